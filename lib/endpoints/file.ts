/**
 * File endpoint: regular files and block devices (fstat decides), as source or target.
 *
 * Contracts:
 *  - A regular-file target is truncated to 0 and then to `opts.sourceSize`, so it is known to read
 *    as zeroes (isZeroInitialised) and the copier can skip zero requests. Without a source size
 *    (a pipe source) the file is truncated to 0, grows with the writes, and is *not* reported as
 *    zero-initialised: a trailing zero run must still reach zero(), which extends the file.
 *  - 'update' (incremental copies, the built-in server): an existing file or device opened
 *    read-write as it is — never created, truncated or reported as zero-initialised.
 *  - zero() never leaves a range un-zeroed: fallocate(PUNCH_HOLE) (ZERO_RANGE with `allocate`) on
 *    files, BLKZEROOUT on block devices, else zero buffers are written. BLKDISCARD is never used
 *    for zeroes (read-after-discard is unspecified).
 *  - Every I/O failure is an NbdStreamError('ERR_IO', '<op> failed: <CODE> <text>') with the path
 *    and the request offset, and Node's `errno`, `syscall` and `path` of the failed call; messages
 *    are one line.
 *  - `opts.fs` (a node:fs-compatible file system, e.g. a memfs volume) replaces node:fs for every
 *    call; its fds are not the kernel's, so extents are dense and zeroes are written as buffers.
 */
import * as fs from 'node:fs';
import { nodeFsPromises } from '../builtins.js';
import { NbdStreamError } from '../errors.js';
import { blkGetSize64, blkZeroOut, fileExtents, isNotSupported, native, punchHole, zeroRange } from '../native.js';
import {
  checkNotSource,
  denseExtents,
  fileIdentity,
  readOnlyError,
  writeZeroes,
  type Capabilities,
  type Endpoint,
  type ExtentRun,
  type OpenMode,
  type OpenOptions,
  type ReadResult,
  type ZeroOptions,
} from './endpoint.js';
import { detectImageFormat, IMAGE_HEADER_BYTES, type ImageFormat } from '../image-format.js';
import { fileIo, type FileIo, type FileSystem } from './file-system.js';

const MiB = 1024 * 1024;
const MAX_REQUEST = 32 * MiB;
/**
 * Writes up to this size run on the calling thread when no other write is queued: a short
 * buffered write costs less than handing it to libuv's thread pool and back, which with many
 * short data extents (tens of thousands) dominated the copy.
 */
const SYNC_WRITE_MAX = 256 * 1024;
const DEFAULT_BLOCK_SIZE = 4096;

/** "CODE text" from a node:fs or addon error ("ENOENT: no such file or directory, open '/x'"). */
export function errnoText(err: unknown): string {
  const e = err as NodeJS.ErrnoException | null | undefined;
  const code = typeof e?.code === 'string' ? e.code : undefined;
  let msg = typeof e?.message === 'string' ? e.message : String(err);
  if (code !== undefined && msg.startsWith(`${code}: `)) msg = msg.slice(code.length + 2);
  // node:fs and the addon append ", <syscall> ['<path>' [-> '<dest>']]".
  msg = msg.replace(/, [\w()]+(?: '[^']*'(?: -> '[^']*')?)?$/, '');
  msg = msg.replace(/\s+/g, ' ').trim();
  if (code === undefined) return msg;
  // Socket errors read "<syscall> <CODE>" ("write EPIPE"): the code alone says it.
  if (msg === code || msg.endsWith(` ${code}`) && /^\w+ \w+$/.test(msg)) return code;
  return `${code} ${msg}`;
}

function ioError(op: string, err: unknown, endpoint: string, offset?: number): NbdStreamError {
  if (err instanceof NbdStreamError) return err;
  return withErrno(new NbdStreamError('ERR_IO', `${op} failed: ${errnoText(err)}`, { endpoint, offset, cause: err }), err, endpoint);
}

