/**
 * compare(a, b): are two images the same? qemu-img compare's semantics: the common part must
 * be equal byte for byte; when the sizes differ, the extra part of the larger image must read as
 * zeroes (or, with `strict`, any size difference is a difference).
 *
 * Both sides are walked with ExtentSource, so each side reads only what its own extents call
 * data: a range that both sides report as zero is compared without any read, and a range that
 * one side reports as zero only needs the other side's bytes (checked for zeroes).
 */
import { NbdStreamError, asNbdStreamError } from './errors.js';
import type { Chunk } from './extents.js';
import type { Endpoint } from './endpoints/endpoint.js';
import { isEndpoint, openEndpoint, type EndpointSpec } from './endpoints/open.js';
import { ExtentSource } from './streams/extent-source.js';
import { newStats, type CopyStats } from './streams/stats.js';

export interface CompareOptions {
  /** A size mismatch is a difference (qemu-img compare -s). */
  strict?: boolean;
  /** Read piece size (default 256 KiB). */
  requestSize?: number;
  /** Reads in flight per side (default 64). */
  requests?: number;
  /** Bytes of reads in flight per side (default 16 MiB). */
  queueSize?: number;
  /** NBD connections per side when multi-conn is allowed (default 4). */
  connections?: number;
  /** Ignore extent information: read everything. */
  noExtents?: boolean;
  /** compareEndpoints: stops the reads, rejecting with an AbortError. */
  signal?: AbortSignal;
}

export interface CompareResult {
  /** True when the images compare equal (under the chosen strictness). */
  identical: boolean;
  /** Why they differ: bytes, or (strict only) the sizes. */
  difference?: 'content' | 'size';
  /** First differing byte offset, for a content difference. */
  offset?: number;
  /** The sizes differ (reported as a warning when not strict). */
  sizeMismatch: boolean;
  /** Sizes of a and b (known after the walk for streams; undefined if the walk stopped early). */
  sizes: [number | undefined, number | undefined];
  /** Counters of each side's reads. */
  stats: [CopyStats, CopyStats];
  elapsed: number;
}

/**
 * A view of an endpoint limited to its first `size` bytes, which close() leaves open (to walk
 * part of an endpoint that someone else owns).
 */
export function endpointView(ep: Endpoint, size: number): Endpoint {
  return {
    name: ep.name,
    size,
    capabilities: ep.capabilities,
    extents: (o, l) => ep.extents(o, Math.min(l, size - o)),
    read: (o, l, into) => ep.read(o, l, into),
    write: (o, d) => ep.write(o, d),
    zero: (o, l, z) => ep.zero(o, l, z),
    flush: () => ep.flush(),
    close: async () => undefined,
  };
}

/** Compare two images given as specs (opened read-only here and closed) or open endpoints. */
export async function compare(a: EndpointSpec | Endpoint, b: EndpointSpec | Endpoint, options: CompareOptions = {}): Promise<CompareResult> {
  const openOpts = { connections: options.connections ?? 4, requests: options.requests ?? 64, queueSize: options.queueSize };
  const opened: Endpoint[] = [];
  try {
    const ea = isEndpoint(a) ? a : await openEndpoint(a, 'source', openOpts);
    if (!isEndpoint(a)) opened.push(ea);
    const eb = isEndpoint(b) ? b : await openEndpoint(b, 'source', openOpts);
    if (!isEndpoint(b)) opened.push(eb);
    const result = await compareEndpoints(ea, eb, options);
    for (const ep of opened.splice(0)) await ep.close();
    return result;
  } catch (err) {
    throw asNbdStreamError(err, 'ERR_IO');
  } finally {
    await Promise.allSettled(opened.map((ep) => ep.close()));
  }
}

