/**
 * A loop device over an 8 MiB backing file, for block-device tests. Needs root and losetup:
 * elsewhere the tests skip with the reason in their name — but never in CI (CI=true), where a
 * missing loop device is a failure, not a skip.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { join } from 'node:path';

export type LoopDevice = { dev: string; file: string; skip?: undefined; detach(): void } | { skip: string; detach(): void };

export function attachLoop(dir: string, size = 8 * 1024 * 1024): LoopDevice {
  const unavailable = (why: string): LoopDevice => {
    if (process.env.CI) throw new Error(`loop device needed in CI: ${why}`);
    return { skip: why, detach: () => undefined };
  };
  if (process.getuid?.() !== 0) return unavailable('not root');
  const file = join(dir, 'loop-backing');
  let dev: string;
  try {
    const fd = openSync(file, 'w+');
    ftruncateSync(fd, size);
    closeSync(fd);
    dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8', stdio: 'pipe' }).trim();
  } catch (err) {
    const stderr = (err as { stderr?: string }).stderr?.trim();
    return unavailable(`losetup failed: ${stderr || (err as Error).message}`);
  }
  let detached = false;
  const detach = () => {
    if (detached) return;
    detached = true;
    execFileSync('losetup', ['-d', dev], { stdio: 'pipe' });
  };
  process.once('exit', () => {
    try {
      detach();
    } catch {
      // best effort; afterAll normally did it
    }
  });
  return { dev, file, detach };
}
