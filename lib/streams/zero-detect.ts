/**
 * ZeroDetect: a streamx Transform applying -S N. In each data chunk, every N-aligned block (by
 * absolute offset) of zero bytes becomes zero instead of data; adjacent zero blocks and adjacent
 * data blocks inside the chunk merge, so a chunk turns into alternating data and zero chunks. An
 * unaligned head or tail is data. Given the request size, the requests are nbdcopy's, which
 * looks for zero blocks in each request it read: zero runs end at request-size boundaries (the
 * pieces a chunk of several was read as), and an unaligned tail (the export's end) is a data
 * chunk apart from the data blocks before it. Zero chunks and N = 0 pass through unchanged. A
 * data chunk whose zero blocks for this N were found as it arrived (chunk.zeroBlocks, from the
 * native NBD reader) is split by them without looking at its bytes.
 */
import { Transform } from 'streamx';
import type { Chunk, ZeroBlockMap } from '../extents.js';
import { DEFAULT_QUEUE_SIZE, STAGE_BUFFER, chunkBytes } from './extent-source.js';
import { shareRelease, splitAtZeroes } from './buffer-pool.js';

let zeroes = Buffer.alloc(0);

/** True if buf[start, end) is all zero bytes. */
export function isZero(buf: Buffer, start: number, end: number): boolean {
  const n = end - start;
  if (n <= 0) return true;
  if (buf[start] !== 0 || buf[end - 1] !== 0) return false;
  if (zeroes.length < n) zeroes = Buffer.alloc(Math.max(n, 65536));
  return zeroes.compare(buf, start, end, 0, n) === 0;
}

/**
 * Split one data chunk into data/zero chunks at N-aligned zero blocks; with `pieceSize` (the
 * request size), zero chunks are cut at its multiples and an unaligned tail is a data chunk of
 * its own (nbdcopy's requests, exactly).
 */
export function splitZeroBlocks(c: Chunk, n: number, pieceSize = 0): Chunk[] {
  // blocks larger than a piece fit in none (nbdcopy then writes everything)
  if (c.kind !== 'data' || n <= 0 || c.length < n || (pieceSize > 0 && n > pieceSize)) return [c];
  const out = splitAtZeroes(c, c.zeroBlocks?.blockSize === n ? c.zeroBlocks.runs : zeroBlockRuns(c, n));
  return pieceSize > 0 ? out.flatMap((p) => (p.kind === 'zero' ? cutAt(p, pieceSize) : splitTail(p, n))) : out;
}

/** A data chunk's unaligned tail (past its last N boundary) as a chunk of its own, as nbdcopy writes it. */
function splitTail(d: Chunk, n: number): Chunk[] {
  const end = d.offset + d.length;
  const t = end - (end % n);
  if (t === end || t <= d.offset) return [d];
  const out: Chunk[] = [
    { offset: d.offset, length: t - d.offset, kind: 'data', data: d.data!.subarray(0, t - d.offset) },
    { offset: t, length: end - t, kind: 'data', data: d.data!.subarray(t - d.offset) },
  ];
  if (d.release) shareRelease(out, d.release);
  return out;
}

/** A zero chunk cut at multiples of `size`. */
function cutAt(z: Chunk, size: number): Chunk[] {
  const end = z.offset + z.length;
  if (z.offset - (z.offset % size) + size >= end) return [z];
  const out: Chunk[] = [];
  for (let o = z.offset; o < end; ) {
    const e = Math.min(end, o - (o % size) + size);
    out.push({ offset: o, length: e - o, kind: 'zero' });
    o = e;
  }
  return out;
}

/** The N-aligned whole blocks of a data chunk that are all zero bytes, as merged runs. */
function zeroBlockRuns(c: Chunk, n: number): ZeroBlockMap['runs'] {
  const runs: ZeroBlockMap['runs'] = [];
  const end = c.offset + c.length;
  for (let b = Math.ceil(c.offset / n) * n; b + n <= end; b += n) {
    if (!isZero(c.data!, b - c.offset, b + n - c.offset)) continue;
    const last = runs[runs.length - 1];
    if (last && last.offset + last.length === b) last.length += n;
    else runs.push({ offset: b, length: n });
  }
  return runs;
}

export class ZeroDetect extends Transform {
  /** `pieceSize`: the request size, where zero runs found by -S are cut (0: not cut). */
  constructor(
    private readonly sparse: number,
    queueSize = DEFAULT_QUEUE_SIZE,
    private readonly pieceSize = 0,
  ) {
    super({ highWaterMark: Math.min(queueSize, STAGE_BUFFER), byteLength: (c) => chunkBytes(c as Chunk) });
  }

  override _transform(c: unknown, cb: (err: Error | null, data?: unknown) => void): void {
    for (const out of splitZeroBlocks(c as Chunk, this.sparse, this.pieceSize)) this.push(out);
    cb(null);
  }
}
