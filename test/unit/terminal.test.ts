/**
 * What fits a terminal: the -p bar (lib/progress.ts formatBar) and the --help layout, the
 * terminal's width and the "did you mean" of unknown options (bin/usage.ts). Issue 16 item 7.
 */
import { describe, expect, it } from 'vitest';
import { formatBar, type CopyProgress } from '../../lib/progress.js';
import { commandLines, editDistance, formatHelp, nearestOption, terminalWidth, unknownOptions, wrap, type HelpText } from '../../bin/usage.js';

const MiB = 2 ** 20;

function progress(phase: CopyProgress['phase'], rate: number, eta: number | null): CopyProgress {
  return { bytes_done: 0, bytes_total: 100 * MiB, bytes_read: 0, bytes_written: 0, bytes_zeroed: 0, rate, eta_s: eta, phase };
}

describe('formatBar', () => {
  it('is exactly as before at 80 columns: a 40-column bar, the rate and the ETA', () => {
    expect(formatBar(42, progress('copying', 310.2 * MiB, 12), true, 79)).toBe(`[${'#'.repeat(17)}${'.'.repeat(23)}]  42%   310.2 MiB/s  ETA 0:12`);
    expect(formatBar(100, progress('done', 4.5 * MiB, 0), true, 79)).toBe(`[${'#'.repeat(40)}] 100%     4.5 MiB/s  done`);
    expect(formatBar(7, undefined, false, 79)).toBe(`[###${'.'.repeat(37)}]   7%`);
    expect(formatBar(50, progress('verifying', MiB, 3723), true, 79)).toBe(`[${'#'.repeat(19)}${'.'.repeat(18)}]  50%     1.0 MiB/s  ETA 1:02:03  verify`);
  });

  it('shrinks the bar to the width, then leaves out the rate, "verify" and the ETA', () => {
    expect(formatBar(42, progress('copying', 310.2 * MiB, 12), true, 49)).toBe(`[${'#'.repeat(7)}${'.'.repeat(10)}]  42%   310.2 MiB/s  ETA 0:12`);
    expect(formatBar(42, progress('copying', 310.2 * MiB, 12), true, 39)).toBe(`[${'#'.repeat(9)}${'.'.repeat(12)}]  42%  ETA 0:12`);
    expect(formatBar(42, progress('verifying', MiB, 12), true, 39)).toBe(`[${'#'.repeat(5)}${'.'.repeat(8)}]  42%  ETA 0:12   verify`);
    expect(formatBar(42, progress('verifying', MiB, 12), true, 20)).toBe(`[${'#'.repeat(5)}${'.'.repeat(8)}]  42%`);
  });

  it('no line is longer than the width, at 40, 50, 80 and 120 columns, in every phase and state', () => {
    const states: Array<[number, CopyProgress | undefined, boolean]> = [];
    for (const percent of [0, 1, 42, 99, 100])
      for (const p of [
        undefined,
        progress('copying', 0, null),
        progress('copying', 1023.9 * 1024 ** 3, 0.2),
        progress('copying', 5, 359999),
        progress('verifying', 999.9 * MiB, 7),
        progress('verifying', 12, null),
        progress('done', 1023.9 * MiB, 0),
      ])
        for (const detail of [false, true]) states.push([percent, p, detail]);
    for (const width of [40, 50, 80, 120]) {
      const bars = new Set<number>();
      for (const [percent, p, detail] of states) {
        const line = formatBar(percent, p, detail, width - 1);
        expect(line.length, line).toBeLessThanOrEqual(width - 1);
        expect(line).toMatch(new RegExp(`^\\[[#.]{10,40}\\] +${percent}%`));
        if (detail && p && p.phase !== 'verifying' && (p.eta_s ?? 0) < 3600) bars.add(line.indexOf(']'));
      }
      // one bar size while copying (the rate and ETA are padded): it does not jump between redraws
      expect(bars.size).toBe(1);
    }
  });
});

describe('terminalWidth', () => {
  it("a terminal's columns, else $COLUMNS, else 80", () => {
    expect(terminalWidth({ isTTY: true, columns: 50 }, { COLUMNS: '120' })).toBe(50);
    expect(terminalWidth({ isTTY: true, columns: 0 }, { COLUMNS: '120' })).toBe(120); // a pty without a size (script(1) off a terminal)
    expect(terminalWidth({ isTTY: false, columns: 50 }, { COLUMNS: '120' })).toBe(120);
    expect(terminalWidth({}, {})).toBe(80);
    expect(terminalWidth({}, { COLUMNS: 'wide' })).toBe(80);
  });
});

