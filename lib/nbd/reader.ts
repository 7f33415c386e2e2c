/** Awaitable byte reader for the handshake phase: bytes are pushed in, read(n) resolves with exactly n. */
import { NbdStreamError } from '../errors.js';

export class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private error: Error | undefined;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.satisfy();
  }

  /** No more bytes will come: pending and later reads reject with err. */
  fail(err: Error): void {
    if (!this.error) this.error = err;
    if (this.want) {
      const w = this.want;
      this.want = undefined;
      w.reject(this.error);
    }
  }

  read(n: number): Promise<Buffer> {
    if (this.want) return Promise.reject(new NbdStreamError('ERR_PROTOCOL', 'concurrent handshake reads'));
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.satisfy();
      if (this.want && this.error) this.fail(this.error);
    });
  }

  /** Bytes received but not read; the buffer is emptied. */
  drain(): Buffer {
    const b = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return b;
  }

  get pending(): number {
    return this.buffered;
  }

  private satisfy(): void {
    const w = this.want;
    if (!w || this.buffered < w.n) return;
    this.want = undefined;
    let out: Buffer;
    if (this.chunks[0].length >= w.n) {
      out = this.chunks[0].subarray(0, w.n);
      this.chunks[0] = this.chunks[0].subarray(w.n);
      if (this.chunks[0].length === 0) this.chunks.shift();
    } else {
      const all = Buffer.concat(this.chunks);
      out = all.subarray(0, w.n);
      this.chunks = all.length > w.n ? [all.subarray(w.n)] : [];
    }
    this.buffered -= w.n;
    w.resolve(out);
  }
}
