/**
 * The CLI on bad input and failures, against real servers: every error is exactly one line on
 * stderr ("nbdstream: ...", no stack trace), exit status 1, nothing on stdout, and nothing that
 * failed is reported as done (no "100/100", no writes to a target that was refused).
 * DESIGN.md §2 "Errors" and "Sizes"; issue 4 "Bad input of every kind".
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { logLines, nbdcopyHash } from '../helpers/servers.js';
import { dirPerFile, serversPerTest } from '../helpers/fixtures.js';
import { run, type CliResult } from '../helpers/cli.js';

const MiB = 2 ** 20;
const EIO = 'EIO (Input/output error)';

const { kit } = serversPerTest();
const dir = dirPerFile('nbdstream-cli-errors-');

/** Run the CLI with a hang guard: a failure must end the process, not stall it. */
function cli(args: string[], o: { shell?: string } = {}): Promise<CliResult> {
  return run(args, { ...o, timeoutMs: 20_000 });
}

/** Exit 1, nothing on stdout, and stderr is exactly `nbdstream: MESSAGE\n` (one line, no stack). */
function fails(r: CliResult, message: string | RegExp): void {
  expect(r.stderr.endsWith('\n') && r.stderr.indexOf('\n') === r.stderr.length - 1, `one line: ${JSON.stringify(r.stderr)}`).toBe(true);
  expect(r.stderr).not.toMatch(/^\s+at /m);
  if (typeof message === 'string') expect(r.stderr).toBe(`nbdstream: ${message}\n`);
  else expect(r.stderr).toMatch(message);
  expect(r.status).toBe(1);
  expect(r.stdout.length).toBe(0);
}

