// The native addon against real files and a real loop device (no mocks).
// Needs `npm run build:native` first: a missing addon fails the first test.
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  constants as fsConstants,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { attachLoop } from '../helpers/loop.js';
import {
  blkDiscard,
  blkGetSize64,
  blkZeroOut,
  fileExtents,
  isNotSupported,
  native,
  nativeLoadError,
  punchHole,
  seekData,
  seekHole,
  zeroRange,
  type FileExtent,
} from '../../lib/native.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const E = osConstants.errno;

/** Expect `fn` to throw a node:fs-shaped error with this errno code. */
function expectErrno(fn: () => unknown, code: keyof typeof E): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(Error);
  expect(caught).toMatchObject({ code, errno: -E[code] });
  expect(typeof (caught as { syscall?: unknown }).syscall).toBe('string');
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return buf.subarray(0, done);
}

function isAllZero(buf: Buffer): boolean {
  for (const b of buf) if (b !== 0) return false;
  return true;
}

/** 8 MiB sparse file with 4 KiB of data at 1 MiB and at 3 MiB. */
function makeSparse(path: string): number {
  const fd = openSync(path, 'w+');
  ftruncateSync(fd, 8 * MiB);
  writeSync(fd, Buffer.alloc(4 * KiB, 0xaa), 0, 4 * KiB, 1 * MiB);
  writeSync(fd, Buffer.alloc(4 * KiB, 0xbb), 0, 4 * KiB, 3 * MiB);
  return fd;
}

