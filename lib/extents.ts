/**
 * Chunks and extent helpers. A Chunk is what flows through the copy pipeline: a range of the
 * source that is either data (with its bytes) or known to read as zeroes.
 */
import { NbdStreamError } from './errors.js';
import type { Endpoint, ExtentRun } from './endpoints/endpoint.js';

export type { ExtentRun } from './endpoints/endpoint.js';

export interface Chunk {
  offset: number;
  length: number;
  kind: 'data' | 'zero';
  /** `length` bytes for data chunks. */
  data?: Buffer;
  /**
   * Return the chunk's buffer to its pool; called once by whoever consumes the chunk (the
   * sink after the write completed). Data must not be used afterwards.
   */
  release?: () => void;
  /** Data chunks: its all-zero blocks, found as the bytes arrived (-S need not look again). */
  zeroBlocks?: ZeroBlockMap;
}

/**
 * The all-zero blocks of some data: every block of `blockSize` bytes aligned to a multiple of
 * it (by export offset) and inside the data was checked; `runs` (in offset order, merged) are
 * the ones that hold only zero bytes. Empty runs: none do.
 */
export interface ZeroBlockMap {
  blockSize: number;
  runs: Array<{ offset: number; length: number }>;
}

/** Work range: requests never cross a multiple of this (nbdcopy's THREAD_WORK_SIZE). */
export const WORK_RANGE = 128 * 1024 * 1024;

/** Runs that may merge: both zero or both data, and both skipped or both not. */
export function sameKind(a: ExtentRun, b: ExtentRun): boolean {
  return a.zero === b.zero && !a.skip === !b.skip;
}

/**
 * Clip runs to [offset, offset+length) and merge adjacent runs of the same kind. Runs must be
 * consecutive and start at or before `offset`; zero-length or backwards runs are a protocol error.
 * The result may cover less than the range (the caller asks again from where it ends).
 */
export function clipExtents(runs: ExtentRun[], offset: number, length: number, endpoint?: string): ExtentRun[] {
  const end = offset + length;
  const out: ExtentRun[] = [];
  let expect = runs.length ? runs[0].offset : offset;
  for (const r of runs) {
    if (r.length <= 0 || r.offset !== expect)
      throw new NbdStreamError('ERR_PROTOCOL', `bad extent ${r.offset}+${r.length} (expected one starting at ${expect})`, { endpoint, offset: r.offset });
    expect = r.offset + r.length;
    const s = Math.max(r.offset, offset);
    const e = Math.min(r.offset + r.length, end);
    if (e <= s) {
      if (r.offset >= end) break;
      continue;
    }
    const last = out[out.length - 1];
    if (last && sameKind(last, r) && last.offset + last.length === s) last.length += e - s;
    else out.push(r.skip ? { offset: s, length: e - s, zero: r.zero, skip: true } : { offset: s, length: e - s, zero: r.zero });
  }
  if (out.length && out[0].offset !== offset)
    throw new NbdStreamError('ERR_PROTOCOL', `extents start at ${out[0].offset}, not at the requested ${offset}`, { endpoint, offset });
  return out;
}

/**
 * Extent answers for a sequential walk of an endpoint. Asks for spans as large as the endpoint
 * will answer (up to the end), keeps the answer and serves later ranges from it, so a server
 * that describes a whole disk in one reply is asked once. The next span is fetched in the
 * background as soon as the walk enters the last part of what is known.
 */
export class ExtentMap {
  private runs: ExtentRun[] = [];
  private known = 0; // runs cover [start of first run, known)
  private pending: Promise<void> | undefined;
  private pendingFrom = -1;
  requests = 0;

  constructor(
    private readonly ep: Endpoint,
    private readonly size: number,
    private readonly maxSpan = Number.MAX_SAFE_INTEGER,
  ) {}

