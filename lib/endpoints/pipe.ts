/**
 * Pipe endpoint: stdin as a source, stdout as a target, and any non-seekable file (FIFO,
 * character device, socket) given as an fd or a node stream.
 *
 * Contracts:
 *  - Source: size unknown; read(offset, length) must be called in order (offset = end of the
 *    previous request, checked when the call is made, so calls may overlap in time); it returns
 *    exactly `length` bytes, or fewer only at EOF. Data is pulled through a node Readable in paused
 *    mode (libuv does the non-blocking I/O for pipes and sockets: no EAGAIN, no busy loop).
 *  - Target: write()/zero() calls may be in flight together but must come in offset order. A gap
 *    is filled with zero bytes, an overlap is ERR_USAGE. Pieces are handed to the stream in order
 *    and each call settles when its last byte has been accepted by the stream (written to the fd
 *    for pipes and sockets); the stream's highWaterMark bounds what is queued, so a long zero run
 *    never builds a big queue.
 *  - close(): a target waits for every queued write, then ends the stream; process.stdout/stderr
 *    (and fds 0-2) are never ended or closed, only drained. A source stops reading.
 *  - Stream errors become ERR_IO "read failed: ..." / "write failed: ..." (ERR_BROKEN_PIPE for
 *    EPIPE: the reader has gone); after one, every
 *    later call fails with the same error.
 */
import { createReadStream, createWriteStream, fstatSync } from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { NbdStreamError } from '../errors.js';
import { nodeNet } from '../builtins.js';
import { errnoText } from './file.js';
import {
  denseExtents,
  readOnlyError,
  type Capabilities,
  type Endpoint,
  type ExtentRun,
  type OpenMode,
  type PipeFormat,
  type ReadResult,
} from './endpoint.js';

const MiB = 1024 * 1024;
const MAX_REQUEST = 32 * MiB;
const STREAM_HWM = 1 * MiB;
const ZERO_PIECE = 1 * MiB;
let zeroPiece: Buffer | undefined;

export function pipeError(op: string, err: unknown, endpoint: string, offset?: number): NbdStreamError {
  if (err instanceof NbdStreamError) return err;
  // EPIPE: the reader closed its end (`| head`); cat and nbdcopy die of SIGPIPE there (bin/ does too)
  const code = (err as NodeJS.ErrnoException | undefined)?.code === 'EPIPE' ? 'ERR_BROKEN_PIPE' : 'ERR_IO';
  return new NbdStreamError(code, `${op} failed: ${errnoText(err)}`, { endpoint, offset, cause: err });
}

function checkRange(name: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || !Number.isSafeInteger(offset + length)) {
    throw new NbdStreamError('ERR_USAGE', `invalid request: offset ${offset}, length ${length}`, { endpoint: name });
  }
}

export function isStdio(s: unknown): boolean {
  return s === process.stdin || s === process.stdout || s === process.stderr;
}

function capabilities(target: boolean): Capabilities {
  return {
    canExtents: false,
    canZero: false,
    canFastZero: false,
    canTrim: false,
    canFlush: false,
    canMultiConn: false,
    preferredBlockSize: 4096, // as nbdcopy's pipes: raises neither the request size nor -S
    maxRequest: MAX_REQUEST,
    isZeroInitialised: false,
    seekable: false,
    readOnly: !target,
    wholeWrites: true,
  };
}

/** A readable stream over `fd`: libuv pipe/socket handles for FIFOs and sockets, else fs reads. */
export function readableFromFd(fd: number): Readable {
  if (fd === 0) return process.stdin;
  const st = fstatSync(fd);
  if (st.isFIFO() || st.isSocket()) return new (nodeNet().Socket)({ fd, readable: true, writable: false });
  return createReadStream('', { fd, highWaterMark: STREAM_HWM, autoClose: true });
}

export function writableFromFd(fd: number): Writable {
  if (fd === 1) return process.stdout;
  if (fd === 2) return process.stderr;
  const st = fstatSync(fd);
  if (st.isFIFO() || st.isSocket()) return new (nodeNet().Socket)({ fd, readable: false, writable: true });
  return createWriteStream('', { fd, highWaterMark: STREAM_HWM, autoClose: true });
}

