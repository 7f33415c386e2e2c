/**
 * TLS against real `nbdkit --tls=require` (nbdkit-tls(1)): PSK keys from psktool, X.509
 * certificates from certtool, each test with its own server. Refusals must be one clean
 * NbdStreamError with code ERR_TLS, and a TLS URI must never fall back to plaintext.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../lib/nbd/client.js';
import { NbdStreamError } from '../../lib/errors.js';
import { nbdcopyHash, sha256, tmpDir } from '../helpers/servers.js';
import { run } from '../helpers/cli.js';
import {
  type Ca,
  type TlsNbdkitOptions,
  type TlsServer,
  clientCertDir,
  gnutlsPriorityFile,
  makeCa,
  nbdkitTls,
  pskAdd,
  pskKey,
  serverCertDir,
} from '../helpers/tls.js';

const SIZE = 1024 * 1024;
/** Longest a connect (or any single operation) may take before the test fails on its own. */
const OP_TIMEOUT = 10_000;

let dir: string;
/** alice's key (the server's file). */
let pskFile: string;
/** A different key for alice. */
let wrongPskFile: string;
/** bob's key, which the server does not know. */
let bobPskFile: string;
let ca: Ca;
let otherCa: Ca;
/** nbdkit --tls-certificates: ca-cert.pem, server-cert.pem (CN/dns_name localhost), server-key.pem. */
let serverDir: string;
/** Client directory: ca-cert.pem of `ca`, client cert signed by `ca`. */
let clientDir: string;
/** Client directory whose CA and client cert come from `otherCa`. */
let otherCaClientDir: string;
/** Client directory trusting `ca` but with no client certificate. */
let noCertClientDir: string;

beforeAll(() => {
  dir = tmpDir('nbdstream-tls-material-');
  pskFile = pskAdd(path.join(dir, 'server.psk'), 'alice');
  wrongPskFile = pskAdd(path.join(dir, 'wrong.psk'), 'alice');
  bobPskFile = pskAdd(path.join(dir, 'bob.psk'), 'bob');
  expect(pskKey(pskFile, 'alice')).toMatch(/^[0-9a-f]{64}$/);
  expect(pskKey(wrongPskFile, 'alice')).not.toBe(pskKey(pskFile, 'alice'));
  expect(pskKey(pskFile, 'bob')).toBeUndefined();

  ca = makeCa(dir, 'test-ca');
  otherCa = makeCa(dir, 'other-ca');
  serverDir = serverCertDir(ca, path.join(dir, 'server'), 'localhost');
  clientDir = clientCertDir(ca, path.join(dir, 'client'));
  otherCaClientDir = clientCertDir(otherCa, path.join(dir, 'client-other-ca'));
  noCertClientDir = clientCertDir(ca, path.join(dir, 'client-no-cert'), { withClientCert: false });
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) expect(fs.existsSync(path.join(serverDir, f))).toBe(true);
  for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) expect(fs.existsSync(path.join(clientDir, f))).toBe(true);
  expect(fs.readdirSync(noCertClientDir)).toEqual(['ca-cert.pem']);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const servers: TlsServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

/** Start nbdkit memory 1M with these options (verbose: its TLS session is logged); stopped after the test. */
async function memoryServer(o: TlsNbdkitOptions): Promise<TlsServer> {
  const s = await nbdkitTls('memory', [String(SIZE)], { verbose: true, ...o });
  servers.push(s);
  return s;
}

const pskOptions = () => ['--tls=require', `--tls-psk=${pskFile}`];
const x509Options = (verifyPeer = false) => ['--tls=require', `--tls-certificates=${serverDir}`, ...(verifyPeer ? ['--tls-verify-peer'] : [])];
const pskUri = (s: TlsServer, user: string, file: string) => `nbds+unix://${user}@/?socket=${s.socket}&tls-psk-file=${file}`;
const x509Uri = (s: TlsServer, certDir: string) => `nbds+unix:///?socket=${s.socket}&tls-certificates=${certDir}&tls-hostname=localhost`;

