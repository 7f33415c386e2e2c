/**
 * `nbdstream serve`: export a file, a block device or an in-memory image over NBD (lib/nbd/server.ts).
 * Listens on a Unix socket (--socket), TCP (--port/--bind, default port 10809), vsock (--vsock
 * [--port]), or the socket inherited by socket activation (LISTEN_FDS=1, LISTEN_PID = our pid:
 * fd 3), so that
 * `nbdstream -- [ nbdstream serve disk.img ] out.img` works. With --run CMD it runs CMD via sh
 * with $uri (and $unixsocket / $port, $exportname) set, like nbdkit --run, and exits with its
 * status; otherwise it serves until SIGTERM or SIGINT.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import yargs from 'yargs';
import { NbdStreamError } from '../lib/errors.js';
import { nodeChildProcess } from '../lib/builtins.js';
import { NbdServer, type ListenOptions, type ServerTlsOptions } from '../lib/nbd/server.js';
import { openServedEndpoint } from '../lib/nbd/server-export.js';
import { NBD_DEFAULT_PORT } from '../lib/nbd/protocol.js';
import type { Endpoint } from '../lib/endpoints/endpoint.js';

class UsageError extends Error {}

function usage(message: string): never {
  throw new UsageError(message);
}

/** "1G", "64K", "512" (bytes; K/M/G/T are powers of 1024). */
function parseSize(v: unknown): number {
  const m = /^(\d+)([kKmMgGtT]?)$/.exec(String(v));
  if (!m) usage(`--size: expected a size like 1048576, 64M or 1G, not "${String(v)}"`);
  const n = Number(m[1]) * 1024 ** ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
  if (!Number.isSafeInteger(n)) usage(`--size: ${String(v)} is too large`);
  return n;
}

function describe(err: unknown): string {
  if (err instanceof NbdStreamError) return err.describe();
  return (err as Error)?.message ?? String(err);
}

export async function run(args: string[]): Promise<number> {
  try {
    return await serve(args);
  } catch (err) {
    process.stderr.write(`nbdstream serve: ${describe(err)}\n`);
    return 1;
  }
}

