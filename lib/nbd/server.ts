/**
 * NbdServer: the built-in NBD server. Serves any Endpoint (a file, a block device, memory, even
 * another NBD export) — or several named exports — over Unix sockets, TCP, a socket inherited by
 * systemd-style socket activation, or any connected Duplex stream.
 *
 * Protocol: fixed newstyle handshake with NBD_OPT_GO / INFO (INFO_EXPORT, INFO_BLOCK_SIZE,
 * INFO_NAME, INFO_DESCRIPTION), LIST, ABORT, EXPORT_NAME, STRUCTURED_REPLY, EXTENDED_HEADERS
 * (32-byte requests and reply headers, 64-bit lengths, BLOCK_STATUS_EXT), SET/LIST_META_CONTEXT
 * (base:allocation from the endpoint's extents, qemu:dirty-bitmap:NAME from an export's
 * dirtyBitmaps) and STARTTLS (PSK or X.509; FORCEDTLS with
 * mode 'require'); anything else is NBD_REP_ERR_UNSUP. Transmission: READ (structured replies:
 * OFFSET_DATA for data, OFFSET_HOLE for ranges the endpoint's extents call zero), WRITE (+FUA),
 * WRITE_ZEROES (NO_HOLE, FAST_ZERO), TRIM, FLUSH, BLOCK_STATUS (REQ_ONE), DISC. Requests run
 * concurrently and are answered as they finish (out of order); reading from a client pauses while
 * too many requests or bytes are in flight or its replies are not being read.
 *
 * Bounds: one memory budget for queued replies covers all clients (server-budget.ts): while it is
 * exceeded, clients holding part of it are not read from. A client that has not finished the
 * handshake within `handshakeLimitMs` is disconnected.
 *
 * Contracts:
 *  - Peer misbehaviour never throws out of the server: a client that breaks the protocol is
 *    disconnected and reported on the 'clientError' event (never 'error', which would crash an
 *    emitter without listeners).
 *  - Endpoint failures become NBD error replies: EINVAL for bad ranges/flags, ENOSPC for writes
 *    past the end (and ENOSPC/EDQUOT/EFBIG), EPERM for writes to a read-only export, EIO for the
 *    rest — with the endpoint's message in a structured ERROR chunk when structured replies are on.
 *  - Replies to one request are written in one go (no interleaving needed), but replies to
 *    different requests go out in completion order.
 *  - Fault injection (`faults`, for tests; may be changed while serving) can fail requests,
 *    delay them, cut connections after N reply bytes, or break the protocol in chosen ways.
 */
import { EventEmitter } from 'node:events';
import type * as net from 'node:net';
import type { Duplex } from 'node:stream';
import { NbdStreamError, checkOptionNames } from '../errors.js';
import type { Endpoint, ExtentRun } from '../endpoints/endpoint.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  commandName,
} from './protocol.js';
import {
  ServerDecoder,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeSimpleReply,
  toExtendedChunk,
  parseExportNameData,
  parseGoData,
  parseMetaContextData,
  type BlockDescriptor,
  type ClientRequest,
  type ServerDecoderHandler,
} from './server-codec.js';
import { ServerTls, type ServerTlsOptions } from './server-tls.js';
import { ReplyBudget } from './server-budget.js';
import { formatNbdUri } from './uri.js';
import { nodeNet } from '../builtins.js';

export type { ServerTlsOptions } from './server-tls.js';

import { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN } from './protocol.js';
export { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN };

