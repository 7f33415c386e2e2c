// The package as a user gets it: `npm pack` of the built checkout (what `npm publish` sends),
// installed with `npm i ./nbdstream-*.tgz` into a scratch project (dependencies from the npm
// registry, or npm's cache), then used through the installed `nbdstream` binary, an ES module
// import and the TypeScript types. A tarball install runs the package's install script (the
// native addon, the code cache) but not `prepare`: everything else must be in the tarball.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ROOT } from '../helpers/cli.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const DATA_AT = 1500 * MiB; // the README's example: "hello\n" 1500 MiB into a 2 GiB sparse file

let dir: string;
let project: string;
let installed: string;
let bin: string;
let files: string[];

/** The environment of a user's shell: none of the npm_* variables `npm test` runs us with. */
function userEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k) && k !== 'INIT_CWD'));
  return { ...env, ...extra };
}

function sh(cmd: string, args: string[], o: { cwd?: string; env?: NodeJS.ProcessEnv; timeout?: number } = {}): SpawnSyncReturns<string> {
  const r = spawnSync(cmd, args, { cwd: o.cwd ?? project, env: o.env ?? userEnv(), encoding: 'utf8', timeout: o.timeout ?? 120_000 });
  if (r.error) throw r.error;
  return r;
}

function succeeded(r: SpawnSyncReturns<string>): string {
  expect(r.stderr, r.stdout).not.toMatch(/ERR!/);
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

function sparseImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  fs.writeSync(fd, 'hello\n', DATA_AT % size);
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdstream-package-'));
  project = path.join(dir, 'project');
  fs.mkdirSync(project);
  // dist/ is built (pretest); --ignore-scripts packs it as it is instead of building again
  const packed = JSON.parse(succeeded(sh('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', dir], { cwd: ROOT })));
  files = packed[0].files.map((f: { path: string }) => f.path).sort();
  const tarball = path.join(dir, packed[0].filename);
  fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'scratch', version: '1.0.0', private: true, type: 'module' }));
  // an empty node-gyp directory: Node's headers must come from node's installation, not a cache
  const devdir = path.join(dir, 'node-gyp');
  succeeded(sh('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', tarball], { env: userEnv({ npm_config_devdir: devdir }), timeout: 300_000 }));
  installed = path.join(project, 'node_modules', 'nbdstream');
  bin = path.join(project, 'node_modules', '.bin', 'nbdstream');
}, 360_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('npm package', () => {
  it('packs the runtime files, the sources of the addon and the documents, and nothing else', () => {
    for (const f of ['package.json', 'README.md', 'LICENSE', 'CHANGELOG.md', 'bin/nbdstream', 'dist/bin/launch.cjs', 'dist/nbdstream.cjs', 'dist/nbdstream.lib.mjs', 'dist/lib/index.d.ts', 'dist/man/nbdstream.1', 'native/binding.gyp', 'native/nbdstream_native.c', 'native/socket_reader.c', 'native/socket_reader.h', 'scripts/build-native.mjs', 'scripts/code-cache.mjs']) {
      expect(files).toContain(f);
    }
    const allowed = /^(package\.json|README\.md|LICENSE|CHANGELOG\.md|bin\/nbdstream|dist\/bin\/launch\.cjs|dist\/nbdstream\.(cjs|lib\.mjs)|dist\/lib\/.*\.d\.ts|dist\/man\/nbdstream\.1|native\/(binding\.gyp|[\w-]+\.[ch])|scripts\/(build-native|code-cache)\.mjs)$/;
    expect(files.filter((f) => !allowed.test(f))).toEqual([]);
    // the code cache is made at install, by the node that will run it
    expect(files).not.toContain('dist/nbdstream.cjs.v8cache');
  });

  it('builds the native addon at install and makes a code cache this node accepts', () => {
    expect(fs.existsSync(path.join(installed, 'native/build/Release/nbdstream_native.node'))).toBe(true);
    expect(fs.existsSync(path.join(installed, 'native/build.log'))).toBe(false);
    const r = sh(bin, ['--version'], { env: userEnv({ NBDSTREAM_CODE_CACHE_STATUS: '1' }) });
    expect(r.stderr).toBe('code cache accepted\n');
    expect(succeeded(r)).toBe(`nbdstream ${JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version}\n`);
  });

  it("copies the README's 2 GiB sparse file reading only the data", () => {
    const src = path.join(dir, 'src.img');
    const dst = path.join(dir, 'dst.img');
    sparseImage(src, 2 * GiB);
    const r = sh(bin, ['-v', '--summary=json', src, dst]);
    const summary = JSON.parse(succeeded(r));
    expect(summary).toMatchObject({ size: 2 * GiB, bytes_read: 256 * 1024, bytes_written: 4096, bytes_zeroed: 0, bytes_skipped: 2 * GiB - 4096 });
    expect(summary.requests).toEqual({ read: 1, write: 1, zero: 0, extents: 1 });
    expect(r.stderr).not.toMatch(/native addon/);
    expect(r.stderr).toMatch(/: read 262144, written 4096, zeroed 0, skipped 2147479552; requests read=1 write=1 zero=0 extents=1$/m);
    expect(fs.statSync(dst).size).toBe(2 * GiB);
    expect(fs.statSync(dst).blocks * 512).toBeLessThanOrEqual(64 * 1024);
    const fd = fs.openSync(dst, 'r');
    const back = Buffer.alloc(8);
    fs.readSync(fd, back, 0, 8, DATA_AT - 1);
    fs.closeSync(fd);
    expect(back).toEqual(Buffer.from('\0hello\n\0'));
  });

  it('imports as an ES module', () => {
    const src = path.join(dir, 'lib-src.img');
    sparseImage(src, 2 * GiB);
    fs.writeFileSync(
      path.join(project, 'copy.js'),
      `import { copy, NbdStreamError } from 'nbdstream';\n` +
        `const s = await copy(process.argv[2], process.argv[3]);\n` +
        `console.log(JSON.stringify({ read: s.bytesRead, written: s.bytesWritten, error: typeof NbdStreamError }));\n`,
    );
    const out = succeeded(sh('node', ['copy.js', src, path.join(dir, 'lib-dst.img')]));
    expect(JSON.parse(out)).toEqual({ read: 256 * 1024, written: 4096, error: 'function' });
  });

  it('type-checks a TypeScript user of the package types', () => {
    fs.writeFileSync(
      path.join(project, 'check.ts'),
      `import { copy, NbdStreamError, type CopySummary } from 'nbdstream';\n` +
        `const s: CopySummary = await copy('a.img', 'null:', { sparse: 4096 });\n` +
        `const n: number = s.bytesRead;\n` +
        `// @ts-expect-error: not a field of the summary (types resolved, not any)\n` +
        `s.noSuchField;\n` +
        `// @ts-expect-error: copy takes a source and a destination\n` +
        `await copy('a.img');\n` +
        `if (n < 0) throw new NbdStreamError('ERR_IO', 'never');\n`,
    );
    fs.writeFileSync(
      path.join(project, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true, skipLibCheck: false, types: ['node'], typeRoots: [path.join(ROOT, 'node_modules/@types')] },
        files: ['check.ts'],
      }),
    );
    const r = sh(path.join(ROOT, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.json']);
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it('falls back to JS when the addon cannot be built, and -v says so in one line', () => {
    // npm rebuild runs the install script again; no working C compiler this time
    const r = sh('npm', ['rebuild', '--foreground-scripts', 'nbdstream'], { env: userEnv({ CC: 'false' }) });
    expect(r.status, r.stderr).toBe(0);
    const log = path.join(installed, 'native/build.log');
    expect(r.stdout + r.stderr).toContain(`nbdstream: native addon not built (Error: \`make\` failed with exit code: 2; node-gyp's output: ${log}); using the JS fallback`);
    expect(fs.existsSync(path.join(installed, 'native/build/Release/nbdstream_native.node'))).toBe(false);
    const src = path.join(dir, 'small.img');
    sparseImage(src, 4 * MiB);
    const v = sh(bin, ['-v', src, 'null:']);
    expect(v.status, v.stderr).toBe(0);
    const notes = v.stderr.split('\n').filter((l) => /native/.test(l));
    expect(notes).toEqual([
      `nbdstream: native addon unavailable (not built: no ${path.join(installed, 'native/build/Release/nbdstream_native.node')}; the install's build failed, see ${log}; \`npm rebuild nbdstream\` builds it with a C compiler): files use dense extents and zero by writing zeroes`,
    ]);
    expect(v.stderr).not.toMatch(/Require stack/);
    // the whole file is read: no extents without the addon
    expect(v.stderr).toMatch(/: read 4194304, .* extents=0$/m);
  });
});
