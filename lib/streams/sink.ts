/**
 * Sink: a streamx Writable that writes data chunks to a target endpoint and turns zero chunks
 * into zero requests — or into nothing when the target is known to be zero. Several requests are
 * in flight (bounded by count and bytes); the first failure destroys the stream, and the sink
 * finishes only after every request has completed (then calls the target's finish(), if it has
 * one, and flushes, if asked). `written` is a watermark for --resume: every chunk that starts below
 * it has been written (chunks arrive in offset order, so nothing more will come below it).
 */
import { Writable } from 'streamx';
import { WORK_RANGE, type Chunk } from '../extents.js';
import type { Endpoint } from '../endpoints/endpoint.js';
import { newStats, type CopyStats } from './stats.js';
import { DEFAULT_QUEUE_SIZE } from './extent-source.js';

export interface SinkOptions {
  /** Data is written in requests that do not cross multiples of this (default 256 KiB). */
  requestSize?: number;
  /** Requests in flight (default 64). */
  requests?: number;
  /** Bytes of writes in flight (default 16 MiB). */
  queueSize?: number;
  /** Keep zeroed ranges allocated (--allocated). */
  allocated?: boolean;
  /** Target already reads as zeroes (--destination-is-zero); also implied by isZeroInitialised. */
  destinationIsZero?: boolean;
  /** Flush the target at the end (--flush). */
  flush?: boolean;
  stats?: CopyStats;
  /** Called as chunks complete with the bytes of the source covered so far. */
  onProgress?: (bytesDone: number) => void;
  /** Bytes counted as done before the first chunk (ranges an earlier run copied, --resume). */
  done?: number;
}

export class Sink extends Writable {
  readonly stats: CopyStats;
  private readonly dst: Endpoint;
  private readonly maxRequests: number;
  private readonly requestSize: number;
  private readonly queueSize: number;
  private readonly allocated: boolean;
  private readonly skipZeroes: boolean;
  private readonly doFlush: boolean;
  private readonly onProgress?: (bytesDone: number) => void;
  private inFlight = 0;
  private inFlightBytes = 0;
  private done = 0;
  private blocked: ((err: Error | null) => void) | undefined;
  private idle: (() => void) | undefined;
  private failure: Error | undefined;
  /** Chunks in arrival (offset) order until the ones before them completed; see `written`. */
  private readonly order: Array<{ end: number; complete: boolean }> = [];
  /** Every chunk starting below this has been written; Infinity once all have. */
  written = 0;

  constructor(dst: Endpoint, options: SinkOptions = {}) {
    const queueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    super({ highWaterMark: Math.min(queueSize, 1024 * 1024), byteLength: (c) => ((c as Chunk).kind === 'data' ? (c as Chunk).length : 64) });
    this.dst = dst;
    this.maxRequests = dst.capabilities.seekable ? Math.max(1, options.requests ?? 64) : 16;
    this.queueSize = queueSize;
    this.requestSize = options.requestSize ?? 256 * 1024;
    this.allocated = options.allocated ?? false;
    this.skipZeroes = (options.destinationIsZero ?? false) || dst.capabilities.isZeroInitialised;
    this.doFlush = options.flush ?? false;
    this.stats = options.stats ?? newStats();
    this.onProgress = options.onProgress;
    this.done = options.done ?? 0;
  }

  /** A chunk arrived: the chunks before it have completed if none waits in `order`. */
  private arrived(c: Chunk): { end: number; complete: boolean } {
    const entry = { end: c.offset + c.length, complete: false };
    if (this.order.length === 0) this.written = c.offset;
    this.order.push(entry);
    return entry;
  }

  private completed(entry: { end: number; complete: boolean }): void {
    entry.complete = true;
    while (this.order.length && this.order[0].complete) this.written = this.order.shift()!.end;
  }

