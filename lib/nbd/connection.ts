/**
 * One NBD connection: socket, handshake, and pipelined requests matched to replies by cookie.
 *
 * Plain sockets read with `onread` so that read payloads land directly in the caller's buffer
 * (ReplyDecoder.nextBuffer); TLS sockets are fed by copying. Requests in flight are bounded by
 * count and by bytes; more wait in FIFO order. A protocol violation or a lost socket fails every
 * pending request and closes the connection.
 */
import type * as net from 'node:net';
import { getSystemErrorName } from 'node:util';
import { NbdStreamError, asNbdStreamError } from '../errors.js';
import { nodeNet, nodeTls } from '../builtins.js';
import { encodeExtendedRequest, encodeRequest } from './encode.js';
import { ReplyDecoder, type Extent, type PendingRequest, type ReplyHandler, type ZeroRuns } from './decode.js';
import { clientHandshake, type ExportInfo } from './handshake.js';
import { ByteReader } from './reader.js';
import type { NbdAddress } from './uri.js';
import { native, type SocketReader } from '../native.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_ESHUTDOWN,
  NBD_REPLY_FLAG_DONE,
  commandName,
  nbdErrorName,
  nbdErrorText,
} from './protocol.js';

/** Events from the native reader (native/socket_reader.c). */
const READER_RAW = 0;
const READER_DATA = 1;
const READER_SIMPLE_READ = 2;
const READER_END = 3;
/** Event flag: the read data just received was checked for zero blocks; raw lists the all-zero ones (native/socket_reader.c). */
const READER_ZERO_CHECKED = 1 << 16;
const NO_RUNS: ZeroRuns = new Float64Array(0);

/** The zero-block runs of a DATA / SIMPLE_READ event: pairs of native doubles in raw. */
function zeroRuns(flags: number, raw: Buffer | undefined): ZeroRuns | undefined {
  if (!(flags & READER_ZERO_CHECKED)) return undefined;
  if (!raw?.length) return NO_RUNS;
  const bytes = raw.byteOffset % 8 === 0 ? raw : Buffer.from(raw);
  return new Float64Array(bytes.buffer, bytes.byteOffset, bytes.length / 8);
}

export interface ConnectionOptions {
  /** Name used in error messages (normally the URI). */
  endpoint: string;
  structuredReplies: boolean;
  /** Negotiate extended headers when the server offers them (default true). */
  extendedHeaders?: boolean;
  metaContexts: string[];
  maxRequests: number;
  maxBytesInFlight: number;
  /** Milliseconds a request (or the handshake) may wait for its reply; 0 = no limit. */
  timeout?: number;
  /** Block size the native reader checks read data for all-zero blocks with (0: none). */
  zeroBlockSize?: number;
}

export interface Range {
  offset: number;
  length: number;
}

/** A request in flight. */
class Request implements PendingRequest {
  /** Date.now() when sent (for --timeout). */
  sent = 0;
  holes: Range[] | undefined;
  covered = 0;
  /** Reads: some data part was not checked for zero blocks as it arrived (see zeroRuns). */
  zeroUnchecked = false;
  /** Reads: the all-zero blocks the native reader found in the data (none: undefined). */
  zeroRuns: Range[] | undefined;
  /** Reads: the native reader saw the reply end and dropped the registration itself. */
  forgotten = false;
  error: NbdStreamError | undefined;
  extents: Extent[] | undefined;
  contextId = 0;
  /** Block status chunks for the other negotiated contexts (the server sends one per context). */
  otherExtents: Map<number, Extent[]> | undefined;
  constructor(
    readonly cookie: number,
    readonly type: number,
    readonly offset: number,
    readonly length: number,
    readonly cost: number,
    readonly dest: Buffer | undefined,
    readonly resolve: (r: Request) => void,
    readonly reject: (e: NbdStreamError) => void,
  ) {}
}

