/**
 * Extent-format pipes (docs/extent-stream.md): a pipe endpoint that carries records instead of
 * raw bytes, so holes cross a pipe as ZERO records and only data is sent.
 *
 * Contracts:
 *  - ExtentStreamTarget: write()/zero() calls come in offset order (as for any pipe); each becomes
 *    records written through a PipeTarget (payloads are not copied: a write settles when its
 *    bytes have been accepted by the stream). Adjacent zero calls merge into one ZERO record.
 *    finish() — called by the Sink once every request of the copy succeeded — writes END; a
 *    close() without finish() (a failed copy) ends the stream without END, which every reader
 *    reports as truncated. With `incremental`, ranges never written or zeroed are left out of the
 *    stream (the far side keeps them); otherwise they are sent as ZERO.
 *  - ExtentStreamSource: the header has been read and checked when it is opened (size, flags);
 *    chunks() yields the records as chunks in order and fails with ERR_PROTOCOL on any violation
 *    or when the stream ends before a complete END. extents() and read() are not available: the
 *    copier reads such a source through chunks().
 *  - openStreamSource(stream): looks at the first bytes. The extent stream magic (or format
 *    'extents') gives an ExtentStreamSource — and so does input that ends within the 8 magic
 *    bytes it matches so far (a cut stream); anything else, empty input included, a raw
 *    PipeSource that starts with the bytes already looked at.
 */
import type { Readable } from 'node:stream';
import { NbdStreamError } from '../errors.js';
import type { Chunk } from '../extents.js';
import { ExtentFrameDecoder, ExtentFrameEncoder, MAGIC, decodeHeader, headerLength, looksLikeExtentStream, type EncoderOptions, type ExtentStreamHeader } from '../streams/extent-codec.js';
import { PipeSource, PipeTarget, isStdio, pipeError } from './pipe.js';
import type { Capabilities, Endpoint, ExtentRun, PipeFormat, ReadResult } from './endpoint.js';

const MAX_REQUEST = 32 * 1024 * 1024;

function capabilities(target: boolean, partial: boolean): Capabilities {
  return {
    canExtents: !target,
    canZero: target,
    canFastZero: false,
    canTrim: false,
    canFlush: false,
    canMultiConn: false,
    preferredBlockSize: 4096, // as nbdcopy's pipes: raises neither the request size nor -S
    maxRequest: MAX_REQUEST,
    isZeroInitialised: false,
    seekable: false,
    readOnly: !target,
    partial,
  };
}

export class ExtentStreamTarget implements Endpoint {
  readonly name: string;
  readonly size = undefined;
  readonly capabilities: Capabilities;
  readonly frames: ExtentFrameEncoder;
  /** Byte position in the output stream. */
  private pos = 0;
  private finished = false;

  constructor(
    private readonly pipe: PipeTarget,
    o: EncoderOptions = {},
  ) {
    this.name = pipe.name;
    this.frames = new ExtentFrameEncoder(o);
    this.capabilities = capabilities(true, false);
  }

  /** Bytes written to the stream so far (header, records, payloads). */
  get streamBytes(): number {
    return this.frames.bytes;
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    return length > 0 ? [{ offset, length, zero: false }] : [];
  }

  async read(offset: number): Promise<ReadResult> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'cannot read from an output pipe', { endpoint: this.name, offset });
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.send(() => this.frames.data(offset, data), offset);
  }

  zero(offset: number, length: number): Promise<void> {
    return this.send(() => this.frames.zero(offset, length), offset);
  }

  /** The copy succeeded: write the rest and END. */
  async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    await this.send(() => this.frames.end());
    await this.pipe.flush();
  }

  async flush(): Promise<void> {
    await this.pipe.flush();
  }

  close(): Promise<void> {
    return this.pipe.close();
  }

  /** Hand frames to the pipe in order; settles when the last one was accepted. */
  private send(make: () => Buffer[], offset?: number): Promise<void> {
    let frames: Buffer[];
    try {
      frames = make();
    } catch (err) {
      return Promise.reject(err instanceof NbdStreamError ? Object.assign(err, { endpoint: err.endpoint ?? this.name }) : err);
    }
    let last: Promise<void> = Promise.resolve();
    const all: Promise<void>[] = [];
    for (const f of frames) {
      last = this.pipe.write(this.pos, f);
      all.push(last);
      this.pos += f.length;
    }
    if (all.length <= 1) return last;
    // every frame's promise is observed; the pipe settles them in order, so the last one decides
    return Promise.all(all).then(
      () => undefined,
      (err: unknown) => {
        throw err instanceof NbdStreamError && offset !== undefined && err.offset === undefined ? Object.assign(err, { offset }) : err;
      },
    );
  }
}

