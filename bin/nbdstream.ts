/**
 * nbdstream command line: nbdcopy's syntax and options. Parses, validates, calls copy(), prints
 * progress, -v details and errors (one line, exit 1).
 */
import * as fs from 'node:fs';
import yargs from 'yargs';
import { copy, checkRequestSize, type CopySummary } from '../lib/copy.js';
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

const pkg = { version: packageVersion() };

function fail(message: string): never {
  process.stderr.write(`nbdstream: ${message}\n`);
  process.exit(1);
}

/** "64K", "1M", "2G" or plain bytes. */
function parseSize(name: string, v: unknown): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(String(v));
  if (!m) fail(`--${name}: expected a size like 262144, 256K or 1M, not "${String(v)}"`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[m[2].toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * mult;
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

/** yargs' "Unknown arguments: frob-nicate, frobNicate, x" as the user spelled them: "unknown option: --frob-nicate, -x". */
function unknownOptions(list: string, args: string[]): string {
  const end = args.indexOf('--');
  const opts = end < 0 ? args : args.slice(0, end);
  const spelled = new Set<string>();
  for (const n of list.split(', ')) {
    if (n.length === 1) spelled.add(`-${n}`);
    // camel-case aliases yargs adds (frobNicate for --frob-nicate) match nothing and are dropped
    else if (opts.some((a) => a === `--${n}` || a.startsWith(`--${n}=`))) spelled.add(`--${n}`);
  }
  if (!spelled.size) spelled.add(list);
  return `unknown option${spelled.size > 1 ? 's' : ''}: ${[...spelled].join(', ')}`;
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

  const argv = await yargs(flat)
    .scriptName('nbdstream')
    .usage(
      'Usage: nbdstream [options] SOURCE DESTINATION\n\n' +
        'Copy a disk image between NBD servers, files, block devices and pipes, reading only data\n' +
        'and turning holes and zeroes into cheap zero requests. SOURCE and DESTINATION are an NBD URI\n' +
        '(nbd://, nbds://, nbd+unix://, nbds+unix://), a file or device, "-" for stdin/stdout,\n' +
        '"null:" (destination only) or "[ CMD ARGS ]" to run an NBD server by socket activation.',
    )
    .parserConfiguration({ 'populate--': false, 'short-option-groups': true, 'camel-case-expansion': true, 'boolean-negation': false })
    .option('blkhash', { type: 'string', describe: 'Print the block hash of the source on stdout: --blkhash[=ALG[/BLOCKSIZE]], ALG md5, sha1, sha256 or sha512 (default sha256/64k)' })
    .option('blkhash-file', { type: 'string', describe: 'Write the block hash to FILE instead of stdout (implies --blkhash)' })
    .option('allocated', { type: 'boolean', describe: 'Fully allocate the destination (zero with NO_HOLE, no -S detection)' })
    .option('connections', { alias: 'C', type: 'string', describe: 'NBD connections when multi-conn is allowed (default 4)' })
    .option('destination-is-zero', { alias: 'target-is-zero', type: 'boolean', describe: 'Destination already reads as zeroes: send no zero requests' })
    .option('flush', { type: 'boolean', describe: 'Flush the destination at the end' })
    .option('no-extents', { type: 'boolean', describe: 'Ignore extent information and read everything' })
    .option('pipe-format', { type: 'string', describe: 'raw or extents (holes as records, docs/extent-stream.md): the format of a "-" or FIFO destination (default raw; the source then detects its own), else forces a pipe source\'s (default: detected)' })
    .option('dirty-bitmap', { type: 'string', describe: 'Copy only the ranges dirty in the NBD source\'s qemu:dirty-bitmap:NAME; leave the rest of the destination as it is' })
    .option('progress', { type: 'string', describe: 'Progress bar on stderr (-p), "N/100" lines to FD (--progress=FD), or JSON lines on stderr or FD (--progress=json[:FD])' })
    .option('queue-size', { type: 'string', describe: 'Bytes of read buffers held, from the read until written (default 32M)' })
    .option('request-size', { type: 'string', describe: 'Request size, a power of two 4K-32M (default 256K)' })
    .option('requests', { alias: 'R', type: 'string', describe: 'Requests in flight per connection (default 64)' })
    .option('sparse', { alias: 'S', type: 'string', describe: 'Detect zero blocks of this size (default 4096, 0 = off)' })
    .option('summary', { type: 'string', describe: 'Print the final summary as a JSON object on stdout (--summary=json)' })
    .option('synchronous', { type: 'boolean', describe: 'One request at a time (for debugging)' })
    .option('timeout', { type: 'string', describe: 'Seconds an NBD request may wait for its reply (default: no limit)' })
    .option('retries', { type: 'string', describe: 'Reconnect and resend up to N times after a lost NBD connection (default 0)' })
    .option('threads', { alias: 'T', type: 'string', describe: 'Accepted for nbdcopy compatibility (Node copies on one thread)' })
    .option('verbose', { alias: 'v', type: 'boolean', describe: 'Print endpoints, capabilities and sizes to stderr' })
    .option('verify', { type: 'boolean', describe: 'After the copy, re-read the destination and check it against the block hash of the source' })
    .version(`nbdstream ${pkg.version}`)
    .alias('version', 'V')
    .help('help')
    .example('nbdstream nbd://server/disk disk.img', 'copy an NBD export to a sparse file')
    .example('nbdstream disk.img nbd+unix:///?socket=/tmp/sock', 'copy a file to an NBD server over a Unix socket')
    .example('nbdstream -p -- [ qemu-nbd -f qcow2 disk.qcow2 ] out.raw', 'convert qcow2 to raw via qemu-nbd')
    .example('nbdstream --target-is-zero disk.img nbd://host/fresh', 'skip zeroing a new target')
    .example('nbdstream --blkhash --verify disk.img nbd://host/export', 'copy, print the source block hash, check the copy')
    .example('nbdstream nbd://host/disk - --pipe-format=extents | ssh far nbdstream - disk.img', 'send only the data through a pipe')
    .example('nbdstream --dirty-bitmap=b0 nbd://host/disk backup.raw', 'incremental backup: copy what changed since bitmap b0')
    .example('nbdstream compare a.img nbd://host/export', 'compare two images (see nbdstream compare --help)')
    .strictOptions()
    .wrap(Math.min(100, process.stdout.columns || 100))
    .fail((msg, err) => {
      if (err) fail(err.message);
      const unknown = /^Unknown arguments?: (.*)/.exec(msg);
      fail(unknown ? unknownOptions(unknown[1], flat) : msg.replace(/\n.*/s, ''));
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
    fail((err as Error).message);
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
      fail((err as Error).message);
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
  if (dst === '-') {
    // stdout carries the image: nothing else may be printed there
    if (blkhash && blkhashFile === undefined) fail('--blkhash: the destination is stdout; write the digest with --blkhash-file=FILE');
    if (summaryJson) fail('--summary=json: the destination is stdout');
  }
  const options = {
    requestSize,
    requests: argv.requests !== undefined ? parseCount('requests', argv.requests, 1) : undefined,
    connections: argv.connections !== undefined ? parseCount('connections', argv.connections, 1) : undefined,
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
  };
  if (argv.threads !== undefined) parseCount('threads', argv.threads, 0);
  if (options.sparse !== undefined && options.sparse !== 0 && (options.sparse < 512 || (options.sparse & (options.sparse - 1)) !== 0))
    fail(`--sparse: expected 0 or a power of two ≥ 512, not ${options.sparse}`);

  let lastPercent = -1;
  let lastDraw = 0;
  let lastProgress: CopyProgress | undefined;
  // on a terminal the bar also shows rate and ETA, redrawn a few times a second
  const tty = progress === '' && process.stderr.isTTY === true;
  const report = (percent: number) => {
    const now = Date.now();
    if (percent === lastPercent && !(tty && now - lastDraw >= 200)) return;
    lastPercent = percent;
    lastDraw = now;
    if (progressFd !== undefined) fs.writeSync(progressFd, `${percent}/100\n`);
    else if (progress !== undefined) process.stderr.write(`\r${formatBar(percent, lastProgress, tty)}${tty ? '\x1b[K' : ''}`);
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
      onOpen: verbose
        ? (s, d, sizes) => {
            process.stderr.write(`nbdstream: source ${capabilityLine(s)}\n`);
            process.stderr.write(`nbdstream: destination ${capabilityLine(d)}\n`);
            if (nativeLoadError) process.stderr.write(`nbdstream: native addon unavailable (${nativeLoadError}): files use dense extents and zero by writing zeroes\n`);
            process.stderr.write(
              `nbdstream: request-size=${sizes.requestSize} requests=${options.synchronous ? 1 : options.requests ?? 64} connections=${options.synchronous ? 1 : options.connections ?? 4} queue-size=${sizes.queueSize} sparse=${sizes.sparse}${options.noExtents ? ' no-extents' : ''}${options.allocated ? ' allocated' : ''}${options.destinationIsZero ? ' destination-is-zero' : ''}\n`,
            );
          }
        : undefined,
    });
  } catch (err) {
    jsonLines?.cancel();
    if (progress === '' && lastPercent >= 0) process.stderr.write('\n');
    const e = err instanceof NbdStreamError ? err : new NbdStreamError('ERR_IO', (err as Error)?.message ?? String(err));
    fail(e.describe());
  }
  if (!progressJson) report(100);
  if (progress === '') process.stderr.write('\n');
  if (verbose) {
    const s = summary;
    process.stderr.write(
      `nbdstream: copied ${s.size} bytes in ${s.elapsed.toFixed(3)} s: read ${s.bytesRead}, written ${s.bytesWritten}, zeroed ${s.bytesZeroed}, skipped ${s.bytesSkipped}; requests read=${s.requests.read} write=${s.requests.write} zero=${s.requests.zero} extents=${s.requests.extents}${s.extentErrors ? `; ${s.extentErrors} extent queries failed (copied as data)` : ''}${s.blkhash ? `; blkhash ${s.blkhash.algorithm}/${s.blkhash.blockSize} ${s.blkhash.digest}` : ''}${s.verified ? '; verified' : ''}\n`,
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
  (err) => fail(err instanceof NbdStreamError ? err.describe() : (err as Error)?.message ?? String(err)),
);
