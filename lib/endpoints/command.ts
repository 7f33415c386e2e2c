/**
 * `[ CMD ARGS ]` endpoints: systemd-style socket activation of an NBD server command, as nbdcopy
 * does it. The parent listens on a Unix socket in a private temporary directory, the command gets
 * the listening socket as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to its own pid (only the
 * `exec` trick in the `sh -c` wrapper knows that pid), and the parent then closes its own copy of
 * the listening socket so that the command alone answers — and so that, if the command dies,
 * every pending connection fails instead of hanging in a backlog nobody will ever accept from.
 *
 * Keeping the socket file: closing a listening net.Server on a Unix socket makes libuv unlink the
 * path it was bound to. So the parent binds `DIR/listen`, renames it to `DIR/sock` (a Unix socket
 * is found by its inode, so the renamed path keeps reaching the same listening socket), and only
 * then closes the server: libuv's unlink of `DIR/listen` finds nothing, and `DIR/sock` stays.
 *
 * Readiness: startActivated resolves once the command has answered a probe connection with the
 * NBD greeting. The probe then ends politely with NBD_OPT_ABORT, which servers do not count as a
 * client (qemu-nbd without -t exits only after its first *negotiated* client disconnects, and
 * prints nothing for an aborted one). If the command exits first, startActivated rejects with its
 * exit status and the first line of its stderr.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import type * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdStreamError } from '../errors.js';
import { nodeChildProcess, nodeNet } from '../builtins.js';
import { IHAVEOPT, NBDMAGIC, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_OPT_ABORT } from '../nbd/protocol.js';
import { formatNbdUri } from '../nbd/uri.js';

export interface ActivatedServer {
  /** Path of the Unix socket the command listens on. */
  socket: string;
  /** `nbd+unix:///?socket=PATH`. */
  uri: string;
  pid: number;
  /**
   * When the command has exited other than through stop(), an ERR_CONNECT error saying how
   * (status or signal, first stderr line); otherwise undefined. Lets a caller whose connection
   * was closed explain why.
   */
  failure(): NbdStreamError | undefined;
  /** SIGTERM the command (SIGKILL after 3 s), wait for it to exit, remove the temp dir. Idempotent. */
  stop(): Promise<void>;
}

export interface StartActivatedOptions {
  /** Name used as the error endpoint (default `[ CMD ARGS ]`). */
  name?: string;
  /** How long to wait for the command to answer (default 60 s); then ERR_TIMEOUT. */
  timeoutMs?: number;
}

const STDERR_KEEP = 64 * 1024;
const KILL_AFTER_MS = 3000;

/** Children still running, killed synchronously if the node process exits first. */
const live = new Set<{ proc: ChildProcess; dir: string }>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const c of live) {
      try {
        c.proc.kill('SIGTERM');
      } catch {
        /* gone */
      }
      try {
        fs.rmSync(c.dir, { recursive: true, force: true });
      } catch {
        /* best effort */
      }
    }
    live.clear();
  });
}

/** Find an executable the way `exec` in sh would; returns an errno code when it cannot be run. */
function checkRunnable(cmd: string): string | undefined {
  const candidates = cmd.includes('/')
    ? [cmd]
    : (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(':').map((d) => path.join(d || '.', cmd));
  let err = 'ENOENT';
  for (const c of candidates) {
    try {
      const st = fs.statSync(c);
      if (st.isDirectory()) {
        err = 'EACCES';
        continue;
      }
      fs.accessSync(c, fs.constants.X_OK);
      return undefined;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EACCES') err = 'EACCES';
    }
  }
  return err;
}

function firstLine(s: string): string {
  return (
    s
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l !== '') ?? ''
  );
}

function exitMessage(cmd: string, code: number | null, signal: NodeJS.Signals | null, stderr: string): string {
  const how = signal ? `was killed by signal ${signal}` : `exited with status ${code}`;
  const line = firstLine(stderr);
  return `command "${cmd}" ${how}${line ? `: ${line}` : ''}`;
}

/**
 * Start `argv` with a listening Unix socket as fd 3 and wait until it speaks NBD on it.
 * Rejects with ERR_USAGE (empty argv), ERR_CONNECT (cannot run, exited, not listening) or
 * ERR_TIMEOUT.
 */