describe('help layout', () => {
  const help: HelpText = {
    usage: ['tool [options] SOURCE DESTINATION', 'tool serve [options] FILE'],
    description: 'Copies things. A "[\u00a0CMD\u00a0ARGS\u00a0]" group stays on one line wherever the text is wrapped to the width.',
    commands: [['serve', 'Serve a file (serve\u00a0--help)']],
    options: {
      'request-size': { type: 'string', value: 'size', describe: 'Request size, a power of two 4K-32M (default 256K)' },
      connections: { alias: 'C', type: 'string', value: 'number', describe: 'NBD connections when multi-conn is allowed (default 4)' },
      'destination-is-zero': { alias: 'target-is-zero', type: 'boolean', describe: 'Destination already reads as zeroes' },
      pipe: { type: 'string', describe: 'raw or extents' },
    },
    examples: [
      ['tool -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw', 'Convert qcow2 to raw'],
      ['tool --pipe=extents nbd://a/disk - | ssh b tool --pipe=extents - disk.img', 'Send only the data'],
    ],
  };

  it('at 80 columns: options beside their descriptions with their kind, examples whole under their description', () => {
    expect(formatHelp(help, 80)).toBe(
      [
        'Usage: tool [options] SOURCE DESTINATION',
        '       tool serve [options] FILE',
        '',
        'Copies things. A "[ CMD ARGS ]" group stays on one line wherever the text is',
        'wrapped to the width.',
        '',
        'Commands:',
        '  serve  Serve a file (serve --help)',
        '',
        'Options:',
        '      --request-size  Request size, a power of two 4K-32M (default 256K)  [size]',
        '  -C, --connections   NBD connections when multi-conn is allowed (default 4)',
        '[number]'.padStart(80),
        '      --destination-is-zero, --target-is-zero',
        '                      Destination already reads as zeroes              [boolean]',
        '      --pipe          raw or extents                                    [string]',
        '',
        'Examples:',
        '  Convert qcow2 to raw:',
        '    tool -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw',
        '  Send only the data:',
        '    tool --pipe=extents nbd://a/disk - | ssh b tool --pipe=extents - disk.img',
        '',
      ].join('\n'),
    );
  });

  it('at 40 columns: options above their descriptions, long commands continued with " \\" between words', () => {
    expect(formatHelp(help, 40)).toBe(
      [
        'Usage: tool [options] SOURCE DESTINATION',
        '       tool serve [options] FILE',
        '',
        'Copies things. A "[ CMD ARGS ]" group',
        'stays on one line wherever the text is',
        'wrapped to the width.',
        '',
        'Commands:',
        '  serve  Serve a file (serve --help)',
        '',
        'Options:',
        '  --request-size  [size]',
        '      Request size, a power of two',
        '      4K-32M (default 256K)',
        '  -C, --connections  [number]',
        '      NBD connections when multi-conn is',
        '      allowed (default 4)',
        '  --destination-is-zero,  [boolean]',
        '  --target-is-zero',
        '      Destination already reads as',
        '      zeroes',
        '  --pipe  [string]',
        '      raw or extents',
        '',
        'Examples:',
        '  Convert qcow2 to raw:',
        '    tool -p -- \\',
        '        [ qemu-nbd -f qcow2 disk.qcow2 \\',
        '        ] out.raw',
        '  Send only the data:',
        '    tool --pipe=extents nbd://a/disk - \\',
        '        | ssh b tool --pipe=extents - \\',
        '        disk.img',
        '',
      ].join('\n'),
    );
  });

  it('commandLines: whole when it fits; else broken between words, rejoined it is the same command', () => {
    const cmd = 'nbdstream --pipe-format=extents nbd://a/disk - | ssh b nbdstream - disk.img';
    expect(commandLines(cmd, 4, 80)).toEqual([`    ${cmd}`]);
    for (const width of [36, 40, 50, 60, 79]) {
      const lines = commandLines(cmd, 4, width);
      for (const l of lines) expect(l.length).toBeLessThanOrEqual(width);
      expect(lines.slice(0, -1).every((l) => l.endsWith(' \\'))).toBe(true);
      expect(lines.map((l) => l.replace(/ \\$/, '').trim()).join(' ')).toBe(cmd);
    }
    // a word longer than the width keeps a line to itself, unbroken
    expect(commandLines('tool nbd+unix:///export?socket=/a/very/long/path/to/sock x', 2, 20)).toEqual(['  tool \\', '      nbd+unix:///export?socket=/a/very/long/path/to/sock \\', '      x']);
  });

  it('wrap: words only, no-break spaces kept together', () => {
    expect(wrap('a bb ccc dddd', 6)).toEqual(['a bb', 'ccc', 'dddd']);
    expect(wrap('x [\u00a0A\u00a0B\u00a0]', 4)).toEqual(['x', '[ A B ]']);
  });
});

describe('did you mean', () => {
  const known = ['connections', 'C', 'request-size', 'requests', 'R', 'verbose', 'verify', 'sparse', 'help', 'version'];

  it('editDistance counts an adjacent swap as one edit', () => {
    expect(editDistance('conections', 'connections')).toBe(1);
    expect(editDistance('verfiy', 'verify')).toBe(1);
    expect(editDistance('spares', 'sparse')).toBe(1);
    expect(editDistance('conectoins', 'connections')).toBe(2);
    expect(editDistance('', 'abc')).toBe(3);
    expect(editDistance('same', 'same')).toBe(0);
  });

  it('nearestOption: a likely typo gets the nearest long name; anything else none', () => {
    expect(nearestOption('conections', known)).toBe('connections');
    expect(nearestOption('request', known)).toBe('requests');
    expect(nearestOption('requestsize', known)).toBe('request-size');
    expect(nearestOption('verfiy', known)).toBe('verify');
    expect(nearestOption('hepl', known)).toBe('help');
    expect(nearestOption('frobnicate', known)).toBeUndefined();
    expect(nearestOption('c', known)).toBeUndefined(); // one-letter names are not suggested
  });

  it('unknownOptions: as the user spelled them, each with its suggestion', () => {
    expect(unknownOptions('conections', ['--conections', 'a', 'b'], known)).toBe('unknown option: --conections (did you mean --connections?)');
    expect(unknownOptions('conections, x, frob-nicate, frobNicate', ['--conections=2', '-x', '--frob-nicate', 'a', 'b'], known)).toBe(
      'unknown options: --conections (did you mean --connections?), -x, --frob-nicate',
    );
  });
});
