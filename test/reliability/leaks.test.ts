/**
 * No file descriptor or socket leaks: 1,000 copies in one process (library use), through
 * successes and failures.
 */
import { afterAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copy } from '../../lib/copy.js';
import { nbdkit, tmpDir, type Server } from '../helpers/servers.js';

const fds = () => fs.readdirSync('/proc/self/fd').length;
const handles = () => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length;
const servers: Server[] = [];
const dir = tmpDir();
afterAll(async () => {
  await Promise.allSettled(servers.map((s) => s.stop()));
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('resource leaks', () => {
  it('1,000 copies (NBD → null:, NBD → file, failing copies) leave no fds or handles behind', async () => {
    const src = await nbdkit('sparse-random', ['1M', 'percent=50', 'seed=2'], { readOnly: true });
    const bad = await nbdkit('pattern', ['1M', 'error-pread-rate=1'], { readOnly: true, filters: ['error'] });
    servers.push(src, bad);
    const out = path.join(dir, 'out.img');
    // warm up once so lazily loaded modules and pools exist before counting
    await copy(src.uri, 'null:', { connections: 2 });
    const fd0 = fds();
    const h0 = handles();
    let failures = 0;
    for (let i = 0; i < 1000; i++) {
      if (i % 10 === 9) {
        await copy(bad.uri, out).catch(() => failures++);
      } else if (i % 2) await copy(src.uri, out, { connections: 2 });
      else await copy(src.uri, 'null:', { connections: 2 });
    }
    expect(failures).toBe(100);
    // sockets close asynchronously: give them a moment
    for (let i = 0; i < 50 && (fds() > fd0 || handles() > h0); i++) await new Promise((r) => setTimeout(r, 20));
    expect(fds()).toBe(fd0);
    expect(handles()).toBeLessThanOrEqual(h0);
  }, 180_000);
});
