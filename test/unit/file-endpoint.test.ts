// File endpoint against real files in a temp dir and a real loop device (no mocks).
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { Volume } from 'memfs';
import { attachLoop } from '../helpers/loop.js';
import { copy } from '../../lib/copy.js';
import { MemoryEndpoint } from '../../lib/endpoints/memory.js';
import { NbdStreamError } from '../../lib/errors.js';
import { openFile, type FileEndpoint } from '../../lib/endpoints/file.js';
import { fileExtents, native } from '../../lib/native.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const dir = mkdtempSync(join(tmpdir(), 'nbdstream-file-ep-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const opened: FileEndpoint[] = [];
function track(ep: FileEndpoint): FileEndpoint {
  opened.push(ep);
  return ep;
}
afterEach(async () => {
  for (const ep of opened.splice(0)) await ep.close();
});

function isAllZero(buf: Buffer): boolean {
  for (const b of buf) if (b !== 0) return false;
  return true;
}

/** Extents of the file at `path` as the addon sees them. */
function extentsOf(path: string): { offset: number; length: number; zero: boolean }[] {
  const fd = openSync(path, 'r');
  try {
    return fileExtents(fd, 0, statSync(path).size, statSync(path).size);
  } finally {
    closeSync(fd);
  }
}

/** Expect `p` to reject with an NbdStreamError; returns it. */
async function rejection(p: Promise<unknown>): Promise<NbdStreamError> {
  let caught: unknown;
  try {
    await p;
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(NbdStreamError);
  const e = caught as NbdStreamError;
  expect(e.message).not.toMatch(/\n/);
  expect(e.describe()).not.toMatch(/\n/);
  return e;
}

/** 8 MiB sparse file with 64 KiB of data at 1 MiB and at 5 MiB; returns the data. */
function makeSparse(path: string): { a: Buffer; b: Buffer } {
  const a = randomBytes(64 * KiB);
  const b = randomBytes(64 * KiB);
  const fd = openSync(path, 'w+');
  ftruncateSync(fd, 8 * MiB);
  writeSync(fd, a, 0, a.length, 1 * MiB);
  writeSync(fd, b, 0, b.length, 5 * MiB);
  closeSync(fd);
  return { a, b };
}

describe('regular file source', () => {
  it('has the fstat size and source capabilities', async () => {
    const path = join(dir, 'caps');
    makeSparse(path);
    const ep = track(await openFile(path, 'source', {}));
    expect(ep.name).toBe(path);
    expect(ep.size).toBe(8 * MiB);
    expect(ep.capabilities).toMatchObject({
      canExtents: native !== undefined,
      canTrim: false,
      canFlush: true,
      canMultiConn: true,
      maxRequest: 32 * MiB,
      seekable: true,
      readOnly: true,
      isZeroInitialised: false,
    });
    expect(ep.capabilities.preferredBlockSize).toBeGreaterThanOrEqual(512);
  });

  it('extents of a sparse file match exactly', async () => {
    const path = join(dir, 'sparse');
    makeSparse(path);
    const ep = track(await openFile(path, 'source', {}));
    expect(await ep.extents(0, 8 * MiB)).toEqual([
      { offset: 0, length: 1 * MiB, zero: true },
      { offset: 1 * MiB, length: 64 * KiB, zero: false },
      { offset: 1 * MiB + 64 * KiB, length: 4 * MiB - 64 * KiB, zero: true },
      { offset: 5 * MiB, length: 64 * KiB, zero: false },
      { offset: 5 * MiB + 64 * KiB, length: 3 * MiB - 64 * KiB, zero: true },
    ]);
    // A sub-range starts at the requested offset and is clipped to it; past the size is empty.
    expect(await ep.extents(1 * MiB + 100, 1 * MiB)).toEqual([
      { offset: 1 * MiB + 100, length: 64 * KiB - 100, zero: false },
      { offset: 1 * MiB + 64 * KiB, length: 1 * MiB - 64 * KiB + 100, zero: true },
    ]);
    expect(await ep.extents(6 * MiB, 16 * MiB)).toEqual([{ offset: 6 * MiB, length: 2 * MiB, zero: true }]);
    expect(await ep.extents(8 * MiB, 4096)).toEqual([]);
  });

  it('read returns the exact bytes, into a given buffer too, short only past EOF', async () => {
    const path = join(dir, 'read');
    const { a, b } = makeSparse(path);
    const ep = track(await openFile(path, 'source', {}));
    expect((await ep.read(1 * MiB, 64 * KiB)).data.equals(a)).toBe(true);
    const r = await ep.read(1 * MiB - 100, 200);
    expect(r.data.length).toBe(200);
    expect(isAllZero(r.data.subarray(0, 100))).toBe(true);
    expect(r.data.subarray(100).equals(a.subarray(0, 100))).toBe(true);
    const into = Buffer.alloc(128 * KiB, 0xff);
    const r2 = await ep.read(5 * MiB, 64 * KiB, into);
    expect(r2.data.buffer).toBe(into.buffer);
    expect(r2.data.length).toBe(64 * KiB);
    expect(r2.data.equals(b)).toBe(true);
    expect((await ep.read(8 * MiB - 10, 100)).data.length).toBe(10);
    expect((await ep.read(9 * MiB, 100)).data.length).toBe(0);
    // A whole 8 MiB read (bigger than one fs.read may return) is complete.
    const all = (await ep.read(0, 8 * MiB)).data;
    expect(all.length).toBe(8 * MiB);
    expect(all.equals(readFileSync(path))).toBe(true);
  });

  it('refuses write and zero (read-only)', async () => {
    const path = join(dir, 'ro');
    makeSparse(path);
    const ep = track(await openFile(path, 'source', {}));
    expect((await rejection(ep.write(0, Buffer.alloc(10)))).code).toBe('ERR_UNSUPPORTED');
    expect((await rejection(ep.zero(0, 10))).code).toBe('ERR_UNSUPPORTED');
    expect(isAllZero(readFileSync(path).subarray(0, 10))).toBe(true);
  });

  it('close is idempotent and later I/O is ERR_USAGE', async () => {
    const path = join(dir, 'close');
    makeSparse(path);
    const ep = await openFile(path, 'source', {});
    await ep.close();
    await ep.close();
    expect((await rejection(ep.read(0, 10))).code).toBe('ERR_USAGE');
  });
});

describe('regular file target', () => {
  it('truncates an existing larger file with junk to sourceSize: all zero, all hole', async () => {
    const path = join(dir, 'junk');
    writeFileSync(path, randomBytes(12 * MiB));
    const ep = track(await openFile(path, 'target', { sourceSize: 8 * MiB }));
    expect(ep.size).toBe(8 * MiB);
    expect(ep.capabilities).toMatchObject({ isZeroInitialised: true, readOnly: false, canZero: native !== undefined, canTrim: false });
    expect(statSync(path).size).toBe(8 * MiB);
    expect(isAllZero(readFileSync(path))).toBe(true);
    expect(extentsOf(path)).toEqual([{ offset: 0, length: 8 * MiB, zero: true }]);
  });

  it('extends a smaller file and creates a missing one', async () => {
    const small = join(dir, 'small');
    writeFileSync(small, Buffer.alloc(1000, 7));
    const ep = track(await openFile(small, 'target', { sourceSize: 3 * MiB + 5 }));
    expect(statSync(small).size).toBe(3 * MiB + 5);
    expect(isAllZero(readFileSync(small))).toBe(true);

    const created = join(dir, 'created');
    expect(existsSync(created)).toBe(false);
    const ep2 = track(await openFile(created, 'target', { sourceSize: 1 * MiB }));
    expect(ep2.size).toBe(1 * MiB);
    expect(statSync(created).size).toBe(1 * MiB);
  });

  it('writes at an offset and reads back', async () => {
    const path = join(dir, 'write');
    const ep = track(await openFile(path, 'target', { sourceSize: 4 * MiB }));
    const data = randomBytes(300 * KiB + 17);
    await ep.write(1 * MiB + 3, data);
    await ep.flush();
    expect((await ep.read(1 * MiB + 3, data.length)).data.equals(data)).toBe(true);
    const onDisk = readFileSync(path);
    expect(onDisk.length).toBe(4 * MiB);
    expect(onDisk.subarray(1 * MiB + 3, 1 * MiB + 3 + data.length).equals(data)).toBe(true);
    expect(isAllZero(onDisk.subarray(0, 1 * MiB + 3))).toBe(true);
  });

  it('keeps writes in the order asked, short ones (run on the calling thread) behind queued long ones', async () => {
    const path = join(dir, 'write-order');
    const ep = track(await openFile(path, 'target', { sourceSize: 4 * MiB }));
    const fill = (n: number, v: number) => Buffer.alloc(n, v);
    // a short write with nothing queued completes on the spot
    const first = ep.write(3 * MiB, fill(4 * KiB, 9));
    expect(readFileSync(path).subarray(3 * MiB, 3 * MiB + 4 * KiB).equals(fill(4 * KiB, 9))).toBe(true);
    const writes = [
      first,
      ep.write(0, fill(1 * MiB, 1)), // long: thread pool
      ep.write(0, fill(4 * KiB, 2)), // short, queued behind it: must land after it
      ep.write(8 * KiB, fill(4 * KiB, 3)),
      ep.write(4 * KiB, fill(2 * MiB, 4)), // long again, over the last one
    ];
    await Promise.all(writes);
    const onDisk = readFileSync(path);
    expect(onDisk.subarray(0, 4 * KiB).equals(fill(4 * KiB, 2))).toBe(true);
    expect(onDisk.subarray(4 * KiB, 4 * KiB + 2 * MiB).equals(fill(2 * MiB, 4))).toBe(true);
    expect(onDisk.subarray(2 * MiB + 4 * KiB, 3 * MiB).equals(fill(MiB - 4 * KiB, 0))).toBe(true);
    // a failing short write is rejected, not thrown
    await ep.close();
    await expect(ep.write(0, fill(10, 1))).rejects.toMatchObject({ code: 'ERR_USAGE' });
  });

  it('zero() punches a hole that reads back as zeroes', async () => {
    const path = join(dir, 'punch');
    const ep = track(await openFile(path, 'target', { sourceSize: 4 * MiB }));
    await ep.write(1 * MiB, Buffer.alloc(2 * MiB, 0xff));
    await ep.zero(1 * MiB + 256 * KiB, 512 * KiB);
    expect(ep.size).toBe(4 * MiB);
    expect(statSync(path).size).toBe(4 * MiB);
    const back = (await ep.read(1 * MiB, 2 * MiB)).data;
    expect(back.subarray(0, 256 * KiB).every((x) => x === 0xff)).toBe(true);
    expect(isAllZero(back.subarray(256 * KiB, 768 * KiB))).toBe(true);
    expect(back.subarray(768 * KiB).every((x) => x === 0xff)).toBe(true);
    if (native) {
      expect(extentsOf(path)).toEqual([
        { offset: 0, length: 1 * MiB, zero: true },
        { offset: 1 * MiB, length: 256 * KiB, zero: false },
        { offset: 1 * MiB + 256 * KiB, length: 512 * KiB, zero: true },
        { offset: 1 * MiB + 768 * KiB, length: 1 * MiB + 256 * KiB, zero: false },
        { offset: 3 * MiB, length: 1 * MiB, zero: true },
      ]);
    }
  });

  it('zero({allocate: true}) zeroes and keeps the range allocated', async () => {
    const path = join(dir, 'zerorange');
    const ep = track(await openFile(path, 'target', { sourceSize: 2 * MiB }));
    await ep.write(0, Buffer.alloc(2 * MiB, 0xee));
    await ep.flush();
    const blocks = statSync(path).blocks;
    await ep.zero(100 * KiB, 1 * MiB + 123, { allocate: true });
    const back = (await ep.read(0, 2 * MiB)).data;
    expect(back.subarray(0, 100 * KiB).every((x) => x === 0xee)).toBe(true);
    expect(isAllZero(back.subarray(100 * KiB, 100 * KiB + 1 * MiB + 123))).toBe(true);
    expect(back.subarray(100 * KiB + 1 * MiB + 123).every((x) => x === 0xee)).toBe(true);
    expect(statSync(path).blocks).toBeGreaterThanOrEqual(blocks);
  });

  it('on tmpfs (no ZERO_RANGE) zero({allocate}) falls back to writing zeroes, every time', async (ctx) => {
    let shm: string;
    try {
      shm = mkdtempSync('/dev/shm/nbdstream-file-ep-');
    } catch {
      ctx.skip();
      return;
    }
    try {
      const path = join(shm, 't');
      const ep = track(await openFile(path, 'target', { sourceSize: 1 * MiB }));
      await ep.write(0, Buffer.alloc(1 * MiB, 0x11));
      await ep.zero(4 * KiB, 8 * KiB, { allocate: true });
      await ep.zero(64 * KiB, 3 * KiB + 1, { allocate: true });
      await ep.zero(512 * KiB, 64 * KiB); // punch works on tmpfs
      const back = readFileSync(path);
      const expected = Buffer.alloc(1 * MiB, 0x11);
      expected.fill(0, 4 * KiB, 12 * KiB).fill(0, 64 * KiB, 67 * KiB + 1).fill(0, 512 * KiB, 576 * KiB);
      expect(back.equals(expected)).toBe(true);
    } finally {
      for (const ep of opened.splice(0)) await ep.close();
      rmSync(shm, { recursive: true, force: true });
    }
  });

  it('without a source size: truncated to 0, grows with writes, zero() past EOF extends', async () => {
    const path = join(dir, 'nosize');
    writeFileSync(path, randomBytes(100 * KiB));
    const ep = track(await openFile(path, 'target', {}));
    expect(ep.size).toBeUndefined();
    expect(ep.capabilities.isZeroInitialised).toBe(false);
    expect(statSync(path).size).toBe(0);
    await ep.write(0, Buffer.alloc(10 * KiB, 1));
    await ep.zero(10 * KiB, 1 * MiB);
    expect(statSync(path).size).toBe(10 * KiB + 1 * MiB);
    const back = readFileSync(path);
    expect(back.subarray(0, 10 * KiB).every((x) => x === 1)).toBe(true);
    expect(isAllZero(back.subarray(10 * KiB))).toBe(true);
  });

  it('flush and close', async () => {
    const path = join(dir, 'flush');
    const ep = await openFile(path, 'target', { sourceSize: 4096 });
    await ep.write(0, Buffer.alloc(4096, 3));
    await ep.flush();
    await Promise.all([ep.close(), ep.close()]);
    expect(readFileSync(path).every((x) => x === 3)).toBe(true);
  });
});

describe('errors', () => {
  it('a missing source: ERR_IO "cannot open: ENOENT", naming the path, one line', async () => {
    const path = join(dir, 'no', 'such-file');
    const e = await rejection(openFile(path, 'source', {}));
    expect(e.code).toBe('ERR_IO');
    expect(e.message).toMatch(/^cannot open: ENOENT /);
    expect(e.endpoint).toBe(path);
    expect(e.describe()).toContain(path);
    expect(e.describe()).toContain('ENOENT');
    // Node's own fields of the failed call
    expect([e.errno, e.syscall, e.path]).toEqual([-2, 'stat', path]);
  });

  it('a missing target directory: ERR_IO ENOENT', async () => {
    const e = await rejection(openFile(join(dir, 'no', 'dir', 'x'), 'target', { sourceSize: 10 }));
    expect(e.code).toBe('ERR_IO');
    expect(e.message).toMatch(/ENOENT/);
  });

  it('a directory as target or source fails cleanly (EISDIR)', async () => {
    const d = join(dir, 'adir');
    mkdirSync(d);
    for (const mode of ['target', 'source'] as const) {
      const e = await rejection(openFile(d, mode, { sourceSize: 10 }));
      expect(e.code).toBe('ERR_IO');
      expect(e.message).toMatch(/EISDIR/);
      expect(e.endpoint).toBe(d);
    }
    expect(statSync(d).isDirectory()).toBe(true);
  });

  it('a target on a read-only mount: ERR_UNSUPPORTED "target is read-only ... EROFS"', async (ctx) => {
    const a = join(dir, 'ro-a');
    const b = join(dir, 'ro-b');
    mkdirSync(a);
    mkdirSync(b);
    writeFileSync(join(a, 'f'), 'keep');
    try {
      execFileSync('mount', ['--bind', a, b], { stdio: 'pipe' });
    } catch {
      ctx.skip(); // not root / no mount permission
      return;
    }
    try {
      execFileSync('mount', ['-o', 'remount,ro,bind', b], { stdio: 'pipe' });
      const e = await rejection(openFile(join(b, 'f'), 'target', { sourceSize: 10 }));
      expect(e.code).toBe('ERR_UNSUPPORTED');
      expect(e.message).toMatch(/^target is read-only: .*EROFS/);
      expect(e.endpoint).toBe(join(b, 'f'));
      // Still readable as a source.
      const src = track(await openFile(join(b, 'f'), 'source', {}));
      expect((await src.read(0, 4)).data.toString()).toBe('keep');
      await src.close();
    } finally {
      execFileSync('umount', [b], { stdio: 'pipe' });
    }
    expect(readFileSync(join(a, 'f'), 'utf8')).toBe('keep');
  });

  it('a FIFO is refused without blocking (it belongs to the pipe endpoint)', async () => {
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const e = await rejection(openFile(fifo, 'source', {}));
    expect(e.code).toBe('ERR_USAGE');
  });

  it('an I/O error names the operation and offset in one line (read of /proc/self/mem)', async () => {
    const ep = track(await openFile('/proc/self/mem', 'source', {}));
    const e = await rejection(ep.read(0, 4096));
    expect(e.code).toBe('ERR_IO');
    expect(e.message).toMatch(/^read failed: EIO /);
    expect(e.offset).toBe(0);
    expect(e.describe()).toBe(`/proc/self/mem: offset 0: ${e.message}`);
  });

  it('bad ranges are ERR_USAGE', async () => {
    const path = join(dir, 'range');
    makeSparse(path);
    const ep = track(await openFile(path, 'source', {}));
    expect((await rejection(ep.read(-1, 10))).code).toBe('ERR_USAGE');
    expect((await rejection(ep.read(0, 1.5))).code).toBe('ERR_USAGE');
    expect((await rejection(ep.read(0, 100, Buffer.alloc(10)))).code).toBe('ERR_USAGE');
  });
});

// Loop device: needs root and a working losetup (skipped with the reason otherwise, never in CI).
const loop = attachLoop(dir);
afterAll(async () => {
  for (const ep of opened.splice(0)) await ep.close();
  loop.detach();
});

describe.skipIf(loop.skip !== undefined)(
  `block device on a loop device${loop.skip !== undefined ? ` (skipped: ${loop.skip})` : ''}`,
  () => {
    const dev = loop.skip === undefined ? loop.dev : '';
    const backing = loop.skip === undefined ? loop.file : '';

    it('source: size from BLKGETSIZE64, dense extents', async () => {
      const ep = track(await openFile(dev, 'source', {}));
      expect(ep.kind).toBe('block');
      expect(ep.size).toBe(8 * MiB);
      expect(ep.capabilities.canExtents).toBe(false);
      expect(ep.capabilities.readOnly).toBe(true);
      expect(await ep.extents(0, 16 * MiB)).toEqual([{ offset: 0, length: 8 * MiB, zero: false }]);
      expect(await ep.extents(1 * MiB, 1 * MiB)).toEqual([{ offset: 1 * MiB, length: 1 * MiB, zero: false }]);
    });

    it('target: not truncated, not zero-initialised; zero() via BLKZEROOUT reads back zero', async () => {
      const ep = track(await openFile(dev, 'target', { sourceSize: 4 * MiB }));
      expect(ep.size).toBe(8 * MiB);
      expect(ep.capabilities.isZeroInitialised).toBe(false);
      expect(ep.capabilities.canZero).toBe(native !== undefined);
      expect(statSync(backing).size).toBe(8 * MiB);

      await ep.write(1 * MiB, Buffer.alloc(2 * MiB, 0x5a));
      await ep.zero(1 * MiB + 64 * KiB, 256 * KiB);
      // Unaligned: BLKZEROOUT says EINVAL, the fallback writes zeroes.
      await ep.zero(2 * MiB + 1, 1000);
      await ep.flush();
      const back = (await ep.read(1 * MiB, 2 * MiB)).data;
      const expected = Buffer.alloc(2 * MiB, 0x5a).fill(0, 64 * KiB, 320 * KiB).fill(0, 1 * MiB + 1, 1 * MiB + 1001);
      expect(back.equals(expected)).toBe(true);
      await ep.close();
      // Through the backing file too, once the loop device was flushed.
      expect(readFileSync(backing).subarray(1 * MiB, 3 * MiB).equals(expected)).toBe(true);
      expect(statSync(backing).size).toBe(8 * MiB);
    });

    it('a target smaller than the source is refused before any write', async () => {
      const e = await rejection(openFile(dev, 'target', { sourceSize: 8 * MiB + 1 }));
      expect(e.code).toBe('ERR_TARGET_TOO_SMALL');
      expect(e.endpoint).toBe(dev);
    });

    it('writing past the end of the device is ERR_IO', async () => {
      const ep = track(await openFile(dev, 'target', {}));
      const e = await rejection(ep.write(8 * MiB, Buffer.alloc(4096)));
      expect(e.code).toBe('ERR_IO');
      expect(e.message).toMatch(/^write failed: /);
    });
  },
);

describe('without the native addon (NBDSTREAM_NATIVE=0)', () => {
  it('extents are dense, zero() writes zeroes, block device size comes from sysfs', async () => {
    const saved = process.env.NBDSTREAM_NATIVE;
    process.env.NBDSTREAM_NATIVE = '0';
    try {
      vi.resetModules();
      const m = await import('../../lib/endpoints/file.js');
      const path = join(dir, 'nonative');
      makeSparse(path);
      const src = await m.openFile(path, 'source', {});
      expect(src.capabilities.canExtents).toBe(false);
      expect(await src.extents(0, 16 * MiB)).toEqual([{ offset: 0, length: 8 * MiB, zero: false }]);
      await src.close();

      const dst = await m.openFile(join(dir, 'nonative-dst'), 'target', { sourceSize: 1 * MiB });
      expect(dst.capabilities.canZero).toBe(false);
      await dst.write(0, Buffer.alloc(1 * MiB, 9));
      await dst.zero(1000, 300 * KiB);
      await dst.zero(512 * KiB, 4 * KiB, { allocate: true });
      await dst.close();
      const expected = Buffer.alloc(1 * MiB, 9).fill(0, 1000, 1000 + 300 * KiB).fill(0, 512 * KiB, 516 * KiB);
      expect(readFileSync(join(dir, 'nonative-dst')).equals(expected)).toBe(true);

      if (loop.skip === undefined) {
        const blk = await m.openFile(loop.dev, 'target', {});
        expect(blk.size).toBe(8 * MiB);
        await blk.write(0, Buffer.alloc(64 * KiB, 1));
        await blk.zero(4 * KiB, 8 * KiB);
        const back = (await blk.read(0, 64 * KiB)).data;
        await blk.close();
        expect(back.equals(Buffer.alloc(64 * KiB, 1).fill(0, 4 * KiB, 12 * KiB))).toBe(true);
      }
    } finally {
      if (saved === undefined) delete process.env.NBDSTREAM_NATIVE;
      else process.env.NBDSTREAM_NATIVE = saved;
      vi.resetModules();
    }
  });
});

// The file endpoint over an injected node:fs-compatible file system (memfs): no kernel fds, so
// the JS fallbacks (dense extents, zero buffers) and every call through the volume.
describe('an injected fs (memfs)', () => {
  function volumeWith(files: Record<string, Buffer>): InstanceType<typeof Volume> {
    const vol = new Volume();
    vol.mkdirSync('/d');
    for (const [name, data] of Object.entries(files)) vol.writeFileSync(name, data);
    return vol;
  }

  it('source: reads through the volume; extents are the dense fallback, not SEEK_DATA', async () => {
    const data = randomBytes(3 * MiB + 5);
    const vol = volumeWith({ '/d/src.img': data });
    const ep = track(await openFile('/d/src.img', 'source', { fs: vol }));
    expect(ep.size).toBe(data.length);
    expect(ep.capabilities.canExtents).toBe(false);
    expect(ep.capabilities.canZero).toBe(false);
    expect(ep.capabilities.readOnly).toBe(true);
    expect(await ep.extents(0, 8 * MiB)).toEqual([{ offset: 0, length: data.length, zero: false }]);
    expect((await ep.read(1 * MiB, 64 * KiB)).data.equals(data.subarray(1 * MiB, 1 * MiB + 64 * KiB))).toBe(true);
    // a read past the end is short
    expect((await ep.read(data.length - 5, 4096)).data.equals(data.subarray(data.length - 5))).toBe(true);
    // nothing of it reached the real file system
    expect(existsSync('/d/src.img')).toBe(false);
  });

  it('target: created and truncated to the source size in the volume; short (sync) and long writes; zero() writes zeroes', async () => {
    const vol = volumeWith({ '/d/out.img': Buffer.alloc(9 * MiB, 0xee) });
    const ep = track(await openFile('/d/out.img', 'target', { sourceSize: 4 * MiB, fs: vol }));
    expect([ep.size, ep.capabilities.isZeroInitialised, ep.capabilities.canZero]).toEqual([4 * MiB, true, false]);
    expect(vol.statSync('/d/out.img').size).toBe(4 * MiB);
    const short = randomBytes(4 * KiB);
    const long = randomBytes(2 * MiB);
    await Promise.all([ep.write(0, short), ep.write(1 * MiB, long)]);
    await ep.write(3 * MiB, Buffer.alloc(1 * MiB, 0x55));
    await ep.zero(3 * MiB + 4 * KiB, 8 * KiB);
    await ep.flush();
    await ep.close();
    const expected = Buffer.alloc(4 * MiB);
    short.copy(expected, 0);
    long.copy(expected, 1 * MiB);
    expected.fill(0x55, 3 * MiB).fill(0, 3 * MiB + 4 * KiB, 3 * MiB + 12 * KiB);
    expect((vol.readFileSync('/d/out.img') as Buffer).equals(expected)).toBe(true);
  });

  it('a target without a source size grows with its writes, and a trailing zero() extends it', async () => {
    const vol = volumeWith({});
    const ep = track(await openFile('/d/grow.img', 'target', { fs: vol }));
    expect(ep.capabilities.isZeroInitialised).toBe(false);
    await ep.write(0, Buffer.alloc(4096, 1));
    await ep.zero(4096, 1 * MiB);
    await ep.close();
    expect((vol.readFileSync('/d/grow.img') as Buffer).equals(Buffer.alloc(4096 + 1 * MiB).fill(1, 0, 4096))).toBe(true);
  });

  it("errors carry the volume's errno, syscall and path", async () => {
    const vol = volumeWith({});
    const e = await rejection(openFile('/d/missing.img', 'source', { fs: vol }));
    expect([e.code, e.message, e.errno, e.syscall, e.path, e.endpoint]).toEqual(['ERR_IO', 'cannot open: ENOENT no such file or directory', -2, 'stat', '/d/missing.img', '/d/missing.img']);
    const t = await rejection(openFile('/no/dir/x.img', 'target', { sourceSize: 10, fs: vol }));
    expect([t.code, t.errno, t.path]).toEqual(['ERR_IO', -2, '/no/dir/x.img']);
  });

  it('copy() between { file, fs } endpoints: zero runs detected, holes skipped on the zero-initialised target', async () => {
    const data = Buffer.alloc(8 * MiB);
    randomBytes(64 * KiB).copy(data, 1 * MiB);
    randomBytes(4 * KiB).copy(data, 6 * MiB + 8 * KiB);
    const vol = volumeWith({ '/d/a.img': data });
    const s = await copy({ file: '/d/a.img', fs: vol }, { file: '/d/b.img', fs: vol });
    expect((vol.readFileSync('/d/b.img') as Buffer).equals(data)).toBe(true);
    // dense extents: everything is read; -S 4096 keeps the zero blocks from being written
    expect([s.bytesRead, s.bytesWritten, s.requests.zero]).toEqual([8 * MiB, 68 * KiB, 0]);
    // and from an in-memory endpoint into the volume
    const back = await copy(new MemoryEndpoint(data), { file: '/d/c.img', fs: vol });
    expect(back.bytesWritten).toBe(68 * KiB);
    expect((vol.readFileSync('/d/c.img') as Buffer).equals(data)).toBe(true);
  });
});