async function serve(args: string[]): Promise<number> {
  const argv = await yargs(args)
    .scriptName('nbdstream serve')
    .usage(
      'Usage: nbdstream serve [options] FILE|DEVICE|memory:\n\n' +
        'Export a file, a block device or an in-memory image (memory: with --size) over NBD.\n' +
        'Listens on --socket PATH, or TCP --port (default 10809) on --bind ADDR; under socket\n' +
        'activation (LISTEN_FDS) on the inherited socket. Serves until SIGTERM/SIGINT, or runs\n' +
        '--run CMD with $uri set and exits with its status.',
    )
    .parserConfiguration({ 'camel-case-expansion': false, 'boolean-negation': false })
    .option('socket', { alias: 'U', type: 'string', describe: 'Listen on this Unix socket ("-": a private temporary one)' })
    .option('port', { alias: 'p', type: 'string', describe: `Listen on this TCP port (default ${NBD_DEFAULT_PORT}; 0: any free port)` })
    .option('vsock', { type: 'boolean', describe: `Listen on vsock (AF_VSOCK, any CID of this machine) --port (default ${NBD_DEFAULT_PORT}): nbd+vsock://CID:PORT/` })
    .option('bind', { alias: 'i', type: 'string', describe: 'TCP address to listen on (default: all)' })
    .option('export', { alias: 'e', type: 'string', describe: 'Export name (default ""; the default export "" always reaches it too)' })
    .option('description', { type: 'string', describe: 'Export description (NBD_INFO_DESCRIPTION, NBD_OPT_LIST)' })
    .option('read-only', { alias: 'r', type: 'boolean', describe: 'Export read-only (writes fail with EPERM)' })
    .option('size', { type: 'string', describe: 'Size of a memory: image, e.g. 1G' })
    .option('tls', { type: 'string', choices: ['off', 'on', 'require'], describe: 'TLS: offer (on) or insist (require); default on when credentials are given' })
    .option('tls-psk', { type: 'string', describe: 'psktool key file (user:hexkey lines)' })
    .option('tls-certificates', { type: 'string', describe: 'Directory with server-cert.pem, server-key.pem, ca-cert.pem' })
    .option('tls-verify-peer', { type: 'boolean', describe: 'Require a client certificate signed by ca-cert.pem' })
    .option('run', { type: 'string', describe: 'Run this shell command with $uri set, then exit with its status' })
    .option('verbose', { alias: 'v', type: 'boolean', describe: 'Log connections and client errors to stderr' })
    .help('help')
    .version(false)
    .strictOptions()
    .wrap(Math.min(100, process.stdout.columns || 100))
    .fail((msg, err) => {
      if (err) throw err;
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      if (unknown) {
        const names = unknown[1].split(', ').map((n) => (n.length === 1 ? `-${n}` : `--${n}`));
        usage(`unknown option${names.length > 1 ? 's' : ''}: ${names.join(', ')}`);
      }
      usage(msg.replace(/\s*\n\s*/g, ' '));
    })
    .parseAsync();

  const positional = (argv._ as Array<string | number>).map(String);
  if (positional.length !== 1) usage(`expected one FILE, DEVICE or memory: to serve, got ${positional.length} (see --help)`);
  const spec = positional[0];
  const readOnly = argv['read-only'] ?? false;
  const size = argv.size !== undefined ? parseSize(argv.size) : undefined;
  const exportName = argv.export ?? '';
  const verbose = argv.verbose ?? false;

  // TLS
  const pskFile = argv['tls-psk'];
  const certificates = argv['tls-certificates'];
  const mode = (argv.tls ?? (pskFile || certificates ? 'on' : 'off')) as 'off' | 'on' | 'require';
  let tls: ServerTlsOptions | undefined;
  if (mode !== 'off') {
    if (pskFile && certificates) usage('give either --tls-psk or --tls-certificates, not both');
    if (!pskFile && !certificates) usage(`--tls=${mode} needs --tls-psk=FILE or --tls-certificates=DIR`);
    tls = { mode, pskFile, certificates, verifyPeer: argv['tls-verify-peer'] ?? false };
  }
  if (argv['tls-verify-peer'] && !certificates) usage('--tls-verify-peer needs --tls-certificates');

  // Where to listen
  const activated = NbdServer.activationFd();
  for (const k of ['LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES']) delete process.env[k];
  if (activated !== undefined && (argv.socket !== undefined || argv.port !== undefined)) usage('--socket and --port cannot be used under socket activation (LISTEN_FDS)');
  if (argv.socket !== undefined && argv.port !== undefined) usage('give either --socket or --port, not both');
  if (argv.bind !== undefined && argv.socket !== undefined) usage('--bind applies to TCP (--port), not to --socket');
  const vsock = argv.vsock ?? false;
  if (vsock && (activated !== undefined || argv.socket !== undefined || argv.bind !== undefined)) usage('--vsock listens on --port only (not with --socket, --bind or socket activation)');
  let port: number | undefined;
  if (argv.port !== undefined) {
    if (!/^\d+$/.test(argv.port) || Number(argv.port) > (vsock ? 0xffffffff : 65535)) usage(`--port: expected a port number, not "${argv.port}"`);
    port = Number(argv.port);
  }
  let tmpDir: string | undefined;
  let listen: ListenOptions;
  if (activated !== undefined) listen = { fd: activated };
  else if (vsock) listen = { vsockPort: port ?? NBD_DEFAULT_PORT };
  else if (argv.socket !== undefined && argv.socket !== '-') listen = { path: path.resolve(argv.socket) };
  else if (argv.socket === '-' || (port === undefined && argv.run !== undefined)) {
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdstream-serve-'));
    listen = { path: path.join(tmpDir, 'sock') };
  } else listen = { port: port ?? NBD_DEFAULT_PORT, host: argv.bind };

  let endpoint: Endpoint | undefined;
  let server: NbdServer | undefined;
  const cleanup = async () => {
    await server?.close(1000);
    await endpoint?.close().catch(() => undefined);
    if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
  };
  try {
    endpoint = await openServedEndpoint(spec, { readOnly, size });
    server = new NbdServer([{ name: exportName, endpoint, description: argv.description, readOnly }], { tls });
    // The default export '' reaches a named export too (as nbdkit serves any name).
    const log = (m: string) => process.stderr.write(`nbdstream serve: ${m}\n`);
    if (verbose) {
      server.on('connection', (id: number) => log(`client ${id} connected`));
      server.on('disconnect', (id: number) => log(`client ${id} disconnected`));
      server.on('clientError', (err: NbdStreamError, id: number) => log(`client ${id}: ${err.message}`));
    }
    await server.listen(listen);
    const uri = listen.fd === undefined ? server.uri : undefined;
    if (verbose) log(`serving ${spec} (${endpoint.size} bytes${readOnly ? ', read-only' : ''}) at ${uri ?? `fd ${listen.fd}`}`);

    const status = argv.run !== undefined ? await runCommand(argv.run, server, listen, exportName) : await untilSignal();
    return status;
  } finally {
    await cleanup();
  }
}

/** Resolve with 0 on SIGTERM or SIGINT. */
function untilSignal(): Promise<number> {
  return new Promise((resolve) => {
    const done = () => {
      process.off('SIGTERM', done);
      process.off('SIGINT', done);
      resolve(0);
    };
    process.on('SIGTERM', done);
    process.on('SIGINT', done);
  });
}

/** Run CMD via sh with $uri etc. set; resolve with its exit status (128+N for signal N). */
function runCommand(cmd: string, server: NbdServer, listen: ListenOptions, exportName: string): Promise<number> {
  const env: NodeJS.ProcessEnv = { ...process.env, exportname: exportName };
  const uri = server.uri;
  if (uri) env.uri = uri;
  if (listen.path !== undefined) env.unixsocket = listen.path;
  if (server.port !== undefined) env.port = String(server.port);
  if (server.tls) env.tls = server.tls.mode;
  const child = nodeChildProcess().spawn('sh', ['-c', cmd], { stdio: 'inherit', env });
  const forward = (sig: NodeJS.Signals) => () => child.kill(sig);
  const onTerm = forward('SIGTERM');
  const onInt = forward('SIGINT');
  process.on('SIGTERM', onTerm);
  process.on('SIGINT', onInt);
  return new Promise((resolve, reject) => {
    child.once('error', (err) => reject(new NbdStreamError('ERR_USAGE', `--run: cannot run sh: ${err.message}`, { cause: err })));
    child.once('exit', (code, signal) => {
      process.off('SIGTERM', onTerm);
      process.off('SIGINT', onInt);
      resolve(code ?? 128 + (signal ? os.constants.signals[signal] ?? 0 : 0));
    });
  });
}
