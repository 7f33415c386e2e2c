/**
 * nbdstream command line: nbdcopy's syntax and options. Parses, validates, calls copy(), prints
 * progress, -v details and errors (one line, exit 1).
 */
import * as fs from 'node:fs';
import yargs from 'yargs';
import { copy, checkRequestSize, type CopySummary } from '../lib/copy.js';
import { NbdStreamError } from '../lib/errors.js';
import { splitEndpointArgs } from '../lib/endpoints/command.js';
import type { EndpointSpec } from '../lib/endpoints/open.js';
import type { Endpoint } from '../lib/endpoints/endpoint.js';
import { nativeLoadError } from '../lib/native.js';
import { packageVersion } from '../lib/package-info.js';

const pkg = { version: packageVersion() };

function fail(message: string): never {
  process.stderr.write(`nbdstream: ${message}\n`);
  process.exit(1);
}

/** "64K", "1M", "2G" or plain bytes. */
function parseSize(name: string, v: unknown): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(String(v));
  if (!m) fail(`--${name}: expected a size like 262144, 256K or 1M, not "${String(v)}"`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * mult;
}

function parseSeconds(v: unknown): number {
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(String(v)) || n <= 0) fail(`--timeout: expected a number of seconds > 0, not "${String(v)}"`);
  return n;
}

function parseCount(name: string, v: unknown, min: number): number {
  const n = Number(v);
  if (!/^\d+$/.test(String(v)) || n < min) fail(`--${name}: expected an integer ≥ ${min}, not "${String(v)}"`);
  return n;
}

/** yargs' "Unknown arguments: frob-nicate, frobNicate, x" as the user spelled them: "unknown option: --frob-nicate, -x". */
function unknownOptions(list: string, args: string[]): string {
  const end = args.indexOf('--');
  const opts = end < 0 ? args : args.slice(0, end);
  const spelled = new Set<string>();
  for (const n of list.split(', ')) {
    if (n.length === 1) spelled.add(`-${n}`);
    // camel-case aliases yargs adds (frobNicate for --frob-nicate) match nothing and are dropped
    else if (opts.some((a) => a === `--${n}` || a.startsWith(`--${n}=`))) spelled.add(`--${n}`);
  }
  if (!spelled.size) spelled.add(list);
  return `unknown option${spelled.size > 1 ? 's' : ''}: ${[...spelled].join(', ')}`;
}

function capabilityLine(ep: Endpoint): string {
  const c = ep.capabilities;
  const flags = Object.entries(c)
    .filter(([, v]) => typeof v === 'boolean')
    .map(([k, v]) => `${k}=${v ? 1 : 0}`)
    .join(' ');
  return `${ep.name}: size=${ep.size ?? 'unknown'} ${flags} preferredBlockSize=${c.preferredBlockSize} maxRequest=${c.maxRequest}`;
}