const NBD_ERRNO: Record<string, number> = {
  EPERM: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** The allocation meta context (always served). */
export const BASE_ALLOCATION = 'base:allocation';
const BASE_ALLOCATION_ID = 1;
/** Prefix of the dirty bitmap meta contexts (`qemu:dirty-bitmap:NAME`); bitmap i of an export has id 2 + i. */
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** NBD_STATE_DIRTY: the qemu:dirty-bitmap status flag. */
const STATE_DIRTY = 1;

/** A range of a dirty bitmap; `dirty` defaults to true. */
export interface DirtyRange {
  offset: number;
  length: number;
  dirty?: boolean;
}

/**
 * A dirty bitmap: its dirty ranges (everything else is clean), or a function giving the ranges
 * over [offset, offset + length) (those with `dirty: false` and whatever it leaves out are clean).
 */
export type DirtyBitmapSource = DirtyRange[] | ((offset: number, length: number) => Promise<DirtyRange[]> | DirtyRange[]);
/** Most block status descriptors in one reply (the spec asks for at most 2^20). */
const MAX_DESCRIPTORS = 1 << 16;

export type Violation =
  | 'wrong-cookie'
  | 'chunk-past-request'
  | 'zero-length-extent'
  | 'overlong-extent'
  | 'bad-magic'
  | 'truncated-header'
  | 'oversized-payload'
  | 'unasked-context'
  | 'simple-after-structured'
  | 'repeated-chunk'
  | 'hole-over-data';

/** Returns an NBD errno to fail the request with, or undefined to let it run. */
export type ErrorInjector = (offset: number, length: number) => number | undefined;

/**
 * Fault injection for tests. Read at every request, so a test may change it while serving.
 * Counters (closeAfterBytes, violateAfter) are per connection.
 */
export interface ServerFaults {
  readError?: ErrorInjector;
  writeError?: ErrorInjector;
  /** NBD_CMD_WRITE_ZEROES (and NBD_CMD_TRIM). */
  zeroError?: ErrorInjector;
  blockStatusError?: ErrorInjector;
  /** Delay before each request is processed (ms), or a function of the request. */
  delayMs?: number | ((type: number, offset: number, length: number) => number);
  /**
   * Cut the connection once this many bytes of transmission-phase replies were sent (the last
   * reply may be cut in the middle). Handshake bytes do not count.
   */
  closeAfterBytes?: number;
  /**
   * Break the protocol in the reply to every request it applies to (after `violateAfter` of
   * them):
   *  - wrong-cookie, bad-magic, truncated-header (part of a header, then the connection is
   *    closed): any request;
   *  - oversized-payload: a chunk header announcing a 2 GiB payload (any request, with
   *    structured replies; a simple reply has no length to get wrong);
   *  - chunk-past-request, simple-after-structured: reads with structured replies;
   *  - repeated-chunk (the first half of the data twice, then NONE with DONE), hole-over-data
   *    (data for the first three quarters, then a hole over the third quarter with DONE): reads
   *    with structured replies, as many bytes as asked for but not covering the request;
   *  - zero-length-extent, overlong-extent (a non-final extent past the request),
   *    unasked-context: block status.
   */
  violation?: Violation;
  /** Requests the violation applies to that are answered correctly first (default 0). */
  violateAfter?: number;
}

export interface ExportDefinition {
  /** Export name; '' is the default export. */
  name: string;
  endpoint: Endpoint;
  description?: string;
  readOnly?: boolean;
  /** Dirty bitmaps served as meta contexts `qemu:dirty-bitmap:NAME` (flag 1 = dirty). */
  dirtyBitmaps?: Record<string, DirtyBitmapSource>;
}

export interface NbdServerOptions {
  /** Aborting it closes the server as close() does: its listeners, then its clients. */
  signal?: AbortSignal;
  /** Serve every export read-only. */
  readOnly?: boolean;
  /** TLS credentials and mode; without it STARTTLS is refused (NBD_REP_ERR_POLICY). */
  tls?: ServerTlsOptions;
  faults?: ServerFaults;
  /** Requests processed at once per connection before the server stops reading (default 64). */
  maxRequests?: number;
  /** Payload bytes in flight per connection (writes received, replies queued) before it stops reading (default 64 MiB). */
  maxBytesInFlight?: number;
  /**
   * The same across all connections: the server's memory budget for queued replies (default
   * 128 MiB). While it is exceeded, only clients holding none of it are read from.
   */
  maxQueuedBytes?: number;
  /** Disconnect clients that have not finished the handshake after this long (ms; default 10000; 0: no limit). */
  handshakeLimitMs?: number;
}

/** NbdServerOptions.handshakeLimitMs by default. */
export const DEFAULT_HANDSHAKE_LIMIT_MS = 10_000;
/** The longest delay setTimeout takes (2^31 − 1 ms); longer ones fire at once. */
export const MAX_TIMER_MS = 0x7fff_ffff;
/** Every NbdServerOptions name (unknown names are a TypeError). */
export const SERVER_OPTIONS: Readonly<Record<keyof NbdServerOptions, true>> = {
  signal: true,
  readOnly: true,
  tls: true,
  faults: true,
  maxRequests: true,
  maxBytesInFlight: true,
  maxQueuedBytes: true,
  handshakeLimitMs: true,
};

export interface ListenOptions {
  /** Unix socket path. */
  path?: string;
  /** TCP port (0: any free port). */
  port?: number;
  /** TCP address to bind (default: all). */
  host?: string;
  /** An already listening socket (socket activation: 3). */
  fd?: number;
  /** A vsock port (any CID of this machine; vsock.ts). */
  vsockPort?: number;
}

interface Export {
  name: string;
  description: string;
  endpoint: Endpoint;
  size: number;
  readOnly: boolean;
  flags: number;
  minimum: number;
  preferred: number;
  maximum: number;
  /** Served dirty bitmaps, in id order (bitmap i has context id 2 + i). */
  bitmaps: Array<{ name: string; source: DirtyBitmapSource }>;
}

/** A meta context of an export. */
interface MetaContext {
  id: number;
  name: string;
  /** Undefined: base:allocation. */
  bitmap?: DirtyBitmapSource;
}

function metaContextsOf(exp: Export): MetaContext[] {
  return [{ id: BASE_ALLOCATION_ID, name: BASE_ALLOCATION }, ...exp.bitmaps.map((b, i) => ({ id: BASE_ALLOCATION_ID + 1 + i, name: DIRTY_BITMAP_PREFIX + b.name, bitmap: b.source }))];
}

/** Whether a SET/LIST_META_CONTEXT query selects a context. */
function queryMatches(q: string, name: string, list: boolean): boolean {
  if (q === name) return true;
  if (!list) return false;
  // LIST also takes a namespace with an empty leaf: "base:", "qemu:dirty-bitmap:" ("qemu:" too)
  if (q.endsWith(':') && name.startsWith(q)) return q !== 'qemu:' || name.startsWith(DIRTY_BITMAP_PREFIX);
  return false;
}

/** Consecutive dirty/clean descriptors over [offset, offset + length) from dirty ranges. */
async function bitmapDescriptors(source: DirtyBitmapSource, offset: number, length: number): Promise<BlockDescriptor[]> {
  const end = offset + length;
  const got = typeof source === 'function' ? await source(offset, length) : source;
  const dirty = got
    .filter((r) => r.dirty !== false && r.length > 0 && r.offset < end && r.offset + r.length > offset)
    .map((r) => ({ start: Math.max(r.offset, offset), stop: Math.min(r.offset + r.length, end) }))
    .sort((a, b) => a.start - b.start);
  const out: BlockDescriptor[] = [];
  const push = (len: number, flags: number) => {
    if (len <= 0) return;
    const last = out[out.length - 1];
    if (last && last.flags === flags && last.length + len <= 0xffff_ffff) last.length += len;
    else out.push({ length: len, flags });
  };
  let pos = offset;
  for (const d of dirty) {
    if (d.stop <= pos) continue;
    push(d.start - pos, 0);
    push(d.stop - Math.max(d.start, pos), STATE_DIRTY);
    pos = d.stop;
  }
  push(end - pos, 0);
  return out.slice(0, MAX_DESCRIPTORS);
}

/** Error reply raised while processing a request. */
class ReplyError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

function largestPow2AtMost(n: number): number {
  let p = 1;
  while (p * 2 <= n) p *= 2;
  return p;
}

function makeExport(d: ExportDefinition, serverReadOnly: boolean): Export {
  const ep = d.endpoint;
  const c = ep.capabilities;
  if (ep.size === undefined || !c.seekable) throw new NbdStreamError('ERR_USAGE', 'can only serve a seekable endpoint of known size', { endpoint: ep.name });
  const readOnly = serverReadOnly || !!d.readOnly || c.readOnly;
  let flags = NBD_FLAG_HAS_FLAGS;
  if (readOnly) flags |= NBD_FLAG_READ_ONLY;
  // Zeroing always works (endpoints fall back to writing zeroes); FAST_ZERO is advertised so that
  // clients can ask, and refused with ENOTSUP when the endpoint cannot zero quickly. TRIM is a
  // hint: done as a zero where zeroing is cheap, else ignored.
  else flags |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_TRIM;
  if (c.canFlush) flags |= NBD_FLAG_SEND_FLUSH | (readOnly ? 0 : NBD_FLAG_SEND_FUA);
  if (c.canMultiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  const maximum = Math.max(512, Math.min(NBD_DEFAULT_MAX_PAYLOAD, c.maxRequest || NBD_DEFAULT_MAX_PAYLOAD));
  const preferred = Math.min(largestPow2AtMost(Math.max(512, c.preferredBlockSize || 4096)), largestPow2AtMost(maximum));
  const bitmaps = Object.entries(d.dirtyBitmaps ?? {}).map(([name, source]) => {
    if (!name) throw new NbdStreamError('ERR_USAGE', 'a dirty bitmap needs a name', { endpoint: ep.name });
    return { name, source };
  });
  return { name: d.name, description: d.description ?? '', endpoint: ep, size: ep.size, readOnly, flags, minimum: 1, preferred, maximum, bitmaps };
}

/** NBD error value for an exception from an endpoint. */
export function nbdErrnoOf(err: unknown): number {
  if (err instanceof ReplyError) return err.errno;
  if (err instanceof NbdStreamError) {
    if (err.code === 'ERR_RANGE') return NBD_EINVAL;
    if (err.code === 'ERR_UNSUPPORTED') return NBD_EPERM;
    if (err.nbdError && NBD_ERRNO[err.nbdError]) return NBD_ERRNO[err.nbdError];
  }
  const e = err as { code?: unknown; cause?: { code?: unknown } } | null | undefined;
  const code = typeof e?.cause?.code === 'string' ? e.cause.code : typeof e?.code === 'string' ? e.code : undefined;
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NBD_EPERM;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
      return NBD_EINVAL;
    default:
      return NBD_EIO;
  }
}

function messageOf(err: unknown): string {
  const m = err instanceof Error ? err.message : String(err);
  return m.replace(/\s+/g, ' ').trim();
}

/** One message of a reply: a header (fresh buffer) and optionally a payload sent after it. */
interface Message {
  head: Buffer;
  body?: Buffer;
}

const ALLOWED_FLAGS: Record<number, number> = {
  [NBD_CMD_READ]: 0,
  [NBD_CMD_WRITE]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_FLUSH]: 0,
  [NBD_CMD_TRIM]: NBD_CMD_FLAG_FUA,
  [NBD_CMD_WRITE_ZEROES]: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
  [NBD_CMD_BLOCK_STATUS]: NBD_CMD_FLAG_REQ_ONE,
};

