/**
 * nbdstream command line: nbdcopy's syntax and options. Parses, validates, calls copy(), prints
 * progress, -v details and errors (one line, exit 1).
 */
import * as fs from 'node:fs';
import yargs from 'yargs';
import { copy, checkRequestSize, copyThreads, type CopySummary } from '../lib/copy.js';
import { NbdStreamError } from '../lib/errors.js';
import { splitEndpointArgs } from '../lib/endpoints/command.js';
import type { EndpointSpec } from '../lib/endpoints/open.js';
import type { Endpoint } from '../lib/endpoints/endpoint.js';
import { nativeLoadError } from '../lib/native.js';
import { packageVersion } from '../lib/package-info.js';
import { parseBlkhash, type BlkhashSpec } from '../lib/blkhash.js';
import { formatBar, progressPercent, throttle, type CopyProgress } from '../lib/progress.js';
import { describeSpec } from '../lib/endpoints/open.js';
import { deferExtraCaCerts } from '../lib/nbd/tls.js';
import { writeAll } from './output.js';
import { formatHelp, helpWidth, optionNames, terminalWidth, unknownOptions, wantsHelp, type HelpText } from './usage.js';
import { parseSize as parseSizeText } from '../lib/size.js';
import { cliMessage } from './messages.js';

const pkg = { version: packageVersion() };

function fail(message: string): never {
  process.stderr.write(`nbdstream: ${message}\n`);
  process.exit(1);
}

/**
 * The reader of a pipe target has gone (`nbdstream SRC - | head`): end as cat and nbdcopy do in a
 * pipeline, silently, killed by SIGPIPE (status 141 in the shell). Node ignores SIGPIPE; a listener
 * added and removed puts the default action back. Called after copy() has closed the endpoints.
 */
function dieOfSigpipe(): never {
  const noop = () => undefined;
  process.on('SIGPIPE', noop);
  process.off('SIGPIPE', noop);
  process.kill(process.pid, 'SIGPIPE');
  // the signal is delivered before kill() returns; if it was somehow blocked, fail as before
  return fail('write failed: EPIPE');
}

/** A size option (lib/size.ts: "65536", "64K", "64MiB" ...). */
function parseSize(name: string, v: unknown): number {
  try {
    return parseSizeText(String(v), `--${name}`);
  } catch (err) {
    fail((err as Error).message);
  }
}

function parseSeconds(v: unknown): number {
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(String(v)) || n <= 0) fail(`--timeout: expected a number of seconds > 0, not "${String(v)}"`);
  return n;
}

function parseCount(name: string, v: unknown, min: number): number {
  const n = Number(v);
  if (!/^\d+$/.test(String(v)) || n < min) fail(`--${name}: expected an integer ≥ ${min}, not "${String(v)}"`);
  return n;
}

/** "-", or a path to a FIFO, character device or socket: what opens as a pipe. */
function isPipe(spec: EndpointSpec): boolean {
  if (spec === '-') return true;
  if (typeof spec !== 'string' || spec === 'null:' || /^[a-z][a-z0-9+.-]*:/i.test(spec)) return false;
  try {
    const st = fs.statSync(spec);
    return st.isFIFO() || st.isCharacterDevice() || st.isSocket();
  } catch {
    return false;
  }
}

function capabilityLine(ep: Endpoint): string {
  const c = ep.capabilities;
  const flags = Object.entries(c)
    .filter(([, v]) => typeof v === 'boolean')
    .map(([k, v]) => `${k}=${v ? 1 : 0}`)
    .join(' ');
  return `${ep.name}: size=${ep.exactSize ?? ep.size ?? 'unknown'} ${flags} preferredBlockSize=${c.preferredBlockSize} maxRequest=${c.maxRequest}`;
}

