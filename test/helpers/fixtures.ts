/**
 * Per-test-file fixtures. Each call registers vitest hooks, so call them at a file's top level:
 * servers stopped after each test, and a temporary directory removed after the file.
 */
import { afterAll, afterEach } from 'vitest';
import * as fs from 'node:fs';
import { nbdkit, sha256, tmpDir, type NbdkitOptions, type Server } from './servers.js';

/** Servers stopped after each test: `track` takes any server, `kit` starts nbdkit and tracks it. */
export function serversPerTest(): { track<T extends Server>(s: T): T; kit(plugin: string, args: readonly string[], o?: NbdkitOptions): Promise<Server> } {
  const live: Server[] = [];
  afterEach(async () => {
    await Promise.allSettled(live.splice(0).map((s) => s.stop()));
  });
  const track = <T extends Server>(s: T): T => {
    live.push(s);
    return s;
  };
  return { track, kit: async (plugin, args, o = {}) => track(await nbdkit(plugin, [...args], o)) };
}

/** A temporary directory for this test file, removed after its last test. */
export function dirPerFile(prefix: string): string {
  const dir = tmpDir(prefix);
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** sha256 of a file's bytes. */
export const fileHash = (f: string): string => sha256(fs.readFileSync(f));
/** Allocated bytes of a file (st_blocks × 512). */
export const allocated = (f: string): number => fs.statSync(f).blocks * 512;
