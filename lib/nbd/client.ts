/**
 * NbdClient: an NBD export over one or more connections (multi-conn when the server advertises
 * NBD_FLAG_CAN_MULTI_CONN). Requests larger than the server's maximum payload are split; requests
 * that violate its minimum block size or fall outside the export are refused before sending.
 */
import { NbdStreamError } from '../errors.js';
import { NbdConnection, type ConnectionOptions, type Range } from './connection.js';
import type { BlockSizeConstraints } from './handshake.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  commandName,
} from './protocol.js';
import { formatNbdUri, parseNbdUri, type NbdAddress } from './uri.js';
import type { ZeroBlockMap } from '../extents.js';

export type { Range } from './connection.js';
export { NBD_STATE_HOLE, NBD_STATE_ZERO };

export interface ConnectOptions {
  /** Connections to open when the server allows multi-conn (default 1). */
  connections?: number;
  /** Meta contexts to negotiate (default ['base:allocation']). */
  metaContexts?: string[];
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /**
   * Negotiate extended headers when the server offers them (default true): zero, trim and
   * block status requests may then span more than 4 GiB.
   */
  extendedHeaders?: boolean;
  /** Requests in flight per connection (default 64). */
  maxRequests?: number;
  /** Read/write payload bytes in flight per connection (default 64 MiB). */
  maxBytesInFlight?: number;
  /** Name used in errors (default: the URI). */
  endpoint?: string;
  /**
   * Check read data for all-zero blocks of this size as it arrives (native reader only; see
   * ReadResult.zeroBlocks). Default 0: no check.
   */
  zeroBlockSize?: number;
  /**
   * Largest NBD_CMD_READ to send (default: the server's maximum payload). A longer pread goes
   * out as requests of this size on one connection, sent together and settled as one: servers
   * often serve short reads more cheaply (their buffers stay in cache), and the caller still
   * pays for one read.
   */
  readRequestSize?: number;
  /** Seconds a request may wait for its reply before the connection is failed (default: none). */
  timeout?: number;
  /**
   * On a lost or timed-out connection (or a server shutting down: NBD_ESHUTDOWN), reconnect and
   * resend the affected request, up to this many times per request (default 0), waiting
   * retryDelay(attempt) before each reconnection. Reads, writes, zeroes, block status and flush
   * are all idempotent, so resending is safe.
   */
  retries?: number;
}

export interface ReadResult {
  /** The bytes read; ranges in `holes` are zero-filled. */
  data: Buffer;
  /** Ranges the server sent as OFFSET_HOLE chunks (known zero), in export offsets. */
  holes: Range[];
  /**
   * With ConnectOptions.zeroBlockSize: the all-zero blocks of the data, when all of it was
   * checked as it arrived (the native reader).
   */
  zeroBlocks?: ZeroBlockMap;
}

export interface BlockStatusExtent {
  offset: number;
  length: number;
  flags: number;
}

export interface ZeroOptions {
  /** NBD_CMD_FLAG_NO_HOLE: keep the range allocated. */
  noHole?: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than zero slowly. */
  fastZero?: boolean;
  fua?: boolean;
}

/**
 * Milliseconds to wait before reconnection `attempt` (0-based): 250, 500, 1000, then 2000 each,
 * so that N retries ride out a server away for their sum (1.75 s for 3, 5.75 s for 5): long
 * enough for a restart.
 */
export function retryDelay(attempt: number): number {
  return Math.min(2000, 250 * 2 ** attempt);
}

export class NbdClient {
  readonly endpoint: string;
  readonly address: NbdAddress;
  private readonly conns: NbdConnection[];
  private next = 0;

  private readonly reconnecting = new Map<NbdConnection, Promise<void>>();
  /** Reconnections made after lost connections (for --retries). */
  reconnects = 0;

  private constructor(
    address: NbdAddress,
    endpoint: string,
    conns: NbdConnection[],
    private readonly copts: ConnectionOptions,
    private readonly retries: number,
    private readonly readRequestSize: number,
  ) {
    this.address = address;
    this.endpoint = endpoint;
    this.conns = conns;
  }

  /**
   * Send one request on the least busy connection. With retries, a request that fails because
   * its connection was lost or timed out is sent again on a fresh connection.
   */
  private send(type: number, flags: number, offset: number, length: number, payload?: Buffer, dest?: Buffer, contextId = 0) {
    if (this.toJoin && (type === NBD_CMD_READ || type === NBD_CMD_WRITE)) this.join();
    return this.retrying((c) => c.request(type, flags, offset, length, payload, dest, contextId));
  }

