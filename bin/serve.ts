/**
 * `nbdstream serve`: export a file, a block device or an in-memory image over NBD (lib/nbd/server.ts).
 * Listens on a Unix socket (--socket), TCP (--port/--bind, default port 10809), vsock (--vsock
 * [--port]), or the socket inherited by socket activation (LISTEN_FDS=1, LISTEN_PID = our pid:
 * fd 3), so that
 * `nbdstream -- [ nbdstream serve disk.img ] out.img` works. With --run CMD it runs CMD via sh
 * with $uri (and $unixsocket / $port, $exportname) set, like nbdkit --run, and exits with its
 * status; otherwise it serves until SIGTERM or SIGINT. Under socket activation (and with
 * --exit-with-parent) the parent's exit is a SIGTERM too (prctl PR_SET_PDEATHSIG, as nbdkit).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tty from 'node:tty';
import yargs from 'yargs';
import { NbdStreamError } from '../lib/errors.js';
import { parseSize } from '../lib/size.js';
import { cliMessage } from './messages.js';
import { nodeChildProcess } from '../lib/builtins.js';
import { DEFAULT_HANDSHAKE_LIMIT_MS, MAX_TIMER_MS, NbdServer, type ListenOptions, type ServerTlsOptions } from '../lib/nbd/server.js';
import { openServedEndpoint } from '../lib/nbd/server-export.js';
import { NBD_DEFAULT_PORT } from '../lib/nbd/protocol.js';
import { setParentDeathSignal } from '../lib/native.js';
import type { Endpoint } from '../lib/endpoints/endpoint.js';
import { writeAll } from './output.js';
import { formatHelp, helpWidth, optionNames, unknownOptions, wantsHelp, type HelpText } from './usage.js';

class UsageError extends Error {}

function usage(message: string): never {
  throw new UsageError(message);
}


/**
 * Print a line on stderr with a plain write(2). `serve` shares its stdout and stderr with other
 * writers (`( nbdstream serve … & nbdcopy … - ) | …`), and using process.stdout or
 * process.stderr on a pipe makes Node set O_NONBLOCK on it, so that the other writers fail with
 * EAGAIN: serve leaves both alone (--help, printed by yargs, is the exception).
 */
function printErr(line: string): void {
  writeAll(2, `nbdstream serve: ${line}\n`);
}

export async function run(args: string[]): Promise<number> {
  try {
    return await serve(args);
  } catch (err) {
    printErr(cliMessage(err));
    return 1;
  }
}

/** The options (yargs' .options() map; `value` is how --help shows the value). */
const OPTIONS = {
  socket: { alias: 'U', type: 'string', describe: 'Listen on this Unix socket ("-": a private temporary one)' },
  port: { alias: 'p', type: 'string', value: 'number', describe: `Listen on this TCP port (default ${NBD_DEFAULT_PORT}; 0: any free port)` },
  vsock: { type: 'boolean', describe: `Listen on vsock (AF_VSOCK, any CID of this machine) --port (default ${NBD_DEFAULT_PORT}): nbd+vsock://CID:PORT/` },
  bind: { alias: 'i', type: 'string', describe: 'TCP address to listen on (default: all)' },
  export: { alias: 'e', type: 'string', describe: 'Export name (default ""; the default export "" always reaches it too)' },
  description: { type: 'string', describe: 'Export description (NBD_INFO_DESCRIPTION, NBD_OPT_LIST)' },
  'read-only': { alias: 'r', type: 'boolean', describe: 'Export read-only (writes fail with EPERM)' },
  size: { type: 'string', value: 'size', describe: 'Size of a memory: image, e.g. 1G' },
  tls: { type: 'string', choices: ['off', 'on', 'require'], describe: 'off, on or require: offer TLS (on) or insist on it (require); default on when credentials are given' },
  'tls-psk': { type: 'string', describe: 'psktool key file (user:hexkey lines)' },
  'tls-certificates': { type: 'string', describe: 'Directory with server-cert.pem, server-key.pem, ca-cert.pem' },
  'tls-verify-peer': { type: 'boolean', describe: 'Require a client certificate signed by ca-cert.pem' },
  'handshake-limit': { type: 'string', value: 'number', describe: `Disconnect clients that have not finished the handshake after SECONDS (default ${DEFAULT_HANDSHAKE_LIMIT_MS / 1000}; 0: no limit)` },
  'exit-with-parent': { type: 'boolean', describe: 'Exit when the parent process exits (always under socket activation)' },
  run: { type: 'string', describe: 'Run this shell command with $uri set, then exit with its status' },
  verbose: { alias: 'v', type: 'boolean', describe: 'Log connections and client errors to stderr' },
} as const;