function violationApplies(v: Violation, type: number, structured: boolean): boolean {
  switch (v) {
    case 'wrong-cookie':
    case 'bad-magic':
    case 'truncated-header':
      return true;
    case 'oversized-payload':
      return structured;
    case 'chunk-past-request':
    case 'simple-after-structured':
    case 'repeated-chunk':
    case 'hole-over-data':
      return structured && type === NBD_CMD_READ;
    case 'zero-length-extent':
    case 'overlong-extent':
    case 'unasked-context':
      return type === NBD_CMD_BLOCK_STATUS;
  }
}

/**
 * The server. Events: 'connection' (id), 'disconnect' (id), 'clientError' (err: NbdStreamError,
 * id) for clients that broke the protocol, failed TLS, or lost their socket mid-request.
 */
export class NbdServer extends EventEmitter {
  /** Fault injection (tests); read at every use. */
  faults: ServerFaults;
  readonly readOnly: boolean;
  private readonly exports: Export[];
  readonly tls: ServerTls | undefined;
  readonly maxRequests: number;
  readonly maxBytesInFlight: number;
  readonly handshakeLimitMs: number;
  /** @internal Bytes held for all clients (maxQueuedBytes). */
  readonly budget: ReplyBudget;
  private readonly servers: net.Server[] = [];
  private readonly conns = new Set<Connection>();
  private nextId = 1;
  private closing: Promise<void> | undefined;
  private listened: ListenOptions | undefined;
  private readonly signal: AbortSignal | undefined;
  private readonly onAbort = () => void this.close();

  constructor(exports: Endpoint | ExportDefinition[], opts: NbdServerOptions = {}) {
    super();
    checkOptionNames('NbdServer', opts, SERVER_OPTIONS);
    this.signal = opts.signal;
    this.readOnly = !!opts.readOnly;
    const defs = Array.isArray(exports) ? exports : [{ name: '', endpoint: exports }];
    if (defs.length === 0) throw new NbdStreamError('ERR_USAGE', 'no exports to serve');
    const names = new Set<string>();
    for (const d of defs) {
      if (names.has(d.name)) throw new NbdStreamError('ERR_USAGE', `export "${d.name}" defined twice`);
      names.add(d.name);
    }
    this.exports = defs.map((d) => makeExport(d, this.readOnly));
    this.tls = opts.tls ? new ServerTls(opts.tls) : undefined;
    this.faults = opts.faults ?? {};
    this.maxRequests = opts.maxRequests ?? 64;
    this.maxBytesInFlight = opts.maxBytesInFlight ?? 64 * 1024 * 1024;
    this.handshakeLimitMs = opts.handshakeLimitMs ?? DEFAULT_HANDSHAKE_LIMIT_MS;
    if (!(this.handshakeLimitMs >= 0 && this.handshakeLimitMs <= MAX_TIMER_MS)) throw new NbdStreamError('ERR_USAGE', `handshakeLimitMs must be 0 to ${MAX_TIMER_MS}, not ${this.handshakeLimitMs}`);
    // Crossing the budget either way can pause or resume any client.
    this.budget = new ReplyBudget(opts.maxQueuedBytes ?? 128 * 1024 * 1024, () => {
      for (const c of this.conns) c.updateFlow();
    });
    if (this.signal?.aborted) this.onAbort();
    else this.signal?.addEventListener('abort', this.onAbort, { once: true });
  }

  /** The export for a client's name: exact match, and '' means the first export. */
  findExport(name: string): Export | undefined {
    return this.exports.find((e) => e.name === name) ?? (name === '' ? this.exports[0] : undefined);
  }

  get exportList(): readonly Export[] {
    return this.exports;
  }

  /** Open connections. */
  get connections(): number {
    return this.conns.size;
  }

