/**
 * The CLI in a terminal of a given width (issue 16 item 7): --help laid out for $COLUMNS with
 * example commands never cut into pieces that look like commands, the subcommands listed,
 * sizes and counts shown as such; the -p bar one line at every redraw on a 50-column
 * pseudo-terminal; unknown options naming the nearest known one.
 */
import { describe, expect, it } from 'vitest';
import { serversPerTest } from '../helpers/fixtures.js';
import { run, type CliResult } from '../helpers/cli.js';

const MiB = 2 ** 20;
const { kit } = serversPerTest();

function help(args: string[], columns: number): Promise<CliResult> {
  return run(args, { env: { COLUMNS: String(columns) }, timeoutMs: 20_000 });
}

/** Exit 0, nothing on stderr, no line wider than `columns`; the lines. */
function fits(r: CliResult, columns: number): string[] {
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  const lines = r.stdout.toString().split('\n');
  for (const l of lines) expect(l.length, l).toBeLessThanOrEqual(columns);
  return lines;
}

/** The commands of the Examples section, their " \\"-continued lines joined back. */
function exampleCommands(lines: string[]): string[] {
  const cmds: string[] = [];
  let continued = false;
  for (const l of lines.slice(lines.indexOf('Examples:') + 1)) {
    if (!continued && /^ {4}\S/.test(l)) cmds.push(l.trim());
    else if (continued && /^ {8}\S/.test(l)) cmds[cmds.length - 1] += ` ${l.trim()}`;
    else expect(l, 'a description').toMatch(/^( {2}\S.*)?$/);
    continued = l.endsWith(' \\');
    if (continued) cmds[cmds.length - 1] = cmds[cmds.length - 1].slice(0, -2);
  }
  return cmds;
}

const EXAMPLES = [
  'nbdstream nbd://server/disk disk.img',
  'nbdstream disk.img nbd+unix:///?socket=/tmp/sock',
  'nbdstream -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw',
  'nbdstream --target-is-zero disk.img nbd://host/fresh',
  'nbdstream --blkhash --verify disk.img nbd://host/export',
  'nbdstream --pipe-format=extents nbd://a/disk - | ssh b nbdstream - disk.img',
  'nbdstream --dirty-bitmap=b0 nbd://host/disk backup.raw',
  'nbdstream compare a.img nbd://host/export',
];

