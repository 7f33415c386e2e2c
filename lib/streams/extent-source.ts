/**
 * ExtentSource: a streamx Readable of Chunks covering a source endpoint in offset order.
 *
 * The source is walked in 128 MiB work ranges; each is cut into request-size pieces from its
 * start. A piece wholly covered by zero extents joins the pending zero run, which is emitted as
 * one zero chunk when a data piece comes or the source ends (the sink cuts zero requests at work
 * range boundaries; data chunks never cross one). Any other piece is read whole
 * and emitted as data, except ranges the read reply itself marks as holes, which flow on as zero
 * chunks. Failure to get extents makes the work range data; failure to read destroys the stream
 * (a read error never becomes zeroes). Up to `requests` reads are in flight; `queueSize`
 * bounds the read buffers (BufferPool slabs, so short reads share memory) from the read until
 * the consumer calls `release()`. A consumer that asks for more while holding the whole
 * budget and releases nothing for STALL_MS gets one more read beyond the bound, so one that
 * never releases still progresses, slowly. Chunks are emitted in order.
 *
 * Runs marked `skip` (clean in a dirty bitmap) produce no chunks at all: pieces are cut at their
 * edges, pending runs end before them, and the target is left alone there. So are whole work
 * ranges for which `skip` says so (--resume: copied by an earlier run; no extents are asked
 * there). A source that
 * provides `chunks()` (an extent-format pipe) is not planned at all: its chunks are forwarded in
 * order as they arrive.
 *
 * With `signal`, an abort fails the stream with an AbortError at once: no read or extent request
 * is started after it (those in flight complete and are dropped).
 */
import { Readable } from 'streamx';
import { NbdStreamError, abortError } from '../errors.js';
import { ExtentMap, WORK_RANGE, type Chunk } from '../extents.js';
import type { Endpoint, ExtentRun } from '../endpoints/endpoint.js';
import { newStats, type CopyStats } from './stats.js';
import { BufferPool, splitAtZeroes } from './buffer-pool.js';

export interface ExtentSourceOptions {
  /** Piece size: power of two, 4 KiB - 32 MiB (default 256 KiB). */
  requestSize?: number;
  /** Reads in flight (default 64). */
  requests?: number;
  /** Bytes of reads in flight (default 16 MiB). */
  queueSize?: number;
  /**
   * Largest read: consecutive data pieces are fetched in one request of up to this size and
   * emitted as one chunk (the sink still writes them piece by piece). Default 4 MiB, or
   * requestSize when that is given: an explicit request size caps requests on the wire, as
   * nbdcopy's --request-size does.
   */
  readSize?: number;
  /** Use extent information (default true); false reads everything (--no-extents). */
  extents?: boolean;
  /** Work ranges (by their start) to leave out entirely, as skipped runs. */
  skip?: (workRangeStart: number) => boolean;
  stats?: CopyStats;
  /** Aborting it destroys the stream with an AbortError and starts no further request. */
  signal?: AbortSignal;
}

type Piece = { kind: 'zero' | 'data'; offset: number; length: number } | { kind: 'chunk'; offset: number; length: number; chunk: Chunk };
type QueueEntry = { bytes: number; chunks: Chunk[] | undefined };

export const DEFAULT_REQUEST_SIZE = 256 * 1024;
/**
 * Default bound on the copy's read buffers (--queue-size). nbdcopy's 16 MiB default bounds each
 * of its worker threads (one per connection, 4 by default); this one bounds the whole copy.
 */
export const DEFAULT_QUEUE_SIZE = 16 * 1024 * 1024;
export const DEFAULT_READ_SIZE = 4 * 1024 * 1024;
/** Bytes buffered between pipeline stages (the in-flight limits are what bound memory). */
export const STAGE_BUFFER = 2 * 1024 * 1024;

/** Milliseconds without a release, with the budget held and the consumer waiting, before one read beyond the budget. */
export const STALL_MS = 50;

export function chunkBytes(c: Chunk): number {
  return c.kind === 'data' ? c.length : 64;
}