  /**
   * The fd of a socket passed by systemd-style socket activation (LISTEN_PID is this process and
   * LISTEN_FDS=1: fd 3), or undefined.
   */
  static activationFd(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number | undefined {
    if (env.LISTEN_PID === undefined || env.LISTEN_FDS === undefined) return undefined;
    if (env.LISTEN_PID !== String(pid)) return undefined;
    const n = Number(env.LISTEN_FDS);
    return Number.isInteger(n) && n >= 1 ? 3 : undefined;
  }

  /** Listen on a Unix socket, a TCP port, or an inherited listening fd. Resolves once listening. */
  async listen(o: ListenOptions): Promise<void> {
    if (this.closing) throw new NbdStreamError('ERR_USAGE', 'server is closed');
    const srv = nodeNet().createServer({ noDelay: true, pauseOnConnect: false });
    srv.on('connection', (s) => this.handle(s));
    const vsock = o.vsockPort !== undefined ? (await import('./vsock.js')).listenVsock(o.vsockPort) : undefined;
    const where = vsock ? `vsock port ${o.vsockPort}` : o.fd !== undefined ? `fd ${o.fd}` : o.path !== undefined ? o.path : `${o.host ?? '*'}:${o.port}`;
    await new Promise<void>((resolve, reject) => {
      srv.once('error', (err: NodeJS.ErrnoException) => reject(new NbdStreamError('ERR_CONNECT', `cannot listen on ${where}: ${err.code ?? err.message}`, { cause: err })));
      if (vsock) srv.listen(vsock, resolve);
      else if (o.fd !== undefined) srv.listen({ fd: o.fd }, resolve);
      else if (o.path !== undefined) srv.listen(o.path, resolve);
      else srv.listen(o.port ?? 0, o.host, resolve);
    });
    // closed (or aborted) while this listener was starting: it closes too
    if (this.closing) {
      srv.close();
      throw new NbdStreamError('ERR_USAGE', 'server is closed');
    }
    // accept() errors (EMFILE ...) must not crash the process
    srv.on('error', (err) => this.emit('clientError', new NbdStreamError('ERR_CONNECT', `listening socket: ${err.message}`, { cause: err }), 0));
    this.servers.push(srv);
    this.listened ??= o;
  }

  /** TCP port listened on (after listen with a port). */
  get port(): number | undefined {
    for (const s of this.servers) {
      const a = s.address();
      if (a && typeof a === 'object') return a.port;
    }
    return undefined;
  }

  /** NBD URI of the default export on the first address listened on (not for fd listeners). */
  get uri(): string | undefined {
    const o = this.listened;
    if (!o || o.fd !== undefined) return undefined;
    const tls = this.tls?.mode === 'require' ? 'require' : 'off';
    const exportName = this.exports[0].name;
    if (o.path !== undefined) return formatNbdUri({ socket: o.path, exportName, tls, tlsVerifyPeer: true });
    if (o.vsockPort !== undefined) return formatNbdUri({ cid: 1 /* VMADDR_CID_LOCAL: this machine */, port: o.vsockPort, exportName, tls, tlsVerifyPeer: true });
    const host = !o.host || o.host === '0.0.0.0' || o.host === '::' ? 'localhost' : o.host;
    return formatNbdUri({ host, port: this.port, exportName, tls, tlsVerifyPeer: true });
  }

  /** Serve one connected stream (what listen() does for each accepted socket). */
  handle(socket: Duplex): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const c = new Connection(this, this.nextId++, socket);
    this.conns.add(c);
    this.emit('connection', c.id);
    c.start();
  }

  /** @internal */
  forget(c: Connection): void {
    if (this.conns.delete(c)) this.emit('disconnect', c.id);
  }

  /** @internal */
  report(err: NbdStreamError, id: number): void {
    if (this.listenerCount('clientError')) this.emit('clientError', err, id);
  }

  /**
   * Stop listening, stop reading from clients, let requests in flight finish (at most
   * `graceMs`), then close every connection. Endpoints are not closed (they belong to the caller).
   */
  close(graceMs = 2000): Promise<void> {
    this.signal?.removeEventListener('abort', this.onAbort);
    this.closing ??= (async () => {
      const listening = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
      const conns = [...this.conns];
      await Promise.all([...listening, ...conns.map((c) => c.shutdown(graceMs))]);
    })();
    return this.closing;
  }
}

/** 'ending': output finished, waiting for the socket to close. */
type Phase = 'handshake' | 'tls' | 'transmission' | 'ending' | 'closed';

/** One client connection. */
class Connection implements ServerDecoderHandler {
  private socket: Duplex;
  private readonly raw: Duplex;
  private readonly decoder: ServerDecoder;
  private phase: Phase = 'handshake';
  private fixed = false;
  private noZeroes = false;
  private tlsActive = false;
  private structured = false;
  /** NBD_OPT_EXTENDED_HEADERS was acknowledged (structured is then true too). */
  private extended = false;
  /** Export the last SET_META_CONTEXT selected contexts for, and those contexts. */
  private metaExport: Export | undefined;
  private metaSelected: MetaContext[] = [];
  private exp: Export | undefined;
  /** Meta contexts negotiated for the export in use (empty: none). */
  private contexts: MetaContext[] = [];
  private inFlight = 0;
  /** Bytes held for this client (its share of the server's ReplyBudget): reserved for requests being processed, and reply bytes the socket has not taken yet. */
  private reserved = 0;
  private unflushed = 0;
  private paused = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private disc = false;
  private sent = 0;
  private violationsSkipped = 0;
  private corked = false;
  private closedWaiters: Array<() => void> = [];
  private readonly onData = (chunk: Buffer) => this.decoder.push(chunk);
  /** The client half-closed: in transmission, finish what is in flight (as after NBD_CMD_DISC); else hang up. */
  private readonly onEnd = () => {
    if (this.phase !== 'transmission') return this.destroy();
    this.decoder.stop();
    this.disc = true;
    this.maybeFinish();
  };

  constructor(
    private readonly server: NbdServer,
    readonly id: number,
    socket: Duplex,
  ) {
    this.socket = socket;
    this.raw = socket;
    this.decoder = new ServerDecoder(this, { maxPayload: NBD_DEFAULT_MAX_PAYLOAD });
  }

  start(): void {
    const s = this.socket;
    s.on('error', (err: NodeJS.ErrnoException) => this.lost(err));
    s.on('close', () => this.destroy());
    s.on('end', this.onEnd);
    s.on('data', this.onData);
    const limit = this.server.handshakeLimitMs;
    if (limit > 0) this.handshakeTimer = setTimeout(() => this.handshakeExpired(limit), limit).unref();
    this.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  }

  private get faults(): ServerFaults {
    return this.server.faults;
  }

  // ------------------------------------------------------------ lifetime

  private lost(err: NodeJS.ErrnoException): void {
    if (this.phase === 'closed') return;
    // A client hanging up with requests in flight (or mid-handshake) is worth reporting.
    if (this.phase !== 'ending' && (this.inFlight > 0 || this.phase !== 'transmission'))
      this.server.report(new NbdStreamError('ERR_CONNECT', `connection error: ${err.code ?? err.message}`, { cause: err }), this.id);
    this.destroy();
  }

