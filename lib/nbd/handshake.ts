/**
 * Client side of the fixed newstyle handshake, over an abstract byte channel so that it can be
 * driven by a socket or by test input. Order: greeting, client flags, [STARTTLS], EXTENDED_HEADERS
 * (which implies structured replies) or else STRUCTURED_REPLY, SET_META_CONTEXT, GO (falling back
 * to EXPORT_NAME for servers without GO).
 */
import { NbdStreamError } from '../errors.js';
import { encodeClientFlags, encodeGo, encodeMetaContext, encodeOption } from './encode.js';
import { parseExportNameReply, parseGreeting, parseInfoReply, parseMetaContextReply, parseOptionReplyHeader } from './decode.js';
import {
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  optionReplyName,
} from './protocol.js';

export interface HandshakeChannel {
  read(n: number): Promise<Buffer>;
  write(b: Buffer): void;
  /** Upgrade the channel to TLS after STARTTLS was acknowledged. */
  startTls(): Promise<void>;
}

export interface HandshakeOptions {
  exportName: string;
  tls: 'require' | 'off';
  structuredReplies: boolean;
  /** Ask for extended headers (with structured replies; default true). */
  extendedHeaders?: boolean;
  /** Meta contexts to ask for with SET_META_CONTEXT (needs structured replies). */
  metaContexts: string[];
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ExportInfo {
  /**
   * Export size in bytes: exact below 2^53; above, the nearest double (right for comparing with
   * any size below 2^53, not for offsets) and `exactSize` holds it exactly.
   */
  size: number;
  /** The exact size when it is 2^53 or more (NBD allows up to 2^63 - 1). */
  exactSize?: bigint;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  structuredReplies: boolean;
  /** NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte headers, 64-bit lengths (structuredReplies is then true). */
  extendedHeaders: boolean;
  /** Negotiated meta contexts: name -> id. */
  metaContexts: Map<string, number>;
  blockSize: BlockSizeConstraints;
  tls: boolean;
  /** True when GO was not supported and EXPORT_NAME was used. */
  oldNegotiation: boolean;
}

const MAX_OPTION_REPLY = 16 * 1024 * 1024;

function handshakeError(message: string, code: 'ERR_HANDSHAKE' | 'ERR_TLS' | 'ERR_PROTOCOL' = 'ERR_HANDSHAKE'): NbdStreamError {
  return new NbdStreamError(code, message);
}

async function readReply(ch: HandshakeChannel, option: number): Promise<{ type: number; data: Buffer }> {
  const h = parseOptionReplyHeader(await ch.read(20));
  if (h.option !== option) throw handshakeError(`option reply for option ${h.option}, expected ${option}`, 'ERR_PROTOCOL');
  if (h.length > MAX_OPTION_REPLY) throw handshakeError(`option reply of ${h.length} bytes is too large`, 'ERR_PROTOCOL');
  const data = h.length ? await ch.read(h.length) : Buffer.alloc(0);
  return { type: h.type, data };
}

function describeRefusal(what: string, type: number, data: Buffer): string {
  const text = data.length ? `: ${data.toString('utf8').replace(/[\r\n]+/g, ' ').trim()}` : '';
  return `server refused ${what} (${optionReplyName(type)})${text}`;
}

function tlsRequired(): NbdStreamError {
  return handshakeError('server requires TLS; use an nbds:// or nbds+unix:// URI with credentials', 'ERR_TLS');
}

function setSize(info: ExportInfo, size: bigint): void {
  info.size = Number(size);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) info.exactSize = size;
}

