/**
 * NBD endpoint: an NbdClient behind the Endpoint interface.
 *
 * With a dirty bitmap (OpenOptions.dirtyBitmap) the client negotiates qemu:dirty-bitmap:NAME next
 * to base:allocation, and extents() asks both in one NBD_CMD_BLOCK_STATUS: ranges clean in the
 * bitmap come back as `skip` runs (not part of the copy), dirty ranges as data or zero by
 * base:allocation (data when the server has no base:allocation). The endpoint is then `partial`.
 */
import { NbdStreamError } from '../errors.js';
import { NbdClient, type BlockStatusExtent } from '../nbd/client.js';
import { NBD_STATE_ZERO } from '../nbd/protocol.js';
import { denseExtents, writeZeroes, type Capabilities, type Endpoint, type ExtentRun, type OpenOptions, type ReadResult, type ZeroOptions } from './endpoint.js';

export class NbdEndpoint implements Endpoint {
  readonly name: string;
  readonly capabilities: Capabilities;
  private readonly onClose: (() => Promise<void>) | undefined;

  /** qemu:dirty-bitmap:NAME when copying only dirty ranges. */
  readonly dirtyContext: string | undefined;

  constructor(
    readonly client: NbdClient,
    name?: string,
    onClose?: () => Promise<void>,
    dirtyBitmap?: string,
  ) {
    this.name = name ?? client.endpoint;
    this.onClose = onClose;
    this.dirtyContext = dirtyBitmap !== undefined ? dirtyContextName(dirtyBitmap) : undefined;
    const bs = client.blockSize;
    this.capabilities = {
      canExtents: client.canMetaContext('base:allocation') || this.dirtyContext !== undefined,
      canZero: client.canZero,
      canFastZero: client.canFastZero,
      canTrim: client.canTrim,
      canFlush: client.canFlush,
      canMultiConn: client.canMultiConn,
      // what the server advertises, else 4096 (the handshake's default), as nbdcopy
      preferredBlockSize: bs.preferred,
      maxRequest: client.maxPayload,
      isZeroInitialised: false,
      seekable: true,
      readOnly: client.readOnly,
      ...(this.dirtyContext !== undefined && { partial: true }),
      ...(client.extendedHeaders && { extendedHeaders: true }),
    };
  }

  get size(): number {
    return this.client.size;
  }

  get exactSize(): bigint | undefined {
    return this.client.exactSize;
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    if (this.dirtyContext !== undefined) return this.dirtyExtents(offset, length);
    if (!this.capabilities.canExtents) return denseExtents(offset, length);
    const ex = await this.client.blockStatus(offset, length);
    return ex.map((e) => ({ offset: e.offset, length: e.length, zero: (e.flags & NBD_STATE_ZERO) !== 0 }));
  }

  /** Dirty ranges as data/zero runs, clean ones as skip runs, as far as both answers reach. */
  private async dirtyExtents(offset: number, length: number): Promise<ExtentRun[]> {
    const dirty = this.dirtyContext!;
    const base = this.client.canMetaContext('base:allocation') ? 'base:allocation' : undefined;
    const m = await this.client.blockStatusContexts(offset, length, base ? [dirty, base] : [dirty]);
    return combineDirty(m.get(dirty)!, base ? m.get(base)! : [{ offset, length, flags: 0 }]);
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    const r = await this.client.pread(offset, length, into);
    const out: ReadResult = r.holes.length ? { data: r.data, zeroes: r.holes } : { data: r.data };
    if (r.zeroBlocks) out.zeroBlocks = r.zeroBlocks;
    return out;
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.client.pwrite(offset, data);
  }

  zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    if (!this.capabilities.canZero) return writeZeroes(this, offset, length);
    return this.client.zero(offset, length, { noHole: options.allocate });
  }

  async flush(): Promise<void> {
    if (this.capabilities.canFlush) await this.client.flush();
  }

  async close(): Promise<void> {
    try {
      await this.client.close();
    } finally {
      await this.onClose?.();
    }
  }
}

export function dirtyContextName(bitmap: string): string {
  return `qemu:dirty-bitmap:${bitmap}`;
}

/** qemu:dirty-bitmap flag: the range changed since the bitmap was enabled. */
const DIRTY = 1;

/**
 * Combine a dirty bitmap answer with base:allocation: both start at the same offset; the result
 * covers as far as both do. Clean ranges are skip runs; dirty ones zero when base:allocation
 * says NBD_STATE_ZERO, else data.
 */
export function combineDirty(dirty: BlockStatusExtent[], alloc: BlockStatusExtent[]): ExtentRun[] {
  const out: ExtentRun[] = [];
  let i = 0;
  let j = 0;
  let pos = dirty.length ? dirty[0].offset : 0;
  while (i < dirty.length && j < alloc.length) {
    const d = dirty[i];
    const a = alloc[j];
    const end = Math.min(d.offset + d.length, a.offset + a.length);
    if (end > pos) {
      const skip = (d.flags & DIRTY) === 0;
      const zero = !skip && (a.flags & NBD_STATE_ZERO) !== 0;
      const last = out[out.length - 1];
      if (last && last.zero === zero && !last.skip === !skip) last.length += end - pos;
      else out.push(skip ? { offset: pos, length: end - pos, zero: false, skip: true } : { offset: pos, length: end - pos, zero });
      pos = end;
    }
    if (d.offset + d.length <= pos) i++;
    if (a.offset + a.length <= pos) j++;
  }
  return out;
}

export async function openNbd(uri: string, opts: OpenOptions = {}, name?: string, onClose?: () => Promise<void>): Promise<NbdEndpoint> {
  const bitmap = opts.dirtyBitmap;
  if (bitmap !== undefined && (bitmap === '' || Buffer.byteLength(bitmap) > 1000))
    throw new NbdStreamError('ERR_USAGE', `dirtyBitmap: bad bitmap name "${bitmap}"`, { endpoint: name ?? uri, option: 'dirtyBitmap' });
  const client = await NbdClient.connect(uri, {
    metaContexts: bitmap !== undefined ? ['base:allocation', dirtyContextName(bitmap)] : undefined,
    connections: opts.connections ?? 4,
    maxRequests: opts.requests ?? 64,
    maxBytesInFlight: opts.queueSize,
    readRequestSize: opts.readRequestSize,
    timeout: opts.timeout,
    retries: opts.retries,
    zeroBlockSize: opts.zeroBlockSize,
    endpoint: name,
  });
  if (bitmap !== undefined && !client.canMetaContext(dirtyContextName(bitmap))) {
    await client.close().catch(() => undefined);
    throw new NbdStreamError(
      'ERR_UNSUPPORTED',
      `the server does not export dirty bitmap "${bitmap}" (meta context ${dirtyContextName(bitmap)}${client.structuredReplies ? '' : '; no structured replies'})`,
      { endpoint: name ?? uri },
    );
  }
  return new NbdEndpoint(client, name, onClose, bitmap);
}
