/**
 * `nbdstream serve` as a process among others, as nbdkit behaves: it leaves the descriptors it
 * shares (stdout on a pipe) in the mode it found them, and a socket-activated serve (or one
 * with --exit-with-parent) exits when its parent does.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sha256, tmpDir } from '../helpers/servers.js';
import { CLI } from '../helpers/cli.js';

const MiB = 1024 * 1024;
const dir = tmpDir('nbdstream-serve-process-');
// 32 MiB of data: more than a pipe holds, so nbdcopy's writes to it wait for sha256sum
const img = path.join(dir, 'src.img');
const bytes = randomBytes(32 * MiB);
fs.writeFileSync(img, bytes);

let started: number[] = [];
afterEach(() => {
  for (const pid of started) if (alive(pid)) process.kill(pid, 'SIGKILL');
  started = [];
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function sh(script: string, env: Record<string, string> = {}): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('sh', ['-c', script], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NBDSTREAM: CLI, ...env } });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d));
    p.stderr.on('data', (d: Buffer) => (stderr += d));
    p.on('error', reject);
    p.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

/** A process that exists and is not a zombie (this sandbox's init may be slow to reap). */
function alive(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Pids of live processes whose command line contains `needle`. */
function processesWith(needle: string): number[] {
  return fs
    .readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        return fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').includes(needle);
      } catch {
        return false;
      }
    })
    .map(Number)
    .filter(alive);
}

async function gone(pids: () => number[], ms = 5000): Promise<number[]> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(50)) if (pids().length === 0) return [];
  return pids();
}

describe('nbdstream serve shares its stdout', () => {
  it('leaves an inherited stdout pipe blocking: nbdcopy writing to the same pipe gets every byte', async () => {
    const sock = path.join(dir, 'shared.sock');
    const r = await sh(
      `( "$NBDSTREAM" serve -r --socket ${sock} ${img} & while [ ! -S ${sock} ]; do sleep 0.05; done; nbdcopy 'nbd+unix:///?socket=${sock}' -; kill $! ) | sha256sum`,
    );
    expect(r.stderr).toBe('');
    expect(r.stdout.split(' ')[0]).toBe(sha256(bytes));
  });
});

describe('nbdstream serve exits with its parent', () => {
  for (const [what, env] of [
    ['prctl(PR_SET_PDEATHSIG) from the addon', {}],
    ['process.ppid polled without the addon', { NBDSTREAM_NATIVE: '0' }],
  ] as const) {
    it(`--exit-with-parent: ${what}; it exits cleanly (its socket removed)`, async () => {
      const sock = path.join(dir, `parent-${env.NBDSTREAM_NATIVE ?? 1}.sock`);
      // the parent shell waits for serve to listen, then execs `sleep 1` and so dies a second later
      const r = await sh(
        `"$NBDSTREAM" serve --exit-with-parent -r --socket ${sock} ${img} >/dev/null 2>&1 & echo $!
         i=0; while [ ! -S ${sock} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
         [ -S ${sock} ] || exit 3
         exec sleep 1`,
        env,
      );
      const pid = Number(r.stdout);
      started.push(pid);
      expect(r.status).toBe(0);
      expect(await gone(() => (alive(pid) ? [pid] : []))).toEqual([]);
      expect(fs.existsSync(sock)).toBe(false);
    });
  }

  it('under socket activation: nbdcopy failing on its destination leaves no serve behind', async () => {
    const mine = path.join(dir, 'activated-src.img'); // names the processes to look for
    fs.copyFileSync(img, mine);
    // output to a file: a serve left behind would hold a pipe open
    const err = path.join(dir, 'nbdcopy.err');
    const r = await sh(`nbdcopy -- [ "$NBDSTREAM" serve -r ${mine} ] ${dir}/no-such-dir/out.img >/dev/null 2>${err}; echo $?`);
    expect(r.stdout).toBe('1\n');
    expect(fs.readFileSync(err, 'utf8')).toMatch(/no-such-dir\/out\.img: No such file or directory/);
    const left = await gone(() => processesWith(mine));
    started.push(...left);
    expect(left).toEqual([]);
  });
});
