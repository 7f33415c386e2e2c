/**
 * Server-side TLS for NBD_OPT_STARTTLS: credentials are loaded once (a psktool file of
 * `user:hexkey` lines, or an X.509 directory with server-cert.pem, server-key.pem and
 * optionally ca-cert.pem, as nbdkit --tls-certificates reads it), and each acknowledged STARTTLS
 * wraps the connection's socket in a server-side tls.TLSSocket.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type * as tls from 'node:tls';
import { nodeTls } from '../builtins.js';
import type { Duplex } from 'node:stream';
import { readPskFile, readTlsFile, tlsError } from './tls-files.js';

export interface ServerTlsOptions {
  /** 'require': refuse every option but STARTTLS and ABORT before TLS (FORCEDTLS); 'on': TLS is offered (SELECTIVETLS with no TLS-only exports). */
  mode: 'on' | 'require';
  /** psktool file: `user:hexkey` lines; a client offering one of these identities with its key is accepted. */
  pskFile?: string;
  /** Directory with server-cert.pem, server-key.pem and (for verifyPeer) ca-cert.pem. */
  certificates?: string;
  /** X.509: require a client certificate signed by ca-cert.pem. */
  verifyPeer?: boolean;
}

/** Loaded credentials; upgrade() turns an accepted socket into a server-side TLS socket. */
export class ServerTls {
  readonly mode: 'on' | 'require';
  private readonly context: tls.SecureContext;
  private readonly psk: Map<string, Buffer> | undefined;
  private readonly verifyPeer: boolean;
  /** 'PSK user "alice"' / 'certificates from DIR', for messages. */
  readonly description: string;

  constructor(o: ServerTlsOptions) {
    this.mode = o.mode;
    this.verifyPeer = o.verifyPeer ?? false;
    if (!!o.pskFile === !!o.certificates) throw tlsError('TLS needs exactly one of a PSK file or a certificates directory');
    if (o.pskFile) {
      this.psk = readPskFile(o.pskFile);
      // TLS 1.2 PSK suites and TLS 1.3 (whose suites are configured separately and stay enabled).
      this.context = nodeTls().createSecureContext({ ciphers: 'PSK', minVersion: 'TLSv1.2' });
      this.description = `PSK file ${o.pskFile}`;
    } else {
      const dir = o.certificates!;
      const ca = path.join(dir, 'ca-cert.pem');
      const haveCa = fs.existsSync(ca);
      if (this.verifyPeer && !haveCa) throw tlsError(`verifying clients needs ${ca}`);
      this.context = nodeTls().createSecureContext({
        cert: readTlsFile(path.join(dir, 'server-cert.pem'), 'server certificate'),
        key: readTlsFile(path.join(dir, 'server-key.pem'), 'server key'),
        ca: haveCa ? readTlsFile(ca, 'CA certificate') : undefined,
        minVersion: 'TLSv1.2',
      });
      this.description = `certificates from ${dir}`;
    }
  }

  /**
   * Start a server-side TLS session over `socket` (after NBD_REP_ACK to STARTTLS). Resolves with
   * the TLS socket once the handshake succeeded and (with verifyPeer) the client certificate was
   * accepted; rejects with ERR_TLS otherwise. The caller destroys the socket on rejection.
   */
  upgrade(socket: Duplex): Promise<tls.TLSSocket> {
    const psk = this.psk;
    const ts = new (nodeTls().TLSSocket)(socket, {
      isServer: true,
      secureContext: this.context,
      requestCert: this.verifyPeer,
      rejectUnauthorized: this.verifyPeer,
      ...(psk ? { pskCallback: (_s: tls.TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
    } as tls.TLSSocketOptions);
    // Errors after the outcome is known must not go unhandled; the connection adds its own handler.
    ts.on('error', () => undefined);
    return new Promise((resolve, reject) => {
      const fail = (why: string, cause?: unknown) => {
        ts.removeListener('secure', onSecure);
        reject(tlsError(`TLS handshake failed: ${why}`, cause));
      };
      const onError = (err: Error) => fail(err.message, err);
      const onClose = () => fail('connection closed by the client');
      const onSecure = () => {
        ts.removeListener('error', onError);
        ts.removeListener('close', onClose);
        if (this.verifyPeer) {
          const why = clientCertificateProblem(ts);
          if (why) return reject(tlsError(`client certificate not accepted: ${why}`));
        }
        resolve(ts);
      };
      ts.once('secure', onSecure);
      ts.once('error', onError);
      ts.once('close', onClose);
    });
  }
}

/**
 * Why the client's certificate is not acceptable, or undefined when it is. A bare server-side
 * TLSSocket does not do what tls.Server does after the handshake (check the chain, set
 * `authorized`): OpenSSL only refused a missing certificate, so the chain is checked here the way
 * tls.Server does it, with the handle's verifyError().
 */
function clientCertificateProblem(ts: tls.TLSSocket): string | undefined {
  const cert = ts.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return 'no client certificate';
  const handle = (ts as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'cannot verify it on this Node.js version';
  const err = handle.verifyError();
  return err ? err.code ?? err.message : undefined;
}
