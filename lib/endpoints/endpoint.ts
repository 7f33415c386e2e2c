/**
 * The Endpoint interface: the one seam every kind (NBD, file, block device, pipe, null, command)
 * implements. The copier never branches on the kind; capabilities a kind lacks have one generic
 * fallback here (extents -> one data extent, zero -> write zero buffers).
 */
import { NbdStreamError } from '../errors.js';
import type { Chunk, ZeroBlockMap } from '../extents.js';

export interface Capabilities {
  /** extents() gives real allocation information. */
  canExtents: boolean;
  /** zero() is cheaper than writing zero bytes. */
  canZero: boolean;
  canFastZero: boolean;
  canTrim: boolean;
  canFlush: boolean;
  canMultiConn: boolean;
  /** Preferred request size (bytes). */
  preferredBlockSize: number;
  /** Largest read/write request the endpoint accepts (bytes). */
  maxRequest: number;
  /** The whole endpoint is known to read as zeroes before the copy (e.g. a freshly truncated file). */
  isZeroInitialised: boolean;
  /** Random access; false for pipes and stdin/stdout (offsets must then be sequential). */
  seekable: boolean;
  readOnly: boolean;
  /**
   * The source describes only part of the image (a dirty bitmap, an incremental extent stream):
   * ranges it skips must be left as they are on the target, so the target is opened without
   * truncation (OpenOptions.update).
   */
  partial?: boolean;
  /**
   * write() takes a whole data chunk (up to maxRequest) as cheaply as its request-size pieces
   * and nothing observes request sizes (files, devices, pipes, null:): the Sink writes each
   * chunk in one call instead of one per request-size piece.
   */
  wholeWrites?: boolean;
  /**
   * NBD extended headers are in use: a zero request may span more than 4 GiB, so the Sink zeroes
   * a run of any length in one request instead of one per 128 MiB work range.
   */
  extendedHeaders?: boolean;
}

/**
 * A run of the endpoint: `zero` means it is known to read as zeroes; `skip` means it is not part
 * of this copy (clean in a dirty bitmap): nothing is read, written or zeroed there.
 */
export interface ExtentRun {
  offset: number;
  length: number;
  zero: boolean;
  skip?: boolean;
}

export interface Range {
  offset: number;
  length: number;
}

export interface ReadResult {
  /** `length` bytes (zero ranges are zero-filled). */
  data: Buffer;
  /** Ranges known to be zero without having been transferred (NBD OFFSET_HOLE chunks). */
  zeroes?: Range[];
  /** The all-zero blocks of the data (outside `zeroes`), when found as it arrived (OpenOptions.zeroBlockSize). */
  zeroBlocks?: ZeroBlockMap;
}

export interface ZeroOptions {
  /** Keep the range allocated (--allocated): NBD NO_HOLE, fallocate ZERO_RANGE. */
  allocate?: boolean;
}

