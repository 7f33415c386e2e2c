/**
 * `null:` target: accepts any size (size undefined = no size check), discards writes and zeroes
 * and counts them. It reads as zeroes (isZeroInitialised), so the copier may skip zero requests.
 */
import { NbdStreamError } from '../errors.js';
import type { Capabilities, Endpoint, ExtentRun, ReadResult, ZeroOptions } from './endpoint.js';

function checkRange(name: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || !Number.isSafeInteger(offset + length)) {
    throw new NbdStreamError('ERR_USAGE', `invalid request: offset ${offset}, length ${length}`, { endpoint: name });
  }
}

export class NullEndpoint implements Endpoint {
  readonly name: string;
  readonly size = undefined;
  readonly capabilities: Capabilities = {
    canExtents: true,
    canZero: true,
    canFastZero: true,
    canTrim: false,
    canFlush: true,
    canMultiConn: true,
    preferredBlockSize: 4096,
    maxRequest: 32 * 1024 * 1024,
    isZeroInitialised: true,
    seekable: true,
    readOnly: false,
    wholeWrites: true,
  };
  /** Bytes passed to write(). */
  bytesWritten = 0;
  /** Bytes passed to zero(). */
  bytesZeroed = 0;
  writes = 0;
  zeroes = 0;
  flushes = 0;
  private closed = false;

  constructor(name = 'null:') {
    this.name = name;
  }

  private check(offset: number, length: number): void {
    checkRange(this.name, offset, length);
    if (this.closed) throw new NbdStreamError('ERR_USAGE', 'endpoint is closed', { endpoint: this.name, offset });
  }

  /** Everything reads as zeroes. */
  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    this.check(offset, length);
    return length > 0 ? [{ offset, length, zero: true }] : [];
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    this.check(offset, length);
    if (into !== undefined && into.length < length) {
      throw new NbdStreamError('ERR_USAGE', `read buffer too small: ${into.length} < ${length}`, { endpoint: this.name, offset });
    }
    const data = into ? into.subarray(0, length).fill(0) : Buffer.alloc(length);
    return { data, zeroes: length > 0 ? [{ offset, length }] : [] };
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length);
    this.bytesWritten += data.length;
    this.writes++;
  }

  async zero(offset: number, length: number, _options?: ZeroOptions): Promise<void> {
    this.check(offset, length);
    this.bytesZeroed += length;
    this.zeroes++;
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/** The `null:` target. */
export async function openNull(name = 'null:'): Promise<NullEndpoint> {
  return new NullEndpoint(name);
}