/** Node's fields of the failed call (`errno`, `syscall`, `path`: the file's path when the call had none). */
export function withErrno(e: NbdStreamError, cause: unknown, path: string): NbdStreamError {
  const c = cause as NodeJS.ErrnoException | null | undefined;
  if (typeof c?.errno === 'number') e.errno = c.errno;
  if (typeof c?.syscall === 'string') e.syscall = c.syscall;
  e.path = typeof c?.path === 'string' ? c.path : path;
  return e;
}

function checkRange(name: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || !Number.isSafeInteger(offset + length)) {
    throw new NbdStreamError('ERR_USAGE', `invalid request: offset ${offset}, length ${length}`, { endpoint: name });
  }
}

/** Block device size without the addon: /sys/dev/block/MAJ:MIN/size is in 512-byte sectors. */
async function sysfsBlockSize(rdev: bigint): Promise<number> {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & 0xfffff000n);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & 0xffffff00n);
  const text = await nodeFsPromises().readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
  const sectors = Number(text.trim());
  if (!Number.isSafeInteger(sectors) || sectors < 0) throw new Error(`bad sysfs size ${JSON.stringify(text)}`);
  return sectors * 512;
}

function blockSizeOf(blksize: number): number {
  // st_blksize when it is a sensible power of two, else 4 KiB.
  return blksize >= 512 && blksize <= 1 * MiB && (blksize & (blksize - 1)) === 0 ? blksize : DEFAULT_BLOCK_SIZE;
}

export type FileKind = 'file' | 'block';

/** The file endpoint's own options. */
export interface FileOptions extends Pick<OpenOptions, 'sourceIdentity'> {
  /** Target: the source's size (a regular file is truncated to it; a device must be as large). */
  sourceSize?: number;
  /** A node:fs-compatible file system to use instead of node:fs (e.g. a memfs volume). */
  fs?: FileSystem;
}

export class FileEndpoint implements Endpoint {
  readonly name: string;
  readonly kind: FileKind;
  readonly capabilities: Capabilities;
  identity: string | undefined;
  /** Source: the disk image format its header shows, if any (copied as raw bytes all the same). */
  imageFormat?: string;
  private readonly fd: number;
  private readonly io: FileIo;
  private readonly mode: OpenMode;
  private _size: number | undefined;
  /** Regular-file target: highest end offset known to exist (a zero() past it must extend). */
  private knownEnd: number;
  private punchUnsupported: boolean;
  private zeroRangeUnsupported: boolean;
  private blkZeroOutUnsupported: boolean;
  private closing: Promise<void> | undefined;

  constructor(io: FileIo, fd: number, name: string, mode: OpenMode, kind: FileKind, size: number | undefined, blksize: number, zeroInitialised: boolean) {
    this.io = io;
    this.fd = fd;
    this.name = name;
    this.mode = mode;
    this.kind = kind;
    this._size = size;
    this.knownEnd = size ?? 0;
    const target = mode === 'target';
    // the addon's calls need a kernel fd
    const addon = native !== undefined && io.real;
    this.punchUnsupported = this.zeroRangeUnsupported = this.blkZeroOutUnsupported = !addon;
    this.capabilities = {
      canExtents: addon && kind === 'file',
      canZero: target && addon,
      canFastZero: false,
      canTrim: false,
      canFlush: true,
      canMultiConn: true,
      preferredBlockSize: blockSizeOf(blksize),
      maxRequest: MAX_REQUEST,
      isZeroInitialised: zeroInitialised,
      seekable: true,
      readOnly: !target,
      wholeWrites: true,
    };
  }

  get size(): number | undefined {
    return this._size;
  }

  private checkOpen(): void {
    if (this.closing) throw new NbdStreamError('ERR_USAGE', 'endpoint is closed', { endpoint: this.name });
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    checkRange(this.name, offset, length);
    this.checkOpen();
    const size = this._size;
    if (size === undefined) return denseExtents(offset, length);
    if (!this.capabilities.canExtents) return denseExtents(offset, Math.max(0, Math.min(length, size - offset)));
    try {
      return fileExtents(this.fd, offset, length, size).map((e) => ({ offset: e.offset, length: e.length, zero: e.zero }));
    } catch (err) {
      throw ioError('extents', err, this.name, offset);
    }
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    checkRange(this.name, offset, length);
    this.checkOpen();
    if (into !== undefined && into.length < length) {
      throw new NbdStreamError('ERR_USAGE', `read buffer too small: ${into.length} < ${length}`, { endpoint: this.name, offset });
    }
    const buf = into ?? Buffer.allocUnsafe(length);
    let got = 0;
    try {
      while (got < length) {
        const bytesRead = await this.io.read(this.fd, buf, got, length - got, offset + got);
        if (bytesRead === 0) break; // EOF
        got += bytesRead;
      }
    } catch (err) {
      throw ioError('read', err, this.name, offset + got);
    }
    return { data: got === buf.length ? buf : buf.subarray(0, got) };
  }

