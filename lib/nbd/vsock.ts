/**
 * vsock sockets (AF_VSOCK) for `nbd+vsock://CID:PORT/` and `nbdstream serve --vsock`.
 *
 * libuv cannot create them, and `new net.Socket({ fd })` / `server.listen({ fd })` refuse their
 * fd (libuv guesses only TCP and Unix sockets: "Unsupported fd type: UNKNOWN"). So the native addon
 * makes the socket (connected on a worker thread, or bound and listening), and a libuv TCP
 * handle adopts the fd: uv_tcp_open checks no address family, and everything after is plain
 * stream I/O (read, write, accept). Errors say in one line when the kernel lacks vsock or, for
 * CID 1 (VMADDR_CID_LOCAL), the loopback transport.
 */
import * as fs from 'node:fs';
import type * as net from 'node:net';
import { NbdStreamError } from '../errors.js';
import { nodeNet } from '../builtins.js';
import { native, nativeLoadError, type NativeError } from '../native.js';

/** Any CID of this machine (bind). */
export const VMADDR_CID_ANY = 0xffffffff;
/** This machine, through the vsock_loopback transport. */
export const VMADDR_CID_LOCAL = 1;

interface TcpHandle {
  open(fd: number): number;
}
type TcpWrap = { TCP: new (type: number) => TcpHandle; constants: { SOCKET: number; SERVER: number } };

/** A libuv TCP handle owning `fd` (a server handle for a listening socket). */
function adopt(fd: number, server: boolean): TcpHandle {
  const { TCP, constants } = (process as unknown as { binding(name: string): TcpWrap }).binding('tcp_wrap');
  const handle = new TCP(server ? constants.SERVER : constants.SOCKET);
  const err = handle.open(fd);
  if (err) {
    fs.closeSync(fd);
    throw new NbdStreamError('ERR_CONNECT', `vsock: cannot adopt socket fd ${fd} (uv_tcp_open: ${err})`);
  }
  return handle;
}

function where(cid: number, port: number): string {
  return `vsock CID ${cid === VMADDR_CID_ANY ? 'any' : cid} port ${port}`;
}

/** The one-line error for a failed vsock call. */
function vsockError(verb: string, cid: number, port: number, err: NativeError): NbdStreamError {
  if (err.syscall.startsWith('socket') && (err.code === 'EAFNOSUPPORT' || err.code === 'ENODEV'))
    return new NbdStreamError('ERR_UNSUPPORTED', `vsock is not available: this kernel has no AF_VSOCK sockets (socket(AF_VSOCK): ${err.code})`, { cause: err });
  const noLoopback = cid === VMADDR_CID_LOCAL && !fs.existsSync('/sys/module/vsock_loopback');
  const hint = noLoopback ? ' (this kernel has no vsock loopback transport for CID 1: modprobe vsock_loopback)' : '';
  return new NbdStreamError('ERR_CONNECT', `cannot ${verb} ${where(cid, port)}: ${err.code}${hint}`, { cause: err });
}

function needNative(): NonNullable<typeof native> {
  if (!native) throw new NbdStreamError('ERR_UNSUPPORTED', `vsock needs the native addon (${nativeLoadError})`);
  return native;
}

/** A net.Socket connected to `cid`:`port` (already connected: no 'connect' event follows). */
export function connectVsock(cid: number, port: number, opts: { onread?: net.OnReadOpts } = {}): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    needNative().vsockConnect(cid, port, (err, fd) => {
      if (err || fd < 0) return reject(vsockError('connect to', cid, port, err ?? Object.assign(new Error('ENOMEM'), { code: 'ENOMEM', errno: -12, syscall: 'connect' })));
      try {
        resolve(new (nodeNet().Socket)({ handle: adopt(fd, false), readable: true, writable: true, ...opts } as net.SocketConstructorOpts));
      } catch (e) {
        reject(e);
      }
    });
  });
}

/** A listening vsock socket as a handle for `net.Server.listen(handle)`. */
export function listenVsock(port: number, cid = VMADDR_CID_ANY): object {
  let fd: number;
  try {
    fd = needNative().vsockListen(cid, port);
  } catch (err) {
    if (err instanceof NbdStreamError || !(err as NativeError).syscall) throw err;
    throw vsockError('listen on', cid, port, err as NativeError);
  }
  return adopt(fd, true);
}
