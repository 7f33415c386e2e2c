/**
 * The optional native addon (native/nbdstream_native.c) and its fallbacks.
 *
 * `native` is undefined when the addon is not built, fails to load, or NBDSTREAM_NATIVE=0;
 * `nativeLoadError` then says why. Callers test capabilities with `native !== undefined` (or
 * catch `isNotSupported` errors) and use their generic fallback (extents → one data extent,
 * zero → write zero buffers). Nothing here ever throws at import time.
 *
 * Errors from the addon look like node:fs errors: `{ code: 'ENXIO', errno: -6, syscall }`.
 */

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { constants } from 'node:os';
import { join } from 'node:path';

/** The raw addon. All calls are synchronous; offsets and lengths are integers in [0, 2^53). */
export interface NativeOps {
  /** lseek(SEEK_DATA): next data at or after `offset`, or -1 if there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): next hole at or after `offset`; EOF counts as a hole. ENXIO past EOF. */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE|KEEP_SIZE): deallocate; reads back as zeros; size unchanged. */
  punchHole(fd: number, offset: number, length: number): void;
  /** fallocate(ZERO_RANGE|KEEP_SIZE): zero and keep allocated; size unchanged. */
  zeroRange(fd: number, offset: number, length: number): void;
  /** ioctl(BLKZEROOUT): the range reads back as zeros. */
  blkZeroOut(fd: number, offset: number, length: number): void;
  /** ioctl(BLKDISCARD): a hint; contents afterwards are unspecified (never use it for zeroes). */
  blkDiscard(fd: number, offset: number, length: number): void;
  /** ioctl(BLKGETSIZE64): block device size in bytes. */
  blkGetSize64(fd: number): number;
  /** prctl(PR_SET_PDEATHSIG): the kernel sends `signal` (a number) when the parent exits; 0: off. */
  setParentDeathSignal(signal: number): void;
  /**
   * Socket reader thread (native/socket_reader.c): parse NBD replies on a connected socket fd
   * that JS no longer reads; read payloads go straight into buffers registered by readerExpect.
   * `onEvent(kind, cookie, offset, length, flags, raw)`: kind 0 RAW (raw bytes for the JS
   * decoder), 1 DATA (an OFFSET_DATA chunk is in the buffer), 2 SIMPLE_READ, 3 END (flags 1:
   * inside a reply), 4 ERROR (length = -errno).
   */
  readerStart(
    fd: number,
    structuredReplies: boolean,
    onEvent: (kind: number, cookie: number, offset: number, length: number, flags: number, raw: Buffer | undefined) => void,
    /** Extended headers were negotiated: 32-byte reply headers. */
    extendedHeaders?: boolean,
  ): SocketReader;
  /**
   * Before sending NBD_CMD_READ `cookie` at export `offset`: its payload goes into `buffer`. With
   * `zeroBlock` N > 0 the payload is checked for all-zero N-aligned blocks as it arrives (event
   * flag bit 16: checked; raw: the all-zero runs as pairs of doubles).
   */
  readerExpect(reader: SocketReader, cookie: number, buffer: Buffer, offset: number, zeroBlock?: number): void;
  /** The read `cookie` was answered (idempotent). */
  readerForget(reader: SocketReader, cookie: number): void;
  /** Stop and join the thread (idempotent); no callback runs afterwards. */
  readerStop(reader: SocketReader): void;
  /**
   * socket(AF_VSOCK) connected to `cid`:`port` on a worker thread; `callback(err, fd)` gets the
   * connected fd (blocking, close-on-exec) or an error whose syscall is "socket(AF_VSOCK)" or "connect".
   */
  vsockConnect(cid: number, port: number, callback: (err: NativeError | null, fd: number) => void): void;
  /** socket(AF_VSOCK) bound to `cid`:`port` and listening: its fd. */
  vsockListen(cid: number, port: number): number;
}

/** Opaque handle of a socket reader thread. */
export type SocketReader = { readonly __socketReader: unique symbol };

/** A system-call error from the addon (or ENOSYS from a wrapper when the addon is missing). */
export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export interface FileExtent {
  offset: number;
  length: number;
  /** true: a hole (reads as zeros); false: allocated data. */
  zero: boolean;
}

import { packageRoot } from './package-info.js';

const ADDON_PATH = join('native', 'build', 'Release', 'nbdstream_native.node');
const BUILD_LOG = join('native', 'build.log');

function load(): { ops?: NativeOps; error?: string } {
  if (process.env.NBDSTREAM_NATIVE === '0') return { error: 'disabled by NBDSTREAM_NATIVE=0' };
  if (process.platform !== 'linux') return { error: `not supported on ${process.platform}` };
  const root = packageRoot();
  if (root === undefined) return { error: 'package root (package.json) not found' };
  const path = join(root, ADDON_PATH);
  try {
    return { ops: createRequire(import.meta.url)(path) as NativeOps };
  } catch (err) {
    return { error: loadFailure(root, path, err as NodeJS.ErrnoException) };
  }
}

