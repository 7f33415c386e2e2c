/**
 * TLS material and TLS-enabled nbdkit servers for tests: PSK files from psktool, a CA and
 * X.509 certificates from certtool (GnuTLS), and nbdkit started with its stderr captured and an
 * optional environment (e.g. GNUTLS_SYSTEM_PRIORITY_FILE to pin the TLS version it accepts).
 * Nothing here is a mock; the tools are the same ones nbdkit-tls(1) documents.
 */
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { tmpDir, type Server } from './servers.js';

function run(cmd: string, args: string[], cwd?: string): string {
  try {
    return execFileSync(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 }).toString();
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    throw new Error(`${cmd} ${args.join(' ')} failed: ${e.stderr?.toString() ?? e.message}`);
  }
}

// ------------------------------------------------------------------ PSK

/**
 * Add a random key for `user` to the psktool file `file` (created if missing; psktool replaces
 * an existing entry for the same user). Returns the file.
 */
export function pskAdd(file: string, user: string): string {
  run('psktool', ['-u', user, '-p', file]);
  return file;
}

/** The hex key psktool stored for `user` in `file`, or undefined. */
export function pskKey(file: string, user: string): string | undefined {
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0 && line.slice(0, colon) === user) return line.slice(colon + 1).trim();
  }
  return undefined;
}

// ------------------------------------------------------------------ X.509

export interface Ca {
  name: string;
  cert: string;
  key: string;
}

function template(dir: string, name: string, lines: string[]): string {
  const file = path.join(dir, `${name}.info`);
  fs.writeFileSync(file, lines.join('\n') + '\n');
  return file;
}

function privkey(file: string): string {
  run('certtool', ['--generate-privkey', '--no-text', '--outfile', file]);
  return file;
}

/** A self-signed CA (ca-key.pem, ca-cert.pem) in its own directory under `dir`. */
export function makeCa(dir: string, name: string): Ca {
  const d = path.join(dir, name);
  fs.mkdirSync(d, { recursive: true });
  const key = privkey(path.join(d, 'ca-key.pem'));
  const cert = path.join(d, 'ca-cert.pem');
  const t = template(d, 'ca', [`cn = ${name}`, 'ca', 'cert_signing_key', 'expiration_days = 30']);
  run('certtool', ['--generate-self-signed', '--no-text', '--load-privkey', key, '--template', t, '--outfile', cert]);
  return { name, cert, key };
}

/** Key and certificate signed by `ca`; returns {cert, key} paths (in `dir`, named PREFIX-cert.pem / PREFIX-key.pem). */
export function makeCert(ca: Ca, dir: string, prefix: 'server' | 'client', cn: string): { cert: string; key: string } {
  fs.mkdirSync(dir, { recursive: true });
  const key = privkey(path.join(dir, `${prefix}-key.pem`));
  const cert = path.join(dir, `${prefix}-cert.pem`);
  const lines =
    prefix === 'server'
      ? ['organization = nbdstream tests', `cn = ${cn}`, `dns_name = ${cn}`, 'tls_www_server', 'encryption_key', 'signing_key', 'expiration_days = 30']
      : ['organization = nbdstream tests', `cn = ${cn}`, 'tls_www_client', 'encryption_key', 'signing_key', 'expiration_days = 30'];
  const t = template(dir, prefix, lines);
  run('certtool', [
    '--generate-certificate',
    '--no-text',
    '--load-ca-certificate',
    ca.cert,
    '--load-ca-privkey',
    ca.key,
    '--load-privkey',
    key,
    '--template',
    t,
    '--outfile',
    cert,
  ]);
  fs.rmSync(t);
  return { cert, key };
}

/** An nbdkit --tls-certificates directory: ca-cert.pem, server-cert.pem, server-key.pem. */
export function serverCertDir(ca: Ca, dir: string, hostname = 'localhost'): string {
  makeCert(ca, dir, 'server', hostname);
  fs.copyFileSync(ca.cert, path.join(dir, 'ca-cert.pem'));
  return dir;
}

/**
 * A client tls-certificates directory: ca-cert.pem (of `trust`), and unless `withClientCert` is
 * false, client-cert.pem and client-key.pem signed by `signer`.
 */