export interface Endpoint {
  /** Name for messages and errors: the URI, path or "-". */
  readonly name: string;
  /**
   * The regular file or block device under the endpoint (fileIdentity()), when there is one:
   * two endpoints with the same identity are the same storage.
   */
  readonly identity?: string;
  /**
   * Size in bytes; undefined for a source of unknown size (a pipe), read to EOF. Exact below
   * 2^53; from there on (an NBD export may be up to 2^63 - 1 bytes) the nearest double, right for
   * comparisons with smaller sizes but not for offsets: such an endpoint is only a target.
   */
  readonly size: number | undefined;
  /** The exact size when it is 2^53 or more (`size` is then rounded). */
  readonly exactSize?: bigint;
  readonly capabilities: Capabilities;
  /**
   * A file source whose header is a disk image format (lib/image-format.ts): its bytes are
   * copied as they are (the container, not the disk inside); callers may warn.
   */
  readonly imageFormat?: string;
  /** Extents from `offset`: consecutive, first starts at offset; may cover less than length. */
  extents(offset: number, length: number): Promise<ExtentRun[]>;
  /**
   * Read `length` bytes at `offset` (into `into` if given). Non-seekable sources are read in
   * order; at EOF the result is shorter than asked.
   */
  read(offset: number, length: number, into?: Buffer): Promise<ReadResult>;
  /** Write all of `data` at `offset`. The buffer must not change until the promise settles. */
  write(offset: number, data: Buffer): Promise<void>;
  /** Make the range read as zeroes (cheaply when capabilities.canZero; never by TRIM). */
  zero(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
  /**
   * Optional, sources: the contents arrive as a stream of chunks in offset order (an extent-format
   * pipe). ExtentSource then forwards these instead of asking extents() and read(); gaps between
   * chunks are ranges to skip (see `capabilities.partial`). Iterated at most once.
   */
  chunks?(): AsyncIterable<Chunk>;
  /**
   * Optional, targets: called once by the Sink after every write and zero of a copy has completed
   * successfully (before flush). A stream target writes its trailer here; close() without
   * finish() marks the output as incomplete.
   */
  finish?(): Promise<void>;
}

export type OpenMode = 'source' | 'target';

export interface OpenOptions {
  /** Target only: the source's size (files are created/truncated to it). */
  sourceSize?: number;
  /** NBD: connections to open when multi-conn is allowed (-C). */
  connections?: number;
  /** NBD: requests in flight per connection (-R). */
  requests?: number;
  /** NBD: bytes in flight per connection. */
  queueSize?: number;
  /**
   * NBD: largest NBD_CMD_READ on the wire (--request-size); longer reads go out as several
   * requests, settled together. Default: the server's maximum payload.
   */
  readRequestSize?: number;
  /** NBD: seconds a request may wait for its reply (default: no limit). */
  timeout?: number;
  /** NBD: reconnect and resend a request up to this many times after a lost connection. */
  retries?: number;
  /**
   * Source: the -S block size. An NBD source received by the native reader checks read data for
   * all-zero blocks of this size as it arrives (ReadResult.zeroBlocks), sparing -S a pass over
   * cache-cold buffers.
   */
  zeroBlockSize?: number;
  /**
   * Pipes ("-", FIFOs): 'raw' bytes or the 'extents' stream format (docs/extent-stream.md). A
   * source without it detects the format by the stream's header; a target defaults to raw.
   */
  pipeFormat?: PipeFormat;
  /** NBD source: also negotiate qemu:dirty-bitmap:NAME and describe only its dirty ranges. */
  dirtyBitmap?: string;
  /**
   * Target: the source's identity (Endpoint.identity). A target that is the same file or block
   * device is refused with ERR_SAME_FILE before it is truncated or written.
   */
  sourceIdentity?: string;
  /**
   * Target: keep what is there (the source is partial): files are opened without truncation and
   * must exist and be large enough; a pipe target must use the extents format.
   */
  update?: boolean;
  /**
   * A file opened through qemu-nbd (lib/endpoints/image.ts): the image format (`auto`: detect
   * by the header), as qemu-img -f / -O spell it; `raw` opens the file directly.
   */
  format?: string;
}

export type PipeFormat = 'raw' | 'extents';

const ZERO_BUFFER_SIZE = 1024 * 1024;
let zeroBuffer: Buffer | undefined;

/** Generic zero fallback: write zero buffers (at most 1 MiB each, in order). */
export async function writeZeroes(ep: Pick<Endpoint, 'write'>, offset: number, length: number): Promise<void> {
  zeroBuffer ??= Buffer.alloc(ZERO_BUFFER_SIZE);
  for (let o = offset, end = offset + length; o < end; o += ZERO_BUFFER_SIZE) await ep.write(o, zeroBuffer.subarray(0, Math.min(ZERO_BUFFER_SIZE, end - o)));
}

/** Generic extents fallback: everything is data. */
export function denseExtents(offset: number, length: number): ExtentRun[] {
  return length > 0 ? [{ offset, length, zero: false }] : [];
}

/** The stat fields fileIdentity() needs (fs.Stats or fs.BigIntStats). */
export interface StatLike {
  dev: number | bigint;
  ino: number | bigint;
  rdev: number | bigint;
  isFile(): boolean;
  isBlockDevice(): boolean;
}

/**
 * What makes two opens the same storage: device and inode of a regular file (so symlinks, hard
 * links and /dev/fd/N match), the device number of a block device (so two device nodes of one
 * disk match); undefined for anything else (pipes, terminals, /dev/null are not overwritten).
 */
export function fileIdentity(st: StatLike): string | undefined {
  if (st.isFile()) return `file ${st.dev}:${st.ino}`;
  if (st.isBlockDevice()) return `block ${st.rdev}`;
  return undefined;
}

/** Refuse a target that is the source's storage (it would be emptied or overwritten by itself). */
export function checkNotSource(target: string, identity: string | undefined, sourceIdentity: string | undefined): void {
  if (identity === undefined || identity !== sourceIdentity) return;
  const what = identity.startsWith('block') ? 'block device' : 'file';
  throw new NbdStreamError('ERR_SAME_FILE', `is the same ${what} as the source: refusing to copy it onto itself`, { endpoint: target });
}

export function readOnlyError(name: string, offset?: number): NbdStreamError {
  return new NbdStreamError('ERR_UNSUPPORTED', 'target is read-only', { endpoint: name, offset });
}