export async function clientHandshake(ch: HandshakeChannel, opts: HandshakeOptions): Promise<ExportInfo> {
  parseGreeting(await ch.read(16));
  const serverFlags = (await ch.read(2)).readUInt16BE(0);
  const fixed = (serverFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  ch.write(encodeClientFlags((fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));

  const info: ExportInfo = {
    size: 0,
    flags: 0,
    structuredReplies: false,
    extendedHeaders: false,
    metaContexts: new Map(),
    blockSize: { minimum: 1, preferred: 4096, maximum: NBD_DEFAULT_MAX_PAYLOAD },
    tls: false,
    oldNegotiation: false,
  };

  if (!fixed) {
    if (opts.tls === 'require') throw handshakeError('server does not support fixed newstyle negotiation, so TLS cannot be used', 'ERR_TLS');
    return exportName(ch, opts, info, noZeroes);
  }

  try {
    if (opts.tls === 'require') {
      ch.write(encodeOption(NBD_OPT_STARTTLS));
      const r = await readReply(ch, NBD_OPT_STARTTLS);
      if (r.type !== NBD_REP_ACK) throw handshakeError(describeRefusal('TLS', r.type, r.data), 'ERR_TLS');
      await ch.startTls();
      info.tls = true;
    }

    if (opts.structuredReplies && (opts.extendedHeaders ?? true)) {
      // servers without them (nbdkit 1.32, qemu 7.2) refuse with an error: structured replies then
      ch.write(encodeOption(NBD_OPT_EXTENDED_HEADERS));
      const r = await readReply(ch, NBD_OPT_EXTENDED_HEADERS);
      if (r.type === NBD_REP_ACK) info.structuredReplies = info.extendedHeaders = true;
      else if (r.type === NBD_REP_ERR_TLS_REQD) throw tlsRequired();
      else if (!(r.type >= NBD_REP_FLAG_ERROR)) throw handshakeError(`unexpected reply ${optionReplyName(r.type)} to NBD_OPT_EXTENDED_HEADERS`, 'ERR_PROTOCOL');
    }

    if (opts.structuredReplies && !info.extendedHeaders) {
      ch.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      const r = await readReply(ch, NBD_OPT_STRUCTURED_REPLY);
      if (r.type === NBD_REP_ACK) info.structuredReplies = true;
      else if (r.type === NBD_REP_ERR_TLS_REQD) throw tlsRequired();
      else if (!(r.type >= NBD_REP_FLAG_ERROR)) throw handshakeError(`unexpected reply ${optionReplyName(r.type)} to NBD_OPT_STRUCTURED_REPLY`, 'ERR_PROTOCOL');
    }

    if (info.structuredReplies && opts.metaContexts.length) {
      ch.write(encodeMetaContext(NBD_OPT_SET_META_CONTEXT, opts.exportName, opts.metaContexts));
      for (;;) {
        const r = await readReply(ch, NBD_OPT_SET_META_CONTEXT);
        if (r.type === NBD_REP_META_CONTEXT) {
          const c = parseMetaContextReply(r.data);
          if (!opts.metaContexts.includes(c.name)) throw handshakeError(`server sent meta context "${c.name}" that was not asked for`, 'ERR_PROTOCOL');
          info.metaContexts.set(c.name, c.id);
        } else if (r.type === NBD_REP_ACK) break;
        else if (r.type === NBD_REP_ERR_TLS_REQD) throw tlsRequired();
        else if (r.type >= NBD_REP_FLAG_ERROR) break; // no meta contexts: extents unavailable
        else throw handshakeError(`unexpected reply ${optionReplyName(r.type)} to NBD_OPT_SET_META_CONTEXT`, 'ERR_PROTOCOL');
      }
    }

    ch.write(encodeGo(opts.exportName, [NBD_INFO_BLOCK_SIZE]));
    let haveExport = false;
    for (;;) {
      const r = await readReply(ch, NBD_OPT_GO);
      if (r.type === NBD_REP_INFO) {
        const i = parseInfoReply(r.data);
        if (i.type === NBD_INFO_EXPORT && 'size' in i) {
          setSize(info, i.size);
          info.flags = i.flags;
          haveExport = true;
        } else if (i.type === NBD_INFO_BLOCK_SIZE && 'minimum' in i) {
          info.blockSize = { minimum: i.minimum, preferred: i.preferred, maximum: i.maximum };
        }
      } else if (r.type === NBD_REP_ACK) {
        if (!haveExport) throw handshakeError('server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT', 'ERR_PROTOCOL');
        return info;
      } else if (r.type === NBD_REP_ERR_UNSUP) {
        info.structuredReplies = info.extendedHeaders = false;
        info.metaContexts.clear();
        return exportName(ch, opts, info, noZeroes);
      } else if (r.type === NBD_REP_ERR_TLS_REQD) throw tlsRequired();
      else if (r.type === NBD_REP_ERR_UNKNOWN) throw handshakeError(`export "${opts.exportName}" not found on the server${r.data.length ? ': ' + r.data.toString('utf8') : ''}`);
      else if (r.type >= NBD_REP_FLAG_ERROR) throw handshakeError(describeRefusal(`export "${opts.exportName}"`, r.type, r.data));
      else throw handshakeError(`unexpected reply ${optionReplyName(r.type)} to NBD_OPT_GO`, 'ERR_PROTOCOL');
    }
  } catch (err) {
    // Be polite where the channel still works: tell the server we are going away.
    try {
      ch.write(encodeOption(NBD_OPT_ABORT));
    } catch {
      /* channel already gone */
    }
    throw err;
  }
}

async function exportName(ch: HandshakeChannel, opts: HandshakeOptions, info: ExportInfo, noZeroes: boolean): Promise<ExportInfo> {
  ch.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(opts.exportName, 'utf8')));
  let reply: Buffer;
  try {
    reply = await ch.read(noZeroes ? 10 : 134);
  } catch (err) {
    if (err instanceof NbdStreamError && err.code === 'ERR_CONNECT')
      throw handshakeError(`server closed the connection after NBD_OPT_EXPORT_NAME (no export "${opts.exportName}"?)`);
    throw err;
  }
  const r = parseExportNameReply(reply);
  setSize(info, r.size);
  info.flags = r.flags;
  info.oldNegotiation = true;
  return info;
}