/** Compare two open endpoints (left open). */
export async function compareEndpoints(a: Endpoint, b: Endpoint, options: CompareOptions = {}): Promise<CompareResult> {
  const started = process.hrtime.bigint();
  const statsA = newStats();
  const statsB = newStats();
  const elapsed = () => Number(process.hrtime.bigint() - started) / 1e9;
  const strict = options.strict ?? false;
  const known = a.size !== undefined && b.size !== undefined;
  const base = { stats: [statsA, statsB] as [CopyStats, CopyStats] };
  if (known && strict && a.size !== b.size)
    return { identical: false, difference: 'size', sizeMismatch: true, sizes: [a.size, b.size], ...base, elapsed: elapsed() };

  const srcOpts = { requestSize: options.requestSize, requests: options.requests, queueSize: options.queueSize, extents: !options.noExtents, signal: options.signal };
  const ca = new Cursor(new ExtentSource(a, { ...srcOpts, stats: statsA }));
  const cb = new Cursor(new ExtentSource(b, { ...srcOpts, stats: statsB }));
  const done = (r: Omit<CompareResult, 'stats' | 'elapsed'>): CompareResult => ({ ...r, ...base, elapsed: elapsed() });
  try {
    let pos = 0;
    for (;;) {
      const [x, y] = await Promise.all([ca.peek(), cb.peek()]);
      if (!x && !y) break;
      if (!x || !y) {
        // one image ended: the rest of the other must be zero (or, strictly, must not exist)
        if (strict) return done({ identical: false, difference: 'size', sizeMismatch: true, sizes: [a.size, b.size] });
        const c = (x ?? y)!;
        if (c.kind === 'data') {
          const i = firstNonZero(ca.slice(c, pos, c.offset + c.length) ?? cb.slice(c, pos, c.offset + c.length)!);
          if (i >= 0) return done({ identical: false, difference: 'content', offset: pos + i, sizeMismatch: true, sizes: [a.size, b.size] });
        }
        pos = c.offset + c.length;
        (x ? ca : cb).advance(pos);
        continue;
      }
      const end = Math.min(x.offset + x.length, y.offset + y.length);
      if (x.kind === 'data' || y.kind === 'data') {
        const i =
          x.kind === 'data' && y.kind === 'data'
            ? firstDifference(ca.slice(x, pos, end)!, cb.slice(y, pos, end)!)
            : firstNonZero(x.kind === 'data' ? ca.slice(x, pos, end)! : cb.slice(y, pos, end)!);
        if (i >= 0) return done({ identical: false, difference: 'content', offset: pos + i, sizeMismatch: known && a.size !== b.size, sizes: [a.size, b.size] });
      }
      pos = end;
      ca.advance(pos);
      cb.advance(pos);
    }
    const sizes: [number, number] = [a.size ?? statsA.bytesRead, b.size ?? statsB.bytesRead];
    return done({ identical: true, sizeMismatch: sizes[0] !== sizes[1], sizes });
  } finally {
    await Promise.allSettled([ca.close(), cb.close()]);
  }
}

/** Pulls chunks from an ExtentSource one at a time; releases each once the walk has passed it. */
class Cursor {
  private readonly it: AsyncIterator<unknown>;
  private current: Chunk | null | undefined; // undefined: not fetched yet; null: end

  constructor(private readonly source: ExtentSource) {
    this.it = source[Symbol.asyncIterator]();
  }

  async peek(): Promise<Chunk | null> {
    if (this.current === undefined) {
      const r = await this.it.next();
      this.current = r.done ? null : (r.value as Chunk);
    }
    return this.current;
  }

  /** The bytes of data chunk `c` (the current one, if it belongs to this cursor) for [from, to). */
  slice(c: Chunk, from: number, to: number): Buffer | undefined {
    if (c !== this.current) return undefined;
    return c.data!.subarray(from - c.offset, to - c.offset);
  }

  /** The walk has reached `pos`: drop the current chunk if it ends there. */
  advance(pos: number): void {
    const c = this.current;
    if (c && c.offset + c.length <= pos) {
      c.release?.();
      this.current = undefined;
    }
  }

  async close(): Promise<void> {
    const c = this.current;
    this.current = null;
    c?.release?.();
    // stops the source (reads in flight complete into buffers nobody uses)
    if (!this.source.destroyed) await this.it.return?.().catch(() => undefined);
  }
}

const STEP = 4096;
let zeroes = Buffer.alloc(STEP);

/** Index of the first byte where a and b (same length) differ, or -1. */
export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) throw new NbdStreamError('ERR_USAGE', `firstDifference: lengths ${a.length} and ${b.length}`);
  if (a.equals(b)) return -1;
  const n = a.length;
  let o = 0;
  while (o < n && a.compare(b, o, Math.min(n, o + STEP), o, Math.min(n, o + STEP)) === 0) o += STEP;
  for (let i = o; i < n; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** Index of the first non-zero byte of b, or -1. */
export function firstNonZero(b: Buffer): number {
  const n = b.length;
  if (zeroes.length < Math.min(n, 1 << 20)) zeroes = Buffer.alloc(Math.min(n, 1 << 20));
  const big = zeroes.length;
  let o = 0;
  // skip equal stretches in large steps, then narrow down
  while (o < n) {
    const e = Math.min(n, o + big);
    if (zeroes.compare(b, o, e, 0, e - o) !== 0) break;
    o = e;
  }
  if (o >= n) return -1;
  for (let s = o; s < n; s += STEP) {
    const e = Math.min(n, s + STEP);
    if (zeroes.compare(b, s, e, 0, e - s) !== 0) {
      for (let i = s; i < e; i++) if (b[i] !== 0) return i;
    }
  }
  return -1;
}