  /** The last write queued: writes run one at a time (see write()). */
  private lastWrite: Promise<unknown> = Promise.resolve();
  /** Writes queued and not yet done. */
  private writesQueued = 0;

  /**
   * Writes run one at a time, in the order they were asked for: buffered writes to one file
   * serialize on its inode lock anyway, and concurrent ones only make the kernel spin on it
   * (on tmpfs, 4 concurrent 4 MiB writers cost twice the CPU of one).
   */
  write(offset: number, data: Buffer): Promise<void> {
    if (data.length <= SYNC_WRITE_MAX && this.writesQueued === 0) {
      try {
        this.writeShort(offset, data);
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(err);
      }
    }
    this.writesQueued++;
    const p = this.lastWrite.then(() => this.writeQueued(offset, data)).finally(() => this.writesQueued--);
    this.lastWrite = p.catch(() => undefined);
    return p;
  }

  /** A short write on this thread (see SYNC_WRITE_MAX). */
  private writeShort(offset: number, data: Buffer): void {
    this.checkWritable(offset, data.length);
    let done = 0;
    try {
      while (done < data.length) {
        const n = this.io.writeSync(this.fd, data, done, data.length - done, offset + done);
        if (n === 0) throw Object.assign(new Error('ENOSPC: no space left on device (0 bytes written)'), { code: 'ENOSPC' });
        done += n;
      }
    } catch (err) {
      throw ioError('write', err, this.name, offset + done);
    }
    if (this.kind === 'file') this.grow(offset + data.length);
  }

  private checkWritable(offset: number, length: number): void {
    checkRange(this.name, offset, length);
    this.checkOpen();
    if (this.mode !== 'target') throw readOnlyError(this.name, offset);
  }

  /** A write whose turn has come: short ones on this thread, the rest in the thread pool. */
  private async writeQueued(offset: number, data: Buffer): Promise<void> {
    if (data.length <= SYNC_WRITE_MAX) return this.writeShort(offset, data);
    this.checkWritable(offset, data.length);
    let done = 0;
    try {
      while (done < data.length) {
        const bytesWritten = await this.io.write(this.fd, data, done, data.length - done, offset + done);
        if (bytesWritten === 0) throw Object.assign(new Error('ENOSPC: no space left on device (0 bytes written)'), { code: 'ENOSPC' });
        done += bytesWritten;
      }
    } catch (err) {
      throw ioError('write', err, this.name, offset + done);
    }
    if (this.kind === 'file') this.grow(offset + data.length);
  }

  private grow(end: number): void {
    if (end > this.knownEnd) this.knownEnd = end;
    if (this._size !== undefined && this.mode === 'target' && end > this._size) this._size = end;
  }

  async zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    checkRange(this.name, offset, length);
    this.checkOpen();
    if (this.mode !== 'target') throw readOnlyError(this.name, offset);
    if (length === 0) return;
    if (this.kind === 'block') return this.zeroBlock(offset, length);