export class ExtentStreamSource implements Endpoint {
  readonly name: string;
  readonly size: number | undefined;
  readonly capabilities: Capabilities;
  /** What the stream said it carries. */
  readonly header: ExtentStreamHeader;
  private prefix: Buffer | undefined;
  private started = false;
  private closed = false;
  /** The decoder, for counters and the END result once chunks() has finished. */
  readonly frames = new ExtentFrameDecoder();

  constructor(
    private readonly stream: Readable,
    name: string,
    header: ExtentStreamHeader,
    prefix: Buffer,
  ) {
    this.name = name;
    this.header = header;
    this.size = header.size;
    this.prefix = prefix;
    this.capabilities = capabilities(false, header.incremental);
    // until chunks() reads it, keep an error from becoming an uncaught exception
    stream.on('error', () => undefined);
  }

  async *chunks(): AsyncGenerator<Chunk> {
    if (this.started) throw new NbdStreamError('ERR_USAGE', 'an extent stream can be read once', { endpoint: this.name });
    this.started = true;
    const dec = this.frames;
    const wrap = (err: unknown): NbdStreamError => {
      if (err instanceof NbdStreamError) {
        err.endpoint ??= this.name;
        return err;
      }
      return pipeError('read', err, this.name);
    };
    try {
      const first = this.prefix!;
      this.prefix = undefined;
      yield* dec.push(first);
      for await (const b of this.stream) {
        if (this.closed) return;
        yield* dec.push(typeof b === 'string' ? Buffer.from(b) : (b as Buffer));
      }
      if (!this.closed) dec.end();
    } catch (err) {
      throw wrap(err);
    }
  }

  async extents(offset: number): Promise<ExtentRun[]> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'an extent stream is read in order through chunks()', { endpoint: this.name, offset });
  }

  async read(offset: number): Promise<ReadResult> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'an extent stream is read in order through chunks()', { endpoint: this.name, offset });
  }

  async write(offset: number): Promise<void> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'target is read-only', { endpoint: this.name, offset });
  }

  async zero(offset: number): Promise<void> {
    throw new NbdStreamError('ERR_UNSUPPORTED', 'target is read-only', { endpoint: this.name, offset });
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const s = this.stream;
    if (isStdio(s)) {
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

/** Read until at least `n` bytes (counting `have`) or EOF; returns everything read. */
async function readAtLeast(stream: Readable, n: number, have: Buffer, name: string): Promise<Buffer> {
  const parts = [have];
  let got = have.length;
  while (got < n) {
    const b = stream.read() as Buffer | string | null;
    if (b !== null) {
      const buf = typeof b === 'string' ? Buffer.from(b) : b;
      parts.push(buf);
      got += buf.length;
      continue;
    }
    if (stream.readableEnded) break;
    if (stream.destroyed) throw pipeError('read', stream.errored ?? new Error('stream closed'), name, got);
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        stream.off('readable', done);
        stream.off('end', done);
        stream.off('error', fail);
        resolve();
      };
      const fail = (err: unknown): void => {
        done();
        reject(pipeError('read', err, name, got));
      };
      stream.on('readable', done);
      stream.on('end', done);
      stream.on('error', fail);
    });
  }
  return parts.length === 1 ? parts[0] : Buffer.concat(parts);
}

/**
 * A pipe source: an extent stream when its header says so (or `format` is 'extents'), raw bytes
 * otherwise. Reads only as much as it needs to decide (at least 8 bytes, or EOF).
 */
export async function openStreamSource(stream: Readable, name: string, format?: PipeFormat): Promise<Endpoint> {
  let head = await readAtLeast(stream, format === 'extents' ? 12 : MAGIC.length, Buffer.alloc(0), name);
  // the magic, or input that ends inside it (a cut stream, not a 1-7 byte image); empty is raw
  const isExtents = head.length > 0 && looksLikeExtentStream(head);
  if (!isExtents && format !== 'extents') return new PipeSource(stream, name, head);
  try {
    if (head.length < 12) head = await readAtLeast(stream, 12, head, name);
    if (head.length < 12) {
      const where = head.length === 0 ? 'the stream is empty' : `the stream ends inside the header after ${head.length} bytes`;
      throw new NbdStreamError('ERR_PROTOCOL', `extent stream: truncated: ${where} without an END record (stream byte ${head.length})`);
    }
    const len = headerLength(head);
    head = await readAtLeast(stream, len, head, name);
    if (head.length < len)
      throw new NbdStreamError('ERR_PROTOCOL', `extent stream: truncated: the stream ends inside the header after ${head.length} bytes without an END record (stream byte ${head.length})`);
    const header = decodeHeader(head);
    return new ExtentStreamSource(stream, name, header, head);
  } catch (err) {
    if (err instanceof NbdStreamError) err.endpoint ??= name;
    if (!isStdio(stream)) stream.destroy();
    throw err;
  }
}