export class PipeSource implements Endpoint {
  readonly name: string;
  readonly size = undefined;
  readonly capabilities = capabilities(false);
  private readonly stream: Readable;
  /** Offset the next read() call must ask for. */
  private nextOffset = 0;
  /** Reads run one after another (each waits for the previous to finish). */
  private tail: Promise<unknown> = Promise.resolve();
  private leftover: Buffer | undefined;
  private ended = false;
  private error: NbdStreamError | undefined;
  private waiter: (() => void) | undefined;
  /** Bytes consumed so far. */
  private position = 0;
  /** Stream offset of EOF, once a read has met it. */
  private eofAt: number | undefined;
  private closed = false;
  private readonly onReadable = (): void => this.wake();
  private readonly onEnd = (): void => {
    this.ended = true;
    this.wake();
  };
  private readonly onError = (err: unknown): void => {
    this.error ??= pipeError('read', err, this.name, this.position);
    this.wake();
  };

  /** `prefix`: bytes already taken from the stream (format detection), read first. */
  constructor(stream: Readable, name: string, prefix?: Buffer) {
    this.stream = stream;
    this.name = name;
    if (prefix?.length) this.leftover = prefix;
    stream.on('readable', this.onReadable);
    stream.on('end', this.onEnd);
    stream.on('error', this.onError);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    return denseExtents(offset, length);
  }

  read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    try {
      checkRange(this.name, offset, length);
      if (this.closed) throw new NbdStreamError('ERR_USAGE', 'endpoint is closed', { endpoint: this.name });
      // Past a known EOF any offset reads as empty; before it, only the next byte is allowed.
      const pastEof = this.eofAt !== undefined && offset >= this.eofAt;
      if (offset !== this.nextOffset && !pastEof) {
        throw new NbdStreamError('ERR_USAGE', `non-sequential read from a pipe: offset ${offset}, expected ${this.nextOffset}`, { endpoint: this.name, offset });
      }
      if (into !== undefined && into.length < length) {
        throw new NbdStreamError('ERR_USAGE', `read buffer too small: ${into.length} < ${length}`, { endpoint: this.name, offset });
      }
    } catch (err) {
      return Promise.reject(err);
    }
    this.nextOffset = Math.max(this.nextOffset, offset + length);
    const p = this.tail.then(() => this.readNext(length, into));
    this.tail = p.catch(() => undefined);
    return p;
  }

  private async readNext(length: number, into: Buffer | undefined): Promise<ReadResult> {
    const buf = into ?? Buffer.allocUnsafe(length);
    let got = 0;
    while (got < length) {
      if (this.error) throw this.error;
      let chunk = this.leftover;
      this.leftover = undefined;
      if (chunk === undefined && !this.closed) chunk = (this.stream.read() as Buffer | null) ?? undefined;
      if (chunk === undefined) {
        if (this.ended || this.closed || this.stream.readableEnded) {
          if (!this.closed) this.eofAt ??= this.position;
          break;
        }
        await new Promise<void>((resolve) => (this.waiter = resolve));
        continue;
      }
      if (typeof chunk === 'string') chunk = Buffer.from(chunk);
      const n = Math.min(chunk.length, length - got);
      if (n < chunk.length) this.leftover = chunk.subarray(n);
      // Hand a whole stream chunk over without copying when it is exactly what was asked for.
      if (into === undefined && got === 0 && n === length && n === chunk.length) {
        this.position += n;
        return { data: chunk };
      }
      chunk.copy(buf, got, 0, n);
      got += n;
      this.position += n;
    }
    return { data: got === buf.length ? buf : buf.subarray(0, got) };
  }

  async write(offset: number): Promise<void> {
    throw readOnlyError(this.name, offset);
  }

  async zero(offset: number): Promise<void> {
    throw readOnlyError(this.name, offset);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.wake();
    const s = this.stream;
    s.off('readable', this.onReadable);
    s.off('end', this.onEnd);
    // Keep an error listener: a late error must not become an uncaught exception.
    if (isStdio(s)) {
      s.off('error', this.onError);
      s.on('error', () => undefined);
      s.pause();
      return;
    }
    if (s.destroyed) return;
    await new Promise<void>((resolve) => {
      s.once('close', resolve);
      s.destroy();
    });
  }
}

interface WriteOp {
  /** Data still to hand to the stream (whole op) or the number of zero bytes left. */
  data: Buffer | undefined;
  zeroes: number;
  /** Pieces handed to the stream whose callback has not fired. */
  outstanding: number;
  submitted: boolean;
  settled: boolean;
  offset: number;
  resolve: () => void;
  reject: (err: NbdStreamError) => void;
}

