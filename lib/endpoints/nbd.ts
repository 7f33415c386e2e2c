/** NBD endpoint: an NbdClient behind the Endpoint interface. */
import { NbdClient } from '../nbd/client.js';
import { NBD_STATE_ZERO } from '../nbd/protocol.js';
import { denseExtents, writeZeroes, type Capabilities, type Endpoint, type ExtentRun, type OpenOptions, type ReadResult, type ZeroOptions } from './endpoint.js';

export class NbdEndpoint implements Endpoint {
  readonly name: string;
  readonly capabilities: Capabilities;
  private readonly onClose: (() => Promise<void>) | undefined;

  constructor(
    readonly client: NbdClient,
    name?: string,
    onClose?: () => Promise<void>,
  ) {
    this.name = name ?? client.endpoint;
    this.onClose = onClose;
    const bs = client.blockSize;
    this.capabilities = {
      canExtents: client.canMetaContext('base:allocation'),
      canZero: client.canZero,
      canFastZero: client.canFastZero,
      canTrim: client.canTrim,
      canFlush: client.canFlush,
      canMultiConn: client.canMultiConn,
      preferredBlockSize: Math.max(bs.preferred, 4096),
      maxRequest: client.maxPayload,
      isZeroInitialised: false,
      seekable: true,
      readOnly: client.readOnly,
    };
  }

  get size(): number {
    return this.client.size;
  }

  async extents(offset: number, length: number): Promise<ExtentRun[]> {
    if (!this.capabilities.canExtents) return denseExtents(offset, length);
    const ex = await this.client.blockStatus(offset, length);
    return ex.map((e) => ({ offset: e.offset, length: e.length, zero: (e.flags & NBD_STATE_ZERO) !== 0 }));
  }

  async read(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    const r = await this.client.pread(offset, length, into);
    return r.holes.length ? { data: r.data, zeroes: r.holes } : { data: r.data };
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

export async function openNbd(uri: string, opts: OpenOptions = {}, name?: string, onClose?: () => Promise<void>): Promise<NbdEndpoint> {
  const client = await NbdClient.connect(uri, {
    connections: opts.connections ?? 4,
    maxRequests: opts.requests ?? 64,
    maxBytesInFlight: opts.queueSize,
    timeout: opts.timeout,
    retries: opts.retries,
    endpoint: name,
  });
  return new NbdEndpoint(client, name, onClose);
}