function esc(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Requests of the given kinds from an nbdkit log filter file, as [kind, offset, count]. */
function requests(logFile: string, kinds: string[]): Array<[string, number, number]> {
  return logLines(logFile, kinds)
    .map((l) => /\b(\w+) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [m[1], Number(m[2]), Number(m[3])]);
}

describe('usage errors', () => {
  const cases: Array<[string, string[], string]> = [
    ['unknown option', ['--frobnicate', 'a', 'b'], 'unknown option: --frobnicate'],
    ['unknown short options', ['-q', '-z', 'a', 'b'], 'unknown options: -q, -z'],
    ['-R not a number', ['-R', 'abc', 'a', 'b'], '--requests: expected an integer ≥ 1, not "abc"'],
    ['--request-size not a power of two', ['--request-size=3000', 'a', 'b'], '--request-size must be a power of two between 4096 and 33554432, not 3000'],
    ['--request-size too big', ['--request-size=64M', 'a', 'b'], '--request-size must be a power of two between 4096 and 33554432, not 67108864'],
    ['--request-size not a size', ['--request-size=lots', 'a', 'b'], '--request-size: expected a size like 65536, 64K or 64MiB, not "lots"'],
    ['--request-size with trailing text', ['--request-size=65536x', 'a', 'b'], '--request-size: expected a size like 65536, 64K or 64MiB, not "65536x"'],
    ['--queue-size past 2^53', ['--queue-size=99999999999999999999G', 'a', 'b'], '--queue-size: 99999999999999999999G is too large (at most 2^53 - 1 bytes)'],
    ['-S past 2^53', ['-S', '8E', 'a', 'b'], '--sparse: 8E is too large (at most 2^53 - 1 bytes)'],
    ['-S not a power of two past 2^32', ['-S', '6G', 'a', 'b'], '--sparse: expected 0 or a power of two ≥ 512, not 6442450944'],
    ['-S not a power of two', ['-S', '3000', 'a', 'b'], '--sparse: expected 0 or a power of two ≥ 512, not 3000'],
    ['--progress=FD not a number', ['--progress=two', 'a', 'b'], '--progress: expected a file descriptor number, not "two"'],
    ['no arguments', [], 'expected SOURCE and DESTINATION, got 0 arguments (see --help)'],
    ['missing destination', ['a'], 'expected SOURCE and DESTINATION, got 1 argument (see --help)'],
    ['extra argument', ['a', 'b', 'c'], 'expected SOURCE and DESTINATION, got 3 arguments (see --help)'],
    ['unbalanced [', ['[', 'nbdkit', 'memory', '1M', 'out.img'], '"[" at argument 1 has no matching "]"'],
    ['] alone', ['in.img', ']', 'out.img'], '"]" without a matching "[" (argument 2)'],
    ['null: as source', ['null:', 'null:'], 'null: can only be a destination, not a source'],
    ['unknown URI scheme', ['http://x/', 'out.img'], 'http://x/: unsupported URI scheme'],
    ['nbd+unix URI without a socket', ['nbd+unix:///x', 'null:'], 'nbd+unix:///x: invalid NBD URI: nbd+unix:// needs ?socket=PATH'],
    ['unknown URI query key', ['nbd+unix:///?socket=/tmp/x.sock&frob=1', 'null:'], 'nbd+unix:///?socket=/tmp/x.sock&frob=1: invalid NBD URI: unknown query parameter "frob"'],
  ];
  it.concurrent.each(cases)('%s', async (_name, args, message) => {
    const absent = args.filter((a) => !fs.existsSync(a));
    fails(await cli(args), message);
    for (const a of absent) expect(fs.existsSync(a), `${a} was created`).toBe(false); // no out.img left behind
  });
});

describe('cannot open an endpoint', () => {
  it('missing source file', async () => {
    const missing = path.join(dir, 'missing.img');
    const out = path.join(dir, 'never.img');
    fails(await cli([missing, out]), `${missing}: cannot open: ENOENT no such file or directory`);
    expect(fs.existsSync(out)).toBe(false);
  });

  it('unreachable TCP server', async () => {
    fails(await cli(['nbd://127.0.0.1:1/', 'null:']), 'nbd://127.0.0.1:1/: cannot connect to 127.0.0.1:1: ECONNREFUSED');
  });

  it('Unix socket that does not exist', async () => {
    const sock = path.join(dir, 'nowhere.sock');
    fails(await cli([`nbd+unix:///?socket=${sock}`, 'null:']), `nbd+unix:///?socket=${sock}: cannot connect to socket ${sock}: ENOENT`);
  });

  it('nbds+unix:// to a server without TLS: TLS refused', async () => {
    const s = await kit('memory', ['1M']);
    const uri = `nbds+unix:///?socket=${s.socket}`;
    fails(await cli([uri, 'null:']), `${uri}: server refused TLS (NBD_REP_ERR_POLICY)`);
  });

  it('export not found', async () => {
    const s = await kit('memory', ['1M', 'exportname=disk', 'exportname-strict=true'], { filters: ['exportname'] });
    const uri = `nbd+unix:///nosuch?socket=${s.socket}`;
    fails(await cli([uri, 'null:']), `${uri}: export "nosuch" not found on the server`);
  });
});

describe('targets refused before any write', () => {
  it('read-only NBD target', async () => {
    const src = await kit('pattern', ['1M'], { readOnly: true });
    const dst = await kit('memory', ['1M'], { readOnly: true, log: true });
    fails(await cli([src.uri, dst.uri]), `${dst.uri}: target is read-only`);
    expect(requests(dst.logFile!, ['Write', 'Zero', 'Trim'])).toEqual([]);
  });

  it('NBD target smaller than the source', async () => {
    const src = await kit('pattern', ['2M'], { readOnly: true, log: true });
    const dst = await kit('memory', ['1M'], { log: true });
    fails(await cli([src.uri, dst.uri]), `${dst.uri}: target is smaller than the source (1048576 < 2097152 bytes)`);
    expect(requests(dst.logFile!, ['Write', 'Zero', 'Trim'])).toEqual([]);
    expect(requests(src.logFile!, ['Read'])).toEqual([]);
  });

  // never skipped in CI: a missing loop device is a failure there
  const loopSkip = !process.env.CI && (process.getuid?.() !== 0 || !fs.existsSync('/dev/loop-control'));
  it.skipIf(loopSkip)('block device (loop) smaller than the source', async () => {
    const backing = path.join(dir, 'small-loop.img');
    fs.writeFileSync(backing, Buffer.alloc(MiB, 0x5a));
    const dev = execFileSync('losetup', ['-f', '--show', backing]).toString().trim();
    try {
      const src = await kit('pattern', ['2M'], { readOnly: true });
      fails(await cli([src.uri, dev]), `${dev}: target is smaller than the source (1048576 < 2097152 bytes)`);
    } finally {
      execFileSync('losetup', ['-d', dev]);
    }
    expect(fs.readFileSync(backing).equals(Buffer.alloc(MiB, 0x5a))).toBe(true);
  });
});

describe('errors from the source', () => {
  it('error filter fails every read: exit 1 naming the source, offset, NBD_CMD_READ, EIO; no zeroes for the failed ranges', async () => {
    // data at 0 and at 1 MiB, zero elsewhere: both data pieces are read, and both reads fail
    const src = await kit('data', ['1 @1048576 1', `size=${2 * MiB}`, 'error-pread-rate=1'], { readOnly: true, filters: ['error'], log: true });
    const dst = await kit('memory', [`${2 * MiB}`], { log: true });
    fails(await cli(['--synchronous', src.uri, dst.uri]), `${src.uri}: offset 0: NBD_CMD_READ failed: ${EIO}`);
    const failed = requests(src.logFile!, ['Read']).map(([, o, c]) => [o, o + c]);
    expect(failed.length).toBeGreaterThan(0);
    for (const [kind, o, c] of requests(dst.logFile!, ['Write', 'Zero', 'Trim'])) {
      expect(kind).not.toBe('Write'); // every read failed: nothing to write
      for (const [fs0, fe] of failed) expect(o + c <= fs0 || o >= fe, `${kind} ${o}+${c} overlaps failed read ${fs0}-${fe}`).toBe(true);
    }
  });

  it('a read error at 1 MiB, in a source of zero bytes, never becomes zeroes (-S on)', async () => {
    // an eval source: 4 MiB of zero bytes, but any read touching 1 MiB fails with EIO
    const src = await kit(
      'eval',
      [
        `get_size=echo ${4 * MiB}`,
        `pread=if [ $4 -le ${MiB} ] && [ $(($4 + $3)) -gt ${MiB} ]; then echo "EIO bad sector" >&2; exit 1; fi; dd if=/dev/zero count=$3 iflag=count_bytes status=none`,
      ],
      { readOnly: true, log: true },
    );
    const dst = await kit('memory', [`${4 * MiB}`], { log: true });
    const progress = path.join(dir, 'progress-failed');
    const r = await cli([], { shell: `"$NBDSTREAM" --progress=3 '${src.uri}' '${dst.uri}' 3>'${progress}'` });
    // the error names the read request that covered 1 MiB (however large nbdstream made it)
    const bad = requests(src.logFile!, ['Read']).filter(([, o, c]) => o <= MiB && MiB < o + c);
    expect(bad.length).toBe(1);
    const failedAt = bad[0][1];
    fails(r, `${src.uri}: offset ${failedAt}: NBD_CMD_READ failed: ${EIO}`);
    // pieces are emitted in order: nothing at or past the failed read reaches the target
    for (const [kind, o, c] of requests(dst.logFile!, ['Write', 'Zero', 'Trim'])) expect(o + c, `${kind} ${o}+${c}`).toBeLessThanOrEqual(failedAt);
    // and a failed copy never reports 100/100
    const lines = fs.readFileSync(progress, 'utf8').split('\n').filter(Boolean);
    expect(lines).not.toContain('100/100');
    for (const l of lines) expect(Number(/^(\d+)\/100$/.exec(l)![1])).toBeLessThanOrEqual(Math.floor((failedAt * 100) / (4 * MiB)));
  });

  it('error filter fails every extents query: not fatal, copied as data, same bytes', async () => {
    const args = ['1 @1048576 2 @3145727 3', `size=${4 * MiB}`];
    const src = await kit('data', [...args, 'error-extents-rate=1'], { readOnly: true, filters: ['error'], log: true });
    const ref = await kit('data', args, { readOnly: true });
    const dst = await kit('memory', [`${4 * MiB}`]);
    const r = await cli([src.uri, dst.uri]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(logLines(src.logFile!, ['Extents']).length).toBeGreaterThan(0); // it did ask, and was refused
    expect(nbdcopyHash(dst.uri)).toBe(nbdcopyHash(ref.uri));
  });
});

describe('errors from the target', () => {
  // one data piece at 0, zero from 256 KiB on: -S 0 gives exactly one write and one zero request
  const source = () => kit('data', ['1', `size=${MiB}`], { readOnly: true });

  it('error filter fails writes: exit 1 naming the target, offset, NBD_CMD_WRITE', async () => {
    const src = await source();
    const dst = await kit('memory', [`${MiB}`, 'error-pwrite-rate=1'], { filters: ['error'] });
    fails(await cli(['-S', '0', src.uri, dst.uri]), `${dst.uri}: offset 0: NBD_CMD_WRITE failed: ${EIO}`);
  });

  it('error filter fails zero requests: exit 1 naming NBD_CMD_WRITE_ZEROES', async () => {
    const src = await source();
    const dst = await kit('memory', [`${MiB}`, 'error-zero-rate=1'], { filters: ['error'] });
    fails(await cli(['-S', '0', src.uri, dst.uri]), `${dst.uri}: offset 262144: NBD_CMD_WRITE_ZEROES failed: ${EIO}`);
  });

  it('a zero request failing while the copy is finishing still fails the copy (no hang)', async () => {
    // the zero request is delayed, so the source has ended and the sink is in _final, waiting
    // for it, when it fails
    const src = await source();
    const dst = await kit('memory', [`${MiB}`, 'delay-zero=500ms', 'error-zero-rate=1'], { filters: ['delay', 'error'] });
    fails(await cli(['-S', '0', src.uri, dst.uri]), `${dst.uri}: offset 262144: NBD_CMD_WRITE_ZEROES failed: ${EIO}`);
  });

  it('a write failing while the copy is finishing still fails the copy (no hang)', async () => {
    const src = await source();
    const dst = await kit('memory', [`${MiB}`, 'delay-write=500ms', 'error-pwrite-rate=1'], { filters: ['delay', 'error'] });
    fails(await cli(['-S', '0', src.uri, dst.uri]), `${dst.uri}: offset 0: NBD_CMD_WRITE failed: ${EIO}`);
  });
});

describe('server lost mid-copy', () => {
  it('source killed with SIGKILL during slow reads: exit 1 within seconds, one line naming the source', async () => {
    const src = await kit('pattern', [`${64 * MiB}`, 'rdelay=1'], { readOnly: true, filters: ['delay'], log: true });
    const started = Date.now();
    const pending = cli([src.uri, 'null:']);
    // kill once the first read has reached the server
    while (!logLines(src.logFile!, ['Read']).length) {
      if (Date.now() - started > 10_000) throw new Error('no read reached the server');
      await new Promise((r) => setTimeout(r, 20));
    }
    await new Promise((r) => setTimeout(r, 300));
    const killedAt = Date.now();
    src.proc!.kill('SIGKILL');
    const r = await pending;
    expect(Date.now() - killedAt).toBeLessThan(5000);
    fails(r, new RegExp(`^nbdstream: ${esc(src.uri)}: offset \\d+: (connection error: E[A-Z]+|server closed the connection[^\\n]*)\\n$`));
  });
});

describe('--progress=FD', () => {
  it('writes increasing N/100 lines ending with 100/100', async () => {
    const src = await kit('pattern', [`${8 * MiB}`], { readOnly: true });
    const file = path.join(dir, 'progress');
    const r = await cli([], { shell: `"$NBDSTREAM" --progress=3 '${src.uri}' null: 3>'${file}'` });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    expect(lines.pop()).toBe(''); // ends with a newline
    expect(lines.length).toBeGreaterThan(1);
    const n = lines.map((l) => {
      expect(l).toMatch(/^\d+\/100$/);
      return Number(l.split('/')[0]);
    });
    for (let i = 1; i < n.length; i++) expect(n[i]).toBeGreaterThan(n[i - 1]);
    expect(lines[lines.length - 1]).toBe('100/100');
  });
});