export class PipeTarget implements Endpoint {
  readonly name: string;
  readonly size = undefined;
  readonly capabilities = capabilities(true);
  private readonly stream: Writable;
  private readonly own: boolean;
  /** End offset of the last accepted call (where the next one must start, or after). */
  private nextOffset = 0;
  private readonly queue: WriteOp[] = [];
  /** Ops handed (at least partly) to the stream and not yet settled. */
  private readonly inFlight = new Set<WriteOp>();
  private waitingDrain = false;
  private error: NbdStreamError | undefined;
  private idleWaiters: (() => void)[] = [];
  private closing: Promise<void> | undefined;
  /** Bytes handed to the stream so far (for error offsets). */
  private position = 0;
  private readonly onError = (err: unknown): void => this.fail(pipeError('write', err, this.name, this.position));
  private readonly onDrain = (): void => {
    this.waitingDrain = false;
    this.pump();
  };

  constructor(stream: Writable, name: string, own: boolean) {
    this.stream = stream;
    this.name = name;
    this.own = own && !isStdio(stream);
    stream.on('error', this.onError);
    stream.on('drain', this.onDrain);
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    return denseExtents(offset, length);
  }

  async read(offset: number): Promise<ReadResult> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'cannot read from an output pipe', { endpoint: this.name, offset });
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.enqueue(offset, data, data.length);
  }

  zero(offset: number, length: number): Promise<void> {
    return this.enqueue(offset, undefined, length);
  }

  private enqueue(offset: number, data: Buffer | undefined, length: number): Promise<void> {
    try {
      checkRange(this.name, offset, length);
      if (this.closing) throw new NbdStreamError('ERR_USAGE', 'endpoint is closed', { endpoint: this.name, offset });
      if (this.error) throw this.error;
      if (offset < this.nextOffset) {
        throw new NbdStreamError('ERR_USAGE', `non-sequential write to a pipe: offset ${offset} overlaps data already written up to ${this.nextOffset}`, { endpoint: this.name, offset });
      }
    } catch (err) {
      return Promise.reject(err);
    }
    const gap = offset - this.nextOffset;
    const p = new Promise<void>((resolve, reject) => {
      // A gap is written as zero bytes: merged into this op so it settles with it.
      const op: WriteOp = { data, zeroes: data ? 0 : length, outstanding: 0, submitted: false, settled: false, offset: this.nextOffset, resolve, reject };
      if (gap > 0) {
        if (data) {
          this.queue.push({ data: undefined, zeroes: gap, outstanding: 0, submitted: false, settled: false, offset: this.nextOffset, resolve: () => undefined, reject: () => undefined });
        } else {
          op.zeroes += gap;
        }
      }
      this.queue.push(op);
    });
    this.nextOffset = offset + length;
    this.pump();
    return p;
  }

  /** Hand queued pieces to the stream, in order, until it asks us to wait for 'drain'. */
  private pump(): void {
    while (this.queue.length > 0 && !this.waitingDrain && !this.error) {
      const op = this.queue[0];
      let piece: Buffer;
      if (op.data !== undefined) {
        piece = op.data;
        op.data = undefined;
      } else {
        zeroPiece ??= Buffer.alloc(ZERO_PIECE);
        piece = zeroPiece.subarray(0, Math.min(ZERO_PIECE, op.zeroes));
        op.zeroes -= piece.length;
      }
      if (op.zeroes === 0 && op.data === undefined) {
        op.submitted = true;
        this.queue.shift();
      }
      if (piece.length === 0) {
        if (op.submitted && op.outstanding === 0) this.settle(op);
        continue;
      }
      op.outstanding++;
      this.inFlight.add(op);
      this.position += piece.length;
      const ok = this.stream.write(piece, (err?: Error | null) => {
        op.outstanding--;
        if (err) this.fail(pipeError('write', err, this.name, this.position));
        else if (op.submitted && op.outstanding === 0) this.settle(op);
      });
      if (!ok) this.waitingDrain = true;
    }
  }

  private settle(op: WriteOp, err?: NbdStreamError): void {
    if (op.settled) return;
    op.settled = true;
    this.inFlight.delete(op);
    if (err) op.reject(err);
    else op.resolve();
    if (this.queue.length === 0 && this.inFlight.size === 0) {
      for (const w of this.idleWaiters.splice(0)) w();
    }
  }

  private fail(err: NbdStreamError): void {
    this.error ??= err;
    for (const op of [...this.inFlight, ...this.queue.splice(0)]) this.settle(op, this.error);
    for (const w of this.idleWaiters.splice(0)) w();
  }

  /** Resolves when every accepted write/zero has settled. */
  private idle(): Promise<void> {
    if (this.queue.length === 0 && this.inFlight.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  async flush(): Promise<void> {
    await this.idle();
    if (this.error) throw this.error;
  }

  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    await this.idle();
    const s = this.stream;
    // A write error was already delivered to the calls that failed; close() only tidies up.
    if (!this.own) {
      // stdout/stderr (or a stream we do not own): drain, never end or close.
      if (!this.error && s.writableNeedDrain && !s.destroyed) {
        await new Promise<void>((resolve) => {
          const done = (): void => {
            s.off('drain', done);
            s.off('close', done);
            resolve();
          };
          s.on('drain', done);
          s.on('close', done);
        });
      }
      s.off('drain', this.onDrain);
      return;
    }
    let endError: unknown;
    if (!s.destroyed && !this.error) {
      await new Promise<void>((resolve) => {
        const onError = (err: unknown): void => {
          endError ??= err;
          resolve();
        };
        s.once('error', onError);
        s.end(() => {
          s.off('error', onError);
          resolve();
        });
      });
    }
    if (!s.destroyed) {
      await new Promise<void>((resolve) => {
        s.once('close', resolve);
        s.destroy();
      });
    }
    if (endError !== undefined) throw pipeError('close', endError, this.name, this.position);
  }
}

