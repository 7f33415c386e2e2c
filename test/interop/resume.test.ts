/**
 * --resume through the CLI against real nbdkit servers: a copy killed with SIGKILL at about half
 * way (a delay filter makes each work range take a second) and run again copies only the work
 * ranges the state file does not record, ignores a torn last record, gives the same blkhash as a
 * plain copy with --verify, and refuses a state file for another source or destination.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI, ok, run, type CliResult } from '../helpers/cli.js';
import { dirPerFile, serversPerTest } from '../helpers/fixtures.js';
import { decodeState } from '../../lib/resume.js';

const KiB = 1024;
const WR = 128 * 1024 * 1024;
const RANGES = 8;
const SIZE = RANGES * WR;
const { kit } = serversPerTest();
const dir = dirPerFile('nbdstream-resume-');

/** Work ranges the state file records as done. */
function recorded(file: string): number {
  let content = '';
  try {
    content = fs.readFileSync(file, 'utf8');
  } catch {
    return 0;
  }
  return decodeState(content).done.reduce((n, r) => n + Math.ceil(r.length / WR), 0);
}

/** Run nbdstream ARGS and kill it with SIGKILL once `state` records at least `ranges` work ranges. */
async function killAfter(args: string[], state: string, ranges: number): Promise<number> {
  const p = spawn(CLI, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  p.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => p.on('exit', () => resolve()));
  const until = Date.now() + 60_000;
  while (recorded(state) < ranges) {
    if (p.exitCode !== null) throw new Error(`nbdstream exited (${p.exitCode}) before it was killed: ${stderr}`);
    if (Date.now() > until) throw new Error('timed out waiting for the state file');
    await new Promise((r) => setTimeout(r, 50));
  }
  p.kill('SIGKILL');
  await exited;
  expect(p.signalCode).toBe('SIGKILL');
  return recorded(state);
}

/** Exit 1, nothing on stdout, stderr exactly one line "nbdstream: MESSAGE". */
function fails(r: CliResult, message: string): void {
  expect(r.stderr).toBe(`nbdstream: ${message}\n`);
  expect(r.status).toBe(1);
  expect(r.stdout.toString()).toBe('');
}

