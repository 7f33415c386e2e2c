/**
 * What `nbdstream serve` exports: a regular file or block device opened in place (read-write
 * unless read-only, never truncated), or `memory:` — a sparse in-memory image of a given size.
 */
import { NbdStreamError } from '../errors.js';
import { openFile } from '../endpoints/file.js';
import type { Capabilities, Endpoint, ExtentRun, ReadResult, ZeroOptions } from '../endpoints/endpoint.js';

const PAGE = 64 * 1024;

/**
 * A sparse image held in memory: 64 KiB pages allocated on first write, so `--size 1T memory:`
 * costs nothing until written. Unallocated pages read as zeroes and are reported as zero extents;
 * zero() frees whole pages and clears partial ones.
 */
export class SparseMemoryEndpoint implements Endpoint {
  readonly capabilities: Capabilities;
  private readonly pages = new Map<number, Buffer>();

  constructor(
    readonly size: number,
    readonly name = 'memory:',
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new NbdStreamError('ERR_USAGE', `bad memory size ${size}`, { endpoint: name });
    this.capabilities = {
      canExtents: true,
      canZero: true,
      canFastZero: true,
      canTrim: true,
      canFlush: true,
      canMultiConn: true,
      preferredBlockSize: 4096,
      maxRequest: 32 * 1024 * 1024,
      isZeroInitialised: true,
      seekable: true,
      readOnly: false,
    };
  }

  /** Bytes of memory in use by allocated pages. */
  get allocated(): number {
    return this.pages.size * PAGE;
  }

  private check(op: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw new NbdStreamError('ERR_RANGE', `${op} ${offset}+${length} is outside the image (size ${this.size})`, { endpoint: this.name, offset });
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    this.check('extents', offset, length);
    const out: ExtentRun[] = [];
    const end = offset + length;
    for (let o = offset; o < end; ) {
      const p = Math.floor(o / PAGE);
      const stop = Math.min(end, (p + 1) * PAGE);
      const zero = !this.pages.has(p);
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += stop - o;
      else out.push({ offset: o, length: stop - o, zero });
      o = stop;
    }
    return out;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    this.check('read', offset, length);
    const data = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    for (let o = offset, end = offset + length; o < end; ) {
      const p = Math.floor(o / PAGE);
      const stop = Math.min(end, (p + 1) * PAGE);
      const page = this.pages.get(p);
      if (page) page.copy(data, o - offset, o - p * PAGE, stop - p * PAGE);
      else data.fill(0, o - offset, stop - offset);
      o = stop;
    }
    return { data };
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check('write', offset, data.length);
    for (let o = offset, end = offset + data.length; o < end; ) {
      const p = Math.floor(o / PAGE);
      const stop = Math.min(end, (p + 1) * PAGE);
      let page = this.pages.get(p);
      if (!page) this.pages.set(p, (page = Buffer.alloc(PAGE)));
      data.copy(page, o - p * PAGE, o - offset, stop - offset);
      o = stop;
    }
  }

  async zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.check('zero', offset, length);
    for (let o = offset, end = offset + length; o < end; ) {
      const p = Math.floor(o / PAGE);
      const stop = Math.min(end, (p + 1) * PAGE);
      const page = this.pages.get(p);
      if (stop - o === PAGE && !options.allocate) this.pages.delete(p);
      else if (page) page.fill(0, o - p * PAGE, stop - p * PAGE);
      else if (options.allocate) this.pages.set(p, Buffer.alloc(PAGE));
      o = stop;
    }
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.pages.clear();
  }
}

export interface ServeOpenOptions {
  readOnly?: boolean;
  /** Size of a `memory:` image (required for it). */
  size?: number;
}

/**
 * Open what a server exports: `memory:` (with `size`), or a regular file or block device opened
 * in place. Without readOnly the file is opened read-write and never truncated; when that is not
 * allowed (EACCES, EROFS, EPERM) it fails — pass readOnly to export it read-only.
 */
export async function openServedEndpoint(spec: string, o: ServeOpenOptions = {}): Promise<Endpoint> {
  if (spec === 'memory:') {
    if (o.size === undefined) throw new NbdStreamError('ERR_USAGE', 'memory: needs the size option', { endpoint: spec, option: 'size' });
    return new SparseMemoryEndpoint(o.size, spec);
  }
  if (o.size !== undefined) throw new NbdStreamError('ERR_USAGE', 'size only applies to memory:', { endpoint: spec, option: 'size' });
  // openFile: stat checks (no FIFOs, directories ...), size (BLKGETSIZE64 for devices), kind,
  // block size. Read-write exports use its 'update' mode: in place, never created or truncated;
  // zeroes punch holes / ZERO_RANGE / BLKZEROOUT.
  if (o.readOnly) return openFile(spec, 'source');
  try {
    return await openFile(spec, 'update');
  } catch (err) {
    const code = ((err as NbdStreamError).cause as NodeJS.ErrnoException | undefined)?.code;
    if (err instanceof NbdStreamError && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
      const e = new NbdStreamError(err.code, `${err.message} (use readOnly to export it read-only)`, { endpoint: spec, cause: err.cause, option: 'readOnly' });
      throw Object.assign(e, { errno: err.errno, syscall: err.syscall, path: err.path });
    }
    throw err;
  }
}
