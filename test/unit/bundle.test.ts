/** The built CLI bundle (npm run build) runs inside a vm.Script: see bin/launch.cts. */
import { describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bundle = path.join(root, 'dist/nbdstream.cjs');

describe('CLI bundle', () => {
  it('has no import() expressions (a vm.Script cannot load modules)', () => {
    const src = fs.readFileSync(bundle, 'utf8');
    expect(src.match(/\bimport\s*\(/g) ?? []).toEqual([]);
  });

  it('has a V8 code cache that the launcher accepts, and runs with and without it', () => {
    const cache = `${bundle}.v8cache`;
    expect(fs.statSync(cache).size).toBeGreaterThan(100_000);
    const version = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')).version;
    const r = spawnSync(path.join(root, 'bin/nbdstream'), ['--version'], { env: { ...process.env, NBDSTREAM_CODE_CACHE_STATUS: '1' } });
    expect(r.stderr.toString()).toBe('code cache accepted\n');
    expect(r.stdout.toString().trim()).toBe(`nbdstream ${version}`);
    expect(execFileSync('node', [path.join(root, 'dist/bin/nbdstream.js'), '--version']).toString().trim()).toBe(`nbdstream ${version}`);
  });

  it('does not use a code cache older than the bundle (V8 would take one for any source of the same length)', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdstream-bundle-'));
    try {
      fs.mkdirSync(path.join(dir, 'bin'));
      fs.copyFileSync(path.join(root, 'dist/bin/launch.cjs'), path.join(dir, 'bin/launch.cjs'));
      fs.copyFileSync(bundle, path.join(dir, 'nbdstream.cjs'));
      fs.copyFileSync(`${bundle}.v8cache`, path.join(dir, 'nbdstream.cjs.v8cache'));
      const status = () =>
        spawnSync('node', ['--max-semi-space-size=1', path.join(dir, 'bin/launch.cjs'), '--version'], { env: { ...process.env, NBDSTREAM_CODE_CACHE_STATUS: '1' } }).stderr.toString();
      const t = Date.now() / 1000;
      fs.utimesSync(path.join(dir, 'nbdstream.cjs'), t - 10, t - 10);
      expect(status()).toBe('code cache accepted\n');
      fs.utimesSync(path.join(dir, 'nbdstream.cjs.v8cache'), t - 20, t - 20);
      expect(status()).toBe('code cache missing\n');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('loads no net, TLS, crypto, zlib, child_process, assert or fs/promises module at start-up (lib/builtins.ts)', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdstream-bundle-'));
    try {
      const preload = path.join(dir, 'modules.cjs');
      const list = path.join(dir, 'modules.txt');
      fs.writeFileSync(preload, `process.on('exit', () => require('fs').writeFileSync(${JSON.stringify(list)}, process.moduleLoadList.join('\\n')));`);
      // stdout to a file: on a pipe Node itself makes process.stdout a net.Socket
      const out = fs.openSync(path.join(dir, 'out.txt'), 'w');
      execFileSync('node', ['-r', preload, path.join(root, 'dist/bin/launch.cjs'), '--version'], { stdio: ['ignore', out, 'inherit'] });
      fs.closeSync(out);
      expect(fs.readFileSync(path.join(dir, 'out.txt'), 'utf8')).toMatch(/^nbdstream /);
      const loaded = fs.readFileSync(list, 'utf8').split('\n');
      expect(loaded).toContain('NativeModule vm');
      const lazy = ['net', 'tls', 'crypto', 'zlib', 'child_process', 'assert', 'fs/promises'].map((m) => `NativeModule ${m}`);
      expect(loaded.filter((m) => lazy.includes(m))).toEqual([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