async function main(): Promise<void> {
  // "[ CMD ARGS ]" groups are lifted out before option parsing; "-p"/"--progress" take no value
  // unless written as "--progress=FD".
  let groups: Array<string | string[]>;
  try {
    groups = splitEndpointArgs(process.argv.slice(2));
  } catch (err) {
    fail((err as Error).message);
  }
  const commands: string[][] = [];
  const flat = groups.map((g) => {
    if (Array.isArray(g)) {
      commands.push(g);
      return `\u0000cmd${commands.length - 1}`;
    }
    return g === '-p' || g === '--progress' ? '--progress=' : g;
  });

  const argv = await yargs(flat)
    .scriptName('nbdstream')
    .usage(
      'Usage: nbdstream [options] SOURCE DESTINATION\n\n' +
        'Copy a disk image between NBD servers, files, block devices and pipes, reading only data\n' +
        'and turning holes and zeroes into cheap zero requests. SOURCE and DESTINATION are an NBD URI\n' +
        '(nbd://, nbds://, nbd+unix://, nbds+unix://), a file or device, "-" for stdin/stdout,\n' +
        '"null:" (destination only) or "[ CMD ARGS ]" to run an NBD server by socket activation.',
    )
    .parserConfiguration({ 'populate--': false, 'short-option-groups': true, 'camel-case-expansion': true, 'boolean-negation': false })
    .option('allocated', { type: 'boolean', describe: 'Fully allocate the destination (zero with NO_HOLE, no -S detection)' })
    .option('connections', { alias: 'C', type: 'string', describe: 'NBD connections when multi-conn is allowed (default 4)' })
    .option('destination-is-zero', { alias: 'target-is-zero', type: 'boolean', describe: 'Destination already reads as zeroes: send no zero requests' })
    .option('flush', { type: 'boolean', describe: 'Flush the destination at the end' })
    .option('no-extents', { type: 'boolean', describe: 'Ignore extent information and read everything' })
    .option('progress', { type: 'string', describe: 'Progress bar on stderr (-p), or "N/100" lines to FD (--progress=FD)' })
    .option('queue-size', { type: 'string', describe: 'Bytes of requests in flight (default 16M)' })
    .option('request-size', { type: 'string', describe: 'Request size, a power of two 4K-32M (default 256K)' })
    .option('requests', { alias: 'R', type: 'string', describe: 'Requests in flight per connection (default 64)' })
    .option('sparse', { alias: 'S', type: 'string', describe: 'Detect zero blocks of this size (default 4096, 0 = off)' })
    .option('synchronous', { type: 'boolean', describe: 'One request at a time (for debugging)' })
    .option('timeout', { type: 'string', describe: 'Seconds an NBD request may wait for its reply (default: no limit)' })
    .option('retries', { type: 'string', describe: 'Reconnect and resend up to N times after a lost NBD connection (default 0)' })
    .option('threads', { alias: 'T', type: 'string', describe: 'Accepted for nbdcopy compatibility (Node copies on one thread)' })
    .option('verbose', { alias: 'v', type: 'boolean', describe: 'Print endpoints, capabilities and sizes to stderr' })
    .version(`nbdstream ${pkg.version}`)
    .alias('version', 'V')
    .help('help')
    .example('nbdstream nbd://server/disk disk.img', 'copy an NBD export to a sparse file')
    .example('nbdstream disk.img nbd+unix:///?socket=/tmp/sock', 'copy a file to an NBD server over a Unix socket')
    .example('nbdstream -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw', 'convert qcow2 to raw via qemu-nbd')
    .example('nbdstream --target-is-zero disk.img nbd://host/fresh', 'skip zeroing a new target')
    .strictOptions()
    .wrap(Math.min(100, process.stdout.columns || 100))
    .fail((msg, err) => {
      if (err) fail(err.message);
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      fail(unknown ? unknownOptions(unknown[1], flat) : msg.replace(/\n.*/s, ''));
    })
    .parseAsync();

  const positional = (argv._ as Array<string | number>).map(String);
  if (positional.length !== 2) fail(`expected SOURCE and DESTINATION, got ${positional.length} argument${positional.length === 1 ? '' : 's'} (see --help)`);
  const spec = (s: string): EndpointSpec => (s.startsWith('\u0000cmd') ? commands[Number(s.slice(4))] : s);
  const [src, dst] = positional.map(spec);

  const requestSize = argv['request-size'] !== undefined ? parseSize('request-size', argv['request-size']) : 256 * 1024;
  try {
    checkRequestSize(requestSize);
  } catch (err) {
    fail((err as Error).message);
  }
  const verbose = argv.verbose ?? false;
  const progress = argv.progress;
  let progressFd: number | undefined;
  if (progress !== undefined && progress !== '') {
    if (!/^\d+$/.test(progress)) fail(`--progress: expected a file descriptor number, not "${progress}"`);
    progressFd = Number(progress);
  }
  const options = {
    requestSize,
    requests: argv.requests !== undefined ? parseCount('requests', argv.requests, 1) : undefined,
    connections: argv.connections !== undefined ? parseCount('connections', argv.connections, 1) : undefined,
    queueSize: argv['queue-size'] !== undefined ? parseSize('queue-size', argv['queue-size']) : undefined,
    sparse: argv.sparse !== undefined ? parseSize('sparse', argv.sparse) : undefined,
    allocated: argv.allocated,
    destinationIsZero: argv['destination-is-zero'],
    noExtents: argv['no-extents'],
    flush: argv.flush,
    synchronous: argv.synchronous,
    timeout: argv.timeout !== undefined ? parseSeconds(argv.timeout) : undefined,
    retries: argv.retries !== undefined ? parseCount('retries', argv.retries, 0) : undefined,
  };
  if (argv.threads !== undefined) parseCount('threads', argv.threads, 0);
  if (options.sparse !== undefined && options.sparse !== 0 && (options.sparse < 512 || (options.sparse & (options.sparse - 1)) !== 0))
    fail(`--sparse: expected 0 or a power of two ≥ 512, not ${options.sparse}`);

  let lastPercent = -1;
  const report = (percent: number) => {
    if (percent === lastPercent) return;
    lastPercent = percent;
    if (progressFd !== undefined) fs.writeSync(progressFd, `${percent}/100\n`);
    else if (progress !== undefined) {
      const width = 40;
      const filled = Math.round((percent / 100) * width);
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${String(percent).padStart(3)}%`);
    }
  };

  let summary: CopySummary;
  try {
    summary = await copy(src, dst, {
      ...options,
      onProgress: progress !== undefined ? (done, total) => report(total ? Math.min(100, Math.floor((done * 100) / total)) : 0) : undefined,
      onOpen: verbose
        ? (s, d) => {
            process.stderr.write(`nbdstream: source ${capabilityLine(s)}\n`);
            process.stderr.write(`nbdstream: destination ${capabilityLine(d)}\n`);
            if (nativeLoadError) process.stderr.write(`nbdstream: native addon unavailable (${nativeLoadError}): files use dense extents and zero by writing zeroes\n`);
            process.stderr.write(
              `nbdstream: request-size=${requestSize} requests=${options.synchronous ? 1 : options.requests ?? 64} connections=${options.synchronous ? 1 : options.connections ?? 4} queue-size=${options.queueSize ?? 16 << 20} sparse=${options.allocated ? 0 : options.sparse ?? 4096}${options.noExtents ? ' no-extents' : ''}${options.allocated ? ' allocated' : ''}${options.destinationIsZero ? ' destination-is-zero' : ''}\n`,
            );
          }
        : undefined,
    });
  } catch (err) {
    if (progress === '' && lastPercent >= 0) process.stderr.write('\n');
    const e = err instanceof NbdStreamError ? err : new NbdStreamError('ERR_IO', (err as Error)?.message ?? String(err));
    fail(e.describe());
  }
  report(100);
  if (progress === '') process.stderr.write('\n');
  if (verbose) {
    const s = summary;
    process.stderr.write(
      `nbdstream: copied ${s.size} bytes in ${s.elapsed.toFixed(3)} s: read ${s.bytesRead}, written ${s.bytesWritten}, zeroed ${s.bytesZeroed}, skipped ${s.bytesSkipped}; requests read=${s.requests.read} write=${s.requests.write} zero=${s.requests.zero} extents=${s.requests.extents}${s.extentErrors ? `; ${s.extentErrors} extent queries failed (copied as data)` : ''}\n`,
    );
  }
}

/**
 * Subcommands live in their own files (bin/<name>.ts exporting `run(args): Promise<number>`,
 * which resolves with the exit status); anything else is a copy.
 */
const SUBCOMMANDS: Record<string, () => Promise<{ run(args: string[]): Promise<number> }>> = {
  serve: () => import('./serve.js'),
};

const sub = SUBCOMMANDS[process.argv[2]];
(sub ? sub().then((m) => m.run(process.argv.slice(3))) : main().then(() => 0)).then(
  (status) => process.exit(status),
  (err) => fail(err instanceof NbdStreamError ? err.describe() : (err as Error)?.message ?? String(err)),
);
