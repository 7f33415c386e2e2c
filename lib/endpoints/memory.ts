/**
 * Memory endpoint: an image held in a Buffer, with an optional list of zero ranges that its
 * extents() reports (for embedding, tests and the built-in server).
 */
import { NbdStreamError } from '../errors.js';
import type { Capabilities, Endpoint, ExtentRun, Range, ReadResult, ZeroOptions } from './endpoint.js';

export class MemoryEndpoint implements Endpoint {
  readonly capabilities: Capabilities;
  /** Calls made, in order, e.g. "write 0+4096" (for inspection). */
  readonly log: string[] = [];

  constructor(
    readonly buffer: Buffer,
    readonly name = 'memory:',
    private zeroRanges: Range[] = [],
    caps: Partial<Capabilities> = {},
  ) {
    this.capabilities = {
      canExtents: true,
      canZero: true,
      canFastZero: false,
      canTrim: false,
      canFlush: true,
      canMultiConn: true,
      preferredBlockSize: 4096,
      maxRequest: 32 * 1024 * 1024,
      isZeroInitialised: false,
      seekable: true,
      readOnly: false,
      ...caps,
    };
  }

  get size(): number {
    return this.buffer.length;
  }

  private range(op: string, offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.buffer.length)
      throw new NbdStreamError('ERR_RANGE', `${op} ${offset}+${length} is outside the image (size ${this.buffer.length})`, { endpoint: this.name, offset });
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    this.range('extents', offset, length);
    this.log.push(`extents ${offset}+${length}`);
    const out: ExtentRun[] = [];
    const end = offset + length;
    const zs = [...this.zeroRanges].sort((a, b) => a.offset - b.offset);
    let pos = offset;
    const add = (o: number, l: number, zero: boolean) => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += l;
      else out.push({ offset: o, length: l, zero });
    };
    for (const z of zs) {
      const s = Math.max(z.offset, pos);
      const e = Math.min(z.offset + z.length, end);
      if (e <= s) continue;
      add(pos, s - pos, false);
      add(s, e - s, true);
      pos = e;
    }
    add(pos, end - pos, false);
    return out;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    this.range('read', offset, length);
    this.log.push(`read ${offset}+${length}`);
    const data = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    this.buffer.copy(data, 0, offset, offset + length);
    return { data };
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.range('write', offset, data.length);
    this.log.push(`write ${offset}+${data.length}`);
    data.copy(this.buffer, offset);
    this.zeroRanges = this.zeroRanges.flatMap((z) => cut(z, offset, data.length));
  }

  async zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.range('zero', offset, length);
    this.log.push(`zero ${offset}+${length}${options.allocate ? ' allocate' : ''}`);
    this.buffer.fill(0, offset, offset + length);
    this.zeroRanges = [...this.zeroRanges.flatMap((z) => cut(z, offset, length)), { offset, length }];
  }

  async flush(): Promise<void> {
    this.log.push('flush');
  }

  async close(): Promise<void> {}
}

/** Range r without [offset, offset+length). */
function cut(r: Range, offset: number, length: number): Range[] {
  const end = offset + length;
  const out: Range[] = [];
  if (r.offset < offset) out.push({ offset: r.offset, length: Math.min(r.offset + r.length, offset) - r.offset });
  if (r.offset + r.length > end) {
    const s = Math.max(r.offset, end);
    out.push({ offset: s, length: r.offset + r.length - s });
  }
  return out.filter((x) => x.length > 0);
}
