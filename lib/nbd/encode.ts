/** Pure encoders: values -> Buffers for the NBD handshake and transmission phases. No I/O. */
import {
  IHAVEOPT,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_EXTENDED_REQUEST_MAGIC,
  NBD_EXTENDED_REQUEST_SIZE,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
} from './protocol.js';

const TWO_32 = 0x1_0000_0000;

/** Write an unsigned 64-bit integer given as a JS number (≤ 2^53) in big-endian order. */
export function writeU64(buf: Buffer, value: number, pos: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), pos);
  buf.writeUInt32BE(value % TWO_32, pos + 4);
}

/**
 * Transmission request header (28 bytes). The cookie is a 32-bit number sent in the low half of
 * the 64-bit cookie field; the high half is always zero.
 */
export function encodeRequest(flags: number, type: number, cookie: number, offset: number, length: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(NBD_REQUEST_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0, 8);
  b.writeUInt32BE(cookie, 12);
  writeU64(b, offset, 16);
  b.writeUInt32BE(length, 24);
  return b;
}

/**
 * Extended request header (32 bytes, after NBD_OPT_EXTENDED_HEADERS): as encodeRequest, with a
 * 64-bit length (the effect length; for NBD_CMD_WRITE the payload length).
 */
export function encodeExtendedRequest(flags: number, type: number, cookie: number, offset: number, length: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(NBD_EXTENDED_REQUEST_SIZE);
  b.writeUInt32BE(NBD_EXTENDED_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0, 8);
  b.writeUInt32BE(cookie, 12);
  writeU64(b, offset, 16);
  writeU64(b, length, 24);
  return b;
}

/** Client flags sent after the server's greeting. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags, 0);
  return b;
}

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

function lengthPrefixed(s: string): Buffer {
  const text = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(4 + text.length);
  b.writeUInt32BE(text.length, 0);
  text.copy(b, 4);
  return b;
}

/** NBD_OPT_GO or NBD_OPT_INFO: export name and the list of NBD_INFO_* requests. */
export function encodeGo(exportName: string, infos: number[], option: number = NBD_OPT_GO): Buffer {
  if (option !== NBD_OPT_GO && option !== NBD_OPT_INFO) throw new RangeError('encodeGo: option must be GO or INFO');
  const n = Buffer.allocUnsafe(2 + 2 * infos.length);
  n.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => n.writeUInt16BE(t, 2 + 2 * i));
  return encodeOption(option, Buffer.concat([lengthPrefixed(exportName), n]));
}

/** NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT: export name and context queries. */
export function encodeMetaContext(option: number, exportName: string, queries: string[]): Buffer {
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  return encodeOption(option, Buffer.concat([lengthPrefixed(exportName), count, ...queries.map(lengthPrefixed)]));
}