/** The options (yargs' .options() map; `value` is how --help shows the value: [size] takes K/M/G). */
const OPTIONS = {
  blkhash: { type: 'string', describe: 'Print the block hash of the source on stdout: --blkhash[=ALG[/BLOCKSIZE]], ALG md5, sha1, sha256 or sha512 (default sha256/64k)' },
  'blkhash-file': { type: 'string', describe: 'Write the block hash to FILE instead of stdout (implies --blkhash)' },
  allocated: { type: 'boolean', describe: 'Fully allocate the destination (zero with NO_HOLE, no -S detection)' },
  connections: { alias: 'C', type: 'string', value: 'number', describe: 'NBD connections when multi-conn is allowed (default 4, at most --threads)' },
  'destination-is-zero': { alias: 'target-is-zero', type: 'boolean', describe: 'Destination already reads as zeroes: send no zero requests' },
  flush: { type: 'boolean', describe: 'Flush the destination at the end' },
  format: { type: 'string', describe: 'Read a file source as this disk image format through qemu-nbd: qcow2, vmdk, vhdx, vdi, vpc, qed, ... or auto (detect)' },
  'target-format': { type: 'string', describe: 'Write a file destination as this image format (e.g. qcow2): created by qemu-img, written through qemu-nbd' },
  'no-extents': { type: 'boolean', describe: 'Ignore extent information and read everything' },
  'pipe-format': { type: 'string', describe: 'raw or extents (holes as records, docs/extent-stream.md): the format of a "-" or FIFO destination (default raw; the source then detects its own), else forces a pipe source\'s (default: detected)' },
  'dirty-bitmap': { type: 'string', describe: 'Copy only the ranges dirty in the NBD source\'s qemu:dirty-bitmap:NAME; leave the rest of the destination as it is' },
  progress: { type: 'string', describe: 'Progress bar on stderr (-p), "N/100" lines to FD (--progress=FD), or JSON lines on stderr or FD (--progress=json[:FD])' },
  'queue-size': { type: 'string', value: 'size', describe: 'Bytes of read buffers held, from the read until written (default 16M)' },
  'request-size': { type: 'string', value: 'size', describe: 'Request size, a power of two 4K-32M (default 256K)' },
  resume: { type: 'string', describe: 'Record the ranges copied in STATEFILE; rerun with it after an interruption to copy only the rest (removed when the copy succeeds)' },
  requests: { alias: 'R', type: 'string', value: 'number', describe: 'Requests in flight per connection (default 64)' },
  sparse: { alias: 'S', type: 'string', value: 'size', describe: 'Detect zero blocks of this size (default 4096, 0 = off)' },
  summary: { type: 'string', describe: 'Print the final summary as a JSON object on stdout (--summary=json)' },
  synchronous: { type: 'boolean', describe: 'One request at a time (for debugging)' },
  timeout: { type: 'string', value: 'number', describe: 'Seconds an NBD request may wait for its reply (default: no limit)' },
  retries: { type: 'string', value: 'number', describe: 'Reconnect and resend up to N times after a lost NBD connection or a server shutting down, waiting 0.25, 0.5, 1, then 2 s each: rides out a server away for 1.75 s (N=3), 5.75 s (N=5), 2N-4.25 s (N>=3) (default 0)' },
  threads: { alias: 'T', type: 'string', value: 'number', describe: 'As nbdcopy: caps the connections (default 0: the number of processor cores)' },
  verbose: { alias: 'v', type: 'boolean', describe: 'Print endpoints, capabilities and sizes to stderr' },
  verify: { type: 'boolean', describe: 'After the copy, re-read the destination and check it against the block hash of the source' },
} as const;

const HELP: HelpText = {
  usage: ['nbdstream [options] SOURCE DESTINATION', 'nbdstream serve [options] FILE|DEVICE|memory:', 'nbdstream compare [options] A B'],
  description:
    'Copy a disk image between NBD servers, files, block devices and pipes, reading only data and turning holes and zeroes into cheap zero requests. ' +
    'SOURCE and DESTINATION are an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://), a file or device, "-" for stdin/stdout, ' +
    '"null:" (destination only) or "[\u00a0CMD\u00a0ARGS\u00a0]" to run an NBD server by socket activation.',
  commands: [
    ['serve', 'Export a file, device or memory image over NBD (serve\u00a0--help)'],
    ['compare', 'Compare two images, as qemu-img compare (compare\u00a0--help)'],
  ],
  options: {
    ...OPTIONS,
    progress: { ...OPTIONS.progress, alias: 'p' }, // "-p" is rewritten to "--progress=" before yargs parses
    version: { alias: 'V', type: 'boolean', describe: 'Show version number' },
    help: { type: 'boolean', describe: 'Show this help' },
  },
  examples: [
    ['nbdstream nbd://server/disk disk.img', 'Copy an NBD export to a sparse file'],
    ['nbdstream disk.img nbd+unix:///?socket=/tmp/sock', 'Copy a file to an NBD server over a Unix socket'],
    ['nbdstream -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw', 'Convert qcow2 to raw via qemu-nbd, with a progress bar'],
    ['nbdstream --target-is-zero disk.img nbd://host/fresh', 'Skip zeroing a new target'],
    ['nbdstream --blkhash --verify disk.img nbd://host/export', 'Copy, print the source block hash, check the copy'],
    ['nbdstream --pipe-format=extents nbd://a/disk - | ssh b nbdstream - disk.img', 'Send only the data from host a to host b, through ssh'],
    ['nbdstream --dirty-bitmap=b0 nbd://host/disk backup.raw', 'Incremental backup: copy what changed since bitmap b0'],
    ['nbdstream compare a.img nbd://host/export', 'Compare two images'],
  ],
};

