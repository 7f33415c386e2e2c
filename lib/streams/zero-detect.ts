/**
 * ZeroDetect: a streamx Transform applying -S N. In each data chunk, every N-aligned block (by
 * absolute offset) of zero bytes becomes zero instead of data; adjacent zero blocks and adjacent
 * data blocks inside the chunk merge, so a chunk turns into alternating data and zero chunks. An
 * unaligned head or tail is data. Zero chunks and N = 0 pass through unchanged. A data chunk whose
 * zero blocks for this N were found as it arrived (chunk.zeroBlocks, from the native NBD reader)
 * is split by them without looking at its bytes.
 */
import { Transform } from 'streamx';
import type { Chunk, ZeroBlockMap } from '../extents.js';
import { DEFAULT_QUEUE_SIZE, STAGE_BUFFER, chunkBytes } from './extent-source.js';
import { splitAtZeroes } from './buffer-pool.js';

let zeroes = Buffer.alloc(0);

/** True if buf[start, end) is all zero bytes. */
export function isZero(buf: Buffer, start: number, end: number): boolean {
  const n = end - start;
  if (n <= 0) return true;
  if (buf[start] !== 0 || buf[end - 1] !== 0) return false;
  if (zeroes.length < n) zeroes = Buffer.alloc(Math.max(n, 65536));
  return zeroes.compare(buf, start, end, 0, n) === 0;
}

/** Split one data chunk into data/zero chunks at N-aligned zero blocks. */
export function splitZeroBlocks(c: Chunk, n: number): Chunk[] {
  if (c.kind !== 'data' || n <= 0 || c.length < n) return [c];
  return splitAtZeroes(c, c.zeroBlocks?.blockSize === n ? c.zeroBlocks.runs : zeroBlockRuns(c, n));
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
  constructor(private readonly sparse: number, queueSize = DEFAULT_QUEUE_SIZE) {
    super({ highWaterMark: Math.min(queueSize, STAGE_BUFFER), byteLength: (c) => chunkBytes(c as Chunk) });
  }

  override _transform(c: unknown, cb: (err: Error | null, data?: unknown) => void): void {
    for (const out of splitZeroBlocks(c as Chunk, this.sparse)) this.push(out);
    cb(null);
  }
}