  override _write(data: unknown, cb: (err: Error | null) => void): void {
    if (this.failure) return cb(this.failure);
    const c = data as Chunk;
    const stats = this.stats;
    const entry = this.arrived(c);
    let op: Promise<void>;
    let bytes = 0;
    if (c.kind === 'data') {
      bytes = c.length;
      op = this.writePieces(c).then(() => {
        stats.bytesWritten += c.length;
      });
    } else if (this.skipZeroes) {
      stats.bytesSkipped += c.length;
      this.completed(entry);
      this.progress(c.length);
      return cb(null);
    } else {
      op = this.zeroPieces(c).then(() => {
        stats.bytesZeroed += c.length;
      });
    }
    this.inFlight++;
    this.inFlightBytes += bytes;
    op.then(
      () => {
        c.release?.();
        this.inFlight--;
        this.inFlightBytes -= bytes;
        this.completed(entry);
        this.progress(c.length);
        this.release();
      },
      (err: Error) => {
        c.release?.();
        this.inFlight--;
        this.inFlightBytes -= bytes;
        this.failure ??= err;
        // A pending _write or _final callback must be answered: streamx waits for it before it
        // destroys the stream, so destroy() alone would hang when _final is waiting for idle.
        if (this.blocked || this.idle) this.release();
        else this.destroy(this.failure);
      },
    );
    if (this.inFlight < this.maxRequests && this.inFlightBytes < this.queueSize) cb(null);
    else this.blocked = cb;
  }

  /**
   * Write a data chunk as one request per request-size piece it touches, or whole when the
   * target takes whole chunks (capabilities.wholeWrites).
   */
  private writePieces(c: Chunk): Promise<unknown> {
    const rs = this.requestSize;
    const first = rs - (c.offset % rs);
    if (c.length <= first || (this.dst.capabilities.wholeWrites && c.length <= this.dst.capabilities.maxRequest)) {
      this.stats.requests.write++;
      return this.dst.write(c.offset, c.data!);
    }
    const writes: Promise<void>[] = [];
    for (let o = c.offset, end = c.offset + c.length; o < end; ) {
      const e = Math.min(end, o - (o % rs) + rs);
      writes.push(this.dst.write(o, c.data!.subarray(o - c.offset, e - c.offset)));
      o = e;
    }
    this.stats.requests.write += writes.length;
    return Promise.all(writes);
  }

  /**
   * Zero a range as one request per 128 MiB work range it touches (as nbdcopy), or as one
   * request when the target takes any length (NBD extended headers).
   */
  private zeroPieces(c: Chunk): Promise<unknown> {
    const zeros: Promise<void>[] = [];
    const span = this.dst.capabilities.extendedHeaders ? Infinity : WORK_RANGE;
    for (let o = c.offset, end = c.offset + c.length; o < end; ) {
      const e = span === Infinity ? end : Math.min(end, o - (o % span) + span);
      zeros.push(this.dst.zero(o, e - o, { allocate: this.allocated }));
      o = e;
    }
    this.stats.requests.zero += zeros.length;
    return zeros.length === 1 ? zeros[0] : Promise.all(zeros);
  }

  private progress(n: number): void {
    this.done += n;
    this.onProgress?.(this.done);
  }

  private release(): void {
    const b = this.blocked;
    if (b && (this.failure || (this.inFlight < this.maxRequests && this.inFlightBytes < this.queueSize))) {
      this.blocked = undefined;
      b(this.failure ?? null);
    }
    if (this.inFlight === 0 && this.idle) {
      const i = this.idle;
      this.idle = undefined;
      i();
    }
  }

  override _final(cb: (err: Error | null) => void): void {
    const finish = () => {
      if (this.failure) return cb(this.failure);
      this.written = Infinity;
      // every request succeeded: a stream target writes its trailer (END) now, and only now
      const dst = this.dst;
      if (!dst.finish && !this.doFlush) return cb(null);
      (async () => {
        if (dst.finish) await dst.finish();
        if (this.doFlush) await dst.flush();
      })().then(
        () => cb(null),
        (err: Error) => cb(err),
      );
    };
    if (this.inFlight === 0) finish();
    else this.idle = finish;
  }
}