export class ExtentSource extends Readable {
  readonly stats: CopyStats;
  private readonly src: Endpoint;
  private readonly requestSize: number;
  /** Largest read: several consecutive data pieces go in one request (fewer round trips). */
  private readonly readSize: number;
  private readonly maxRequests: number;
  private readonly queueSize: number;
  private readonly useExtents: boolean;
  private readonly skip: ((workRangeStart: number) => boolean) | undefined;
  private readonly plan: AsyncGenerator<Piece>;
  private planDone = false;
  /** Reads in offset order; `chunks` is set when the read has completed. */
  private readonly queue: QueueEntry[] = [];
  /** Bytes of chunks a chunks() source handed over, waiting in the queue (reads count in the pool). */
  private queuedBytes = 0;
  private planning = false;
  private flowing = false;
  private ended = false;
  private failed = false;
  private pendingRead: ((err: Error | null) => void) | undefined;
  private streamOffset = 0; // for sources of unknown size
  private readonly pool: BufferPool;
  /** Set while the budget is held and the consumer waits (see STALL_MS); a release clears it. */
  private stallTimer: NodeJS.Timeout | undefined;
  /** One read may start beyond the budget (the stall timer fired). */
  private overdraft = false;
  private readonly signal: AbortSignal | undefined;
  private readonly onAbort = () => this.fail(abortError(this.signal!));

  constructor(src: Endpoint, options: ExtentSourceOptions = {}) {
    const queueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    // reads in flight are bounded by queueSize; between stages only about one read's worth waits
    super({ highWaterMark: STAGE_BUFFER, byteLength: (c) => chunkBytes(c as Chunk) });
    this.src = src;
    this.requestSize = options.requestSize ?? DEFAULT_REQUEST_SIZE;
    this.maxRequests = src.capabilities.seekable ? Math.max(1, options.requests ?? 64) : 1;
    this.queueSize = queueSize;
    this.useExtents = (options.extents ?? true) && src.capabilities.canExtents;
    this.stats = options.stats ?? newStats();
    this.skip = options.skip;
    this.plan = src.chunks ? this.planChunks(src.chunks()) : src.size === undefined ? this.planStream() : this.planRanges(src.size);
    this.readSize = src.size === undefined ? this.requestSize : Math.max(this.requestSize, Math.min(options.readSize ?? (options.requestSize ?? DEFAULT_READ_SIZE), src.capabilities.maxRequest, this.queueSize));
    this.pool = new BufferPool(this.readSize);
    this.signal = options.signal;
    this.signal?.addEventListener('abort', this.onAbort, { once: true });
  }

