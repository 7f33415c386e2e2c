import { afterEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { nbdcopyHash, nbdkit, type Server } from '../helpers/servers.js';

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