/** First of tmpdir(), /dev/shm whose filesystem reports holes via SEEK_DATA/SEEK_HOLE. */
function pickSparseDir(): string {
  const candidates = [tmpdir(), '/dev/shm'];
  for (const base of candidates) {
    let dir: string | undefined;
    try {
      dir = mkdtempSync(join(base, 'nbdstream-native-'));
      const fd = makeSparse(join(dir, 'probe'));
      try {
        if (native && native.seekData(fd, 0) === 1 * MiB) return dir;
      } finally {
        closeSync(fd);
      }
    } catch {
      // try the next candidate
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
  return mkdtempSync(join(tmpdir(), 'nbdstream-native-')); // tests below then fail visibly
}

const dir = pickSparseDir();
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const openFds: number[] = [];
function track(fd: number): number {
  openFds.push(fd);
  return fd;
}
afterEach(() => {
  for (const fd of openFds.splice(0)) closeSync(fd);
});

describe('addon loading', () => {
  it('loads the built addon', () => {
    expect(nativeLoadError).toBeUndefined();
    expect(native).toBeDefined();
    for (const name of [
      'seekData',
      'seekHole',
      'punchHole',
      'zeroRange',
      'blkZeroOut',
      'blkDiscard',
      'blkGetSize64',
    ]) {
      expect(typeof (native as unknown as Record<string, unknown>)[name]).toBe('function');
    }
  });

  it('falls back without the addon (NBDSTREAM_NATIVE=0)', async () => {
    const saved = process.env.NBDSTREAM_NATIVE;
    process.env.NBDSTREAM_NATIVE = '0';
    try {
      vi.resetModules();
      const m = await import('../../lib/native.js');
      expect(m.native).toBeUndefined();
      expect(m.nativeLoadError).toMatch(/NBDSTREAM_NATIVE=0/);
      const fd = track(makeSparse(join(dir, 'fallback')));
      expect(m.fileExtents(fd, 0, 8 * MiB, 8 * MiB)).toEqual([{ offset: 0, length: 8 * MiB, zero: false }]);
      expect(m.fileExtents(fd, 100, 8 * MiB, 5000)).toEqual([{ offset: 100, length: 4900, zero: false }]);
      expect(() => m.punchHole(fd, 0, 4096)).toThrow(expect.objectContaining({ code: 'ENOSYS' }));
      let caught: unknown;
      try {
        m.blkGetSize64(fd);
      } catch (err) {
        caught = err;
      }
      expect(m.isNotSupported(caught)).toBe(true);
    } finally {
      if (saved === undefined) delete process.env.NBDSTREAM_NATIVE;
      else process.env.NBDSTREAM_NATIVE = saved;
      vi.resetModules();
    }
  });
});

describe('seekData / seekHole / fileExtents on a sparse file', () => {
  // tmpfs, ext4 and overlay on either report allocation at 4 KiB granularity, so the 4 KiB
  // writes at 1 MiB and 3 MiB are exactly the data extents.
  const full: FileExtent[] = [
    { offset: 0, length: 1 * MiB, zero: true },
    { offset: 1 * MiB, length: 4 * KiB, zero: false },
    { offset: 1 * MiB + 4 * KiB, length: 2 * MiB - 4 * KiB, zero: true },
    { offset: 3 * MiB, length: 4 * KiB, zero: false },
    { offset: 3 * MiB + 4 * KiB, length: 5 * MiB - 4 * KiB, zero: true },
  ];

  it('seekData / seekHole find the data and holes', () => {
    const fd = track(makeSparse(join(dir, 'seek')));
    expect(seekData(fd, 0)).toBe(1 * MiB);
    expect(seekHole(fd, 1 * MiB)).toBe(1 * MiB + 4 * KiB);
    expect(seekData(fd, 1 * MiB + 4 * KiB)).toBe(3 * MiB);
    expect(seekHole(fd, 3 * MiB + 100)).toBe(3 * MiB + 4 * KiB);
    expect(seekHole(fd, 0)).toBe(0);
    // No data after the last write: -1 instead of ENXIO.
    expect(seekData(fd, 3 * MiB + 4 * KiB)).toBe(-1);
    expect(seekData(fd, 100 * MiB)).toBe(-1);
    // SEEK_HOLE at or past EOF is ENXIO.
    expectErrno(() => seekHole(fd, 8 * MiB), 'ENXIO');
  });

  it('returns the exact extent list for the whole file', () => {
    const fd = track(makeSparse(join(dir, 'extents')));
    expect(fileExtents(fd, 0, 8 * MiB, 8 * MiB)).toEqual(full);
  });

  it('clips to the range and to fileSize', () => {
    const fd = track(makeSparse(join(dir, 'clip')));
    // Unaligned start inside data, unaligned end inside the trailing hole.
    expect(fileExtents(fd, 1 * MiB + 100, 3 * MiB, 8 * MiB)).toEqual([
      { offset: 1 * MiB + 100, length: 4 * KiB - 100, zero: false },
      { offset: 1 * MiB + 4 * KiB, length: 2 * MiB - 4 * KiB, zero: true },
      { offset: 3 * MiB, length: 4 * KiB, zero: false },
      { offset: 3 * MiB + 4 * KiB, length: 1 * MiB - 4 * KiB + 100, zero: true },
    ]);
    // Range ends inside data.
    expect(fileExtents(fd, 512 * KiB, 512 * KiB + 10, 8 * MiB)).toEqual([
      { offset: 512 * KiB, length: 512 * KiB, zero: true },
      { offset: 1 * MiB, length: 10, zero: false },
    ]);
    // Wholly inside a hole / wholly inside data.
    expect(fileExtents(fd, 2 * MiB, 4096, 8 * MiB)).toEqual([{ offset: 2 * MiB, length: 4096, zero: true }]);
    expect(fileExtents(fd, 3 * MiB + 1, 10, 8 * MiB)).toEqual([{ offset: 3 * MiB + 1, length: 10, zero: false }]);
    // fileSize cuts the range; a range at or past fileSize is empty.
    expect(fileExtents(fd, 0, 8 * MiB, 2 * MiB)).toEqual(full.slice(0, 2).concat({
      offset: 1 * MiB + 4 * KiB,
      length: 1 * MiB - 4 * KiB,
      zero: true,
    }));
    expect(fileExtents(fd, 8 * MiB, 4096, 8 * MiB)).toEqual([]);
    expect(fileExtents(fd, 0, 0, 8 * MiB)).toEqual([]);
  });

  it('treats space past the real EOF (fileSize too large) as a hole', () => {
    const fd = track(makeSparse(join(dir, 'shrunk')));
    ftruncateSync(fd, 2 * MiB);
    expect(fileExtents(fd, 0, 4 * MiB, 4 * MiB)).toEqual([
      { offset: 0, length: 1 * MiB, zero: true },
      { offset: 1 * MiB, length: 4 * KiB, zero: false },
      { offset: 1 * MiB + 4 * KiB, length: 3 * MiB - 4 * KiB, zero: true },
    ]);
  });

  it('a fully written file with an unaligned size is one data extent', () => {
    const fd = track(openSync(join(dir, 'dense'), 'w+'));
    writeSync(fd, Buffer.alloc(10_000, 1));
    expect(fileExtents(fd, 0, 1 * MiB, 10_000)).toEqual([{ offset: 0, length: 10_000, zero: false }]);
  });

  it('without SEEK_DATA support (EINVAL from /proc) the range is one data extent', () => {
    const fd = track(openSync('/proc/self/status', fsConstants.O_RDONLY));
    expectErrno(() => seekData(fd, 0), 'EINVAL');
    expect(fileExtents(fd, 0, 100, 1000)).toEqual([{ offset: 0, length: 100, zero: false }]);
  });
});

describe('fallocate', () => {
  it('punchHole makes a range read back as zeros and become a hole', () => {
    const fd = track(openSync(join(dir, 'punch'), 'w+'));
    writeSync(fd, Buffer.alloc(1 * MiB, 0xff));
    punchHole(fd, 256 * KiB, 128 * KiB);
    expect(isAllZero(readAt(fd, 256 * KiB, 128 * KiB))).toBe(true);
    expect(readAt(fd, 256 * KiB - 1, 1)[0]).toBe(0xff);
    expect(readAt(fd, 384 * KiB, 1)[0]).toBe(0xff);
    expect(fileExtents(fd, 0, 1 * MiB, 1 * MiB)).toEqual([
      { offset: 0, length: 256 * KiB, zero: false },
      { offset: 256 * KiB, length: 128 * KiB, zero: true },
      { offset: 384 * KiB, length: 640 * KiB, zero: false },
    ]);
    // KEEP_SIZE: punching at the end does not shrink the file.
    punchHole(fd, 960 * KiB, 64 * KiB);
    expect(readAt(fd, 0, 2 * MiB).length).toBe(1 * MiB);
  });

  it('zeroRange zeroes the range and keeps the size (or is EOPNOTSUPP, e.g. on tmpfs)', () => {
    const fd = track(openSync(join(dir, 'zero'), 'w+'));
    writeSync(fd, Buffer.alloc(1 * MiB, 0xee));
    try {
      zeroRange(fd, 100 * KiB, 200 * KiB + 123);
    } catch (err) {
      // tmpfs has no FALLOC_FL_ZERO_RANGE; callers fall back (isNotSupported).
      expect(err).toMatchObject({ code: 'EOPNOTSUPP' });
      expect(isNotSupported(err)).toBe(true);
      return;
    }
    expect(isAllZero(readAt(fd, 100 * KiB, 200 * KiB + 123))).toBe(true);
    expect(readAt(fd, 100 * KiB - 1, 1)[0]).toBe(0xee);
    expect(readAt(fd, 300 * KiB + 123, 1)[0]).toBe(0xee);
    zeroRange(fd, 1 * MiB - 10, 4 * KiB);
    expect(readAt(fd, 0, 2 * MiB).length).toBe(1 * MiB);
  });
});

describe('errors', () => {
  it('carry code, negative errno and syscall', () => {
    expectErrno(() => seekHole(1_000_000, 0), 'EBADF');
    expectErrno(() => seekData(1_000_000, 0), 'EBADF');
    expectErrno(() => punchHole(1_000_000, 0, 4096), 'EBADF');
    expect(() => fileExtents(1_000_000, 0, 4096, 4096)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });

  it('a block ioctl on a regular file is ENOTTY (isNotSupported)', () => {
    const fd = track(openSync(join(dir, 'notblk'), 'w+'));
    expectErrno(() => blkGetSize64(fd), 'ENOTTY');
    let caught: unknown;
    try {
      blkZeroOut(fd, 0, 4096);
    } catch (err) {
      caught = err;
    }
    expect(isNotSupported(caught)).toBe(true);
  });

  it('rejects offsets and lengths that are not integers in [0, 2^53)', () => {
    const fd = track(openSync(join(dir, 'args'), 'w+'));
    for (const bad of [-1, 1.5, NaN, Infinity, 2 ** 53]) {
      expect(() => seekData(fd, bad)).toThrow(RangeError);
    }
    expect(() => punchHole(fd, 2 ** 53 - 1, 1)).toThrow(RangeError);
    expect(() => seekData(fd, '0' as unknown as number)).toThrow(TypeError);
    // The largest safe offset is passed through intact: past EOF, so no data.
    expect(seekData(fd, 2 ** 53 - 1)).toBe(-1);
  });

  it('vsock calls take a CID and port below 2^32 and a callback (test/interop/vsock.test.ts uses them)', () => {
    const n = native!;
    expect(() => n.vsockListen(0xffffffff, 2 ** 32)).toThrow(/^port must be below 2\^32$/);
    expect(() => n.vsockListen(-1, 1)).toThrow(RangeError);
    expect(() => n.vsockConnect(1.5, 1, () => {})).toThrow(RangeError);
    expect(() => n.vsockConnect('1' as unknown as number, 1, () => {})).toThrow(TypeError);
    expect(() => n.vsockConnect(1, 1, undefined as unknown as () => void)).toThrow(/^callback must be a function$/);
  });
});

// Loop device: needs root and a working losetup (skipped with the reason otherwise, never in CI).
const loop = attachLoop(dir);
afterAll(() => loop.detach());

describe.skipIf(loop.skip !== undefined)(
  `block device ioctls on a loop device${loop.skip !== undefined ? ` (skipped: ${loop.skip})` : ''}`,
  () => {
    const dev = loop.skip === undefined ? loop.dev : '';

    it('blkGetSize64 equals the backing file size', () => {
      const fd = track(openSync(dev, fsConstants.O_RDWR));
      expect(blkGetSize64(fd)).toBe(8 * MiB);
    });

    it('blkZeroOut zeroes a range', () => {
      const fd = track(openSync(dev, fsConstants.O_RDWR));
      writeSync(fd, Buffer.alloc(1 * MiB, 0x5a), 0, 1 * MiB, 1 * MiB);
      expect(isAllZero(readAt(fd, 1 * MiB, 1 * MiB))).toBe(false);
      blkZeroOut(fd, 1 * MiB + 64 * KiB, 256 * KiB);
      expect(isAllZero(readAt(fd, 1 * MiB + 64 * KiB, 256 * KiB))).toBe(true);
      expect(readAt(fd, 1 * MiB + 64 * KiB - 1, 1)[0]).toBe(0x5a);
      expect(readAt(fd, 1 * MiB + 320 * KiB, 1)[0]).toBe(0x5a);
      // Unaligned (not a multiple of 512) ranges are the kernel's EINVAL.
      expectErrno(() => blkZeroOut(fd, 1, 512), 'EINVAL');
    });

    it('blkDiscard succeeds or is EOPNOTSUPP', () => {
      const fd = track(openSync(dev, fsConstants.O_RDWR));
      try {
        blkDiscard(fd, 4 * MiB, 1 * MiB);
      } catch (err) {
        expect(err).toMatchObject({ code: 'EOPNOTSUPP' });
      }
    });
  },
);