  /** Runs covering exactly [offset, offset+length). Throws if the endpoint fails. */
  async get(offset: number, length: number): Promise<ExtentRun[]> {
    const end = offset + length;
    if (offset < this.known && this.runs.length && this.runs[0].offset > offset) this.reset(offset);
    if (offset > this.known) this.reset(offset);
    while (this.known < end) await this.fetch(this.known);
    // drop runs wholly before offset
    let i = 0;
    while (i < this.runs.length && this.runs[i].offset + this.runs[i].length <= offset) i++;
    if (i) this.runs.splice(0, i);
    const out = clipExtents(this.runs, offset, length, this.ep.name);
    // read ahead: once the walk reaches the last known run, ask for the next span early
    if (this.known < this.size && this.runs.length <= 2 && !this.pending) void this.fetch(this.known).catch(() => undefined);
    return out;
  }

  /**
   * End of the zero run (not skipped) that covers `offset`, as far as already known; `offset`
   * itself when none is known there. Never asks the endpoint.
   */
  zeroUntil(offset: number): number {
    for (const r of this.runs) {
      if (r.offset > offset) break;
      if (r.offset + r.length > offset) return r.zero && !r.skip ? r.offset + r.length : offset;
    }
    return offset;
  }

  private reset(offset: number): void {
    this.runs = [];
    this.known = offset;
    this.pending = undefined;
    this.ahead.clear();
  }

  /** Speculative answers for the spans after the last one, keyed by their start. */
  private readonly ahead = new Map<number, Promise<ExtentRun[]>>();

  private ask(from: number): Promise<ExtentRun[]> {
    const early = this.ahead.get(from);
    if (early) {
      this.ahead.delete(from);
      return early;
    }
    // guesses for spans the walk has passed (an answer covered less than asked) are dropped
    for (const o of this.ahead.keys()) if (o < from) this.ahead.delete(o);
    this.requests++;
    return this.ep.extents(from, Math.min(this.size - from, this.maxSpan));
  }

  /**
   * A server that described a whole large span in one answer (a mostly sparse image) will
   * likely do so again: ask for the next AHEAD spans of the same length at once, so their
   * requests share one write and their round trips overlap.
   */
  private askAhead(end: number, stride: number): void {
    // top the window up only once half of it has been used: the new requests then share a write
    if (this.ahead.size > ExtentMap.AHEAD / 2) return;
    for (let i = 0, o = end; i < ExtentMap.AHEAD && o < this.size; i++, o += stride) {
      if (this.ahead.has(o)) continue;
      this.requests++;
      const p = this.ep.extents(o, Math.min(this.size - o, stride));
      p.catch(() => undefined); // a failed guess is asked again when needed
      this.ahead.set(o, p);
    }
  }

  private static readonly AHEAD = 32;
  private static readonly BIG_SPAN = 1024 * 1024 * 1024;

  private fetch(from: number): Promise<void> {
    if (this.pending && this.pendingFrom === from) return this.pending;
    this.pendingFrom = from;
    const p = (async () => {
      let got: ExtentRun[];
      try {
        got = await this.ask(from);
      } catch (err) {
        this.ahead.clear();
        throw err;
      }
      if (!got.length || got[0].offset !== from || got.some((r) => r.length <= 0))
        throw new NbdStreamError('ERR_PROTOCOL', `extents at ${from} are empty or do not start there`, { endpoint: this.ep.name, offset: from });
      if (this.known !== from) return; // reset meanwhile
      const clipped = clipExtents(got, from, this.size - from, this.ep.name);
      for (const r of clipped) {
        const last = this.runs[this.runs.length - 1];
        if (last && sameKind(last, r) && last.offset + last.length === r.offset) last.length += r.length;
        else this.runs.push({ ...r });
      }
      this.known = clipped.length ? clipped[clipped.length - 1].offset + clipped[clipped.length - 1].length : from;
      const answered = got[got.length - 1].offset + got[got.length - 1].length - from;
      if (answered >= ExtentMap.BIG_SPAN && this.known < this.size) this.askAhead(this.known, answered);
    })();
    this.pending = p;
    return p.finally(() => {
      if (this.pending === p) this.pending = undefined;
    });
  }
}
