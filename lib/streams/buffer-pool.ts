import type { Chunk } from '../extents.js';

/**
 * Reusable read buffers of one size. Buffers come back through Chunk.release() once the sink
 * has written them, so a steady-state copy allocates nothing per request. The pool keeps at most
 * `keep` free buffers; the pipeline's byte limits bound how many are out at once.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(
    readonly size: number,
    private readonly keep = 256,
  ) {}

  get(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  put(b: Buffer): void {
    if (b.length === this.size && this.free.length < this.keep) this.free.push(b);
  }
}

/**
 * Hand one buffer's release to the data chunks cut from it: the buffer goes back once each of
 * them has been released (at once if there are none). Zero chunks hold no buffer.
 */
export function shareRelease(chunks: Chunk[], release: () => void): void {
  const data = chunks.filter((c) => c.kind === 'data');
  if (!data.length) return release();
  if (data.length === 1) {
    data[0].release = release;
    return;
  }
  let left = data.length;
  const one = () => {
    if (--left === 0) release();
  };
  for (const c of data) c.release = one;
}