  /** Pieces of a source of known size, by work range. */
  private async *planRanges(size: number): AsyncGenerator<Piece> {
    const rs = this.requestSize;
    const map = new ExtentMap(this.src, size);
    let counted = 0;
    // A zero run may continue across work ranges (the sink still cuts zero requests at them).
    let zeroStart = -1;
    let zeroEnd = -1;
    for (let ws = 0; ws < size; ws += WORK_RANGE) {
      const we = Math.min(ws + WORK_RANGE, size);
      let runs: ExtentRun[] = [{ offset: ws, length: we - ws, zero: false }];
      if (this.skip?.(ws)) runs = [{ offset: ws, length: we - ws, zero: false, skip: true }];
      else if (this.useExtents) {
        try {
          runs = await map.get(ws, we - ws);
        } catch {
          this.stats.extentErrors++;
        }
        // requests asked ahead between walks count too
        this.stats.requests.extents += map.requests - counted;
        counted = map.requests;
      }
      let dataStart = -1;
      let dataEnd = -1;
      let ri = 0;
      for (let p = ws; p < we; ) {
        // pieces are request-size aligned from the work range start; after a skipped run they
        // resume at the next aligned boundary, and they end where a skipped run begins
        let pe = Math.min(p - ((p - ws) % rs) + rs, we);
        while (runs[ri].offset + runs[ri].length <= p) ri++;
        const r = runs[ri];
        if (r.skip) {
          if (dataStart >= 0) {
            yield { kind: 'data', offset: dataStart, length: dataEnd - dataStart };
            dataStart = -1;
          }
          if (zeroStart >= 0) {
            yield { kind: 'zero', offset: zeroStart, length: zeroEnd - zeroStart };
            zeroStart = -1;
          }
          p = Math.min(r.offset + r.length, we);
          continue;
        }
        for (let k = ri + 1; k < runs.length && runs[k].offset < pe; k++) {
          if (runs[k].skip) {
            pe = runs[k].offset;
            break;
          }
        }
        if (r.zero && r.offset + r.length >= pe) {
          // every whole piece inside this zero run joins the pending zero run
          if (dataStart >= 0) {
            yield { kind: 'data', offset: dataStart, length: dataEnd - dataStart };
            dataStart = -1;
          }
          const zEnd = r.offset + r.length;
          const last = zEnd >= we ? we : Math.max(pe, ws + Math.floor((zEnd - ws) / rs) * rs);
          if (zeroStart < 0) zeroStart = p;
          zeroEnd = last;
          p = last;
          continue;
        }
        if (zeroStart >= 0) {
          yield { kind: 'zero', offset: zeroStart, length: zeroEnd - zeroStart };
          zeroStart = -1;
        }
        // consecutive data pieces are read together (never more than readSize: pieces cut at
        // skipped runs are shorter); the sink writes them piece by piece
        if (dataStart >= 0 && pe - dataStart > this.readSize) {
          yield { kind: 'data', offset: dataStart, length: dataEnd - dataStart };
          dataStart = -1;
        }
        if (dataStart < 0) dataStart = p;
        dataEnd = pe;
        if (dataEnd - dataStart >= this.readSize) {
          yield { kind: 'data', offset: dataStart, length: dataEnd - dataStart };
          dataStart = -1;
        }
        p = pe;
      }
      if (dataStart >= 0) yield { kind: 'data', offset: dataStart, length: dataEnd - dataStart };
      // whole work ranges inside a known zero run join the pending zero run without a walk each
      if (zeroStart >= 0 && zeroEnd === we) {
        let skipTo = Math.min(size, we + Math.floor((map.zeroUntil(we) - we) / WORK_RANGE) * WORK_RANGE);
        // (not over a work range left out: the zero run ends before it)
        if (this.skip) for (let w = we; w < skipTo; w += WORK_RANGE) if (this.skip(w)) skipTo = w;
        if (skipTo > we) {
          zeroEnd = skipTo;
          ws = skipTo - WORK_RANGE;
        }
      }
    }
    if (zeroStart >= 0) yield { kind: 'zero', offset: zeroStart, length: zeroEnd - zeroStart };
  }

  /** Sources that deliver their own chunks (extent-format pipes): forwarded one by one. */
  private async *planChunks(chunks: AsyncIterable<Chunk>): AsyncGenerator<Piece> {
    for await (const chunk of chunks) yield { kind: 'chunk', offset: chunk.offset, length: chunk.length, chunk };
  }

  /** Sources of unknown size: sequential data pieces until a short read. */
  private async *planStream(): AsyncGenerator<Piece> {
    for (;;) {
      yield { kind: 'data', offset: this.streamOffset, length: this.requestSize };
      if (this.planDone) return;
    }
  }