function withTimeout<T>(p: Promise<T>, what: string, ms = OP_TIMEOUT): Promise<T> {
  let timer: NodeJS.Timeout;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Write random bytes at a few places, read them back, compare exactly; returns the expected image. */
async function writeReadBack(client: NbdClient): Promise<Buffer> {
  expect(client.tls).toBe(true);
  expect(client.size).toBe(SIZE);
  const image = Buffer.alloc(SIZE);
  const pieces = [
    { offset: 0, data: randomBytes(512) },
    { offset: 4096 + 17, data: randomBytes(65536 + 3) }, // unaligned, spans many TLS records
    { offset: SIZE - 1000, data: randomBytes(1000) }, // up to the end
  ];
  for (const p of pieces) {
    await withTimeout(client.pwrite(p.offset, p.data), 'pwrite');
    p.data.copy(image, p.offset);
  }
  for (const p of pieces) {
    const { data } = await withTimeout(client.pread(p.offset, p.data.length), 'pread');
    expect(data.equals(p.data)).toBe(true);
  }
  const { data: all } = await withTimeout(client.pread(0, SIZE), 'pread all');
  expect(sha256(all)).toBe(sha256(image));
  return image;
}

/** Connect, write, read back, close; then libnbd (nbdcopy) reads the same bytes over TLS. */
async function roundTrip(uri: string): Promise<void> {
  const client = await withTimeout(NbdClient.connect(uri), 'connect');
  let image: Buffer;
  try {
    image = await writeReadBack(client);
  } finally {
    await withTimeout(client.close(), 'close');
  }
  expect(nbdcopyHash(uri)).toBe(sha256(image));
}

/**
 * Connect, expecting exactly one rejection: an NbdStreamError with `code`, and no stray
 * 'error' events or unhandled rejections afterwards (within 300 ms).
 */
async function refused(uri: string, code: string): Promise<NbdStreamError> {
  const stray: unknown[] = [];
  const onStray = (e: unknown) => stray.push(e);
  process.on('uncaughtException', onStray);
  process.on('unhandledRejection', onStray);
  try {
    let err: unknown;
    let connected: NbdClient | undefined;
    try {
      connected = await withTimeout(NbdClient.connect(uri), 'connect');
    } catch (e) {
      err = e;
    }
    if (connected) {
      await connected.close();
      throw new Error(`expected ${code}, but connected (tls=${connected.tls}) to ${uri}`);
    }
    expect(err).toBeInstanceOf(NbdStreamError);
    const e = err as NbdStreamError;
    expect({ code: e.code, message: e.message }).toMatchObject({ code });
    expect(e.endpoint).toBe(uri);
    await new Promise((r) => setTimeout(r, 300));
    expect(stray).toEqual([]);
    return e;
  } finally {
    process.off('uncaughtException', onStray);
    process.off('unhandledRejection', onStray);
  }
}

/** nbdkit never reached the transmission phase (never opened the plugin): no plaintext fallback. */
function neverServed(s: TlsServer): void {
  expect(s.stderr()).not.toMatch(/memory: open /);
  expect(s.stderr()).not.toMatch(/handshake complete, processing requests/);
}

describe('TLS with pre-shared keys (psktool)', () => {
  test('alice connects with her key; bytes written are read back exactly', async () => {
    const s = await memoryServer({ options: pskOptions() });
    await roundTrip(pskUri(s, 'alice', pskFile));
    expect(s.stderr()).toMatch(/TLS: authentication: PSK/);
    expect(s.stderr()).toMatch(/TLS: PSK username: alice\b/);
  });

  // nbdkit has no priority option; GnuTLS's system priority file ([overrides] disabled-version)
  // pins the one protocol version the server accepts, and nbdkit logs the session it negotiated.
  test.each(['tls1.3', 'tls1.2'] as const)('works when the server only allows %s', async (version) => {
    const env = { GNUTLS_SYSTEM_PRIORITY_FILE: gnutlsPriorityFile(dir, version) };
    const s = await memoryServer({ options: pskOptions(), env });
    await roundTrip(pskUri(s, 'alice', pskFile));
    const label = version === 'tls1.3' ? 'TLS1.3' : 'TLS1.2';
    await s.waitForLog(/TLS session:[^]*TLS session:/); // ours and nbdcopy's
    const sessions = s.stderr().match(/TLS session: \(TLS[0-9.]+\)/g) ?? [];
    expect(new Set(sessions)).toEqual(new Set([`TLS session: (${label})`]));
    expect(s.stderr()).toMatch(/TLS: PSK username: alice\b/);
  });
});

describe('TLS refusals', () => {
  test('a plain nbd+unix:// URI is refused by a --tls=require server with ERR_TLS', async () => {
    const s = await memoryServer({ options: pskOptions() });
    const e = await refused(`nbd+unix:///?socket=${s.socket}`, 'ERR_TLS');
    expect(e.message).toMatch(/TLS/);
    expect(e.message).toMatch(/requires TLS|TLS (is )?required/i);
    neverServed(s);
    expect(s.stderr()).toMatch(/NBD_REP_ERR_TLS_REQD/);
  });

  test('a different key for alice is refused with ERR_TLS', async () => {
    const s = await memoryServer({ options: pskOptions() });
    const e = await refused(pskUri(s, 'alice', wrongPskFile), 'ERR_TLS');
    expect(e.message).toMatch(/^TLS handshake failed/);
    expect(e.message).toContain('PSK user "alice"');
    neverServed(s);
    await s.waitForLog(/error: gnutls_handshake/);
    // The server is unharmed: the right key still works.
    await roundTrip(pskUri(s, 'alice', pskFile));
  });

  test('a user missing from the client PSK file is refused with ERR_TLS naming the user', async () => {
    const s = await memoryServer({ options: pskOptions() });
    const e = await refused(pskUri(s, 'bob', pskFile), 'ERR_TLS');
    expect(e.message).toBe(`PSK file ${pskFile} has no key for user "bob"`);
    neverServed(s);
  });

  test('a user the server does not know is refused with ERR_TLS naming the user', async () => {
    const s = await memoryServer({ options: pskOptions() });
    const e = await refused(pskUri(s, 'bob', bobPskFile), 'ERR_TLS');
    expect(e.message).toMatch(/^TLS handshake failed/);
    expect(e.message).toContain('PSK user "bob"');
    neverServed(s);
    await s.waitForLog(/error: gnutls_handshake/);
  });

  test('an nbds+unix:// URI to a server without TLS is refused, never falling back to plaintext', async () => {
    const s = await memoryServer({});
    const e = await refused(pskUri(s, 'alice', pskFile), 'ERR_TLS');
    expect(e.message).toMatch(/^server refused TLS \(NBD_REP_ERR_\w+\)/);
    neverServed(s);
    expect(s.stderr()).toMatch(/replying to NBD_OPT_STARTTLS with NBD_REP_ERR_/);
    expect(s.stderr()).not.toMatch(/NBD_OPT_GO|NBD_OPT_EXPORT_NAME/);
  });
});

describe('TLS with X.509 certificates (certtool)', () => {
  test('client with the CA and a client certificate reads back what it wrote', async () => {
    const s = await memoryServer({ options: x509Options() });
    await roundTrip(x509Uri(s, clientDir));
    expect(s.stderr()).toMatch(/TLS: authentication: certificate/);
  });

  test('a client trusting a different CA refuses the server with ERR_TLS', async () => {
    const s = await memoryServer({ options: x509Options() });
    const e = await refused(x509Uri(s, otherCaClientDir), 'ERR_TLS');
    expect(e.message).toBe(`TLS handshake failed (certificates from ${otherCaClientDir}): unable to verify the first certificate`);
    expect((e.cause as NodeJS.ErrnoException).code).toBe('UNABLE_TO_VERIFY_LEAF_SIGNATURE');
    neverServed(s);
  });

  test('a tls-hostname the server certificate does not name is refused with ERR_TLS', async () => {
    const s = await memoryServer({ options: x509Options() });
    const uri = `nbds+unix:///?socket=${s.socket}&tls-certificates=${clientDir}&tls-hostname=nbd.example.com`;
    const e = await refused(uri, 'ERR_TLS');
    expect(e.message).toMatch(/^TLS handshake failed \(certificates from .*\): Hostname\/IP does not match certificate's altnames/);
    expect((e.cause as NodeJS.ErrnoException).code).toBe('ERR_TLS_CERT_ALTNAME_INVALID');
    neverServed(s);
  });

  // bin/nbdstream hides NODE_EXTRA_CA_CERTS from Node's start-up (Node 20 parses it eagerly) and
  // the CLI loads it only when a client verifies against the default trust.
  test('the CLI trusts a CA named only by NODE_EXTRA_CA_CERTS, and its [ CMD ] children still see the variable', async () => {
    const s = await memoryServer({ options: x509Options() });
    const src = path.join(dir, 'extra-ca-src.img');
    const image = randomBytes(SIZE);
    fs.writeFileSync(src, image);
    const uri = `nbds+unix:///?socket=${s.socket}&tls-hostname=localhost`;
    const distrust = await run([src, uri], { env: { NODE_EXTRA_CA_CERTS: '' } });
    expect(distrust.stderr).toBe(`nbdstream: ${uri}: TLS handshake failed (no client credentials): unable to verify the first certificate\n`);
    expect(distrust.status).toBe(1);
    const r = await run([src, uri], { env: { NODE_EXTRA_CA_CERTS: ca.cert } });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(nbdcopyHash(x509Uri(s, clientDir))).toBe(sha256(image));

    const seen = path.join(dir, 'extra-ca-env.txt');
    const cmd = await run(['--', '[', 'sh', '-c', `printenv NODE_EXTRA_CA_CERTS NBDSTREAM_EXTRA_CA_CERTS > ${seen}; exec nbdkit memory 1M`, ']', 'null:'], {
      env: { NODE_EXTRA_CA_CERTS: ca.cert },
    });
    expect(cmd.stderr).toBe('');
    expect(cmd.status).toBe(0);
    expect(fs.readFileSync(seen, 'utf8')).toBe(`${ca.cert}\n`);
  });

  // TLS 1.3 clients complete their handshake before the server checks the client certificate,
  // so the refusal arrives later than under TLS 1.2; both must be the same single ERR_TLS.
  describe.each(['tls1.3', 'tls1.2'] as const)('--tls-verify-peer, server allowing only %s', (version) => {
    const env = () => ({ GNUTLS_SYSTEM_PRIORITY_FILE: gnutlsPriorityFile(dir, version) });
    const label = version === 'tls1.3' ? 'TLS1.3' : 'TLS1.2';

    test('a client with a certificate from the CA is accepted', async () => {
      const s = await memoryServer({ options: x509Options(true), env: env() });
      await roundTrip(x509Uri(s, clientDir));
      expect(s.stderr()).toContain(`TLS session: (${label})`);
      expect(s.stderr()).toMatch(/TLS: subject `CN=nbdstream-client/);
    });

    test('a client without a client certificate is refused with one ERR_TLS', async () => {
      const s = await memoryServer({ options: x509Options(true), env: env() });
      const e = await refused(x509Uri(s, noCertClientDir), 'ERR_TLS');
      expect(e.message).toContain(`certificates from ${noCertClientDir}`);
      if (version === 'tls1.2') expect(e.message).toMatch(/^TLS handshake failed \(certificates from [^)]*\): /);
      else expect(e.message).toMatch(/^server ended the TLS session right after the handshake \(certificates from [^;]*; client certificate missing or not accepted\?\): /);
      neverServed(s);
      await s.waitForLog(/error: gnutls_handshake: Error in the certificate/);
    });

    test('a client certificate signed by another CA is refused with ERR_TLS', async () => {
      const s = await memoryServer({ options: x509Options(true), env: env() });
      const certDir = path.join(dir, `client-foreign-cert-${version}`);
      if (!fs.existsSync(certDir)) clientCertDir(ca, certDir, { signer: otherCa });
      const e = await refused(x509Uri(s, certDir), 'ERR_TLS');
      expect(e.message).toContain(`certificates from ${certDir}`);
      neverServed(s);
      await s.waitForLog(/error: gnutls_handshake: Error in the certificate/);
    });
  });
});