  private handshakeExpired(limit: number): void {
    this.server.report(new NbdStreamError('ERR_TIMEOUT', `handshake not finished within ${limit / 1000} s`), this.id);
    this.destroy();
  }

  private violation(message: string): void {
    this.server.report(new NbdStreamError('ERR_PROTOCOL', message), this.id);
    this.destroy();
  }

  /** Tear down now. Requests still running finish into the void. */
  destroy(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    clearTimeout(this.handshakeTimer);
    // Whatever is still held is dropped with the socket (late callbacks are ignored).
    this.server.budget.give(this.reserved + this.unflushed);
    this.reserved = this.unflushed = 0;
    this.decoder.stop();
    this.socket.destroy();
    if (this.raw !== this.socket) this.raw.destroy();
    this.server.forget(this);
    const ws = this.closedWaiters;
    this.closedWaiters = [];
    for (const w of ws) w();
  }

  /** Close politely once the output is flushed (TLS close_notify, then FIN); destroy if the peer lingers. */
  private endGracefully(): void {
    if (this.phase === 'closed' || this.phase === 'ending') return;
    this.phase = 'ending';
    this.decoder.stop();
    this.socket.end();
    setTimeout(() => this.destroy(), 2000).unref();
  }

  /** Server shutdown: stop reading, wait for requests in flight (≤ graceMs), close. */
  shutdown(graceMs: number): Promise<void> {
    if (this.phase === 'closed') return Promise.resolve();
    const closed = new Promise<void>((r) => this.closedWaiters.push(r));
    this.decoder.stop();
    if (this.phase !== 'transmission' || this.inFlight === 0) this.destroy();
    else {
      this.disc = true; // finishing the last request ends the connection
      setTimeout(() => this.destroy(), graceMs).unref();
    }
    return closed;
  }

  // ------------------------------------------------------------ output

  /** Queue output; its bytes are held (budget) until the socket has taken them. */
  private write(b: Buffer): void {
    if (this.phase === 'closed' || this.phase === 'ending') return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    const n = b.length;
    this.unflushed += n;
    this.server.budget.take(n);
    this.socket.write(b, () => {
      if (this.phase === 'closed') return;
      this.unflushed -= n;
      this.server.budget.give(n);
      this.updateFlow();
    });
  }

  /** Transmission output, counted for faults.closeAfterBytes. Returns false once the connection is cut. */
  private writeCounted(b: Buffer): boolean {
    if (this.phase !== 'transmission') return false;
    const limit = this.faults.closeAfterBytes;
    if (limit !== undefined && this.sent + b.length >= limit) {
      const n = Math.max(0, limit - this.sent);
      this.sent += n;
      if (n > 0) this.write(b.subarray(0, n));
      this.endGracefully();
      return false;
    }
    this.sent += b.length;
    this.write(b);
    return true;
  }

  private reply(option: number, type: number, data?: Buffer): void {
    this.write(encodeOptionReply(option, type, data));
  }

  private replyError(option: number, type: number, message: string): void {
    this.write(encodeOptionError(option, type, message));
  }

  // ------------------------------------------------------------ handshake

  onClientFlags(flags: number): void {
    if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) return this.violation(`unknown client flags 0x${flags.toString(16)}`);
    this.fixed = (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
    if (!this.fixed && this.server.tls?.mode === 'require') return this.violation('TLS is required but the client does not speak fixed newstyle');
  }

  onOption(option: number, data: Buffer | undefined, length: number): void {
    try {
      this.option(option, data, length);
    } catch (err) {
      this.server.report(new NbdStreamError('ERR_PROTOCOL', `handling option ${option}: ${messageOf(err)}`, { cause: err }), this.id);
      this.destroy();
    }
  }