describe('--resume', () => {
  it('after kill -9 at half way, reruns only the rest (a torn last record ignored), with the blkhash of a plain copy and --verify', async () => {
    // 5 bytes of data 64 KiB into each work range: each range is one 256 KiB read, delayed 1 s
    const data = Array.from({ length: RANGES }, (_, r) => `@${r * WR + 64 * KiB} ${r + 1} 2 3 4 5`).join(' ');
    const src = await kit('data', [`data=${data}`, `size=${SIZE}`, 'rdelay=1'], { filters: ['delay'] });
    const out = path.join(dir, 'a.img');
    const state = path.join(dir, 'a.state');
    const k = await killAfter(['-R', '1', '-C', '1', `--resume=${state}`, src.uri, out], state, RANGES / 2);
    expect(k).toBeGreaterThanOrEqual(RANGES / 2);
    expect(k).toBeLessThan(RANGES);
    fs.appendFileSync(state, `done ${k * WR} 1342`); // a torn last record

    const r = await run(['-R', '1', '-C', '1', `--resume=${state}`, '--blkhash', '--verify', '--summary=json', src.uri, out], { timeoutMs: 60_000 });
    const [digest, json] = ok(r).trim().split('\n');
    const summary = JSON.parse(json);
    expect(summary.bytes_read).toBe((RANGES - k) * 256 * KiB);
    expect(summary.bytes_resumed).toBe(k * WR);
    expect(summary.verified).toBe(true);
    expect(fs.existsSync(state)).toBe(false);

    // the same digest as a copy that was never interrupted; the target is the source
    const plain = ok(await run(['--blkhash', src.uri, 'null:'], { timeoutMs: 60_000 })).trim();
    expect(digest).toBe(plain);
    expect(summary.blkhash.digest).toBe(plain);
    expect(ok(await run(['--blkhash', out, 'null:'])).trim()).toBe(plain);
    expect(ok(await run(['compare', src.uri, out], { timeoutMs: 60_000 }))).toBe('Images are identical.\n');
  }, 90_000);

  it('records what was written when the source server goes away, and the rerun against a new server copies the rest', async () => {
    const ranges = 4;
    const data = Array.from({ length: ranges }, (_, r) => `@${r * WR + 64 * KiB} ${r + 1} 2 3 4 5`).join(' ');
    const args = [`data=${data}`, `size=${ranges * WR}`];
    const slow = await kit('data', [...args, 'rdelay=1'], { filters: ['delay'] });
    const out = path.join(dir, 'c.img');
    const state = path.join(dir, 'c.state');
    const copying = run(['-R', '1', '-C', '1', `--resume=${state}`, slow.uri, out], { timeoutMs: 60_000 });
    const until = Date.now() + 30_000;
    while (recorded(state) < 1 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    const before = recorded(state);
    expect(before).toBeGreaterThanOrEqual(1);
    slow.proc!.kill('SIGKILL');
    const r = await copying;
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^nbdstream: [^\n]+\n$/);
    // the ranges written before the failure were flushed and recorded on the way out
    const k = recorded(state);
    expect(k).toBeGreaterThanOrEqual(before);
    expect(k).toBeLessThan(ranges);

    // the server back on the same socket (the same URI), without the delay
    fs.rmSync(slow.socket, { force: true });
    const pidFile = path.join(dir, 'c.pid');
    const again = spawn('nbdkit', ['-f', '-U', slow.socket, '-P', pidFile, 'data', ...args], { stdio: 'ignore' });
    try {
      while (!fs.existsSync(pidFile) || fs.readFileSync(pidFile, 'utf8') === '') await new Promise((r) => setTimeout(r, 20));
      const summary = JSON.parse(ok(await run([`--resume=${state}`, '--summary=json', slow.uri, out])));
      expect(summary.bytes_read).toBe((ranges - k) * 256 * KiB);
      expect(ok(await run(['compare', slow.uri, out]))).toBe('Images are identical.\n');
    } finally {
      again.kill('SIGTERM');
    }
  }, 60_000);

  it('refuses a state file for another destination, source size or source mtime, then resumes once the source is back', async () => {
    const src = path.join(dir, 'b.img');
    const fd = fs.openSync(src, 'w');
    for (let r = 0; r < RANGES; r++) fs.writeSync(fd, randomBytes(4 * KiB), 0, 4 * KiB, r * WR + 64 * KiB);
    fs.ftruncateSync(fd, SIZE);
    fs.closeSync(fd);
    // each range is one 4 KiB write, delayed 1 s
    const dst = await kit('memory', [`${SIZE}`, 'delay-write=1'], { filters: ['delay'] });
    const state = path.join(dir, 'b.state');
    const k = await killAfter(['-R', '1', '-C', '1', `--resume=${state}`, src, dst.uri], state, 2);
    const saved = fs.readFileSync(state, 'utf8');
    const header = decodeState(saved).header!;
    expect(header).toMatchObject({ source: src, sourceSize: SIZE, target: dst.uri, targetSize: SIZE });
    const stat = fs.statSync(src, { bigint: true });
    expect(header.sourceId).toBe(`file ${stat.dev}:${stat.ino}`);
    expect(header.sourceMtime).toBe(stat.mtimeNs.toString());

    const again = (target = dst.uri) => run(['-R', '1', '-C', '1', `--resume=${state}`, '--summary=json', src, target], { timeoutMs: 60_000 });
    const refused = (what: string, now: string | number, was: string | number) =>
      `${state}: --resume: not resuming: the ${what} is ${now}, the state file says ${was} (delete the state file to copy everything again)`;
    fails(await again('null:'), refused("destination's name", 'null:', dst.uri));
    fs.truncateSync(src, SIZE + 4096);
    fails(await again(), refused("source's size", SIZE + 4096, SIZE));
    fs.truncateSync(src, SIZE);
    const mtime = fs.statSync(src, { bigint: true }).mtimeNs;
    expect(mtime).not.toBe(stat.mtimeNs);
    fails(await again(), refused("source's mtime (ns)", mtime.toString(), stat.mtimeNs.toString()));
    expect(fs.readFileSync(state, 'utf8')).toBe(saved);

    // the same file with its old mtime: resumed
    const ns = stat.mtimeNs;
    execFileSync('touch', ['-m', '-d', `@${ns / 1_000_000_000n}.${(ns % 1_000_000_000n).toString().padStart(9, '0')}`, src]);
    const summary = JSON.parse(ok(await again()));
    expect(summary.bytes_resumed).toBe(k * WR);
    expect(summary.bytes_read).toBe((RANGES - k) * 256 * KiB);
    expect(fs.existsSync(state)).toBe(false);
    expect(ok(await run(['compare', src, dst.uri], { timeoutMs: 60_000 }))).toBe('Images are identical.\n');
  }, 90_000);
});
