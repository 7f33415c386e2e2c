/**
 * The node:fs calls the file endpoint makes, so that another node:fs-compatible implementation
 * (a memfs volume, say) can stand in for the real one: `{ file: '/out.img', fs: vol }`.
 *
 * Contract: the callback API of node:fs (positional read/write, numeric open flags from
 * fs.constants). The fds of an injected fs are its own, not the kernel's: the native addon
 * (SEEK_DATA/SEEK_HOLE, fallocate, block-device ioctls) is never used on them, so extents are
 * the dense fallback and zero() writes zero buffers.
 */
import * as fs from 'node:fs';

type Callback<T> = (err: NodeJS.ErrnoException | null, value: T) => void;

/** What the file endpoint reads from a stat. */
export interface FileStats {
  dev: number | bigint;
  ino: number | bigint;
  size: number | bigint;
  blksize: number | bigint;
  rdev: number | bigint;
  isFile(): boolean;
  isDirectory(): boolean;
  isBlockDevice(): boolean;
  isCharacterDevice(): boolean;
  isFIFO(): boolean;
  isSocket(): boolean;
}

/** A node:fs-compatible file system: node:fs itself, or e.g. a memfs volume. */
export interface FileSystem {
  stat(path: string, callback: Callback<FileStats>): void;
  open(path: string, flags: number, mode: number, callback: Callback<number>): void;
  fstat(fd: number, callback: Callback<FileStats>): void;
  read(fd: number, buffer: Buffer, offset: number, length: number, position: number, callback: Callback<number>): void;
  write(fd: number, buffer: Buffer, offset: number, length: number, position: number, callback: Callback<number>): void;
  writeSync(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
  ftruncate(fd: number, len: number, callback: (err: NodeJS.ErrnoException | null) => void): void;
  fsync(fd: number, callback: (err: NodeJS.ErrnoException | null) => void): void;
  close(fd: number, callback: (err: NodeJS.ErrnoException | null) => void): void;
}

/** The calls as promises (not node:fs/promises: it costs about 5 ms of start-up to load). */
export interface FileIo {
  /** True for node:fs: its fds are the kernel's, so the native addon may use them. */
  readonly real: boolean;
  /** Prefix of file identities (Endpoint.identity): '' for node:fs, one per injected fs. */
  readonly tag: string;
  stat(path: string): Promise<FileStats>;
  open(path: string, flags: number, mode: number): Promise<number>;
  /** rdev as a bigint (block device numbers need all 64 bits). */
  fstat(fd: number): Promise<FileStats>;
  read(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number>;
  write(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number>;
  writeSync(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
  ftruncate(fd: number, len: number): Promise<void>;
  fsync(fd: number): Promise<void>;
  close(fd: number): Promise<void>;
}

/** Promise of a node-style call: `call(cb)` runs it with the callback. */
function settle<T>(call: (cb: Callback<T>) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => call((err, value) => (err ? reject(err) : resolve(value))));
}

function ioOf(f: FileSystem, real: boolean, tag: string): FileIo {
  const done = (cb: Callback<void>) => (err: NodeJS.ErrnoException | null) => cb(err, undefined);
  return {
    real,
    tag,
    stat: (path) => settle((cb) => f.stat(path, cb)),
    open: (path, flags, mode) => settle((cb) => f.open(path, flags, mode, cb)),
    fstat: real ? (fd) => settle((cb) => fs.fstat(fd, { bigint: true }, cb)) : (fd) => settle((cb) => f.fstat(fd, cb)),
    read: (fd, buffer, offset, length, position) => settle((cb) => f.read(fd, buffer, offset, length, position, cb)),
    write: (fd, buffer, offset, length, position) => settle((cb) => f.write(fd, buffer, offset, length, position, cb)),
    writeSync: (fd, buffer, offset, length, position) => f.writeSync(fd, buffer, offset, length, position),
    ftruncate: (fd, len) => settle<void>((cb) => f.ftruncate(fd, len, done(cb))),
    fsync: (fd) => settle<void>((cb) => f.fsync(fd, done(cb))),
    close: (fd) => settle<void>((cb) => f.close(fd, done(cb))),
  };
}

let nodeIo: FileIo | undefined;
const injected = new WeakMap<FileSystem, FileIo>();
let injectedCount = 0;

/** The FileIo for `f` (node:fs when undefined). */
export function fileIo(f?: FileSystem): FileIo {
  if (f === undefined || f === fs) return (nodeIo ??= ioOf(fs, true, ''));
  let io = injected.get(f);
  if (!io) injected.set(f, (io = ioOf(f, false, `fs#${injectedCount++} `)));
  return io;
}
