import { afterEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import * as fs from 'node:fs';
import { nbdcopyHash, nbdkit, sha256, type Server } from '../helpers/servers.js';

const root = path.resolve(__dirname, '../..');
let servers: Server[] = [];
afterEach(async () => {
  await Promise.allSettled(servers.map((s) => s.stop()));
  servers = [];
});

describe('examples', () => {
  it('read-export reads a whole export into reused buffers, hashing what nbdcopy hashes', async () => {
    const s = await nbdkit('sparse-random', ['256M', 'percent=20', 'seed=3']);
    servers.push(s);
    const out = execFileSync('node', [path.join(root, 'dist/examples/read-export.js'), s.uri, '262144', '8', '2'], {
      env: { ...process.env, NBDSTREAM_HASH: '1' },
    }).toString();
    expect(out).toMatch(/^268435456 bytes in \d+\.\d{3} s \(\d+ MB\/s\), sha256 [0-9a-f]{64}\n$/);
    expect(out.trim().split(' ').at(-1)).toBe(nbdcopyHash(s.uri));
  });

  it('read-export reports a failure in one line and exits 1', async () => {
    let err: { status: number; stderr: Buffer } | undefined;
    try {
      execFileSync('node', [path.join(root, 'dist/examples/read-export.js'), 'nbd+unix:///?socket=/nonexistent/sock'], { stdio: 'pipe' });
    } catch (e) {
      err = e as typeof err;
    }
    expect(err?.status).toBe(1);
    expect(err?.stderr.toString()).toBe('read-export: cannot connect to socket /nonexistent/sock: ENOENT\n');
  });
});

describe('examples/pipeline', () => {
  it('pipes an ExtentSource through a custom Transform into a Sink, hashing what nbdcopy hashes', async () => {
    const s = await nbdkit('sparse-random', ['128M', 'percent=10', 'seed=5'], { readOnly: true });
    servers.push(s);
    const dir = fs.mkdtempSync('/tmp/nbdstream-example-');
    try {
      const out = path.join(dir, 'out.img');
      const stdout = execFileSync('node', [path.join(root, 'dist/examples/pipeline.js'), s.uri, out]).toString();
      const want = nbdcopyHash(s.uri);
      expect(stdout.split('\n')[0]).toBe(`sha256 ${want}`);
      expect(stdout.split('\n')[1]).toMatch(/^read \d+ written \d+ zeroed 0 skipped \d+$/);
      expect(sha256(fs.readFileSync(out))).toBe(want);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