  /** NBD_CMD_READs of several ranges on one connection, settled together (see NbdConnection.requestReads). */
  private sendReads(ranges: Array<{ offset: number; length: number; dest: Buffer }>) {
    if (this.toJoin) this.join();
    return this.retrying((c) => c.requestReads(ranges));
  }

  /** Run `op` on the least busy connection; with retries, again on a fresh one after a lost connection. */
  private async retrying<T>(op: (c: NbdConnection) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const c = this.conn();
      try {
        return await op(c);
      } catch (err) {
        const code = (err as NbdStreamError).code;
        // the server is going away (NBD_ESHUTDOWN): let it, on every connection
        if ((err as NbdStreamError).nbdError === 'ESHUTDOWN') for (const x of this.conns) x.shutDown();
        if (attempt >= this.retries || !(code === 'ERR_CLOSED' || code === 'ERR_CONNECT' || code === 'ERR_TIMEOUT') || this.closing) throw err;
        // each request waits out its own backoff (whatever reconnection it then joins), so
        // that its retries span the whole window
        await new Promise((r) => setTimeout(r, retryDelay(attempt)));
        if (this.closing) throw err;
        try {
          await this.replace(c);
        } catch (reconnectError) {
          // the server may not be back yet: that costs this attempt; the last one reports it
          if (attempt + 1 >= this.retries) throw reconnectError;
        }
      }
    }
  }

  /**
   * Replace a failed connection with a new one (once, however many requests ask). Once the
   * server answers again, its other failed connections (multi-conn) are replaced too, in the
   * background: a restarted server gets all of them back, not only those requests were on.
   */
  private replace(dead: NbdConnection): Promise<void> {
    if (!this.conns.includes(dead)) return Promise.resolve();
    let p = this.reconnecting.get(dead);
    if (!p) {
      p = (async () => {
        const fresh = await NbdConnection.open(this.address, this.copts);
        if (fresh.info.size !== dead.info.size) {
          await fresh.close();
          throw new NbdStreamError('ERR_PROTOCOL', `export size changed across reconnection (${dead.info.size} -> ${fresh.info.size})`, { endpoint: this.endpoint });
        }
        if (this.closing) return fresh.close();
        this.conns[this.conns.indexOf(dead)] = fresh;
        this.reconnects++;
        for (const c of this.conns) if (c.error) this.replace(c).catch(() => undefined);
      })().finally(() => this.reconnecting.delete(dead));
      this.reconnecting.set(dead, p);
    }
    return p;
  }

  /** Connect to an NBD URI (or a parsed address) and negotiate. */
  static async connect(target: string | NbdAddress, options: ConnectOptions = {}): Promise<NbdClient> {
    const address = typeof target === 'string' ? parseNbdUri(target) : target;
    const endpoint = options.endpoint ?? (typeof target === 'string' ? target : formatNbdUri(address));
    const copts = {
      endpoint,
      timeout: options.timeout ? options.timeout * 1000 : 0,
      structuredReplies: options.structuredReplies ?? true,
      extendedHeaders: options.extendedHeaders ?? true,
      metaContexts: options.metaContexts ?? ['base:allocation'],
      maxRequests: options.maxRequests ?? 64,
      maxBytesInFlight: options.maxBytesInFlight ?? 64 * 1024 * 1024,
      zeroBlockSize: options.zeroBlockSize ?? 0,
    };
    const first = await NbdConnection.open(address, copts);
    // reads are never split below the server's preferred block size (nor so its minimum)
    const readRequestSize = Math.max(options.readRequestSize ?? Infinity, first.info.blockSize.preferred);
    const client = new NbdClient(address, endpoint, [first], copts, options.retries ?? 0, readRequestSize);
    const want = Math.max(1, options.connections ?? 1);
    if (want > 1 && first.info.flags & NBD_FLAG_CAN_MULTI_CONN) client.toJoin = want - 1;
    return client;
  }

  /**
   * Extra multi-conn connections not opened yet. They are opened with the first read or write
   * (or joined()): metadata-only work, such as copying an all-hole image, never needs them, and
   * each handshake costs the server work (nbdkit's file plugin probes the file).
   */
  private toJoin = 0;
  private joining: Promise<void> = Promise.resolve();
  /** Why an extra multi-conn connection was not added (it failed or disagreed with the first). */
  joinError?: NbdStreamError;

  /**
   * Open the extra connections in the background; each serves requests from the moment its
   * handshake completes (servers may spend tens of ms per handshake, e.g. nbdkit's file plugin
   * probing SEEK_HOLE). One that fails or disagrees with the first is dropped: the export stays
   * usable on the connections it has, and `joinError` says why.
   */
  private join(): void {
    const count = this.toJoin;
    this.toJoin = 0;
    const first = this.conns[0];
    const add = async (): Promise<void> => {
      let c: NbdConnection;
      try {
        c = await NbdConnection.open(this.address, this.copts);
      } catch (err) {
        this.joinError ??= err as NbdStreamError;
        return;
      }
      if (c.info.size !== first.info.size || c.info.flags !== first.info.flags) {
        this.joinError ??= new NbdStreamError('ERR_PROTOCOL', 'connections to the same export disagree on its size or flags', { endpoint: this.endpoint });
        await c.close();
      } else if (this.closing) await c.close();
      else this.conns.push(c);
    };
    this.joining = Promise.all(Array.from({ length: count }, add)).then(() => undefined);
  }

  /** Resolves with the number of connections once every extra multi-conn connection has joined or failed. */
  async joined(): Promise<number> {
    if (this.toJoin) this.join();
    await this.joining;
    return this.conns.length;
  }

  /** Export size: exact below 2^53, else the nearest double (see exactSize). */
  get size(): number {
    return this.conns[0].info.size;
  }
  /** The exact export size when it is 2^53 or more (up to 2^63 - 1); undefined below. */
  get exactSize(): bigint | undefined {
    return this.conns[0].info.exactSize;
  }
  /** Transmission flags (NBD_FLAG_*). */
  get flags(): number {
    return this.conns[0].info.flags;
  }
  get blockSize(): BlockSizeConstraints {
    return this.conns[0].info.blockSize;
  }
  get structuredReplies(): boolean {
    return this.conns[0].info.structuredReplies;
  }
  /** Extended headers are in use (64-bit lengths for zero, trim and block status). */
  get extendedHeaders(): boolean {
    return this.conns[0].info.extendedHeaders;
  }
  get tls(): boolean {
    return this.conns[0].info.tls;
  }
  /** Negotiated meta contexts, name -> id. */
  get metaContexts(): ReadonlyMap<string, number> {
    return this.conns[0].info.metaContexts;
  }
  /** How replies are received (see NbdConnection.receiver). */
  get receiver(): 'native' | 'libuv' | 'tls' {
    return this.conns[0].receiver;
  }
  get connections(): number {
    return this.conns.length;
  }
  get readOnly(): boolean {
    return (this.flags & NBD_FLAG_READ_ONLY) !== 0;
  }
  get canFlush(): boolean {
    return (this.flags & NBD_FLAG_SEND_FLUSH) !== 0;
  }
  get canFua(): boolean {
    return (this.flags & NBD_FLAG_SEND_FUA) !== 0;
  }
  get canTrim(): boolean {
    return (this.flags & NBD_FLAG_SEND_TRIM) !== 0;
  }
  get canZero(): boolean {
    return (this.flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
  }
  get canFastZero(): boolean {
    return (this.flags & NBD_FLAG_SEND_FAST_ZERO) !== 0;
  }
  get canMultiConn(): boolean {
    return (this.flags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }
  canMetaContext(name: string): boolean {
    return this.metaContexts.has(name);
  }
  /** Largest read or write payload in one request. */
  get maxPayload(): number {
    return Math.min(this.blockSize.maximum, 32 * 1024 * 1024 * 2);
  }

  /** The least busy working connection (a failed one only if all have failed). */
  private conn(): NbdConnection {
    const cs = this.conns;
    if (cs.length === 1) return cs[0];
    let best = cs[this.next];
    this.next = (this.next + 1) % cs.length;
    for (const c of cs) {
      if (c.error) continue;
      if (best.error || c.bytesInFlight < best.bytesInFlight || (c.bytesInFlight === best.bytesInFlight && c.requestsInFlight < best.requestsInFlight)) best = c;
    }
    return best;
  }

  private check(type: number, offset: number, length: number, write: boolean): void {
    const cmd = commandName(type);
    if (write && this.readOnly) throw new NbdStreamError('ERR_UNSUPPORTED', `${cmd}: export is read-only`, { endpoint: this.endpoint, offset, command: cmd });
    // a size of 2^53 or more is a rounded double: rounding keeps order, so the test stays right
    // for every request that can be made (offsets are safe integers)
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw new NbdStreamError('ERR_RANGE', `${cmd}: range ${offset}+${length} is outside the export (size ${this.exactSize ?? this.size})`, { endpoint: this.endpoint, offset, command: cmd });
    const min = this.blockSize.minimum;
    if (min > 1 && (offset % min !== 0 || length % min !== 0))
      throw new NbdStreamError('ERR_ALIGNMENT', `${cmd}: range ${offset}+${length} is not aligned to the server's minimum block size ${min}`, {
        endpoint: this.endpoint,
        offset,
        command: cmd,
      });
  }

  private unsupported(what: string, offset?: number): NbdStreamError {
    return new NbdStreamError('ERR_UNSUPPORTED', `server does not support ${what}`, { endpoint: this.endpoint, offset });
  }

  /** Split [offset, offset+length) into pieces of at most `max` bytes. */
  private static pieces(offset: number, length: number, max: number): Range[] {
    const out: Range[] = [];
    for (let o = offset, end = offset + length; o < end; o += max) out.push({ offset: o, length: Math.min(max, end - o) });
    return out;
  }

  /**
   * Read `length` bytes at `offset` into `into` (or a new buffer). Holes the server reports as
   * OFFSET_HOLE chunks are zero-filled and listed in `holes`.
   */
  async pread(offset: number, length: number, into?: Buffer): Promise<ReadResult> {
    this.check(NBD_CMD_READ, offset, length, false);
    const data = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    if (data.length < length) throw new RangeError(`pread: buffer of ${into!.length} bytes is smaller than ${length}`);
    if (length === 0) return { data, holes: [] };
    const max = Math.min(this.maxPayload, this.readRequestSize);
    let rs;
    if (length <= max) rs = [await this.send(NBD_CMD_READ, 0, offset, length, undefined, data)];
    else {
      // in groups no larger than the requests allowed in flight (-R 1 reads one piece at a time)
      const ranges = NbdClient.pieces(offset, length, max).map((p) => ({ ...p, dest: data.subarray(p.offset - offset, p.offset - offset + p.length) }));
      const group = this.copts.maxRequests;
      rs = [];
      for (let i = 0; i < ranges.length; i += group) rs.push(...(await this.sendReads(ranges.slice(i, i + group))));
    }
    const result: ReadResult = { data, holes: rs.flatMap((r) => r.holes ?? []) };
    // a block across two pieces was checked by neither: only aligned cuts keep the promise
    const n = this.copts.zeroBlockSize;
    if (n && rs.every((r, i) => !r.zeroUnchecked && (i === 0 || r.offset % n === 0))) result.zeroBlocks = { blockSize: n, runs: rs.flatMap((r) => r.zeroRuns ?? []) };
    return result;
  }

  /** Write `data` at `offset`. The buffer must not change until the promise settles. */
  async pwrite(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    this.check(NBD_CMD_WRITE, offset, data.length, true);
    if (data.length === 0) return;
    const flags = this.fuaFlag(options.fua);
    const max = this.maxPayload;
    if (data.length <= max) {
      await this.send(NBD_CMD_WRITE, flags, offset, data.length, data);
      return;
    }
    await Promise.all(
      NbdClient.pieces(offset, data.length, max).map((p) => this.send(NBD_CMD_WRITE, flags, p.offset, p.length, data.subarray(p.offset - offset, p.offset - offset + p.length))),
    );
  }

  private fuaFlag(fua: boolean | undefined): number {
    if (!fua) return 0;
    if (!this.canFua) throw this.unsupported('FUA');
    return NBD_CMD_FLAG_FUA;
  }

  /**
   * Largest length field for commands without payload (block status, zero, trim): 32 bits, or
   * with extended headers 64 bits (as a JS number: below 2^53, so any range of the export).
   */
  private get maxLength(): number {
    // Aligned to 64 KiB (or the minimum block size if larger): nbdkit 1.32 aborts on a block
    // status request of 0xffffffff bytes over a large hole (an assertion in its extent code).
    const a = Math.max(this.blockSize.minimum, 65536);
    return Math.floor((this.extendedHeaders ? Number.MAX_SAFE_INTEGER : 0xffffffff) / a) * a;
  }

  /** NBD_CMD_WRITE_ZEROES. May trim unless noHole is set. */
  async zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.check(NBD_CMD_WRITE_ZEROES, offset, length, true);
    if (!this.canZero) throw this.unsupported('NBD_CMD_WRITE_ZEROES', offset);
    if (options.fastZero && !this.canFastZero) throw this.unsupported('NBD_CMD_FLAG_FAST_ZERO', offset);
    const flags = (options.noHole ? NBD_CMD_FLAG_NO_HOLE : 0) | (options.fastZero ? NBD_CMD_FLAG_FAST_ZERO : 0) | this.fuaFlag(options.fua);
    await Promise.all(NbdClient.pieces(offset, length, this.maxLength).map((p) => this.send(NBD_CMD_WRITE_ZEROES, flags, p.offset, p.length)));
  }

  /** NBD_CMD_TRIM (contents afterwards are unspecified). */
  async trim(offset: number, length: number, options: { fua?: boolean } = {}): Promise<void> {
    this.check(NBD_CMD_TRIM, offset, length, true);
    if (!this.canTrim) throw this.unsupported('NBD_CMD_TRIM', offset);
    const flags = this.fuaFlag(options.fua);
    await Promise.all(NbdClient.pieces(offset, length, this.maxLength).map((p) => this.send(NBD_CMD_TRIM, flags, p.offset, p.length)));
  }

  /**
   * NBD_CMD_FLUSH. With multi-conn the server guarantees one flush covers writes completed on
   * every connection; without it there is only one connection.
   */
  async flush(): Promise<void> {
    if (!this.canFlush) throw this.unsupported('NBD_CMD_FLUSH');
    await this.send(NBD_CMD_FLUSH, 0, 0, 0);
  }

  /**
   * NBD_CMD_BLOCK_STATUS for one meta context. Extents start at `offset` and are consecutive;
   * they may cover less than `length` (ask again from where they end) and the last one may
   * extend past it (never past the export's end).
   */
  async blockStatus(offset: number, length: number, context = 'base:allocation'): Promise<BlockStatusExtent[]> {
    const id = this.metaContexts.get(context);
    if (id === undefined) throw this.unsupported(`meta context ${context}`, offset);
    this.check(NBD_CMD_BLOCK_STATUS, offset, length, false);
    const len = Math.min(length, this.maxLength);
    const r = await this.send(NBD_CMD_BLOCK_STATUS, 0, offset, len, undefined, undefined, id);
    const out: BlockStatusExtent[] = [];
    let o = offset;
    for (const e of r.extents!) {
      if (o >= this.size) break;
      const l = Math.min(e.length, this.size - o);
      out.push({ offset: o, length: l, flags: e.flags });
      o += l;
    }
    return out;
  }

  /**
   * NBD_CMD_BLOCK_STATUS answered for several negotiated contexts at once (the server sends a
   * chunk for every negotiated context in each reply). Each list starts at `offset` and is
   * consecutive; the lists may cover different lengths. A context missing from the reply is a
   * protocol error.
   */
  async blockStatusContexts(offset: number, length: number, contexts: string[]): Promise<Map<string, BlockStatusExtent[]>> {
    const ids = contexts.map((c) => {
      const id = this.metaContexts.get(c);
      if (id === undefined) throw this.unsupported(`meta context ${c}`, offset);
      return id;
    });
    this.check(NBD_CMD_BLOCK_STATUS, offset, length, false);
    const len = Math.min(length, this.maxLength);
    const r = await this.send(NBD_CMD_BLOCK_STATUS, 0, offset, len, undefined, undefined, ids[0]);
    const out = new Map<string, BlockStatusExtent[]>();
    contexts.forEach((c, i) => {
      const ex = i === 0 ? r.extents! : r.otherExtents?.get(ids[i]);
      if (!ex)
        throw new NbdStreamError('ERR_PROTOCOL', `block status reply at offset ${offset} has no extents for ${c}`, { endpoint: this.endpoint, offset, command: 'NBD_CMD_BLOCK_STATUS' });
      const list: BlockStatusExtent[] = [];
      let o = offset;
      for (const e of ex) {
        if (o >= this.size) break;
        const l = Math.min(e.length, this.size - o);
        list.push({ offset: o, length: l, flags: e.flags });
        o += l;
      }
      out.set(c, list);
    });
    return out;
  }

  private closing = false;

  /** Wait for all replies, disconnect every connection. */
  async close(): Promise<void> {
    this.closing = true;
    await this.joining;
    await Promise.allSettled([...this.reconnecting.values()]);
    await Promise.all(this.conns.map((c) => c.close()));
  }
}

/** NbdClient.connect(target, options): connect to an NBD URI (or a parsed address) and negotiate. */
export function connect(target: string | NbdAddress, options?: ConnectOptions): Promise<NbdClient> {
  return NbdClient.connect(target, options);
}
