/**
 * NBD URI parsing and formatting (NBD URI specification; query keys as libnbd reads them), and
 * libnbd's `nbd+vsock://CID[:PORT]/EXPORT` / `nbds+vsock://` (default port 10809).
 */
import { NbdStreamError } from '../errors.js';
import { NBD_DEFAULT_PORT } from './protocol.js';

export interface NbdAddress {
  /** TCP host (IPv6 without brackets) or undefined for a Unix socket. */
  host?: string;
  port?: number;
  /** Unix socket path. */
  socket?: string;
  /** vsock CID (nbd+vsock://CID[:PORT]/; the port is a 32-bit vsock port then). */
  cid?: number;
  exportName: string;
  /** 'require' for nbds schemes (or explicit TLS options), 'off' otherwise. */
  tls: 'require' | 'off';
  tlsUsername?: string;
  tlsPskFile?: string;
  tlsCertificates?: string;
  tlsVerifyPeer: boolean;
  tlsHostname?: string;
}

const SCHEMES = new Set(['nbd', 'nbds', 'nbd+unix', 'nbds+unix', 'nbd+vsock', 'nbds+vsock']);
const QUERY_KEYS = new Set(['socket', 'tls-psk-file', 'tls-certificates', 'tls-verify-peer', 'tls-hostname', 'tls-username', 'tls-type']);

export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix|\+vsock)?:\/\//i.test(s);
}

function bad(uri: string, why: string): NbdStreamError {
  return new NbdStreamError('ERR_URI', `invalid NBD URI: ${why}`, { endpoint: uri });
}

function decode(uri: string, s: string, what: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw bad(uri, `malformed percent-encoding in ${what}`);
  }
}

export function parseNbdUri(uri: string): NbdAddress {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/.exec(uri);
  if (!m) throw bad(uri, 'expected nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock:// or nbds+vsock://');
  const scheme = m[1].toLowerCase();
  if (!SCHEMES.has(scheme)) throw bad(uri, `unknown scheme "${m[1]}"`);
  const unix = scheme.endsWith('+unix');
  const vsock = scheme.endsWith('+vsock');
  const addr: NbdAddress = { exportName: '', tls: scheme.startsWith('nbds') ? 'require' : 'off', tlsVerifyPeer: true };

  let authority = m[2];
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    addr.tlsUsername = decode(uri, authority.slice(0, at), 'user name');
    authority = authority.slice(at + 1);
  }
  if (vsock) {
    // nbd+vsock://CID[:PORT]/: a decimal CID (1 = this machine, 2 = the host) and a 32-bit port
    const vm = /^(\d+)(?::(\d*))?$/.exec(authority);
    if (!vm) throw bad(uri, authority ? `bad vsock CID "${authority}": expected CID[:PORT] in decimal` : `${scheme}:// needs a CID: ${scheme}://CID[:PORT]/EXPORT`);
    addr.cid = Number(vm[1]);
    if (addr.cid > 0xffffffff) throw bad(uri, `bad vsock CID "${vm[1]}"`);
    addr.port = vm[2] ? Number(vm[2]) : NBD_DEFAULT_PORT;
    if (addr.port > 0xffffffff) throw bad(uri, `bad vsock port "${vm[2]}"`);
  } else if (authority) {
    if (unix) throw bad(uri, 'a Unix socket URI takes no host or port');
    const hm = /^(?:\[([0-9A-Fa-f:.]+(?:%25[^\]]+)?)\]|([^:[\]]+))(?::(\d*))?$/.exec(authority);
    if (!hm) throw bad(uri, `bad host "${authority}"`);
    addr.host = hm[1] !== undefined ? decode(uri, hm[1], 'host') : decode(uri, hm[2], 'host');
    if (hm[3]) {
      const port = Number(hm[3]);
      if (!Number.isInteger(port) || port < 1 || port > 65535) throw bad(uri, `bad port "${hm[3]}"`);
      addr.port = port;
    } else addr.port = NBD_DEFAULT_PORT;
  } else if (!unix) {
    addr.host = 'localhost';
    addr.port = NBD_DEFAULT_PORT;
  }

  const path = m[3];
  if (path) addr.exportName = decode(uri, path.slice(1), 'export name');
  if (addr.exportName.includes('\0')) throw bad(uri, 'export name contains NUL');

  for (const part of (m[4] ?? '').split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const key = decode(uri, eq < 0 ? part : part.slice(0, eq), 'query');
    const value = decode(uri, eq < 0 ? '' : part.slice(eq + 1), 'query');
    if (!QUERY_KEYS.has(key)) throw bad(uri, `unknown query parameter "${key}"`);
    switch (key) {
      case 'socket':
        if (!unix) throw bad(uri, 'socket= is only valid with nbd+unix:// or nbds+unix://');
        addr.socket = value;
        break;
      case 'tls-psk-file':
        addr.tlsPskFile = value;
        break;
      case 'tls-certificates':
        addr.tlsCertificates = value;
        break;
      case 'tls-hostname':
        addr.tlsHostname = value;
        break;
      case 'tls-username':
        addr.tlsUsername = value;
        break;
      case 'tls-verify-peer':
        if (!/^(0|1|true|false|yes|no|on|off)$/i.test(value)) throw bad(uri, `tls-verify-peer must be 0 or 1, not "${value}"`);
        addr.tlsVerifyPeer = /^(1|true|yes|on)$/i.test(value);
        break;
      case 'tls-type':
        if (!/^(psk|x509)$/.test(value)) throw bad(uri, `tls-type must be psk or x509, not "${value}"`);
        break;
    }
  }
  if (unix && !addr.socket) throw bad(uri, `${scheme}:// needs ?socket=PATH`);
  if (addr.tls === 'off' && (addr.tlsPskFile || addr.tlsCertificates))
    throw bad(uri, 'TLS parameters given with a non-TLS scheme; use nbds:// or nbds+unix://');
  return addr;
}

const enc = (s: string) => encodeURIComponent(s).replace(/%2F/g, '/');

export function formatNbdUri(a: NbdAddress): string {
  const scheme = (a.tls === 'require' ? 'nbds' : 'nbd') + (a.socket !== undefined ? '+unix' : a.cid !== undefined ? '+vsock' : '');
  const user = a.tlsUsername ? `${encodeURIComponent(a.tlsUsername)}@` : '';
  let host = '';
  if (a.cid !== undefined) {
    host = String(a.cid);
    if (a.port && a.port !== NBD_DEFAULT_PORT) host += `:${a.port}`;
  } else if (a.socket === undefined) {
    host = a.host && a.host.includes(':') ? `[${a.host}]` : a.host ?? 'localhost';
    if (a.port && a.port !== NBD_DEFAULT_PORT) host += `:${a.port}`;
  }
  const q: string[] = [];
  if (a.socket !== undefined) q.push(`socket=${enc(a.socket)}`);
  if (a.tlsPskFile) q.push(`tls-psk-file=${enc(a.tlsPskFile)}`);
  if (a.tlsCertificates) q.push(`tls-certificates=${enc(a.tlsCertificates)}`);
  if (a.tlsHostname) q.push(`tls-hostname=${enc(a.tlsHostname)}`);
  if (!a.tlsVerifyPeer) q.push('tls-verify-peer=0');
  return `${scheme}://${user}${host}/${enc(a.exportName)}${q.length ? '?' + q.join('&') : ''}`;
}