    const end = offset + length;
    if (end > this.knownEnd) {
      // fallocate(KEEP_SIZE) does not extend the file; a 1-byte write at the end does, and unlike
      // ftruncate it can never shrink the file under a concurrent write.
      await this.write(end - 1, Buffer.alloc(1));
    }
    if (!options.allocate && !this.punchUnsupported) {
      if (this.tryNative('punchHole', () => punchHole(this.fd, offset, length), offset)) return;
    }
    if (!this.zeroRangeUnsupported) {
      if (this.tryNative('zeroRange', () => zeroRange(this.fd, offset, length), offset)) return;
    }
    await writeZeroes(this, offset, length);
  }

  /** Run a native zeroing call: true = done; false = unsupported (use the next method); throws on I/O errors. */
  private tryNative(op: 'punchHole' | 'zeroRange' | 'blkZeroOut', fn: () => void, offset: number): boolean {
    try {
      fn();
      return true;
    } catch (err) {
      if (isNotSupported(err)) {
        if (op === 'punchHole') this.punchUnsupported = true;
        else if (op === 'zeroRange') this.zeroRangeUnsupported = true;
        else this.blkZeroOutUnsupported = true;
        return false;
      }
      // EINVAL: this range or this file type cannot do it (e.g. unaligned BLKZEROOUT); fall back
      // for this request only.
      if ((err as NodeJS.ErrnoException).code === 'EINVAL') return false;
      throw ioError('zero', err, this.name, offset);
    }
  }

  private async zeroBlock(offset: number, length: number): Promise<void> {
    if (!this.blkZeroOutUnsupported) {
      if (this.tryNative('blkZeroOut', () => blkZeroOut(this.fd, offset, length), offset)) return;
    }
    await writeZeroes(this, offset, length);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (this.mode !== 'target') return;
    try {
      await this.io.fsync(this.fd);
    } catch (err) {
      throw ioError('flush', err, this.name);
    }
  }

  close(): Promise<void> {
    this.closing ??= this.io.close(this.fd).catch((err: unknown) => {
      throw ioError('close', err, this.name);
    });
    return this.closing;
  }
}

/** 'update': an existing file or device opened read-write as it is (never created or truncated). */
export type FileOpenMode = OpenMode | 'update';

/**
 * Open a regular file or a block device. Sources are opened read-only; regular-file targets are
 * created if missing and truncated to `opts.sourceSize`; block-device targets keep their size
 * (and must be at least `opts.sourceSize`). 'update' opens an existing file or device read-write
 * without creating or truncating it (incremental copies, the built-in server): its contents are
 * kept, it is not zero-initialised, and it must be at least `opts.sourceSize` bytes. FIFOs,
 * character devices and sockets belong to the pipe endpoint and are refused here with ERR_USAGE.
 */