async function main(): Promise<void> {
  // "[ CMD ARGS ]" groups are lifted out before option parsing; "-p"/"--progress" take no value
  // unless written as "--progress=FD".
  let groups: Array<string | string[]>;
  try {
    groups = splitEndpointArgs(process.argv.slice(2));
  } catch (err) {
    fail((err as Error).message);
  }
  const commands: string[][] = [];
  const flat = groups.map((g) => {
    if (Array.isArray(g)) {
      commands.push(g);
      return `\u0000cmd${commands.length - 1}`;
    }
    // likewise "--blkhash" takes a value only as "--blkhash=ALG[/SIZE]"
    return g === '-p' || g === '--progress' ? '--progress=' : g === '--blkhash' ? '--blkhash=' : g;
  });

  // ("[ CMD ARGS ]" groups are lifted out already: a --help inside one is the command's)
  if (wantsHelp(flat)) {
    process.stdout.write(formatHelp(HELP, helpWidth()));
    return;
  }
  // --version before yargs, whose own makes Node create stdout and stderr streams (on a pipe
  // that loads node:net and node:stream: several milliseconds of a script's every call)
  const beforeEnd = flat.indexOf('--') < 0 ? flat : flat.slice(0, flat.indexOf('--'));
  if (beforeEnd.includes('--version') || beforeEnd.includes('-V')) {
    writeAll(1, `nbdstream ${pkg.version}\n`);
    return;
  }
  const argv = await yargs(flat)
    .scriptName('nbdstream')
    .parserConfiguration({ 'populate--': false, 'short-option-groups': true, 'camel-case-expansion': true, 'boolean-negation': false })
    .options(OPTIONS)
    .version(`nbdstream ${pkg.version}`)
    .alias('version', 'V')
    .help(false)
    .strictOptions()
    .fail((msg, err) => {
      if (err) fail(err.message);
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      fail(unknown ? unknownOptions(unknown[1], flat, optionNames(OPTIONS, ['help', 'version'])) : msg.replace(/\n.*/s, ''));
    })
    .parseAsync();

  const positional = (argv._ as Array<string | number>).map(String);
  if (positional.length !== 2) fail(`expected SOURCE and DESTINATION, got ${positional.length} argument${positional.length === 1 ? '' : 's'} (see --help)`);
  const spec = (s: string): EndpointSpec => (s.startsWith('\u0000cmd') ? commands[Number(s.slice(4))] : s);
  const [src, dst] = positional.map(spec);

  const requestSize = argv['request-size'] !== undefined ? parseSize('request-size', argv['request-size']) : undefined;
  try {
    if (requestSize !== undefined) checkRequestSize(requestSize);
  } catch (err) {
    fail(cliMessage(err));
  }
  const verbose = argv.verbose ?? false;
  const progress = argv.progress;
  // progress: "" bar on stderr, "FD" N/100 lines, "json" / "json:FD" JSON lines (stderr by default)
  let progressFd: number | undefined;
  let progressJson = false;
  if (progress === 'json' || progress?.startsWith('json:')) {
    progressJson = true;
    const fd = progress === 'json' ? '2' : progress.slice(5);
    if (!/^\d+$/.test(fd)) fail(`--progress=json:FD: expected a file descriptor number, not "${fd}"`);
    progressFd = Number(fd);
  } else if (progress !== undefined && progress !== '') {
    if (!/^\d+$/.test(progress)) fail(`--progress: expected a file descriptor number, not "${progress}"`);
    progressFd = Number(progress);
  }
  const summaryJson = argv.summary !== undefined;
  if (summaryJson && argv.summary !== 'json') fail(`--summary: expected "json", not "${argv.summary}"`);
  const blkhashFile = argv['blkhash-file'];
  if (blkhashFile === '') fail('--blkhash-file: expected a file name');
  let blkhash: BlkhashSpec | undefined;
  if (argv.blkhash !== undefined || blkhashFile !== undefined) {
    try {
      blkhash = parseBlkhash(argv.blkhash ?? '');
    } catch (err) {
      fail(cliMessage(err));
    }
  }
  const verify = argv.verify ?? false;
  const pipeFormat = argv['pipe-format'];
  if (pipeFormat !== undefined && pipeFormat !== 'raw' && pipeFormat !== 'extents') fail(`--pipe-format: expected raw or extents, not "${pipeFormat}"`);
  const dirtyBitmap = argv['dirty-bitmap'];
  if (dirtyBitmap !== undefined) {
    if (dirtyBitmap === '') fail('--dirty-bitmap: expected a bitmap name');
    if (argv['no-extents']) fail('--dirty-bitmap needs extent information: drop --no-extents');
    if (blkhash || verify) fail('--dirty-bitmap copies part of the image: --blkhash and --verify need all of it');
  }
  if (argv.resume === '') fail('--resume: expected a state file name');
  if (dst === '-') {
    // stdout carries the image: nothing else may be printed there
    if (blkhash && blkhashFile === undefined) fail('--blkhash: the destination is stdout; write the digest with --blkhash-file=FILE');
    if (summaryJson) fail('--summary=json: the destination is stdout');
  }
  const options = {
    requestSize,
    requests: argv.requests !== undefined ? parseCount('requests', argv.requests, 1) : undefined,
    connections: argv.connections !== undefined ? parseCount('connections', argv.connections, 1) : undefined,
    threads: argv.threads !== undefined ? parseCount('threads', argv.threads, 0) : undefined,
    queueSize: argv['queue-size'] !== undefined ? parseSize('queue-size', argv['queue-size']) : undefined,
    sparse: argv.sparse !== undefined ? parseSize('sparse', argv.sparse) : undefined,
    allocated: argv.allocated,
    destinationIsZero: argv['destination-is-zero'],
    noExtents: argv['no-extents'],
    flush: argv.flush,
    synchronous: argv.synchronous,
    timeout: argv.timeout !== undefined ? parseSeconds(argv.timeout) : undefined,
    retries: argv.retries !== undefined ? parseCount('retries', argv.retries, 0) : undefined,
    blkhash,
    verify,
    // --pipe-format is the output's format when the destination is a pipe, else the input's
    ...(isPipe(dst) ? { pipeFormat: pipeFormat as 'raw' | 'extents' | undefined } : { sourcePipeFormat: pipeFormat as 'raw' | 'extents' | undefined }),
    dirtyBitmap,
    format: argv.format,
    targetFormat: argv['target-format'],
    resume: argv.resume,
  };
  if (options.format === '' || options.targetFormat === '') fail(`--${options.format === '' ? 'format' : 'target-format'}: expected a format name such as qcow2`);
  if (options.sparse !== undefined && options.sparse !== 0 && (options.sparse < 512 || !Number.isInteger(Math.log2(options.sparse))))
    fail(`--sparse: expected 0 or a power of two ≥ 512, not ${options.sparse}`);

  let lastPercent = -1;
  let lastDraw = 0;
  let lastProgress: CopyProgress | undefined;
  // on a terminal the bar also shows rate and ETA, redrawn a few times a second; it stays one
  // column short of the terminal's width (a full line would wrap on some terminals)
  const tty = progress === '' && process.stderr.isTTY === true;
  const report = (percent: number) => {
    const now = Date.now();
    if (percent === lastPercent && !(tty && now - lastDraw >= 200)) return;
    lastPercent = percent;
    lastDraw = now;
    if (progressFd !== undefined) fs.writeSync(progressFd, `${percent}/100\n`);
    else if (progress !== undefined) process.stderr.write(`\r${formatBar(percent, lastProgress, tty, terminalWidth(process.stderr) - 1)}${tty ? '\x1b[K' : ''}`);
  };
  const jsonLines = progressJson ? throttle<CopyProgress>((p) => fs.writeSync(progressFd!, JSON.stringify(p) + '\n'), 250) : undefined;
  const onProgress = (p: CopyProgress) => {
    if (jsonLines) return p.phase === 'done' ? jsonLines.final(p) : jsonLines.push(p);
    lastProgress = p;
    report(progressPercent(p));
  };

  let summary: CopySummary;
  try {
    summary = await copy(src, dst, {
      ...options,
      onProgress: progress !== undefined ? (_done, _total, p) => onProgress(p) : undefined,
      onOpen: (s, d, sizes) => {
        if (s.imageFormat && options.format === undefined)
          process.stderr.write(`nbdstream: warning: ${s.name} is a ${s.imageFormat} image, copied as raw bytes (use --format=auto to copy the disk inside)\n`);
        if (verbose) {
          process.stderr.write(`nbdstream: source ${capabilityLine(s)}\n`);
          process.stderr.write(`nbdstream: destination ${capabilityLine(d)}\n`);
          if (nativeLoadError) process.stderr.write(`nbdstream: native addon unavailable (${nativeLoadError}): files use dense extents and zero by writing zeroes\n`);
          process.stderr.write(
            `nbdstream: request-size=${sizes.requestSize} requests=${options.synchronous ? 1 : options.requests ?? 64} connections=${options.synchronous ? 1 : Math.min(options.connections ?? 4, copyThreads(options.threads))} threads=${copyThreads(options.threads)} queue-size=${sizes.queueSize} sparse=${sizes.sparse}${options.noExtents ? ' no-extents' : ''}${options.allocated ? ' allocated' : ''}${options.destinationIsZero ? ' destination-is-zero' : ''}\n`,
          );
        }
      },
    });
  } catch (err) {
    jsonLines?.cancel();
    if (progress === '' && lastPercent >= 0) process.stderr.write('\n');
    const e = err instanceof NbdStreamError ? err : new NbdStreamError('ERR_IO', (err as Error)?.message ?? String(err));
    if (e.code === 'ERR_BROKEN_PIPE') dieOfSigpipe();
    fail(cliMessage(e));
  }
  if (!progressJson) report(100);
  if (progress === '') process.stderr.write('\n');
  if (verbose) {
    const s = summary;
    process.stderr.write(
      `nbdstream: copied ${s.size} bytes in ${s.elapsed.toFixed(3)} s: read ${s.bytesRead}, written ${s.bytesWritten}, zeroed ${s.bytesZeroed}, skipped ${s.bytesSkipped}; requests read=${s.requests.read} write=${s.requests.write} zero=${s.requests.zero} extents=${s.requests.extents}${s.extentErrors ? `; ${s.extentErrors} extent queries failed (copied as data)` : ''}${s.bytesResumed !== undefined ? `; resumed: skipped ${s.bytesResumed} bytes copied before` : ''}${s.blkhash ? `; blkhash ${s.blkhash.algorithm}/${s.blkhash.blockSize} ${s.blkhash.digest}` : ''}${s.verified ? '; verified' : ''}\n`,
    );
  }
  if (blkhash && summary.blkhash) {
    const line = `${summary.blkhash.digest}\n`;
    if (blkhashFile === undefined) process.stdout.write(line);
    else {
      try {
        fs.writeFileSync(blkhashFile, line);
      } catch (err) {
        fail(`${blkhashFile}: cannot write the block hash: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
    }
  }
  if (summaryJson) process.stdout.write(JSON.stringify(summaryObject(summary, describeSpec(src), describeSpec(dst))) + '\n');
}

/** The --summary=json object. */
function summaryObject(s: CopySummary, source: string, destination: string): Record<string, unknown> {
  return {
    source,
    destination,
    size: s.size,
    bytes_read: s.bytesRead,
    bytes_written: s.bytesWritten,
    bytes_zeroed: s.bytesZeroed,
    bytes_skipped: s.bytesSkipped,
    ...(s.bytesResumed !== undefined && { bytes_resumed: s.bytesResumed }),
    requests: { ...s.requests },
    extent_errors: s.extentErrors,
    elapsed_s: Math.round(s.elapsed * 1000) / 1000,
    rate: s.elapsed > 0 ? Math.round(s.size / s.elapsed) : 0,
    ...(s.blkhash && { blkhash: { algorithm: s.blkhash.algorithm, block_size: s.blkhash.blockSize, digest: s.blkhash.digest } }),
    ...(s.verified !== undefined && { verified: s.verified }),
  };
}

/**
 * Subcommands live in their own files (bin/<name>.ts exporting `run(args): Promise<number>`,
 * which resolves with the exit status); anything else is a copy.
 */
const SUBCOMMANDS: Record<string, () => Promise<{ run(args: string[]): Promise<number> }>> = {
  compare: () => import('./compare.js'),
  serve: () => import('./serve.js'),
};

deferExtraCaCerts();
const sub = SUBCOMMANDS[process.argv[2]];
(sub ? sub().then((m) => m.run(process.argv.slice(3))) : main().then(() => 0)).then(
  (status) => process.exit(status),
  (err) => fail(cliMessage(err)),
);