const HELP: HelpText = {
  usage: ['nbdstream serve [options] FILE|DEVICE|memory:'],
  description:
    'Export a file, a block device or an in-memory image (memory: with --size) over NBD. ' +
    'Listens on --socket PATH, or TCP --port (default 10809) on --bind ADDR; under socket activation (LISTEN_FDS) on the inherited socket. ' +
    'Serves until SIGTERM/SIGINT, or runs --run CMD with $uri set and exits with its status.',
  options: { ...OPTIONS, help: { type: 'boolean', describe: 'Show this help' } },
};

async function serve(args: string[]): Promise<number> {
  if (wantsHelp(args)) {
    process.stdout.write(formatHelp(HELP, helpWidth()));
    return 0;
  }
  const argv = await yargs(args)
    .scriptName('nbdstream serve')
    .parserConfiguration({ 'camel-case-expansion': false, 'boolean-negation': false })
    .options(OPTIONS)
    .help(false)
    .version(false)
    .strictOptions()
    .fail((msg, err) => {
      if (err) throw err;
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      if (unknown) usage(unknownOptions(unknown[1], args, optionNames(OPTIONS)));
      usage(msg.replace(/\s*\n\s*/g, ' '));
    })
    .parseAsync();

  const positional = (argv._ as Array<string | number>).map(String);
  if (positional.length !== 1) usage(`expected one FILE, DEVICE or memory: to serve, got ${positional.length} (see --help)`);
  const spec = positional[0];
  const readOnly = argv['read-only'] ?? false;
  const size = argv.size !== undefined ? parseSize(String(argv.size), '--size') : undefined;
  const exportName = argv.export ?? '';
  const verbose = argv.verbose ?? false;
  let handshakeLimitMs: number | undefined;
  if (argv['handshake-limit'] !== undefined) {
    const v = argv['handshake-limit'];
    if (!/^\d+(\.\d+)?$/.test(v)) usage(`--handshake-limit: expected a number of seconds, not "${v}"`);
    handshakeLimitMs = Math.round(Number(v) * 1000);
    if (handshakeLimitMs > MAX_TIMER_MS) usage(`--handshake-limit: ${v} is too long (at most ${Math.floor(MAX_TIMER_MS / 1000)} seconds)`);
  }

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
  const parent = launcherParent();
  for (const k of ['LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES', 'NBDSTREAM_PARENT']) delete process.env[k];
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

  // From here on SIGTERM/SIGINT end serving cleanly, also while starting (then right after).
  let stopping = false;
  const signalled = untilSignal().then((status) => ((stopping = true), status));
  // As nbdkit: a socket-activated server belongs to the process that started it.
  if (activated !== undefined || argv['exit-with-parent']) setParentDeathSignal('SIGTERM', parent);

  let endpoint: Endpoint | undefined;
  let server: NbdServer | undefined;
  const cleanup = async () => {
    await server?.close(1000);
    await endpoint?.close().catch(() => undefined);
    if (tmpDir) fs.rmSync(tmpDir, { recursive: true, force: true });
  };
  try {
    endpoint = await openServedEndpoint(spec, { readOnly, size });
    server = new NbdServer([{ name: exportName, endpoint, description: argv.description, readOnly }], { tls, handshakeLimitMs });
    // The default export '' reaches a named export too (as nbdkit serves any name).
    const log = printErr;
    if (verbose) {
      server.on('connection', (id: number) => log(`client ${id} connected`));
      server.on('disconnect', (id: number) => log(`client ${id} disconnected`));
      server.on('clientError', (err: NbdStreamError, id: number) => log(`client ${id}: ${err.message}`));
    }
    await server.listen(listen);
    const uri = listen.fd === undefined ? server.uri : undefined;
    if (verbose) log(`serving ${spec} (${endpoint.size} bytes${readOnly ? ', read-only' : ''}) at ${uri ?? `fd ${listen.fd}`}`);

    const status = argv.run !== undefined && !stopping ? await runCommand(argv.run, server, listen, exportName) : await signalled;
    return status;
  } finally {
    await cleanup();
  }
}

/** Our parent's pid as the launcher bin/nbdstream saw it before Node started (NBDSTREAM_PARENT "PID PPID", if PID is us). */
function launcherParent(): number | undefined {
  const [self, parent] = (process.env.NBDSTREAM_PARENT ?? '').split(' ');
  return self === String(process.pid) && /^\d+$/.test(parent ?? '') ? Number(parent) : undefined;
}

/** Resolve with 0 on SIGTERM or SIGINT; later ones are ignored (serve is exiting). */
function untilSignal(): Promise<number> {
  return new Promise((resolve) => {
    const done = () => resolve(0);
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