export async function openFile(path: string, openMode: FileOpenMode, opts: FileOptions = {}): Promise<FileEndpoint> {
  if (openMode !== 'source' && openMode !== 'target' && openMode !== 'update') throw new NbdStreamError('ERR_USAGE', `bad open mode ${String(openMode)}`, { endpoint: path });
  const update = openMode === 'update';
  const mode: OpenMode = update ? 'target' : openMode;
  const sourceSize = opts.sourceSize;
  const io = fileIo(opts.fs);
  if (sourceSize !== undefined && (!Number.isSafeInteger(sourceSize) || sourceSize < 0)) {
    throw new NbdStreamError('ERR_USAGE', `bad source size ${sourceSize}`, { endpoint: path });
  }

  // Look first so that a FIFO is never opened here (open() on a FIFO blocks for the peer).
  let exists = true;
  try {
    const st = await io.stat(path);
    if (st.isFIFO() || st.isCharacterDevice() || st.isSocket()) {
      throw new NbdStreamError('ERR_USAGE', 'not a regular file or block device (use it as a pipe)', { endpoint: path });
    }
    if (st.isDirectory()) throw openError(path, mode, Object.assign(new Error('EISDIR: is a directory'), { code: 'EISDIR' }));
  } catch (err) {
    if (err instanceof NbdStreamError) throw err;
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || mode === 'source') throw openError(path, mode, err);
    if (update) throw openError(path, 'source', err); // nothing to update: "cannot open: ENOENT ..." 
    exists = false;
  }

  const flags = mode === 'source' ? fs.constants.O_RDONLY : fs.constants.O_RDWR | (exists ? 0 : fs.constants.O_CREAT);
  let fd: number;
  try {
    fd = await io.open(path, flags, 0o666);
  } catch (err) {
    throw openError(path, mode, err);
  }

  try {
    const st = await io.fstat(fd);
    // an injected fs numbers its own inodes: its files are told apart from the kernel's by its tag
    const kernel = fileIdentity(st);
    const identity = kernel === undefined ? undefined : io.tag + kernel;
    if (mode === 'target') checkNotSource(path, identity, opts.sourceIdentity); // before any truncate or write
    const blksize = Number(st.blksize);
    if (st.isBlockDevice()) {
      if (!io.real) throw new NbdStreamError('ERR_UNSUPPORTED', 'a block device needs node:fs, not an injected fs', { endpoint: path });
      let size: number;
      try {
        size = native ? blkGetSize64(fd) : await sysfsBlockSize(BigInt(st.rdev));
      } catch (err) {
        throw ioError('get size', err, path);
      }
      if (mode === 'target' && sourceSize !== undefined && size < sourceSize) {
        throw new NbdStreamError('ERR_TARGET_TOO_SMALL', `target is smaller than the source (${size} < ${sourceSize} bytes)`, { endpoint: path });
      }
      const ep = withIdentity(new FileEndpoint(io, fd, path, mode, 'block', size, blksize, false), identity);
      if (mode === 'source') ep.imageFormat = await readImageFormat(io, fd);
      return ep;
    }
    if (!st.isFile()) {
      const what = st.isDirectory() ? 'cannot open: EISDIR is a directory' : 'not a regular file or block device (use it as a pipe)';
      throw new NbdStreamError(st.isDirectory() ? 'ERR_IO' : 'ERR_USAGE', what, { endpoint: path });
    }
    if (mode === 'source') {
      const ep = withIdentity(new FileEndpoint(io, fd, path, mode, 'file', Number(st.size), blksize, false), identity);
      ep.imageFormat = await readImageFormat(io, fd);
      return ep;
    }
    if (update) {
      const size = Number(st.size);
      if (sourceSize !== undefined && size < sourceSize) {
        throw new NbdStreamError('ERR_TARGET_TOO_SMALL', `target is smaller than the source (${size} < ${sourceSize} bytes)`, { endpoint: path });
      }
      return withIdentity(new FileEndpoint(io, fd, path, mode, 'file', size, blksize, false), identity);
    }

    // Regular-file target: drop old contents so it is all hole, then extend to the source size.
    try {
      await io.ftruncate(fd, 0);
      if (sourceSize !== undefined && sourceSize > 0) await io.ftruncate(fd, sourceSize);
    } catch (err) {
      throw ioError('truncate', err, path);
    }
    return withIdentity(new FileEndpoint(io, fd, path, mode, 'file', sourceSize, blksize, sourceSize !== undefined), identity);
  } catch (err) {
    await io.close(fd).catch(() => undefined);
    throw err instanceof NbdStreamError ? err : ioError('open', err, path);
  }
}

function withIdentity(ep: FileEndpoint, identity: string | undefined): FileEndpoint {
  ep.identity = identity;
  return ep;
}

/**
 * The image format named by the header at offset 0 of `fd`, if any (lib/image-format.ts). Only a
 * hint: a header that cannot be read is no format (the copy's own read reports the error).
 */
async function readImageFormat(io: FileIo, fd: number): Promise<ImageFormat | undefined> {
  const header = Buffer.alloc(IMAGE_HEADER_BYTES);
  try {
    const bytesRead = await io.read(fd, header, 0, header.length, 0);
    return detectImageFormat(header.subarray(0, bytesRead));
  } catch {
    return undefined;
  }
}

function openError(path: string, mode: OpenMode, err: unknown): NbdStreamError {
  const code = (err as NodeJS.ErrnoException).code;
  if (mode === 'target' && code === 'EROFS') {
    return withErrno(new NbdStreamError('ERR_UNSUPPORTED', `target is read-only: cannot open for writing: ${errnoText(err)}`, { endpoint: path, cause: err }), err, path);
  }
  const what = mode === 'target' ? 'cannot open for writing' : 'cannot open';
  return withErrno(new NbdStreamError('ERR_IO', `${what}: ${errnoText(err)}`, { endpoint: path, cause: err }), err, path);
}