export function clientCertDir(trust: Ca, dir: string, o: { signer?: Ca; withClientCert?: boolean; cn?: string } = {}): string {
  fs.mkdirSync(dir, { recursive: true });
  fs.copyFileSync(trust.cert, path.join(dir, 'ca-cert.pem'));
  if (o.withClientCert !== false) makeCert(o.signer ?? trust, dir, 'client', o.cn ?? 'nbdstream-client');
  return dir;
}

/** A GnuTLS system priority file disabling every protocol version except `keep`. */
export function gnutlsPriorityFile(dir: string, keep: 'tls1.2' | 'tls1.3'): string {
  const file = path.join(dir, `gnutls-only-${keep}.conf`);
  const disabled = ['tls1.0', 'tls1.1', 'tls1.2', 'tls1.3'].filter((v) => v !== keep);
  fs.writeFileSync(file, ['[overrides]', ...disabled.map((v) => `disabled-version = ${v}`)].join('\n') + '\n');
  return file;
}

// ------------------------------------------------------------------ nbdkit

export interface TlsServer extends Server {
  /** Everything nbdkit wrote to stderr so far (with verbose, its debug log). */
  stderr(): string;
  /** Resolve when stderr matches `re` (or reject after `ms`). */
  waitForLog(re: RegExp, ms?: number): Promise<string>;
}

export interface TlsNbdkitOptions {
  /** nbdkit options before the plugin, e.g. ['--tls=require', '--tls-psk=FILE']. */
  options?: string[];
  /** Extra environment for nbdkit. */
  env?: Record<string, string>;
  /** -v -D nbdkit.tls.session=1: log the negotiated TLS session to stderr. */
  verbose?: boolean;
  scheme?: string;
  query?: string;
  user?: string;
}

/** Start `nbdkit -f -U SOCK [options] PLUGIN ARGS` with stderr captured; stop() kills it and removes its directory. */
export async function nbdkitTls(plugin: string, args: string[], o: TlsNbdkitOptions = {}): Promise<TlsServer> {
  const dir = tmpDir('nbdstream-tls-');
  const socket = path.join(dir, 'sock');
  const pidFile = path.join(dir, 'pid');
  const argv = ['-f', '-U', socket, '-P', pidFile, ...(o.verbose ? ['-v', '-D', 'nbdkit.tls.session=1'] : []), ...(o.options ?? []), plugin, ...args];
  const proc = spawn('nbdkit', argv, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...o.env } });
  let err = '';
  proc.stderr!.on('data', (d) => (err += d));
  const stderr = () => err;

  const stop = (): Promise<void> =>
    new Promise((resolve) => {
      const done = () => {
        fs.rmSync(dir, { recursive: true, force: true });
        resolve();
      };
      if (proc.exitCode !== null || proc.signalCode !== null) return done();
      proc.once('exit', done);
      proc.kill('SIGTERM');
      setTimeout(() => proc.kill('SIGKILL'), 3000).unref();
    });

  const until = Date.now() + 15_000;
  for (;;) {
    if (fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '') break;
    if (proc.exitCode !== null || proc.signalCode !== null) {
      await stop();
      throw new Error(`nbdkit ${argv.join(' ')} exited with ${proc.exitCode ?? proc.signalCode}: ${err}`);
    }
    if (Date.now() > until) {
      await stop();
      throw new Error(`timed out waiting for nbdkit ${argv.join(' ')}: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }

  const waitForLog = async (re: RegExp, ms = 5000): Promise<string> => {
    const end = Date.now() + ms;
    for (;;) {
      const m = re.exec(err);
      if (m) return m[0];
      if (Date.now() > end) throw new Error(`nbdkit stderr did not match ${re} within ${ms} ms:\n${err}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  const scheme = o.scheme ?? 'nbd+unix';
  const user = o.user ? `${encodeURIComponent(o.user)}@` : '';
  const uri = `${scheme}://${user}/?socket=${socket}${o.query ? '&' + o.query : ''}`;
  return { uri, socket, dir, proc, pid: proc.pid, stop, stderr, waitForLog };
}