  private option(option: number, data: Buffer | undefined, length: number): void {
    const tls = this.server.tls;
    if (tls?.mode === 'require' && !this.tlsActive && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      // EXPORT_NAME cannot be refused: the only answer is to hang up.
      if (option === NBD_OPT_EXPORT_NAME) return this.violation('NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS');
      this.replyError(option, NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
      return this.decoder.expectOption();
    }
    if (data === undefined) {
      if (option === NBD_OPT_EXPORT_NAME) return this.violation(`NBD_OPT_EXPORT_NAME with ${length} bytes of data`);
      this.replyError(option, NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is too large`);
      return this.decoder.expectOption();
    }
    switch (option) {
      case NBD_OPT_ABORT:
        this.reply(option, NBD_REP_ACK);
        return this.endGracefully();
      case NBD_OPT_EXPORT_NAME: {
        let name: string;
        try {
          name = parseExportNameData(data);
        } catch (err) {
          return this.violation(messageOf(err));
        }
        const exp = this.server.findExport(name);
        if (!exp) return this.violation(`NBD_OPT_EXPORT_NAME for unknown export "${name}"`);
        this.write(encodeExportNameReply(exp.size, exp.flags, this.noZeroes));
        return this.enterTransmission(exp);
      }
      case NBD_OPT_LIST:
        if (data.length) this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        else {
          for (const e of this.server.exportList) this.reply(option, NBD_REP_SERVER, encodeRepServer(e.name, e.description));
          this.reply(option, NBD_REP_ACK);
        }
        return this.decoder.expectOption();
      case NBD_OPT_STARTTLS:
        if (!tls) this.replyError(option, NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
        else if (this.tlsActive) this.replyError(option, NBD_REP_ERR_INVALID, 'TLS is already active');
        else if (data.length) this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        else return this.startTls(tls);
        return this.decoder.expectOption();
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return this.go(option, data);
      case NBD_OPT_STRUCTURED_REPLY:
        if (data.length) this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else {
          this.structured = true;
          this.reply(option, NBD_REP_ACK);
        }
        return this.decoder.expectOption();
      case NBD_OPT_EXTENDED_HEADERS:
        if (data.length) this.replyError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_EXTENDED_HEADERS takes no data');
        else {
          this.structured = this.extended = true;
          this.reply(option, NBD_REP_ACK);
        }
        return this.decoder.expectOption();
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        this.metaContext(option, data);
        return this.decoder.expectOption();
      default:
        this.replyError(option, NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
        return this.decoder.expectOption();
    }
  }

  private go(option: number, data: Buffer): void {
    let req: { name: string; infos: number[] };
    try {
      req = parseGoData(data);
    } catch (err) {
      this.replyError(option, NBD_REP_ERR_INVALID, messageOf(err));
      return this.decoder.expectOption();
    }
    const exp = this.server.findExport(req.name);
    if (!exp) {
      this.replyError(option, NBD_REP_ERR_UNKNOWN, `export "${req.name}" not found`);
      return this.decoder.expectOption();
    }
    this.reply(option, NBD_REP_INFO, encodeInfoExport(exp.size, exp.flags));
    const asked = new Set(req.infos);
    if (asked.has(NBD_INFO_NAME)) this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name));
    if (asked.has(NBD_INFO_DESCRIPTION) && exp.description) this.reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    if (asked.has(NBD_INFO_BLOCK_SIZE)) this.reply(option, NBD_REP_INFO, encodeInfoBlockSize(exp.minimum, exp.preferred, exp.maximum));
    this.reply(option, NBD_REP_ACK);
    if (option === NBD_OPT_GO) this.enterTransmission(exp);
    else this.decoder.expectOption();
  }

  private metaContext(option: number, data: Buffer): void {
    const set = option === NBD_OPT_SET_META_CONTEXT;
    if (set) this.metaExport = undefined; // SET replaces the selection, even when it fails
    if (!this.structured) return this.replyError(option, NBD_REP_ERR_INVALID, 'negotiate structured replies first');
    let req: { name: string; queries: string[] };
    try {
      req = parseMetaContextData(data);
    } catch (err) {
      return this.replyError(option, NBD_REP_ERR_INVALID, messageOf(err));
    }
    const exp = this.server.findExport(req.name);
    if (!exp) return this.replyError(option, NBD_REP_ERR_UNKNOWN, `export "${req.name}" not found`);
    // LIST answers namespace queries ("base:", "qemu:dirty-bitmap:") and an empty query list too.
    const matched = metaContextsOf(exp).filter((c) => (!set && req.queries.length === 0) || req.queries.some((q) => queryMatches(q, c.name, !set)));
    for (const c of matched) this.reply(option, NBD_REP_META_CONTEXT, encodeRepMetaContext(set ? c.id : 0, c.name));
    if (set && matched.length) {
      this.metaExport = exp;
      this.metaSelected = matched;
    }
    this.reply(option, NBD_REP_ACK);
  }

  private startTls(tls: ServerTls): void {
    this.reply(NBD_OPT_STARTTLS, NBD_REP_ACK);
    this.phase = 'tls';
    const raw = this.socket;
    // The output is corked until the next tick: the ACK must leave in plain text before TLS starts.
    if (this.corked) {
      this.corked = false;
      raw.uncork();
    }
    raw.removeListener('data', this.onData);
    // We are inside the decoder, which has not yet put back the rest of the chunk that held the
    // option. On the next tick (before any more input can arrive) everything the client sent after
    // STARTTLS is queued: plain text sent before our ACK must never be taken as part of the TLS
    // session (the STARTTLS command-injection attack), so any such byte ends the connection.
    process.nextTick(() => {
      if (this.phase !== 'tls') return;
      if (this.decoder.takeBuffered().length) return this.violation('client sent data before the reply to NBD_OPT_STARTTLS');
      this.upgrade(tls, raw);
    });
  }

  private upgrade(tls: ServerTls, raw: Duplex): void {
    tls.upgrade(raw).then(
      (ts) => {
        if (this.phase === 'closed') return ts.destroy();
        this.socket = ts;
        ts.on('error', (err: NodeJS.ErrnoException) => this.lost(err));
        ts.on('close', () => this.destroy());
        ts.on('end', this.onEnd);
        ts.on('data', this.onData);
        this.tlsActive = true;
        this.phase = 'handshake';
        // No negotiation state survives STARTTLS.
        this.structured = this.extended = false;
        this.metaExport = undefined;
        this.decoder.expectOption();
      },
      (err: unknown) => {
        this.server.report(err instanceof NbdStreamError ? err : new NbdStreamError('ERR_TLS', messageOf(err), { cause: err }), this.id);
        this.destroy();
      },
    );
  }

  private enterTransmission(exp: Export): void {
    clearTimeout(this.handshakeTimer);
    this.exp = exp;
    this.contexts = this.structured && this.metaExport === exp ? this.metaSelected : [];
    this.phase = 'transmission';
    this.decoder.expectRequests(this.extended);
  }

  // ------------------------------------------------------------ transmission

  onRequest(req: ClientRequest): void {
    if (this.phase !== 'transmission') return;
    if (req.type === NBD_CMD_DISC) {
      this.decoder.stop();
      this.disc = true;
      return this.maybeFinish();
    }
    const cost = (req.payload?.length ?? 0) + (req.type === NBD_CMD_READ ? Math.min(req.length, NBD_DEFAULT_MAX_PAYLOAD) : 0);
    this.inFlight++;
    this.reserved += cost;
    this.server.budget.take(cost);
    this.updateFlow();
    this.process(req)
      .catch((err: unknown) => {
        // Only a bug gets here (process() turns endpoint errors into replies).
        this.server.report(new NbdStreamError('ERR_PROTOCOL', `internal error serving ${commandName(req.type)}: ${messageOf(err)}`, { cause: err }), this.id);
        this.destroy();
      })
      .finally(() => {
        this.inFlight--;
        if (this.phase === 'closed') return; // destroy() gave back what was held
        this.reserved -= cost;
        this.server.budget.give(cost);
        this.updateFlow();
        this.maybeFinish();
      });
  }

  onProtocolError(err: NbdStreamError): void {
    this.violation(err.message);
  }

  private maybeFinish(): void {
    if (this.disc && this.inFlight === 0 && this.phase === 'transmission') this.endGracefully();
  }

  /**
   * Pause reading (the socket, and requests already received) while too much is in flight or the
   * client is not reading its replies, or the server's budget is exceeded and this client holds
   * some of it. Only requests are held back: the handshake is small, and bounded by the decoder.
   * @internal
   */
  updateFlow(): void {
    if (this.phase === 'closed') return;
    const held = this.reserved + this.unflushed;
    const over =
      this.phase === 'transmission' &&
      (this.inFlight >= this.server.maxRequests || held >= this.server.maxBytesInFlight || (held > 0 && this.server.budget.exceeded));
    if (over && !this.paused) {
      this.paused = true;
      this.decoder.pause();
      this.socket.pause();
    } else if (!over && this.paused) {
      this.paused = false;
      this.socket.resume();
      this.decoder.resume();
    }
  }

  private async process(req: ClientRequest): Promise<void> {
    const delay = this.faults.delayMs;
    const ms = typeof delay === 'function' ? delay(req.type, req.offset, req.length) : delay;
    if (ms && ms > 0) await new Promise((r) => setTimeout(r, ms));
    if (this.phase !== 'transmission') return;
    let msgs: Message[];
    try {
      msgs = await this.execute(req);
    } catch (err) {
      msgs = [this.errorMessage(req, nbdErrnoOf(err), messageOf(err))];
    }
    this.send(req, msgs);
  }

  private errorMessage(req: ClientRequest, errno: number, message: string): Message {
    return { head: this.structured ? encodeErrorChunk(req.cookie, errno, message) : encodeSimpleReply(req.cookie, errno) };
  }

  private ok(req: ClientRequest): Message[] {
    // extended headers have no simple replies
    return [{ head: this.extended ? encodeNoneChunk(req.cookie) : encodeSimpleReply(req.cookie, 0) }];
  }

  private inject(fn: ((o: number, l: number) => number | undefined) | undefined, req: ClientRequest): void {
    const errno = fn?.(req.offset, req.length);
    if (errno) throw new ReplyError(errno, `injected error at offset ${req.offset}`);
  }

  private async execute(req: ClientRequest): Promise<Message[]> {
    const exp = this.exp!;
    const ep = exp.endpoint;
    const cmd = commandName(req.type);
    const allowed = ALLOWED_FLAGS[req.type];
    if (allowed === undefined) throw new ReplyError(NBD_EINVAL, `${cmd} is not supported`);
    if (req.flags & ~allowed) throw new ReplyError(NBD_EINVAL, `${cmd}: unsupported flags 0x${req.flags.toString(16)}`);
    const { offset, length } = req;
    const end = offset + length;
    const inRange = Number.isSafeInteger(offset) && end <= exp.size;
    const writeCheck = () => {
      if (exp.readOnly) throw new ReplyError(NBD_EPERM, `${cmd}: export is read-only`);
    };
    const rangeCheck = (errno: number) => {
      if (length === 0) throw new ReplyError(NBD_EINVAL, `${cmd}: zero length`);
      if (!inRange) throw new ReplyError(errno, `${cmd}: ${offset}+${length} is beyond the end of the export (size ${exp.size})`);
    };
    switch (req.type) {
      case NBD_CMD_READ:
        rangeCheck(NBD_EINVAL);
        if (length > exp.maximum) throw new ReplyError(NBD_EINVAL, `${cmd}: length ${length} is larger than the maximum ${exp.maximum}`);
        this.inject(this.faults.readError, req);
        return this.read(req);
      case NBD_CMD_WRITE:
        writeCheck();
        if (req.payload === undefined) throw new ReplyError(NBD_EINVAL, `${cmd}: length ${length} is larger than the maximum ${exp.maximum}`);
        rangeCheck(NBD_ENOSPC);
        this.inject(this.faults.writeError, req);
        await ep.write(offset, req.payload);
        if (req.flags & NBD_CMD_FLAG_FUA) await ep.flush();
        return this.ok(req);
      case NBD_CMD_WRITE_ZEROES:
        writeCheck();
        rangeCheck(NBD_ENOSPC);
        if (req.flags & NBD_CMD_FLAG_FAST_ZERO && !ep.capabilities.canFastZero) throw new ReplyError(NBD_ENOTSUP, `${cmd}: fast zeroing is not supported`);
        this.inject(this.faults.zeroError, req);
        await ep.zero(offset, length, { allocate: (req.flags & NBD_CMD_FLAG_NO_HOLE) !== 0 });
        if (req.flags & NBD_CMD_FLAG_FUA) await ep.flush();
        return this.ok(req);
      case NBD_CMD_TRIM:
        writeCheck();
        rangeCheck(NBD_EINVAL);
        this.inject(this.faults.zeroError, req);
        if (ep.capabilities.canZero) await ep.zero(offset, length);
        if (req.flags & NBD_CMD_FLAG_FUA) await ep.flush();
        return this.ok(req);
      case NBD_CMD_FLUSH:
        await ep.flush();
        return this.ok(req);
      case NBD_CMD_BLOCK_STATUS:
        if (this.contexts.length === 0) throw new ReplyError(NBD_EINVAL, `${cmd}: no meta context was negotiated`);
        rangeCheck(NBD_EINVAL);
        this.inject(this.faults.blockStatusError, req);
        return this.blockStatus(req);
    }
    throw new ReplyError(NBD_EINVAL, `${cmd} is not supported`);
  }

  /** Extents over [offset, end): consecutive, clipped, non-empty; whatever the endpoint does not describe is data. */
  private async runs(offset: number, length: number, strict: boolean): Promise<ExtentRun[]> {
    const ep = this.exp!.endpoint;
    const end = offset + length;
    if (!ep.capabilities.canExtents) return [{ offset, length, zero: false }];
    const out: ExtentRun[] = [];
    let pos = offset;
    try {
      while (pos < end && out.length < MAX_DESCRIPTORS) {
        const got = await ep.extents(pos, end - pos);
        const before = pos;
        for (const e of got) {
          if (e.offset !== pos || !(e.length > 0)) break; // not contiguous: trust nothing after
          const len = Math.min(e.length, end - pos);
          const last = out[out.length - 1];
          if (last && last.zero === e.zero) last.length += len;
          else out.push({ offset: pos, length: len, zero: e.zero });
          pos += len;
          if (pos >= end) break;
        }
        if (pos === before) break;
      }
    } catch (err) {
      if (strict) throw err;
      // Reads do not depend on extents: whatever is unknown is read as data.
    }
    if (pos < end && (!strict || out.length === 0)) {
      const last = out[out.length - 1];
      if (last && !last.zero) last.length += end - pos;
      else out.push({ offset: pos, length: end - pos, zero: false });
    }
    return out;
  }

  private async read(req: ClientRequest): Promise<Message[]> {
    const ep = this.exp!.endpoint;
    const { offset, length, cookie } = req;
    if (!this.structured) {
      const r = await ep.read(offset, length);
      if (r.data.length !== length) throw new ReplyError(NBD_EIO, `short read at ${offset}: ${r.data.length} of ${length} bytes`);
      return [{ head: encodeSimpleReply(cookie, 0), body: r.data }];
    }
    const runs = await this.runs(offset, length, false);
    // Data runs are read concurrently; zero ranges the read itself reports (an NBD endpoint's
    // OFFSET_HOLE chunks) become holes too.
    const pieces = await Promise.all(
      runs.map(async (run): Promise<Array<{ offset: number; length: number; data?: Buffer }>> => {
        if (run.zero) return [run];
        const r = await ep.read(run.offset, run.length);
        if (r.data.length !== run.length) throw new ReplyError(NBD_EIO, `short read at ${run.offset}: ${r.data.length} of ${run.length} bytes`);
        const out: Array<{ offset: number; length: number; data?: Buffer }> = [];
        let pos = run.offset;
        const zs = (r.zeroes ?? []).filter((z) => z.length > 0 && z.offset >= run.offset && z.offset + z.length <= run.offset + run.length).sort((a, b) => a.offset - b.offset);
        for (const z of zs) {
          if (z.offset < pos) continue;
          if (z.offset > pos) out.push({ offset: pos, length: z.offset - pos, data: r.data.subarray(pos - run.offset, z.offset - run.offset) });
          out.push({ offset: z.offset, length: z.length });
          pos = z.offset + z.length;
        }
        if (pos < run.offset + run.length) out.push({ offset: pos, length: run.offset + run.length - pos, data: r.data.subarray(pos - run.offset) });
        return out;
      }),
    );
    const flat = pieces.flat();
    return flat.map((p, i) => {
      const flags = i === flat.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      return p.data ? { head: encodeOffsetDataHeader(flags, cookie, p.offset, p.length), body: p.data } : { head: encodeOffsetHole(flags, cookie, p.offset, p.length) };
    });
  }

  /** One NBD_REPLY_TYPE_BLOCK_STATUS chunk per negotiated context; the last one carries DONE. */
  private async blockStatus(req: ClientRequest): Promise<Message[]> {
    const chunks = await Promise.all(
      this.contexts.map(async (c) => {
        let desc: BlockDescriptor[];
        if (c.bitmap) desc = await bitmapDescriptors(c.bitmap, req.offset, req.length);
        else desc = (await this.runs(req.offset, req.length, true)).map((r) => ({ length: r.length, flags: r.zero ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0 }));
        if (req.flags & NBD_CMD_FLAG_REQ_ONE) desc = desc.slice(0, 1);
        return { id: c.id, desc };
      }),
    );
    return chunks.map((c, i) => ({ head: this.statusChunk(i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0, req, c.id, c.desc) }));
  }

  /** A block status chunk: BLOCK_STATUS_EXT with extended headers, else BLOCK_STATUS. */
  private statusChunk(flags: number, req: ClientRequest, id: number, desc: BlockDescriptor[]): Buffer {
    return this.extended ? encodeBlockStatusExt(flags, req.cookie, req.offset, id, desc) : encodeBlockStatus(flags, req.cookie, id, desc);
  }

  /** Write a reply, applying any protocol violation asked for. */
  private send(req: ClientRequest, msgs: Message[]): void {
    if (this.phase !== 'transmission') return;
    const v = this.faults.violation;
    if (v && violationApplies(v, req.type, this.structured)) {
      if (this.violationsSkipped < (this.faults.violateAfter ?? 0)) this.violationsSkipped++;
      else return this.violate(v, req, msgs);
    }
    this.writeMessages(req, msgs);
  }

  /** Write a reply's messages, with extended headers re-framed as extended chunks. */
  private writeMessages(req: ClientRequest, msgs: Message[]): void {
    for (const m of msgs) {
      if (!this.writeCounted(this.extended ? toExtendedChunk(m.head, req.offset) : m.head)) return;
      if (m.body && !this.writeCounted(m.body)) return;
    }
  }

  private violate(v: Violation, req: ClientRequest, msgs: Message[]): void {
    const { cookie, offset, length } = req;
    const id = this.contexts[0]?.id ?? BASE_ALLOCATION_ID;
    const unasked = Math.max(BASE_ALLOCATION_ID, ...this.contexts.map((c) => c.id)) + 1;
    let out: Message[] = msgs;
    switch (v) {
      case 'wrong-cookie':
        for (const m of msgs) m.head.writeBigUInt64BE(cookie ^ (1n << 63n), 8);
        break;
      case 'bad-magic':
        msgs[0].head.writeUInt32BE(0xdeadbeef, 0);
        break;
      case 'truncated-header':
        this.writeCounted(msgs[0].head.subarray(0, 10));
        this.endGracefully();
        return;
      case 'oversized-payload':
        out = [{ head: encodeChunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, 0x7fff_fff0) }];
        break;
      case 'chunk-past-request':
        out = [{ head: encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, cookie, offset + 1, length), body: Buffer.alloc(length) }];
        break;
      case 'simple-after-structured':
        out = [{ head: encodeSimpleReply(cookie, 0), body: Buffer.alloc(length) }];
        break;
      case 'repeated-chunk':
      case 'hole-over-data': {
        // the bytes the reply would have carried (a hole chunk's length is at byte 28)
        const bytes = Buffer.concat(msgs.map((m) => m.body ?? Buffer.alloc(m.head.readUInt32BE(28))));
        const half = Math.floor(length / 2);
        const quarter = Math.floor(length / 4);
        out =
          v === 'repeated-chunk'
            ? [
                { head: encodeOffsetDataHeader(0, cookie, offset, half), body: bytes.subarray(0, half) },
                { head: encodeOffsetDataHeader(0, cookie, offset, half), body: bytes.subarray(0, half) },
                { head: encodeNoneChunk(cookie) },
              ]
            : [
                { head: encodeOffsetDataHeader(0, cookie, offset, length - quarter), body: bytes.subarray(0, length - quarter) },
                { head: encodeOffsetHole(NBD_REPLY_FLAG_DONE, cookie, offset + length - 2 * quarter, quarter) },
              ];
        break;
      }
      case 'zero-length-extent':
        out = [{ head: this.statusChunk(NBD_REPLY_FLAG_DONE, req, id, [{ length: 0, flags: 0 }, { length, flags: 0 }]) }];
        break;
      case 'overlong-extent':
        out = [{ head: this.statusChunk(NBD_REPLY_FLAG_DONE, req, id, [{ length: Math.min(length + 4096, 0xffff_ffff), flags: 0 }, { length: 4096, flags: 0 }]) }];
        break;
      case 'unasked-context':
        out = [{ head: this.statusChunk(NBD_REPLY_FLAG_DONE, req, unasked, [{ length, flags: 0 }]) }];
        break;
    }
    this.writeMessages(req, out);
  }
}
