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

/** A release function that runs `done` after it has been called `count` times. */
export function countdown(count: number, done: () => void): () => void {
  let left = count;
  return () => {
    if (--left === 0) done();
  };
}