  private async readPiece(p: Piece): Promise<Chunk[]> {
    if (p.kind === 'zero') return [{ offset: p.offset, length: p.length, kind: 'zero' }];
    if (p.kind === 'chunk') {
      if (p.chunk.kind === 'data') {
        this.stats.requests.read++;
        this.stats.bytesRead += p.length;
      }
      return [p.chunk];
    }
    const stats = this.stats;
    const piece = this.pool.take(p.length);
    const buf = piece.buf;
    let r;
    try {
      r = await this.src.read(p.offset, p.length, buf);
    } catch (err) {
      piece.release();
      throw err;
    }
    // the buffer's slab counts against queueSize (pool.pinned) until the sink releases it
    const release = () => {
      piece.release();
      this.overdraft = false;
      clearTimeout(this.stallTimer);
      this.stallTimer = undefined;
      this.pump();
    };
    stats.requests.read++;
    const length = r.data.length;
    if (this.src.size === undefined) {
      this.streamOffset += length;
      if (length < p.length) this.planDone = true;
      if (length === 0) return (release(), []);
    } else if (length !== p.length) {
      release();
      throw new NbdStreamError('ERR_IO', `short read: ${length} of ${p.length} bytes`, { endpoint: this.src.name, offset: p.offset });
    }
    stats.bytesRead += length;
    const zb = r.zeroBlocks;
    if (!r.zeroes?.length) return [zb ? { offset: p.offset, length, kind: 'data', data: r.data, release, zeroBlocks: zb } : { offset: p.offset, length, kind: 'data', data: r.data, release }];
    // split around the ranges the server sent as holes
    const out = splitAtZeroes({ offset: p.offset, length, kind: 'data', data: r.data, release }, r.zeroes);
    // each data part gets the zero blocks inside it
    if (zb) {
      for (const c of out) {
        if (c.kind !== 'data') continue;
        const end = c.offset + c.length;
        c.zeroBlocks = { blockSize: zb.blockSize, runs: zb.runs.filter((z) => z.offset >= c.offset && z.offset + z.length <= end) };
      }
    }
    return out;
  }

  /**
   * Start reads while under the limits. Runs whenever a read completes or the consumer asks
   * for more, so the server always has work even when replies complete out of order.
   */
  private pump(): void {
    while (!this.planDone && !this.planning && !this.failed && this.queue.length < this.maxRequests) {
      if (this.queuedBytes + this.pool.pinned >= this.queueSize) {
        if (!this.overdraft) {
          // budget held: normally a release comes soon and calls pump() again
          if (this.queue.length === 0 && this.pendingRead && !this.stallTimer) {
            this.stallTimer = setTimeout(() => {
              this.stallTimer = undefined;
              this.overdraft = true;
              this.pump();
            }, STALL_MS);
          }
          return;
        }
        this.overdraft = false;
      }
      this.planning = true;
      this.plan.next().then(
        (n) => {
          this.planning = false;
          if (n.done) this.planDone = true;
          else if (!this.failed) this.start(n.value);
          this.drain();
          this.pump();
        },
        (err: Error) => this.fail(err),
      );
      // plan.next() settles asynchronously: the loop continues from its callback
      return;
    }
  }

  private start(p: Piece): void {
    const entry: QueueEntry = { bytes: p.kind === 'chunk' && p.chunk.kind === 'data' ? p.length : 0, chunks: undefined };
    this.queue.push(entry);
    this.queuedBytes += entry.bytes;
    this.readPiece(p).then(
      (chunks) => {
        entry.chunks = chunks;
        this.drain();
        this.pump();
      },
      (err: Error) => this.fail(err),
    );
  }

  /** Push completed reads in order while the consumer accepts them; end after the last. */
  private drain(): void {
    if (this.failed) return;
    while (this.flowing && this.queue.length && this.queue[0].chunks) {
      const head = this.queue.shift()!;
      this.queuedBytes -= head.bytes;
      for (const c of head.chunks!) if (!this.push(c)) this.flowing = false;
      this.answer();
    }
    if (this.planDone && !this.planning && !this.queue.length && !this.ended) {
      this.ended = true;
      this.push(null);
      this.answer();
    }
  }

  private answer(): void {
    const cb = this.pendingRead;
    this.pendingRead = undefined;
    cb?.(null);
  }

  private fail(err: Error): void {
    if (this.failed) return;
    this.failed = true;
    const cb = this.pendingRead;
    this.pendingRead = undefined;
    if (cb) cb(err);
    else this.destroy(err);
  }

  override _read(cb: (err: Error | null) => void): void {
    this.pendingRead = cb;
    if (this.signal?.aborted) return this.fail(abortError(this.signal));
    this.flowing = true;
    this.drain();
    this.pump();
  }

  override _destroy(cb: (err: Error | null) => void): void {
    this.signal?.removeEventListener('abort', this.onAbort);
    clearTimeout(this.stallTimer);
    void this.plan.return(undefined).finally(() => cb(null));
  }
}