describe('--help fits the terminal', () => {
  it('at 100 and 80 columns every example command is one whole line under its description', async () => {
    for (const columns of [100, 80]) {
      const lines = fits(await help(['--help'], columns), columns);
      const ex = lines.slice(lines.indexOf('Examples:') + 1).filter(Boolean);
      expect(ex.filter((l) => l.startsWith('    '))).toEqual(EXAMPLES.map((c) => `    ${c}`));
      expect(ex.filter((l) => !l.startsWith('    ')).every((l) => /^ {2}[A-Z].*:$/.test(l))).toBe(true);
    }
  });

  it('at 50 and 40 columns a long command is continued with " \\" between its words, never cut inside one', async () => {
    for (const columns of [50, 40]) {
      const lines = fits(await help(['--help'], columns), columns);
      expect(exampleCommands(lines)).toEqual(EXAMPLES);
      expect(lines).toContain('    nbdstream nbd://server/disk disk.img');
    }
  });

  it('lists serve and compare, one line each at 80 columns, and shows sizes and counts as [size] and [number]', async () => {
    const lines = fits(await help(['--help'], 100), 100);
    expect(lines.slice(0, 3)).toEqual(['Usage: nbdstream [options] SOURCE DESTINATION', '       nbdstream serve [options] FILE|DEVICE|memory:', '       nbdstream compare [options] A B']);
    const at80 = fits(await help(['--help'], 80), 80);
    const commands = at80.slice(at80.indexOf('Commands:'), at80.indexOf('Options:'));
    expect(commands).toEqual([
      'Commands:',
      '  serve    Export a file, device or memory image over NBD (serve --help)',
      '  compare  Compare two images, as qemu-img compare (compare --help)',
      '',
    ]);
    // each option's entry (its flags line and description) ends with the kind of its value
    const entries = new Map<string, string>();
    let flags = '';
    for (const l of lines.slice(lines.indexOf('Options:') + 1, lines.indexOf('Examples:') - 1)) {
      const m = /^ {2}(-\w, --[\w-]+|    --[\w-]+(, --[\w-]+)?)( |$)/.exec(l);
      if (m) flags = m[1].trim();
      entries.set(flags, `${entries.get(flags) ?? ''} ${l.trim()}`.trim());
    }
    const kinds = Object.fromEntries([...entries].map(([f, e]) => [f, /\[(\w+)\]$/.exec(e)?.[1]]));
    expect(kinds).toEqual({
      '--blkhash': 'string',
      '--blkhash-file': 'string',
      '--allocated': 'boolean',
      '-C, --connections': 'number',
      '--destination-is-zero, --target-is-zero': 'boolean',
      '--flush': 'boolean',
      '--format': 'string',
      '--target-format': 'string',
      '--no-extents': 'boolean',
      '--pipe-format': 'string',
      '--dirty-bitmap': 'string',
      '-p, --progress': 'string',
      '--queue-size': 'size',
      '--request-size': 'size',
      '--resume': 'string',
      '-R, --requests': 'number',
      '-S, --sparse': 'size',
      '--summary': 'string',
      '--synchronous': 'boolean',
      '--timeout': 'number',
      '--retries': 'number',
      '-T, --threads': 'number',
      '-v, --verbose': 'boolean',
      '--verify': 'boolean',
      '-V, --version': 'boolean',
      '--help': 'boolean',
    });
  });

  it('serve --help and compare --help too', async () => {
    for (const columns of [50, 100]) {
      const serve = fits(await help(['serve', '--help'], columns), columns).join('\n');
      expect(serve).toMatch(/^Usage: nbdstream serve \[options\]/);
      expect(serve).toMatch(/-p, --port[^[]*\[number\]/);
      expect(serve).toMatch(/--size[^[]*\[size\]/);
      const compare = fits(await help(['compare', '--help'], columns), columns).join('\n');
      expect(compare).toMatch(/^Usage: nbdstream compare \[options\] A B/);
      expect(compare).toMatch(/--request-size[^[]*\[size\]/);
      expect(compare).toMatch(/-R, --requests[^[]*\[number\]/);
    }
  });
});

describe('unknown options name the nearest known one', () => {
  const cases: Array<[string[], string, number]> = [
    [['--conections', '2', 'a', 'b'], 'nbdstream: unknown option: --conections (did you mean --connections?)\n', 1],
    [['--conections=2', '--frobnicate', '-z', 'a', 'b'], 'nbdstream: unknown options: --conections (did you mean --connections?), --frobnicate, -z\n', 1],
    [['--verfiy', 'a', 'b'], 'nbdstream: unknown option: --verfiy (did you mean --verify?)\n', 1],
    [['--progres', 'a', 'b'], 'nbdstream: unknown option: --progres (did you mean --progress?)\n', 1],
    [['--target-is-zer', 'a', 'b'], 'nbdstream: unknown option: --target-is-zer (did you mean --target-is-zero?)\n', 1],
    [['serve', '--prot', '10809', 'x.img'], 'nbdstream serve: unknown option: --prot (did you mean --port?)\n', 1],
    [['compare', '--stirct', 'a', 'b'], 'nbdstream: unknown option: --stirct (did you mean --strict?)\n', 2],
  ];
  it.concurrent.each(cases)('%j', async (args, message, status) => {
    const r = await run(args, { timeoutMs: 20_000 });
    expect(r.stderr).toBe(message);
    expect(r.status).toBe(status);
    expect(r.stdout.length).toBe(0);
  });
});

describe('-p fits the terminal', () => {
  it('on a 50-column pseudo-terminal every redraw is one line of at most 49 columns', async () => {
    const slow = await kit('pattern', [`${16 * MiB}`, 'rdelay=100ms'], { readOnly: true, filters: ['delay'] });
    // script(1) gives the CLI a pseudo-terminal; stty sets its width
    const t = await run([], { shell: `script -qec 'stty cols 50 rows 20; "$NBDSTREAM" --synchronous -p ${slow.uri} null:' /dev/null`, timeoutMs: 30_000 });
    expect(t.status).toBe(0);
    const screen = t.stdout.toString();
    expect(screen.endsWith('\r\n')).toBe(true);
    expect(screen.slice(0, -2)).not.toMatch(/\n/); // no redraw wrapped onto another line
    const draws = screen.slice(0, -2).split('\r').filter(Boolean).map((d) => d.replace(/\x1b\[K$/, ''));
    expect(draws.length).toBeGreaterThan(2);
    for (const d of draws) expect(d.length, d).toBeLessThanOrEqual(49);
    expect(draws.some((d) => /^\[#*\.+\] +\d+% +[\d.]+ (B|KiB|MiB)\/s  ETA \d+:\d\d$/.test(d))).toBe(true);
    expect(draws[draws.length - 1]).toMatch(/^\[#{17}\] 100% +[\d.]+ (B|KiB|MiB)\/s  done$/);
  });

  it('off a terminal the bar follows $COLUMNS', async () => {
    const s = await kit('pattern', [`${4 * MiB}`], { readOnly: true });
    const r = await run(['-p', s.uri, 'null:'], { env: { COLUMNS: '40' }, timeoutMs: 20_000 });
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/^(\r\[[#.]{32}\] +\d+%)+\n$/);
    expect(r.stderr).toMatch(/\r\[#{32}\] 100%\n$/);
  });
});