export async function startActivated(argv: string[], opts: StartActivatedOptions = {}): Promise<ActivatedServer> {
  const endpoint = opts.name ?? `[ ${argv.join(' ')} ]`;
  if (argv.length === 0 || argv[0] === '') throw new NbdStreamError('ERR_USAGE', 'empty command in [ ]', { endpoint });
  const cmd = argv[0];
  const notRunnable = checkRunnable(cmd);
  if (notRunnable) throw new NbdStreamError('ERR_CONNECT', `cannot run "${cmd}": ${notRunnable}`, { endpoint });

  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'nbdstream-'));
  const removeDir = () => fs.rmSync(dir, { recursive: true, force: true });
  const bindPath = path.join(dir, 'listen');
  const socket = path.join(dir, 'sock');

  // 1. Listen, then move the socket file to its final name (see the header comment).
  const server = nodeNet().createServer();
  server.on('connection', (c) => c.destroy()); // never expected: we close before anyone connects
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(bindPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.renameSync(bindPath, socket);
  } catch (e) {
    server.close();
    removeDir();
    throw new NbdStreamError('ERR_CONNECT', `cannot listen on ${bindPath}: ${(e as Error).message}`, { endpoint, cause: e });
  }
  const fd = (server as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) {
    server.close();
    removeDir();
    throw new NbdStreamError('ERR_CONNECT', 'cannot get the listening socket descriptor', { endpoint });
  }

  // 2. Start the command with the socket as fd 3. uv_spawn has exec'd (or failed) by the time
  // spawn() returns, so the child holds its own copy of the socket from here on.
  let proc: ChildProcess;
  try {
    proc = nodeChildProcess().spawn('sh', ['-c', 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', 'sh', ...argv], {
      stdio: ['ignore', 'ignore', 'pipe', fd],
      env: { ...process.env, LISTEN_FDNAMES: undefined },
    });
  } finally {
    // 3. Stop accepting in the parent: the child alone answers now.
    server.close();
  }

  let stderr = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => {
    if (stderr.length < STDERR_KEEP) stderr += d.slice(0, STDERR_KEEP - stderr.length);
  });
  const entry = { proc, dir };
  live.add(entry);
  installExitHook();

  let stopping = false;
  let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let spawnError: NodeJS.ErrnoException | undefined;
  const exited = new Promise<void>((resolve) => {
    proc.once('error', (e: NodeJS.ErrnoException) => {
      // Only spawn failures reach here in practice (sh missing); kill() errors are ignored.
      if (proc.pid === undefined) {
        spawnError = e;
        exitInfo = { code: null, signal: null };
        resolve();
      }
    });
    // 'close' comes after the stderr pipe is drained (so the message is complete); if something
    // the command started keeps stderr open, settle for 'exit' a little later.
    proc.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      setTimeout(resolve, 250).unref();
    });
    proc.once('close', (code, signal) => {
      exitInfo ??= { code, signal };
      resolve();
    });
  });
  void exited.then(() => live.delete(entry));

  const exitError = (): NbdStreamError => {
    if (spawnError) return new NbdStreamError('ERR_CONNECT', `cannot run "sh": ${spawnError.code ?? spawnError.message}`, { endpoint, cause: spawnError });
    const { code, signal } = exitInfo!;
    // sh reports an exec failure as 127 (not found) or 126 (not executable).
    if ((code === 127 || code === 126) && /^sh: .*(not found|Permission denied|cannot execute)/m.test(stderr))
      return new NbdStreamError('ERR_CONNECT', `cannot run "${cmd}": ${code === 127 ? 'ENOENT' : 'EACCES'}`, { endpoint });
    return new NbdStreamError('ERR_CONNECT', exitMessage(cmd, code, signal, stderr), { endpoint });
  };

  let probe: net.Socket | undefined;
  let stopPromise: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopPromise ??= (async () => {
      stopping = true;
      probe?.destroy();
      if (!exitInfo) {
        try {
          proc.kill('SIGTERM');
        } catch {
          /* already gone */
        }
        const killer = setTimeout(() => {
          try {
            proc.kill('SIGKILL');
          } catch {
            /* already gone */
          }
        }, KILL_AFTER_MS);
        await exited;
        clearTimeout(killer);
      }
      live.delete(entry);
      removeDir();
    })();
    return stopPromise;
  };

  // 4. Wait for the NBD greeting on a probe connection, the command's exit, or the timeout.
  const ready = new Promise<void>((resolve, reject) => {
    let settled = false;
    const finish = (err?: NbdStreamError) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve();
    };
    const timeoutMs = opts.timeoutMs ?? 60_000;
    const timer = setTimeout(
      () => finish(new NbdStreamError('ERR_TIMEOUT', `command "${cmd}" did not answer on its socket within ${timeoutMs / 1000} s`, { endpoint })),
      timeoutMs,
    );
    void exited.then(() => finish(exitError()));

    const s = nodeNet().connect(socket);
    probe = s;
    let got = Buffer.alloc(0);
    let answered = false;
    s.on('data', (d: Buffer) => {
      if (answered) return; // the reply to NBD_OPT_ABORT, or anything else: ignore
      got = Buffer.concat([got, d]);
      if (got.length >= 8 && got.readBigUInt64BE(0) !== NBDMAGIC) {
        // Not an NBD server; let the client report what it gets.
        answered = true;
        s.destroy();
        return finish();
      }
      if (got.length < 18) return; // NBDMAGIC, IHAVEOPT or oldstyle magic, then 2 bytes
      answered = true;
      if (got.readBigUInt64BE(8) === IHAVEOPT) {
        // Newstyle: say goodbye with NBD_OPT_ABORT so the server does not count us as a client.
        const serverFlags = got.readUInt16BE(16);
        const msg = Buffer.alloc(4 + 16);
        msg.writeUInt32BE(serverFlags & (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES), 0);
        msg.writeBigUInt64BE(IHAVEOPT, 4);
        msg.writeUInt32BE(NBD_OPT_ABORT, 12);
        msg.writeUInt32BE(0, 16);
        s.end(msg);
        // The server acknowledges and closes; do not wait forever for that.
        setTimeout(() => s.destroy(), 2000).unref();
      } else {
        s.destroy();
      }
      finish();
    });
    let failed = false;
    const fail = (why: string, cause?: unknown) => {
      if (answered || failed) return;
      failed = true;
      // Refused or reset: the command is gone (its exit is about to be reported) or it closed
      // the socket without serving. Give the exit a moment to arrive, then say so.
      setTimeout(
        () => finish(new NbdStreamError('ERR_CONNECT', `command "${cmd}" is not serving the activated socket: ${why}`, { endpoint, cause })),
        2000,
      ).unref();
    };
    s.on('error', (e: NodeJS.ErrnoException) => fail(e.code ?? e.message, e));
    s.on('close', () => {
      if (probe === s) probe = undefined;
      fail('connection closed before the NBD greeting');
    });
  });

  try {
    await ready;
  } catch (e) {
    await stop();
    throw e;
  }

  return {
    socket,
    uri: formatNbdUri({ socket, exportName: '', tls: 'off', tlsVerifyPeer: true }),
    pid: proc.pid!,
    failure: () => (exitInfo && !stopping ? exitError() : undefined),
    stop,
  };
}

/**
 * Split a CLI argv into endpoint specs: each `[ ... ]` group becomes one argv array, other words
 * stay strings. As in nbdcopy, groups do not nest: inside a group `[` is an ordinary argument and
 * the first `]` closes the group (so a command cannot take a bare `]` argument). Only the exact
 * words `[` and `]` count; `[x` or `x]` are plain words. An unclosed `[`, a `]` outside a group and
 * an empty `[ ]` are ERR_USAGE.
 */
export function splitEndpointArgs(args: string[]): Array<string | string[]> {
  const out: Array<string | string[]> = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === ']') throw new NbdStreamError('ERR_USAGE', `"]" without a matching "[" (argument ${i + 1})`);
    if (a !== '[') {
      out.push(a);
      continue;
    }
    const end = args.indexOf(']', i + 1);
    if (end < 0) throw new NbdStreamError('ERR_USAGE', `"[" at argument ${i + 1} has no matching "]"`);
    if (end === i + 1) throw new NbdStreamError('ERR_USAGE', `empty "[ ]" at argument ${i + 1}: expected [ CMD ARGS ]`);
    out.push(args.slice(i + 1, end));
    i = end;
  }
  return out;
}
