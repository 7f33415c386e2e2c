// The man page nbdstream(1), built by `npm run build` (npm run man) from docs/nbdstream.1.md,
// documents every option that --help lists, for the copy and for each subcommand.
import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ok, ROOT, run } from '../helpers/cli.js';

const MAN = path.join(ROOT, 'dist/man/nbdstream.1');

/** One section (.SH) of the man page as text: roff escapes of dashes and font changes removed. */
function manSection(name: string): string {
  const roff = fs.readFileSync(MAN, 'utf8');
  const start = roff.search(new RegExp(`^\\.SH "?${name}"?$`, 'm'));
  expect(start).toBeGreaterThanOrEqual(0);
  const end = roff.slice(start + 1).search(/^\.SH /m);
  return roff.slice(start, end < 0 ? undefined : start + 1 + end).replace(/\\-/g, '-').replace(/\\f[BIRP]/g, '');
}

/** Every option named in the Options section of a --help output (`-C`, `--connections`, ...). */
function helpOptions(help: string): string[] {
  const section = help.slice(help.indexOf('\nOptions:\n'));
  const end = section.search(/\n\n\S/);
  const lines = (end < 0 ? section : section.slice(0, end)).split('\n').slice(2);
  const names = new Set<string>();
  for (const line of lines) {
    // the option column: "  -C, --connections", "      --destination-is-zero, --target-is-zero"
    const column = line.match(/^\s+((?:-{1,2}[A-Za-z][\w-]*(?:, )?)+)/);
    for (const name of column?.[1].split(', ') ?? []) names.add(name.trim());
  }
  return [...names];
}

/** True when `text` names `option` on its own (`--sparse` is not found in `--sparse-x`). */
function mentions(text: string, option: string): boolean {
  return new RegExp(`(?<![\\w-])${option}(?![\\w-])`).test(text);
}

describe('man page nbdstream(1)', () => {
  it('is a section-1 page built from docs/nbdstream.1.md', () => {
    const roff = fs.readFileSync(MAN, 'utf8');
    const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version;
    expect(roff.split('\n')[0]).toMatch(new RegExp(`^\\.TH "NBDSTREAM" "1" "[^"]+" "${version.replace(/\./g, '\\.')}"`));
    for (const section of ['NAME', 'SYNOPSIS', 'DESCRIPTION', 'OPTIONS', 'SERVE', 'COMPARE', 'EXIT STATUS', 'ENVIRONMENT']) {
      expect(roff).toMatch(new RegExp(`^\\.SH "?${section}"?$`, 'm'));
    }
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
    expect(pkg.man).toEqual(['./dist/man/nbdstream.1']);
  });

  for (const [command, section] of [[[], 'OPTIONS'], [['serve'], 'SERVE'], [['compare'], 'COMPARE']] as const) {
    const name = ['nbdstream', ...command].join(' ');
    it(`mentions every option of \`${name} --help\` in ${section}`, async () => {
      const options = helpOptions(ok(await run([...command, '--help'])));
      expect(options).toContain('--help');
      expect(options.length).toBeGreaterThan(command.length ? 5 : 20);
      const text = manSection(section);
      // --help itself is described once, for the copy
      expect(options.filter((o) => !mentions(text, o) && !(o === '--help' && command.length))).toEqual([]);
    });
  }
});
