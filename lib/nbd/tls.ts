/** TLS client options from an NBD address: PSK (psktool's "user:hexkey" files) or X.509 (a directory). */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type * as tls from 'node:tls';
import { nodeTls } from '../builtins.js';
import type { NbdAddress } from './uri.js';

import { readPskFile, readTlsFile, tlsError } from './tls-files.js';

/**
 * Extra CA certificates for the default trust that Node did not load at start-up (see
 * deferExtraCaCerts). Read on first use by an X.509 client without ca-cert.pem.
 */
let deferredCaFile: string | undefined;
let deferredCa: Buffer[] | undefined;

/**
 * Take over NODE_EXTRA_CA_CERTS from a launcher that hid it from Node's start-up: Node 20
 * parses that file eagerly on every start (about 0.1 s for a system bundle), though only a TLS
 * client verifying against the default trust uses it. `bin/nbdstream` moves the variable to
 * NBDSTREAM_EXTRA_CA_CERTS; this restores it in process.env (child processes see it as
 * before) and adds its certificates to Node's root certificates when a client needs them.
 */
export function deferExtraCaCerts(env: NodeJS.ProcessEnv = process.env): void {
  const file = env.NBDSTREAM_EXTRA_CA_CERTS;
  delete env.NBDSTREAM_EXTRA_CA_CERTS;
  if (!file) return;
  env.NODE_EXTRA_CA_CERTS = file;
  deferredCaFile = file;
}

function defaultTrust(): Buffer[] | undefined {
  if (!deferredCaFile) return undefined;
  deferredCa ??= [...nodeTls().rootCertificates.map((c) => Buffer.from(c)), readTlsFile(deferredCaFile, 'NODE_EXTRA_CA_CERTS file')];
  return deferredCa;
}

/** Key for `user` from a psktool file, as bytes. */
export function readPskKey(file: string, user: string): Buffer {
  const key = readPskFile(file).get(user);
  if (!key) throw tlsError(`PSK file ${file} has no key for user "${user}"`);
  return key;
}

/** The PSK identity the client offers: the URI's user name, else the local login name. */
export function pskIdentity(a: NbdAddress): string {
  return a.tlsUsername ?? os.userInfo().username;
}

/** The credentials offered, for error messages: 'PSK user "alice"' or 'certificates from DIR'. */
export function describeTlsCredentials(a: NbdAddress): string {
  if (a.tlsPskFile) return `PSK user "${pskIdentity(a)}"`;
  if (a.tlsCertificates) return `certificates from ${a.tlsCertificates}`;
  return 'no client credentials';
}

/** Options for tls.connect({socket, ...}) given the address's TLS parameters. */
export function tlsConnectOptions(a: NbdAddress): tls.ConnectionOptions {
  const servername = a.tlsHostname ?? (a.host && !/^[0-9.:]+$/.test(a.host) ? a.host : 'localhost');
  if (a.tlsPskFile) {
    const identity = pskIdentity(a);
    const psk = readPskKey(a.tlsPskFile, identity);
    return {
      pskCallback: () => ({ psk, identity }),
      ciphers: 'PSK',
      checkServerIdentity: () => undefined,
      minVersion: 'TLSv1.2',
    };
  }
  const o: tls.ConnectionOptions = { minVersion: 'TLSv1.2', servername, rejectUnauthorized: a.tlsVerifyPeer };
  if (a.tlsCertificates) {
    const dir = a.tlsCertificates;
    const ca = path.join(dir, 'ca-cert.pem');
    if (fs.existsSync(ca)) o.ca = readTlsFile(ca, 'CA certificate');
    const cert = path.join(dir, 'client-cert.pem');
    const key = path.join(dir, 'client-key.pem');
    if (fs.existsSync(cert)) {
      o.cert = readTlsFile(cert, 'client certificate');
      o.key = readTlsFile(key, 'client key');
    }
  }
  if (!o.ca) o.ca = defaultTrust();
  if (!a.tlsVerifyPeer) o.checkServerIdentity = () => undefined;
  return o;
}