/** How to open a pipe: its format, and for targets what the extent stream header says. */
export interface PipeOpenOptions {
  /** 'raw' bytes or the 'extents' stream; a source detects it when not given, a target is raw. */
  format?: PipeFormat;
  /** Target, extents: the image size for the header (the source's, when known). */
  size?: number;
  /** Target: the source is partial (keep the far side's other ranges): needs the extents format. */
  update?: boolean;
}

/**
 * Open a pipe endpoint over an fd (0 = process.stdin, 1 = process.stdout; other fds are owned and
 * closed by close()) or a node stream (ended/destroyed by close() unless it is a process stdio
 * stream). `name` is used in messages ("-" for stdin/stdout). With the extents format (or, for a
 * source, when its first bytes are an extent stream header) the endpoint reads or writes
 * docs/extent-stream.md instead of raw bytes (lib/endpoints/extent-pipe.ts).
 */
export async function openPipe(fdOrStream: number | Readable | Writable, name: string, mode: 'source', o?: PipeOpenOptions): Promise<Endpoint>;
export async function openPipe(fdOrStream: number | Readable | Writable, name: string, mode: 'target', o?: PipeOpenOptions): Promise<Endpoint>;
export async function openPipe(fdOrStream: number | Readable | Writable, name: string, mode: OpenMode, o?: PipeOpenOptions): Promise<Endpoint>;
export async function openPipe(fdOrStream: number | Readable | Writable, name: string, mode: OpenMode, o: PipeOpenOptions = {}): Promise<Endpoint> {
  if (o.format !== undefined && o.format !== 'raw' && o.format !== 'extents')
    throw new NbdStreamError('ERR_USAGE', `bad pipe format "${String(o.format)}" (expected raw or extents)`, { endpoint: name });
  if (mode === 'target' && o.update && o.format !== 'extents')
    throw new NbdStreamError('ERR_USAGE', 'the source is partial (a dirty bitmap): a raw pipe cannot leave ranges untouched; use pipeFormat=extents', { endpoint: name, option: 'pipeFormat' });
  let stream: Readable | Writable;
  try {
    if (mode === 'source') stream = typeof fdOrStream === 'number' ? readableFromFd(fdOrStream) : (fdOrStream as Readable);
    else if (mode === 'target') stream = typeof fdOrStream === 'number' ? writableFromFd(fdOrStream) : (fdOrStream as Writable);
    else throw new NbdStreamError('ERR_USAGE', `bad open mode ${String(mode)}`, { endpoint: name });
  } catch (err) {
    throw pipeError('open', err, name);
  }
  if (mode === 'source') {
    if (o.format === 'raw') return new PipeSource(stream as Readable, name);
    return (await import('./extent-pipe.js')).openStreamSource(stream as Readable, name, o.format);
  }
  const own = typeof fdOrStream !== 'number' || fdOrStream > 2;
  const target = new PipeTarget(stream as Writable, name, own);
  if (o.format !== 'extents') return target;
  const { ExtentStreamTarget } = await import('./extent-pipe.js');
  return new ExtentStreamTarget(target, { size: o.size, incremental: o.update });
}