export class NbdConnection implements ReplyHandler {
  info!: ExportInfo;
  private socket!: net.Socket;
  private readonly opts: ConnectionOptions;
  private readonly reader = new ByteReader();
  private decoder: ReplyDecoder | undefined;
  private readonly hsScratch = Buffer.allocUnsafe(16384);
  private lastBuf: Buffer = this.hsScratch;
  private lastFromDecoder = false;
  private readonly pending = new Map<number, Request>();
  private nextCookie = 1;
  private inFlight = 0;
  private inFlightBytes = 0;
  private readonly waiters: Array<{ cost: number; count: number; go: () => void; fail: (e: NbdStreamError) => void }> = [];
  private idleWaiters: Array<() => void> = [];
  private failure: NbdStreamError | undefined;
  /** The server answered NBD_ESHUTDOWN: nothing more is sent but NBD_CMD_DISC (see shutDown). */
  private shutdown: NbdStreamError | undefined;
  private closing = false;
  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
  private closed: Promise<void> | undefined;

  private constructor(opts: ConnectionOptions) {
    this.opts = opts;
  }

  /** Connect and negotiate. Rejects with a coded error naming the endpoint. */
  static async open(addr: NbdAddress, opts: ConnectionOptions): Promise<NbdConnection> {
    const c = new NbdConnection(opts);
    let timer: NodeJS.Timeout | undefined;
    try {
      const connected = c.connect(addr);
      if (opts.timeout) {
        const t = opts.timeout;
        await Promise.race([
          connected,
          new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new NbdStreamError('ERR_TIMEOUT', `no answer to the handshake within ${t / 1000} s`)), t);
          }),
        ]);
        c.watchTimeouts(t);
      } else await connected;
      return c;
    } catch (err) {
      c.socket?.destroy();
      throw asNbdStreamError(err, 'ERR_CONNECT', opts.endpoint);
    } finally {
      clearTimeout(timer);
    }
  }

  private timeoutTimer: NodeJS.Timeout | undefined;

  /**
   * Fail the connection when its oldest pending request has waited longer than `ms` (one timer
   * per connection, not one per request; the pending map is in sending order).
   */
  private watchTimeouts(ms: number): void {
    this.timeoutTimer = setInterval(() => {
      const oldest = this.pending.values().next();
      if (oldest.done) return;
      const r = oldest.value;
      if (Date.now() - r.sent > ms)
        this.lost(new NbdStreamError('ERR_TIMEOUT', `${commandName(r.type)} got no reply within ${ms / 1000} s`, { offset: r.offset }));
    }, Math.max(10, Math.min(1000, ms / 4)));
    this.timeoutTimer.unref();
  }

  get bytesInFlight(): number {
    return this.inFlightBytes;
  }
  get requestsInFlight(): number {
    return this.inFlight;
  }

  private async connect(addr: NbdAddress): Promise<void> {
    const where = addr.socket !== undefined ? { path: addr.socket } : { host: addr.host!, port: addr.port! };
    const zeroCopy = addr.tls === 'off';
    const opts: net.NetConnectOpts = zeroCopy
      ? { ...where, onread: { buffer: () => this.nextBuffer(), callback: (n: number) => this.onRead(n) } }
      : where;
    // vsock: a socket the native addon connected (vsock.ts), so no 'connect' event comes
    const vsock = addr.cid !== undefined ? await import('./vsock.js') : undefined;
    const raw = vsock ? await vsock.connectVsock(addr.cid!, addr.port!, zeroCopy ? { onread: opts.onread } : {}) : nodeNet().connect(opts);
    this.socket = raw;
    const onData = (chunk: Buffer) => this.onSocketData(chunk);
    if (!zeroCopy) raw.on('data', onData);
    await new Promise<void>((resolve, reject) => {
      if (vsock) return resolve();
      raw.once('connect', resolve);
      raw.once('error', (err: NodeJS.ErrnoException) => {
        const to = addr.socket !== undefined ? `socket ${addr.socket}` : `${addr.host}:${addr.port}`;
        reject(new NbdStreamError('ERR_CONNECT', `cannot connect to ${to}: ${err.code ?? err.message}`, { cause: err }));
      });
    });
    if (addr.socket === undefined && !vsock) raw.setNoDelay(true);
    this.watch(raw);

    // A TLS 1.3 client finishes its handshake before the server has checked the client
    // certificate, so a server that refuses it (nbdkit --tls-verify-peer) hangs up only after
    // secureConnect. Until the first byte arrives over TLS, a lost connection is a TLS refusal
    // (as it already is under TLS 1.2), not a connection error.
    let tlsUp = false;
    let describeTlsCredentials = (_a: NbdAddress) => '';
    let heardOverTls = false;
    this.info = await clientHandshake(
      {
        read: (n) => this.reader.read(n),
        write: (b) => {
          this.socket.write(b);
        },
        startTls: async () => {
          raw.removeListener('data', onData);
          // TLS code is loaded only for TLS connections (it costs start-up time)
          const [tls, tlsOptions] = [nodeTls(), await import('./tls.js')];
          describeTlsCredentials = tlsOptions.describeTlsCredentials;
          const options = tlsOptions.tlsConnectOptions(addr);
          const ts = tls.connect({ ...options, socket: raw });
          await new Promise<void>((resolve, reject) => {
            ts.once('secureConnect', resolve);
            const why = () => describeTlsCredentials(addr);
            ts.once('error', (err) => reject(new NbdStreamError('ERR_TLS', `TLS handshake failed (${why()}): ${err.message}`, { cause: err })));
            ts.once('close', () => reject(new NbdStreamError('ERR_TLS', `TLS handshake failed (${why()}): connection closed by the server`)));
          });
          ts.once('data', () => (heardOverTls = true));
          ts.on('data', onData);
          this.socket = ts;
          this.watch(ts);
          tlsUp = true;
        },
      },
      { exportName: addr.exportName, tls: addr.tls, structuredReplies: this.opts.structuredReplies, extendedHeaders: this.opts.extendedHeaders, metaContexts: this.opts.metaContexts },
    ).catch((err: unknown) => {
      if (tlsUp && !heardOverTls && err instanceof NbdStreamError && (err.code === 'ERR_CONNECT' || err.code === 'ERR_CLOSED'))
        throw new NbdStreamError(
          'ERR_TLS',
          `server ended the TLS session right after the handshake (${describeTlsCredentials(addr)}; client certificate missing or not accepted?): ${err.message}`,
          { cause: err },
        );
      throw err;
    });
    this.decoder = new ReplyDecoder(this, this.info.structuredReplies, this.info.extendedHeaders);
    const left = this.reader.drain();
    if (left.length) this.decoder.push(left);
    if (zeroCopy) {
      this.receiver = 'libuv';
      this.startNativeReader(raw);
    }
  }

  /** The socket reader thread, when the addon has it (plain sockets only; see socket_reader.c). */
  private nativeReader: SocketReader | undefined;
  /** Who receives replies: a native thread, libuv reads into request buffers, or TLS 'data' events. */
  receiver: 'native' | 'libuv' | 'tls' = 'tls';

  /**
   * Hand receiving over to a native thread (native/socket_reader.c): libuv stops reading this
   * socket; the thread receives read payloads straight into the registered request buffers and
   * hands every other reply to the decoder. NBDSTREAM_NATIVE_READER=0 (or no addon) keeps
   * libuv's reads.
   */
  private startNativeReader(raw: net.Socket): void {
    const fd = (raw as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (!native?.readerStart || process.env.NBDSTREAM_NATIVE_READER === '0' || typeof fd !== 'number' || fd < 0 || this.failure) return;
    raw.pause();
    this.nativeReader = native.readerStart(
      fd,
      this.info.structuredReplies,
      (kind, cookie, offset, length, flags, raw) => this.onNativeEvent(kind, cookie, offset, length, flags, raw),
      this.info.extendedHeaders,
    );
    this.receiver = 'native';
  }

  private onNativeEvent(kind: number, cookie: number, offset: number, length: number, flags: number, raw: Buffer | undefined): void {
    if (!this.nativeReader) return;
    const d = this.decoder!;
    switch (kind) {
      case READER_RAW:
        return d.push(raw!);
      case READER_DATA:
        if (flags & NBD_REPLY_FLAG_DONE) this.forgotten(cookie);
        return d.dataReceived(cookie, offset, length, flags, zeroRuns(flags, raw));
      case READER_SIMPLE_READ:
        this.forgotten(cookie);
        return d.simpleReadReceived(cookie, zeroRuns(flags, raw));
      case READER_END:
        return this.lostByServer(flags === 1);
      default:
        this.lost(new NbdStreamError('ERR_CONNECT', `connection error: ${getSystemErrorName(length)}`, { cause: Object.assign(new Error(`recv: errno ${-length}`), { errno: length }) }));
    }
  }

  /** The reader thread has dropped this read's registration (a last data chunk, a simple reply). */
  private forgotten(cookie: number): void {
    const r = this.pending.get(cookie);
    if (r) r.forgotten = true;
  }

  /** Stop the reader thread (joins it: nothing writes into request buffers afterwards). */
  private stopNativeReader(): void {
    const r = this.nativeReader;
    if (!r) return;
    this.nativeReader = undefined;
    native!.readerStop(r);
  }

  private watch(s: net.Socket): void {
    s.on('error', (err: NodeJS.ErrnoException) => {
      this.lost(new NbdStreamError('ERR_CONNECT', `connection error: ${err.code ?? err.message}`, { cause: err }));
    });
    s.on('close', () => this.lostByServer());
  }

  /** The server closed the connection; `cut`: the native reader was inside a reply. */
  private lostByServer(cut = false): void {
    // ERR_CLOSED even when a reply was cut short: to the client a truncated reply and a
    // dropped connection look the same, and both may be retried (--retries).
    const n = this.pending.size;
    const pending = n ? ` with ${n} request${n > 1 ? 's' : ''} pending` : '';
    const midReply = cut || (this.decoder && !this.decoder.idle && !this.decoder.dead) ? ' in the middle of a reply' : '';
    this.lost(new NbdStreamError('ERR_CLOSED', `server closed the connection${midReply}${pending}`));
  }

  // ------------------------------------------------------------ input

  private nextBuffer(): Buffer {
    if (this.decoder) {
      this.lastFromDecoder = true;
      return (this.lastBuf = this.decoder.nextBuffer());
    }
    this.lastFromDecoder = false;
    return (this.lastBuf = this.hsScratch);
  }

  private onRead(n: number): boolean {
    if (this.lastFromDecoder) this.decoder!.advance(n);
    else if (this.decoder) this.decoder.push(this.lastBuf.subarray(0, n));
    else this.reader.push(Buffer.from(this.lastBuf.subarray(0, n)));
    return true;
  }

  private onSocketData(chunk: Buffer): void {
    if (this.decoder) this.decoder.push(chunk);
    else this.reader.push(chunk);
  }

  // ------------------------------------------------------------ ReplyHandler

  lookup(cookie: number): PendingRequest | undefined {
    return this.pending.get(cookie);
  }

  onSimpleReply(cookie: number, errno: number, zeroRuns?: ZeroRuns): void {
    const r = this.pending.get(cookie)!;
    this.zeroChecked(r, zeroRuns);
    if (errno) {
      r.error = this.serverError(r, errno, '', undefined);
      if (errno === NBD_ESHUTDOWN) this.shutDown();
    } else if (r.type === NBD_CMD_BLOCK_STATUS) return this.protocolViolation('simple reply to NBD_CMD_BLOCK_STATUS');
    else r.covered = r.length;
    this.finish(r);
  }

  onData(cookie: number, _offset: number, length: number, zeroRuns?: ZeroRuns): void {
    const r = this.pending.get(cookie)!;
    r.covered += length;
    this.zeroChecked(r, zeroRuns);
  }

  /** Add a data part's zero-block runs to its read's, or note that the part was not checked. */
  private zeroChecked(r: Request, runs: ZeroRuns | undefined): void {
    if (!runs) r.zeroUnchecked = true;
    else for (let i = 0; i < runs.length; i += 2) (r.zeroRuns ??= []).push({ offset: runs[i], length: runs[i + 1] });
  }

  onHole(cookie: number, offset: number, length: number): void {
    const r = this.pending.get(cookie)!;
    const start = offset - r.offset;
    r.dest!.fill(0, start, start + length);
    (r.holes ??= []).push({ offset, length });
    r.covered += length;
  }

  onBlockStatus(cookie: number, contextId: number, extents: Extent[]): void {
    const r = this.pending.get(cookie)!;
    const other = contextId !== r.contextId;
    // a reply carries one chunk per negotiated context; any other id was never asked for
    if (other && ![...this.info.metaContexts.values()].includes(contextId))
      return this.protocolViolation(`block status for context id ${contextId}, which was not asked for`);
    if (other ? r.otherExtents?.has(contextId) : r.extents) return this.protocolViolation('two block status chunks for one context');
    let end = r.offset;
    for (let i = 0; i < extents.length; i++) {
      if (extents[i].length === 0) return this.protocolViolation(`block status extent ${i} at offset ${end} has zero length`);
      if (i < extents.length - 1 && end + extents[i].length > r.offset + r.length)
        return this.protocolViolation(`block status extent ${i} at offset ${end} goes past the requested range`);
      end += extents[i].length;
    }
    if (other) (r.otherExtents ??= new Map()).set(contextId, extents);
    else r.extents = extents;
  }

  onError(cookie: number, errno: number, message: string, offset: number | undefined): void {
    const r = this.pending.get(cookie)!;
    r.error ??= this.serverError(r, errno, message, offset);
    if (errno === NBD_ESHUTDOWN) this.shutDown();
  }

  /**
   * The server is going away: it answered NBD_ESHUTDOWN, here or on another connection (nbdkit
   * waits for every connection to close before it exits). As the spec asks, send no more
   * requests and disconnect softly (NBD_CMD_DISC) once those in flight are answered. Requests
   * not sent, and those answered with NBD_ESHUTDOWN, fail as on a lost connection (ERR_CLOSED,
   * nbdError ESHUTDOWN), which --retries resends on a new connection.
   */
  shutDown(): void {
    if (this.shutdown) return;
    this.shutdown = new NbdStreamError('ERR_CLOSED', 'server is shutting down (NBD_ESHUTDOWN)', { endpoint: this.opts.endpoint, nbdError: nbdErrorName(NBD_ESHUTDOWN) });
    for (const w of this.waiters.splice(0)) w.fail(this.shutdown);
    void this.close();
  }

  onDone(cookie: number): void {
    const r = this.pending.get(cookie)!;
    if (!r.error) {
      if (r.type === NBD_CMD_READ && r.covered !== r.length)
        return this.protocolViolation(`read reply at offset ${r.offset} covered ${r.covered} of ${r.length} bytes`);
      if (r.type === NBD_CMD_BLOCK_STATUS && !r.extents) return this.protocolViolation(`block status reply at offset ${r.offset} has no extents`);
    }
    this.finish(r);
  }

  onProtocolError(err: NbdStreamError): void {
    this.lost(err);
  }

  private protocolViolation(message: string): void {
    this.decoder?.fail(message);
  }

  private serverError(r: Request, errno: number, message: string, offset: number | undefined): NbdStreamError {
    const name = nbdErrorName(errno);
    const cmd = commandName(r.type);
    // NBD_ESHUTDOWN is about the connection, not the request: as if it were lost
    return new NbdStreamError(errno === NBD_ESHUTDOWN ? 'ERR_CLOSED' : 'ERR_SERVER', `${cmd} failed: ${name} (${nbdErrorText(name)})${message ? ': ' + message : ''}`, {
      endpoint: this.opts.endpoint,
      offset: offset ?? r.offset,
      command: cmd,
      nbdError: name,
    });
  }

  // ------------------------------------------------------------ requests

  private finish(r: Request): void {
    this.pending.delete(r.cookie);
    if (this.nativeReader && r.type === NBD_CMD_READ && !r.forgotten) native!.readerForget(this.nativeReader, r.cookie);
    this.inFlight--;
    this.inFlightBytes -= r.cost;
    if (r.error) r.reject(r.error);
    else r.resolve(r);
    this.wake();
  }

  private wake(): void {
    while (this.waiters.length && this.fits(this.waiters[0].cost, this.waiters[0].count)) {
      const w = this.waiters.shift()!;
      this.reserve(w.cost, w.count);
      w.go();
    }
    if (this.inFlight === 0 && this.waiters.length === 0) {
      const ws = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of ws) w();
    }
  }

  /** Whether `count` requests of `cost` bytes together may go now (the byte bound gives way on an idle connection). */
  private fits(cost: number, count = 1): boolean {
    return this.inFlight + count <= this.opts.maxRequests && (this.inFlight === 0 || this.inFlightBytes + cost <= this.opts.maxBytesInFlight);
  }

  private reserve(cost: number, count = 1): void {
    this.inFlight += count;
    this.inFlightBytes += cost;
  }

  /** Failure that ended this connection (or its server's shutting down), if any. */
  get error(): NbdStreamError | undefined {
    return this.failure ?? this.shutdown;
  }

  /**
   * Send one request and resolve when its reply is complete. `payload` for writes, `dest` for
   * reads (length bytes), `contextId` for block status.
   */
  async request(type: number, flags: number, offset: number, length: number, payload?: Buffer, dest?: Buffer, contextId = 0): Promise<Request> {
    const cost = type === NBD_CMD_READ || type === NBD_CMD_WRITE ? length : 0;
    await this.admit(cost, 1, offset);
    return new Promise<Request>((resolve, reject) => {
      const r = this.send(type, flags, offset, length, cost, dest, resolve, reject);
      r.contextId = contextId;
      if (payload) this.socket.write(payload);
    });
  }

  /**
   * NBD_CMD_READ of each range into its `dest` (as long as the range), sent together and
   * settled together: one promise for a long read cut into request-size pieces. Resolves with
   * the pieces' requests in order once all are answered; rejects with the first error once
   * none is still being received (the buffers are free again either way).
   */
  async requestReads(ranges: Array<{ offset: number; length: number; dest: Buffer }>): Promise<Request[]> {
    if (ranges.length > this.opts.maxRequests) throw new RangeError(`requestReads: ${ranges.length} reads, more than the ${this.opts.maxRequests} allowed in flight`);
    const cost = ranges.reduce((n, p) => n + p.length, 0);
    await this.admit(cost, ranges.length, ranges[0].offset);
    return new Promise<Request[]>((resolve, reject) => {
      let left = ranges.length;
      let error: NbdStreamError | undefined;
      const done = () => {
        if (--left) return;
        if (error) reject(error);
        else resolve(reqs);
      };
      const failed = (e: NbdStreamError) => {
        error ??= e;
        done();
      };
      const reqs = ranges.map((p) => this.send(NBD_CMD_READ, 0, p.offset, p.length, p.length, p.dest, done, failed));
    });
  }

  /** Wait until `count` requests of `cost` bytes may be sent (they are then reserved). */
  private async admit(cost: number, count: number, offset: number): Promise<void> {
    if (this.shutdown) throw new NbdStreamError('ERR_CLOSED', this.shutdown.message, { endpoint: this.opts.endpoint, offset, nbdError: this.shutdown.nbdError });
    if (this.failure) throw this.failure;
    if (this.closing) throw new NbdStreamError('ERR_CLOSED', 'connection is closing', { endpoint: this.opts.endpoint, offset });
    if (this.waiters.length || !this.fits(cost, count)) {
      await new Promise<void>((go, fail) => this.waiters.push({ cost, count, go, fail }));
    } else this.reserve(cost, count);
    if (this.failure) {
      this.inFlight -= count;
      this.inFlightBytes -= cost;
      throw this.failure;
    }
  }

  /** Send one admitted request (its payload, if any, is the caller's to write next). */
  private send(
    type: number,
    flags: number,
    offset: number,
    length: number,
    cost: number,
    dest: Buffer | undefined,
    resolve: (r: Request) => void,
    reject: (e: NbdStreamError) => void,
  ): Request {
    const cookie = this.nextCookie;
    this.nextCookie = this.nextCookie === 0xffffffff ? 1 : this.nextCookie + 1;
    const r = new Request(cookie, type, offset, length, cost, dest, resolve, reject);
    if (this.timeoutTimer) r.sent = Date.now();
    this.pending.set(cookie, r);
    if (this.nativeReader && type === NBD_CMD_READ && dest && length > 0) native!.readerExpect(this.nativeReader, cookie, dest.length === length ? dest : dest.subarray(0, length), offset, this.opts.zeroBlockSize ?? 0);
    // Requests made in the same tick go out in one writev (fewer syscalls and server wakeups).
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(this.encode(flags, type, cookie, offset, length));
    return r;
  }

  /** A request header in the negotiated format (28 bytes, or 32 with extended headers). */
  private encode(flags: number, type: number, cookie: number, offset: number, length: number): Buffer {
    return this.info.extendedHeaders ? encodeExtendedRequest(flags, type, cookie, offset, length) : encodeRequest(flags, type, cookie, offset, length);
  }

  /** Fail everything pending and tear the socket down (idempotent). */
  private lost(err: NbdStreamError): void {
    if (this.failure) return;
    this.stopNativeReader();
    clearInterval(this.timeoutTimer);
    if (!err.endpoint) err.endpoint = this.opts.endpoint;
    this.failure = err;
    this.reader.fail(err);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const r of pending) {
      this.inFlight--;
      this.inFlightBytes -= r.cost;
      const e = new NbdStreamError(err.code, err.message, { endpoint: this.opts.endpoint, offset: r.offset, command: commandName(r.type), cause: err.cause });
      r.reject(e);
    }
    const waiters = this.waiters.splice(0);
    for (const w of waiters) w.fail(err);
    const ws = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of ws) w();
    this.socket.destroy();
  }

  /** Wait for every reply, send NBD_CMD_DISC, and close the socket. */
  close(): Promise<void> {
    if (this.closed) return this.closed;
    this.closed = (async () => {
      if (!this.failure) {
        if (this.inFlight || this.waiters.length) await new Promise<void>((r) => this.idleWaiters.push(r));
        this.closing = true;
      }
      clearInterval(this.timeoutTimer);
      if (!this.failure && !this.socket.destroyed) {
        const s = this.socket;
        // After NBD_CMD_DISC the server sends nothing more: a plain socket is done once the
        // request is handed to the kernel; TLS waits for the server's close (close_notify).
        const plain = !this.info.tls;
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => s.destroy(), 5000);
          const done = () => {
            clearTimeout(timer);
            this.stopNativeReader();
            if (plain) s.destroy();
            resolve();
          };
          if (plain) s.once('finish', done);
          s.once('close', done);
          this.failure = new NbdStreamError('ERR_CLOSED', 'connection closed', { endpoint: this.opts.endpoint });
          s.end(this.encode(0, NBD_CMD_DISC, 0, 0, 0));
        });
      } else {
        this.stopNativeReader();
        this.socket.destroy();
      }
    })();
    return this.closed;
  }
}
