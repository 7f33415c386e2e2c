import type { Chunk } from '../extents.js';

interface Slab {
  buf: Buffer;
  /** Bytes handed out from the start. */
  used: number;
  /** Pieces handed out and not yet released. */
  refs: number;
}

/** Pieces start at multiples of this within a slab. */
const PIECE_ALIGN = 4096;

/**
 * Read buffers cut from reusable slabs of `slabSize` bytes (the largest read): each read takes
 * the next piece of its length from the current slab, and a slab is free again once every piece
 * of it has been released (Chunk.release(), after the sink has written it). `pinned` is the
 * memory in use: whole slabs that were left for a read that did not fit and still hold pieces,
 * and the part of the current slab cut so far; many short reads share a slab. The process holds
 * at most `pinned` plus one slab. Free slabs are kept for reuse: a copy allocates only up to its
 * peak.
 */
export class BufferPool {
  private current: Slab | undefined;
  private readonly free: Buffer[] = [];
  /** Slabs no longer cut from that still hold pieces. */
  private held = 0;

  constructor(readonly slabSize: number) {}

  /** Bytes of buffers in use (see the class comment). */
  get pinned(): number {
    return this.held * this.slabSize + (this.current?.used ?? 0);
  }

  /** A buffer of `length` (<= slabSize) bytes and the function that gives it back (once). */
  take(length: number): { buf: Buffer; release: () => void } {
    let slab = this.current;
    if (!slab || slab.used + length > this.slabSize) {
      if (slab) {
        if (slab.refs > 0) this.held++;
        else this.free.push(slab.buf);
      }
      slab = this.current = { buf: this.free.pop() ?? Buffer.allocUnsafeSlow(this.slabSize), used: 0, refs: 0 };
    }
    const s = slab;
    const buf = s.buf.subarray(s.used, s.used + length);
    s.used = Math.min(this.slabSize, Math.ceil((s.used + length) / PIECE_ALIGN) * PIECE_ALIGN);
    s.refs++;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      if (--s.refs > 0) return;
      if (s === this.current) {
        s.used = 0; // all back: cut from the start again
      } else {
        this.held--;
        this.free.push(s.buf);
      }
    };
    return { buf, release };
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

/**
 * Cut a data chunk at zero ranges (export offsets, in any order; parts outside the chunk or
 * already covered are ignored): the bytes between stay data (views of the chunk's buffer), the
 * ranges become zero chunks, touching ones merged. The parts share the chunk's release.
 */
export function splitAtZeroes(c: Chunk, zeroes: ReadonlyArray<{ offset: number; length: number }>): Chunk[] {
  if (!zeroes.length) return [c];
  const sorted = zeroes.length > 1 ? [...zeroes].sort((a, b) => a.offset - b.offset) : zeroes;
  const out: Chunk[] = [];
  const data = c.data!;
  const end = c.offset + c.length;
  let pos = c.offset;
  for (const z of sorted) {
    const zs = Math.max(z.offset, pos);
    const ze = Math.min(z.offset + z.length, end);
    if (ze <= zs) continue;
    if (zs > pos) out.push({ offset: pos, length: zs - pos, kind: 'data', data: data.subarray(pos - c.offset, zs - c.offset) });
    const last = out[out.length - 1];
    if (last?.kind === 'zero' && last.offset + last.length === zs) last.length += ze - zs;
    else out.push({ offset: zs, length: ze - zs, kind: 'zero' });
    pos = ze;
  }
  if (pos < end) out.push({ offset: pos, length: end - pos, kind: 'data', data: data.subarray(pos - c.offset) });
  if (c.release) shareRelease(out, c.release);
  return out;
}
