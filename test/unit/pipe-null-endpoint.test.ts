// Pipe endpoint against real FIFOs, child processes and character devices; null endpoint counts.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, open as openCb, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { NbdStreamError } from '../../lib/errors.js';
import { openNull } from '../../lib/endpoints/null.js';
import { openPipe, type PipeSource } from '../../lib/endpoints/pipe.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const openFd = promisify(openCb);

const dir = mkdtempSync(join(tmpdir(), 'nbdstream-pipe-ep-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let fifoCount = 0;
function mkfifo(): string {
  const path = join(dir, `fifo-${fifoCount++}`);
  execFileSync('mkfifo', [path]);
  return path;
}

function exited(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

function collect(child: ChildProcess): Promise<string> {
  let out = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (s: string) => (out += s));
  return new Promise((resolve) => child.stdout!.once('end', () => resolve(out)));
}

async function rejection(p: Promise<unknown>): Promise<NbdStreamError> {
  let caught: unknown;
  try {
    await p;
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(NbdStreamError);
  expect((caught as Error).message).not.toMatch(/\n/);
  return caught as NbdStreamError;
}

/** Read `ep` to EOF with varying request sizes; the last read is the only short one. */
async function readAll(ep: PipeSource): Promise<Buffer> {
  const sizes = [65536, 100_000, 1 * MiB, 7, 256 * KiB + 1];
  const parts: Buffer[] = [];
  let offset = 0;
  for (let i = 0; ; i++) {
    const want = sizes[i % sizes.length];
    const { data } = await ep.read(offset, want);
    parts.push(Buffer.from(data));
    offset += data.length;
    if (data.length < want) break;
  }
  // At and past EOF: empty (at the real EOF and where the short read asked up to).
  expect((await ep.read(offset, 10)).data.length).toBe(0);
  expect((await ep.read(offset + 10, 10)).data.length).toBe(0);
  await expect(ep.read(offset - 1, 1)).rejects.toMatchObject({ code: 'ERR_USAGE' });
  return Buffer.concat(parts);
}

describe('pipe source', () => {
  it('reads a FIFO (by fd) sequentially to EOF, byte-exact', async () => {
    const fifo = mkfifo();
    const copy = join(dir, 'fifo-copy');
    const child = spawn('sh', ['-c', 'head -c 3000000 /dev/urandom | tee "$1" > "$2"', 'sh', copy, fifo], { stdio: 'ignore' });
    const fd = await openFd(fifo, 'r'); // blocks (in the thread pool) until the writer opens it
    const ep = await openPipe(fd, fifo, 'source');
    expect(ep.size).toBeUndefined();
    expect(ep.capabilities).toMatchObject({ seekable: false, canExtents: false, canZero: false, readOnly: true, isZeroInitialised: false });
    const got = await readAll(ep);
    expect(await exited(child)).toBe(0);
    expect(got.length).toBe(3_000_000);
    expect(got.equals(readFileSync(copy))).toBe(true);
    await ep.close();
    await ep.close();
  });

  it('reads a child process stdout stream; in-order reads may be in flight together', async () => {
    const copy = join(dir, 'stream-copy');
    const child = spawn('sh', ['-c', 'head -c 3000000 /dev/urandom | tee "$1"', 'sh', copy], { stdio: ['ignore', 'pipe', 'inherit'] });
    const ep = await openPipe(child.stdout!, 'child', 'source');
    const reads = [];
    for (let off = 0; off < 3_500_000; off += 500_000) reads.push(ep.read(off, 500_000));
    const results = await Promise.all(reads);
    expect(results.map((r) => r.data.length)).toEqual([500_000, 500_000, 500_000, 500_000, 500_000, 500_000, 0]);
    expect(await exited(child)).toBe(0);
    expect(Buffer.concat(results.map((r) => r.data)).equals(readFileSync(copy))).toBe(true);
    await ep.close();
  });

  it('reads into a given buffer', async () => {
    const child = spawn('sh', ['-c', 'printf hello-world'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const ep = await openPipe(child.stdout!, 'child', 'source');
    const into = Buffer.alloc(64, 0xff);
    const { data } = await ep.read(0, 5, into);
    expect(data.buffer).toBe(into.buffer);
    expect(data.toString()).toBe('hello');
    const rest = await ep.read(5, 50, into);
    expect(rest.data.toString()).toBe('-world');
    await exited(child);
    await ep.close();
  });

  it('an empty FIFO gives EOF at once', async () => {
    const fifo = mkfifo();
    const child = spawn('sh', ['-c', ': > "$1"', 'sh', fifo], { stdio: 'ignore' });
    const ep = await openPipe(await openFd(fifo, 'r'), fifo, 'source');
    expect((await ep.read(0, 4096)).data.length).toBe(0);
    await exited(child);
    await ep.close();
  });

  it('an out-of-order read is ERR_USAGE', async () => {
    const child = spawn('sh', ['-c', 'head -c 100000 /dev/zero'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const ep = await openPipe(child.stdout!, 'child', 'source');
    expect((await ep.read(0, 10)).data.length).toBe(10);
    const back = await rejection(ep.read(5, 10));
    expect(back.code).toBe('ERR_USAGE');
    expect(back.message).toMatch(/non-sequential/);
    expect((await rejection(ep.read(20, 10))).code).toBe('ERR_USAGE');
    // The position is unchanged by the refused calls.
    expect((await ep.read(10, 10)).data.length).toBe(10);
    expect((await rejection(ep.write(0, Buffer.alloc(1)))).code).toBe('ERR_UNSUPPORTED');
    await ep.close();
    child.kill();
    await exited(child);
  });

  it('a character device (/dev/zero) by fd: exact lengths', async () => {
    const fd = openSync('/dev/zero', 'r');
    const ep = await openPipe(fd, '/dev/zero', 'source');
    const a = await ep.read(0, 3 * MiB + 1);
    expect(a.data.length).toBe(3 * MiB + 1);
    expect(a.data.every((x) => x === 0)).toBe(true);
    expect((await ep.read(3 * MiB + 1, 5)).data.length).toBe(5);
    await ep.close();
    // close() closed the fd it owned.
    expect(() => closeSync(fd)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });
});

describe('pipe target', () => {
  it('concurrent in-order writes, zero() and a gap produce the exact bytes (FIFO -> sha256sum)', async () => {
    const fifo = mkfifo();
    const child = spawn('sh', ['-c', 'sha256sum < "$1"', 'sh', fifo], { stdio: ['ignore', 'pipe', 'inherit'] });
    const out = collect(child);
    const ep = await openPipe(await openFd(fifo, 'w'), fifo, 'target');
    expect(ep.size).toBeUndefined();
    expect(ep.capabilities).toMatchObject({ seekable: false, canZero: false, isZeroInitialised: false, readOnly: false });

    const a = randomBytes(1 * MiB + 3);
    const b = randomBytes(500_000);
    const c = randomBytes(3 * MiB);
    let off = 0;
    const calls: Promise<void>[] = [];
    calls.push(ep.write(off, a));
    off += a.length;
    calls.push(ep.zero(off, 3 * MiB + 5));
    off += 3 * MiB + 5;
    off += 1000; // gap: written as zero bytes
    calls.push(ep.write(off, b));
    off += b.length;
    calls.push(ep.write(off, c));
    off += c.length;
    calls.push(ep.zero(off, 7));
    off += 7;
    await Promise.all(calls);
    await ep.flush();
    await ep.close();

    const expected = Buffer.concat([a, Buffer.alloc(3 * MiB + 5 + 1000), b, c, Buffer.alloc(7)]);
    expect(expected.length).toBe(off);
    expect((await out).split(' ')[0]).toBe(createHash('sha256').update(expected).digest('hex'));
    expect(await exited(child)).toBe(0);
  });

  it('a large zero run is written in pieces without a big queue', async () => {
    const fifo = mkfifo();
    const child = spawn('sh', ['-c', 'wc -c < "$1"', 'sh', fifo], { stdio: ['ignore', 'pipe', 'inherit'] });
    const out = collect(child);
    const ep = await openPipe(await openFd(fifo, 'w'), fifo, 'target');
    await ep.zero(0, 200 * MiB);
    await ep.write(200 * MiB, Buffer.from('x'));
    await ep.close();
    expect(Number((await out).trim())).toBe(200 * MiB + 1);
  });

  it('an overlapping write is ERR_USAGE (character device /dev/null)', async () => {
    const ep = await openPipe(openSync('/dev/null', 'w'), '/dev/null', 'target');
    await ep.write(0, Buffer.alloc(10));
    const e = await rejection(ep.write(5, Buffer.alloc(10)));
    expect(e.code).toBe('ERR_USAGE');
    expect(e.message).toMatch(/non-sequential/);
    await ep.write(10, Buffer.alloc(10));
    expect((await rejection(ep.read(0, 10))).code).toBe('ERR_UNSUPPORTED');
    await ep.close();
    expect((await rejection(ep.write(20, Buffer.alloc(1)))).code).toBe('ERR_USAGE');
  });

  it('a reader that goes away: ERR_BROKEN_PIPE "write failed: EPIPE"', async () => {
    const fifo = mkfifo();
    const child = spawn('sh', ['-c', 'head -c 10 < "$1" > /dev/null', 'sh', fifo], { stdio: 'ignore' });
    const ep = await openPipe(await openFd(fifo, 'w'), fifo, 'target');
    const chunk = Buffer.alloc(1 * MiB, 1);
    const calls: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) calls.push(ep.write(i * MiB, chunk));
    const results = await Promise.allSettled(calls);
    const failed = results.filter((r) => r.status === 'rejected');
    expect(failed.length).toBeGreaterThan(0);
    const e = (failed[0] as PromiseRejectedResult).reason as NbdStreamError;
    expect(e).toBeInstanceOf(NbdStreamError);
    expect(e.code).toBe('ERR_BROKEN_PIPE');
    expect(e.message).toMatch(/^write failed: EPIPE/);
    expect(e.endpoint).toBe(fifo);
    // Later calls fail the same way; close() tidies up without throwing again.
    expect((await rejection(ep.write(64 * MiB, chunk))).code).toBe('ERR_BROKEN_PIPE');
    await ep.close();
    await exited(child);
  });
});

describe('null target', () => {
  it('discards and counts writes and zeroes', async () => {
    const ep = await openNull();
    expect(ep.name).toBe('null:');
    expect(ep.size).toBeUndefined();
    expect(ep.capabilities).toMatchObject({ isZeroInitialised: true, canZero: true, seekable: true, readOnly: false });
    await Promise.all([ep.write(0, Buffer.alloc(1000)), ep.write(5000, Buffer.alloc(24)), ep.zero(1000, 4000), ep.zero(1 << 40, 1 << 30, { allocate: true })]);
    await ep.flush();
    expect(ep.bytesWritten).toBe(1024);
    expect(ep.bytesZeroed).toBe(4000 + 2 ** 30);
    expect(ep.writes).toBe(2);
    expect(ep.zeroes).toBe(2);
    expect(await ep.extents(0, 100)).toEqual([{ offset: 0, length: 100, zero: true }]);
    expect((await ep.read(0, 8)).data).toEqual(Buffer.alloc(8));
    await ep.close();
    await ep.close();
    expect((await rejection(ep.write(0, Buffer.alloc(1)))).code).toBe('ERR_USAGE');
  });
});