/** Why the addon did not load, on one line (require's message adds a multi-line "Require stack"). */
function loadFailure(root: string, path: string, err: NodeJS.ErrnoException): string {
  if (err.code === 'MODULE_NOT_FOUND') {
    // the install step (scripts/build-native.mjs) keeps node-gyp's output when the build failed
    const log = join(root, BUILD_LOG);
    const failed = existsSync(log) ? `; the install's build failed, see ${log}` : '';
    return `not built: no ${path}${failed}; \`npm rebuild nbdstream\` builds it with a C compiler`;
  }
  return `${path}: ${String(err.message).split('\n')[0]}`;
}

const loaded = load();

export const native: NativeOps | undefined = loaded.ops;
export const nativeLoadError: string | undefined = loaded.error;

function unavailable(syscall: string): NativeError {
  const err = new Error(`ENOSYS: native addon not loaded (${nativeLoadError}), ${syscall}`);
  return Object.assign(err, { code: 'ENOSYS', errno: -38, syscall });
}

/** True for errors meaning "this file, device or build cannot do that": use the fallback. */
export function isNotSupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY';
}

// Typed wrappers: same contracts as NativeOps; without the addon they throw ENOSYS.

export function seekData(fd: number, offset: number): number {
  if (!native) throw unavailable('lseek');
  return native.seekData(fd, offset);
}

export function seekHole(fd: number, offset: number): number {
  if (!native) throw unavailable('lseek');
  return native.seekHole(fd, offset);
}

export function punchHole(fd: number, offset: number, length: number): void {
  if (!native) throw unavailable('fallocate');
  native.punchHole(fd, offset, length);
}

export function zeroRange(fd: number, offset: number, length: number): void {
  if (!native) throw unavailable('fallocate');
  native.zeroRange(fd, offset, length);
}

export function blkZeroOut(fd: number, offset: number, length: number): void {
  if (!native) throw unavailable('ioctl(BLKZEROOUT)');
  native.blkZeroOut(fd, offset, length);
}

export function blkDiscard(fd: number, offset: number, length: number): void {
  if (!native) throw unavailable('ioctl(BLKDISCARD)');
  native.blkDiscard(fd, offset, length);
}

export function blkGetSize64(fd: number): number {
  if (!native) throw unavailable('ioctl(BLKGETSIZE64)');
  return native.blkGetSize64(fd);
}

/**
 * Have `signal` sent to this process when its parent exits: prctl(PR_SET_PDEATHSIG) with the
 * addon; without it (or if prctl fails), process.ppid is polled every second and the signal sent
 * with process.kill. A parent already gone (process.ppid is no longer `parentPid`) gets the
 * signal sent at once. The caller handles the signal (process.on) to exit cleanly, and must
 * expect it twice (a parent dying just as prctl is called is seen both ways).
 */
export function setParentDeathSignal(signal: NodeJS.Signals, parentPid = process.ppid): void {
  const orphaned = () => process.ppid !== parentPid;
  let byKernel = false;
  try {
    native?.setParentDeathSignal(constants.signals[signal]);
    byKernel = native !== undefined;
  } catch {
    // polled below
  }
  if (orphaned()) return void process.kill(process.pid, signal); // the kernel would never tell
  if (byKernel) return;
  const poll = setInterval(() => {
    if (!orphaned()) return;
    clearInterval(poll);
    process.kill(process.pid, signal);
  }, 1000);
  poll.unref();
}

/**
 * Data/hole map of a regular file over [offset, offset + length) clipped to fileSize.
 * Extents are contiguous, non-empty, in order, and adjacent ones differ in `zero`; an empty
 * range gives []. Holes are `zero: true`. Without the addon, or when the filesystem lacks
 * SEEK_DATA/SEEK_HOLE (EINVAL, EOPNOTSUPP), the whole range is one data extent. Other errors
 * (EBADF, EIO ...) are thrown. Granularity is the filesystem's (usually 4 KiB pages/blocks),
 * so data extents may cover zero bytes next to written ones.
 */
export function fileExtents(fd: number, offset: number, length: number, fileSize: number): FileExtent[] {
  const end = Math.min(offset + length, fileSize);
  if (end <= offset) return [];
  const whole: FileExtent[] = [{ offset, length: end - offset, zero: false }];
  if (!native) return whole;

  const out: FileExtent[] = [];
  const push = (start: number, stop: number, zero: boolean): void => {
    const last = out[out.length - 1];
    if (last && last.zero === zero) last.length += stop - start;
    else out.push({ offset: start, length: stop - start, zero });
  };

  try {
    let pos = offset;
    while (pos < end) {
      const data = native.seekData(fd, pos);
      // -1: no data at or after pos (trailing hole, or the file shrank below fileSize).
      const dataStart = data < 0 ? end : Math.min(data, end);
      if (dataStart > pos) {
        push(pos, dataStart, true);
        pos = dataStart;
        if (pos >= end) break;
      }
      let hole: number;
      try {
        hole = native.seekHole(fd, pos);
      } catch (err) {
        if ((err as NativeError).code !== 'ENXIO') throw err;
        hole = end; // file shrank between the two calls: keep the rest as data
      }
      // A hole must be past pos (pos is in data); guard against a misbehaving filesystem.
      const dataEnd = hole > pos ? Math.min(hole, end) : end;
      push(pos, dataEnd, false);
      pos = dataEnd;
    }
  } catch (err) {
    const code = (err as NativeError).code;
    if (code === 'EINVAL' || isNotSupported(err)) return whole;
    throw err;
  }
  return out;
}
