/**
 * Extent stream Transforms (format: docs/extent-stream.md, framing: extent-codec.ts).
 *
 *   ExtentSource -> ZeroDetect -> ExtentEncoder -> (bytes: a pipe, ssh, gzip ...)
 *   (bytes) -> ExtentDecoder -> ZeroDetect -> Sink
 *
 * ExtentEncoder: Chunks in, Buffers out. Record headers and payloads are copied into output
 * buffers of `outputSize` bytes (fewer, larger writes downstream), and each chunk is released as
 * soon as its bytes are copied — the encoder keeps no chunk buffer. Chunks without `release`
 * (buffers nobody reuses) are passed on without copying. The END record is written when the
 * writable side ends; a stream destroyed before that ends without END, which every decoder
 * reports as truncated.
 *
 * ExtentDecoder: Buffers in, Chunks out (see ExtentFrameDecoder). It fails with ERR_PROTOCOL on
 * the first violation and, at the end of its input, unless END was read and its digest matched:
 * a truncated stream never finishes successfully.
 */
import { Transform } from 'streamx';
import type { Chunk } from '../extents.js';
import { chunkBytes, STAGE_BUFFER } from './extent-source.js';
import { ExtentFrameDecoder, ExtentFrameEncoder, type DecodeResult, type DecoderOptions, type EncoderOptions, type ExtentStreamHeader } from './extent-codec.js';

export interface ExtentEncoderOptions extends EncoderOptions {
  /** Bytes per output buffer (default 256 KiB). */
  outputSize?: number;
}

export class ExtentEncoder extends Transform {
  readonly frames: ExtentFrameEncoder;
  private readonly outputSize: number;
  private out: Buffer | undefined;
  private outLen = 0;

  constructor(o: ExtentEncoderOptions = {}) {
    super({ highWaterMark: STAGE_BUFFER, byteLengthWritable: (c) => chunkBytes(c as Chunk), byteLengthReadable: (b) => (b as Buffer).length });
    this.frames = new ExtentFrameEncoder(o);
    this.outputSize = Math.max(4096, o.outputSize ?? 256 * 1024);
  }

  /** Stream bytes produced so far. */
  get bytes(): number {
    return this.frames.bytes;
  }

  override _transform(data: unknown, cb: (err: Error | null, out?: unknown) => void): void {
    const c = data as Chunk;
    let frames: Buffer[];
    try {
      frames = this.frames.chunk(c);
    } catch (err) {
      c.release?.();
      return cb(err as Error);
    }
    // a payload nobody reuses (no release) is passed on as it is; others are copied, then released
    const direct = c.kind === 'data' && !c.release && c.length >= 4096;
    for (const f of frames) {
      if (direct && f.length >= 4096 && f.buffer === c.data!.buffer) {
        this.flushOut();
        this.push(f);
      } else this.add(f);
    }
    c.release?.();
    cb(null);
  }

  override _flush(cb: (err: Error | null) => void): void {
    try {
      for (const f of this.frames.end()) this.add(f);
    } catch (err) {
      return cb(err as Error);
    }
    this.flushOut();
    cb(null);
  }

  /** Copy bytes into the output buffer, pushing it whenever it fills. */
  private add(f: Buffer): void {
    for (let pos = 0; pos < f.length; ) {
      this.out ??= Buffer.allocUnsafe(this.outputSize);
      const n = Math.min(f.length - pos, this.outputSize - this.outLen);
      f.copy(this.out, this.outLen, pos, pos + n);
      this.outLen += n;
      pos += n;
      if (this.outLen === this.outputSize) this.flushOut();
    }
  }

  private flushOut(): void {
    if (!this.out || this.outLen === 0) return;
    this.push(this.outLen === this.out.length ? this.out : this.out.subarray(0, this.outLen));
    this.out = undefined;
    this.outLen = 0;
  }
}

export interface ExtentDecoderOptions extends DecoderOptions {}

export class ExtentDecoder extends Transform {
  readonly frames: ExtentFrameDecoder;

  constructor(o: ExtentDecoderOptions = {}) {
    super({ highWaterMark: STAGE_BUFFER, byteLengthReadable: (c) => chunkBytes(c as Chunk), byteLengthWritable: (b) => (b as Buffer).length });
    this.frames = new ExtentFrameDecoder(o);
  }

  /** The stream header, once read. */
  get header(): ExtentStreamHeader | undefined {
    return this.frames.header;
  }

  /** Image size and digest from END, once the stream has ended successfully. */
  get result(): DecodeResult | undefined {
    return this.frames.result;
  }

  override _transform(data: unknown, cb: (err: Error | null, out?: unknown) => void): void {
    let chunks: Chunk[];
    try {
      chunks = this.frames.push(data as Buffer);
    } catch (err) {
      return cb(err as Error);
    }
    for (const c of chunks) this.push(c);
    cb(null);
  }

  override _flush(cb: (err: Error | null) => void): void {
    try {
      this.frames.end();
    } catch (err) {
      return cb(err as Error);
    }
    cb(null);
  }
}
