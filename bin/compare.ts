/**
 * nbdstream compare [options] A B — are two images the same? qemu-img compare's exit codes and
 * messages (on stdout):
 *
 *   0  "Images are identical."
 *   1  "Content mismatch at offset N!"      (N: the first differing byte)
 *      "Strict mode: Image size mismatch!"  (--strict, sizes differ)
 *   2  an error: one line "nbdstream: ..." on stderr
 *
 * Without --strict, images of different sizes are equal when the common part is and the extra
 * part of the larger reads as zeroes ("Warning: Image size mismatch!" is printed first).
 */
import yargs from 'yargs';
import { compare } from '../lib/compare.js';
import { parseSize as parseSizeText } from '../lib/size.js';
import { cliMessage } from './messages.js';
import { splitEndpointArgs } from '../lib/endpoints/command.js';
import type { EndpointSpec } from '../lib/endpoints/open.js';
import { formatHelp, helpWidth, optionNames, unknownOptions, wantsHelp, type HelpText } from './usage.js';

const EXIT_ERROR = 2;

function fail(message: string): never {
  process.stderr.write(`nbdstream: ${message}\n`);
  process.exit(EXIT_ERROR);
}

function parseSize(name: string, v: unknown): number {
  try {
    return parseSizeText(String(v), `--${name}`);
  } catch (err) {
    fail((err as Error).message);
  }
}

function parseCount(name: string, v: unknown): number {
  if (!/^\d+$/.test(String(v)) || Number(v) < 1) fail(`--${name}: expected an integer ≥ 1, not "${String(v)}"`);
  return Number(v);
}

/** The options (yargs' .options() map; `value` is how --help shows the value). */
const OPTIONS = {
  strict: { alias: 's', type: 'boolean', describe: 'Images of different sizes differ (otherwise the extra part must read as zeroes)' },
  quiet: { alias: 'q', type: 'boolean', describe: 'Print nothing; only the exit status tells' },
  'no-extents': { type: 'boolean', describe: 'Ignore extent information and read everything' },
  connections: { alias: 'C', type: 'string', value: 'number', describe: 'NBD connections per image when multi-conn is allowed (default 4)' },
  'request-size': { type: 'string', value: 'size', describe: 'Read size, a power of two 4K-32M (default 256K)' },
  requests: { alias: 'R', type: 'string', value: 'number', describe: 'Reads in flight per image (default 64)' },
} as const;

const HELP: HelpText = {
  usage: ['nbdstream compare [options] A B'],
  description:
    'Compare two images (any endpoints nbdstream copies: NBD URIs, files, devices, "-", "[\u00a0CMD\u00a0ARGS\u00a0]"). ' +
    'Ranges that both report as zero are not read. Exit status: 0 identical, 1 different (the first differing offset is printed), 2 error — as qemu-img compare.',
  options: { ...OPTIONS, help: { type: 'boolean', describe: 'Show this help' } },
};

export async function run(args: string[]): Promise<number> {
  let groups: Array<string | string[]>;
  try {
    groups = splitEndpointArgs(args);
  } catch (err) {
    fail((err as Error).message);
  }
  const commands: string[][] = [];
  const flat = groups.map((g) => {
    if (!Array.isArray(g)) return g;
    commands.push(g);
    return `\u0000cmd${commands.length - 1}`;
  });

  if (wantsHelp(flat)) {
    process.stdout.write(formatHelp(HELP, helpWidth()));
    return 0;
  }
  const argv = await yargs(flat)
    .scriptName('nbdstream compare')
    .parserConfiguration({ 'populate--': false, 'short-option-groups': true, 'camel-case-expansion': true, 'boolean-negation': false })
    .options(OPTIONS)
    .version(false)
    .help(false)
    .strictOptions()
    .fail((msg, err) => {
      if (err) fail(err.message);
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      fail(unknown ? unknownOptions(unknown[1], flat, optionNames(OPTIONS)) : msg.replace(/\n.*/s, ''));
    })
    .parseAsync();

  const positional = (argv._ as Array<string | number>).map(String);
  if (positional.length !== 2) fail(`compare: expected two images A and B, got ${positional.length} argument${positional.length === 1 ? '' : 's'} (see compare --help)`);
  const spec = (s: string): EndpointSpec => (s.startsWith('\u0000cmd') ? commands[Number(s.slice(4))] : s);
  const [a, b] = positional.map(spec);
  const requestSize = argv['request-size'] !== undefined ? parseSize('request-size', argv['request-size']) : undefined;
  if (requestSize !== undefined && (requestSize < 4096 || requestSize > 32 * 1024 * 1024 || (requestSize & (requestSize - 1)) !== 0))
    fail(`--request-size must be a power of two between 4096 and 33554432, not ${requestSize}`);
  const strict = argv.strict ?? false;
  const say = (line: string) => {
    if (!argv.quiet) process.stdout.write(line + '\n');
  };

  let r;
  try {
    r = await compare(a, b, {
      strict,
      noExtents: argv['no-extents'],
      requestSize,
      requests: argv.requests !== undefined ? parseCount('requests', argv.requests) : undefined,
      connections: argv.connections !== undefined ? parseCount('connections', argv.connections) : undefined,
    });
  } catch (err) {
    fail(cliMessage(err));
  }
  if (r.difference === 'size') {
    say('Strict mode: Image size mismatch!');
    return 1;
  }
  if (r.sizeMismatch) say('Warning: Image size mismatch!');
  if (r.difference === 'content') {
    say(`Content mismatch at offset ${r.offset}!`);
    return 1;
  }
  say('Images are identical.');
  return 0;
}
