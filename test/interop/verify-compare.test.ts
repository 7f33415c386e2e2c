/**
 * Issue 7 through the CLI, against real servers: --blkhash (checked against python3 hashlib),
 * `nbdstream compare` (qemu-img compare's messages and exit codes), --verify (with an nbdkit
 * eval target that really corrupts what it stores), --progress=json and --summary=json.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { logLines, type Server } from '../helpers/servers.js';
import { ok, run, type CliResult } from '../helpers/cli.js';
import { dirPerFile, serversPerTest } from '../helpers/fixtures.js';
import { pyBlkhash, pyBlkhashNbd } from '../helpers/blkhash.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const { kit } = serversPerTest();
const dir = dirPerFile('nbdstream-verify-');

function cli(args: string[], o: { shell?: string } = {}): Promise<CliResult> {
  return run(args, { ...o, timeoutMs: 60_000 });
}

/** Exit `status`, nothing on stdout, stderr exactly one line "nbdstream: MESSAGE". */
function fails(r: CliResult, message: string, status = 1): void {
  expect(r.stderr).toBe(`nbdstream: ${message}\n`);
  expect(r.status).toBe(status);
  expect(r.stdout.toString()).toBe('');
}

/** Requests of the given kinds from an nbdkit log file, as [kind, offset, count]. */
function requests(logFile: string, kinds: string[]): Array<[string, number, number]> {
  return logLines(logFile, kinds)
    .map((l) => /\b(\w+) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [m[1], Number(m[2]), Number(m[3])]);
}

/** A sparse file: `size` bytes, random data only in `data` ranges, holes elsewhere. */
function sparseFile(name: string, size: number, data: Array<[number, number]>): string {
  const file = path.join(dir, name);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  for (const [o, n] of data) fs.writeSync(fd, randomBytes(n), 0, n, o);
  fs.closeSync(fd);
  return file;
}

/** A copy that keeps the holes of the original. */
function sparseCopy(file: string, out: string): string {
  execFileSync('cp', ['--sparse=always', file, out]);
  return out;
}

/** A copy of a file with byte `at` xor-ed (the rest of the copy stays sparse). */
function flipped(file: string, at: number, name: string): string {
  const out = sparseCopy(file, path.join(dir, name));
  const fd = fs.openSync(out, 'r+');
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, at);
  b[0] ^= 0x40;
  fs.writeSync(fd, b, 0, 1, at);
  fs.closeSync(fd);
  return out;
}

// ------------------------------------------------------------------ --blkhash

describe('--blkhash matches python hashlib', () => {
  const images: Array<[string, string]> = [
    ['empty', sparseFile('empty.img', 0, [])],
    ['1 byte', sparseFile('one.img', 1, [[0, 1]])],
    ['unaligned', sparseFile('unaligned.img', 200_001, [[0, 200_001]])],
    ['all zero (sparse)', sparseFile('zero.img', 5 * MiB + 3, [])],
    [
      'random with holes',
      sparseFile('holes.img', 8 * MiB + 123, [
        [0, 70_000],
        [MiB + 4097, 300 * KiB],
        [5 * MiB, 1],
        [8 * MiB + 100, 23],
      ]),
    ],
  ];
  const specs: Array<[string[], string]> = [
    [['--blkhash'], 'sha256/65536'],
    [['--blkhash=sha1/4k'], 'sha1/4096'],
    [['--blkhash=md5/1000'], 'md5/1000'],
    [['--blkhash=sha512/1M'], 'sha512/1048576'],
    [['--blkhash=sha256/512'], 'sha256/512'],
  ];
  const want = new Map(images.map(([, f]) => [f, pyBlkhash(f, specs.map((s) => s[1]))]));
  const cases = images.flatMap(([name, file]) => specs.map(([args, spec]) => [name, args.join(' '), file, args, spec] as const));

  it.concurrent.each(cases)('%s, %s: DIGEST on stdout', async (_name, _a, file, args, spec) => {
    const r = await cli([...args, file, 'null:']);
    expect(ok(r)).toBe(`${want.get(file)![spec]}\n`);
  });

  it('while copying to a file, and --blkhash-file=F writes the digest to F instead of stdout', async () => {
    const file = images[4][1];
    const out = path.join(dir, 'blkhash-copy.img');
    const digestFile = path.join(dir, 'digest');
    expect(ok(await cli(['--blkhash=sha1/4k', `--blkhash-file=${digestFile}`, file, out]))).toBe('');
    expect(fs.readFileSync(digestFile, 'utf8')).toBe(`${want.get(file)!['sha1/4096']}\n`);
    expect(fs.readFileSync(out).equals(fs.readFileSync(file))).toBe(true);
    // --blkhash-file alone implies the default algorithm
    expect(ok(await cli([`--blkhash-file=${digestFile}`, file, 'null:']))).toBe('');
    expect(fs.readFileSync(digestFile, 'utf8')).toBe(`${want.get(file)!['sha256/65536']}\n`);
  });

  it('NBD source (sparse-random), every algorithm, copying to an NBD target', async () => {
    const src = await kit('sparse-random', ['32M', 'percent=10', 'seed=11'], { readOnly: true });
    const all = ['md5/65536', 'sha1/4096', 'sha256/65536', 'sha512/8192'];
    const expected = pyBlkhashNbd(src.uri, all);
    for (const spec of all) {
      const dst = await kit('memory', ['32M']);
      expect(ok(await cli([`--blkhash=${spec}`, src.uri, dst.uri])), spec).toBe(`${expected[spec]}\n`);
    }
  });

  it('NBD source (data plugin, 1 GiB with two bytes): the holes cost no reads', async () => {
    const src = await kit('data', ['1 @1073741823 1'], { readOnly: true });
    const expected = pyBlkhashNbd(src.uri, ['sha256/65536', 'sha1/4096']);
    const out = ok(await cli(['--blkhash', '--summary=json', src.uri, 'null:'])).split('\n');
    expect(out[0]).toBe(expected['sha256/65536']);
    expect(JSON.parse(out[1]).bytes_read).toBeLessThanOrEqual(MiB);
    expect(ok(await cli(['--blkhash=sha1/4k', src.uri, 'null:']))).toBe(`${expected['sha1/4096']}\n`);
  });

  it('usage errors: a bad spec; the digest cannot share stdout with the image', async () => {
    const f = images[1][1];
    fails(await cli(['--blkhash=crc32', f, 'null:']), '--blkhash: expected ALG[/BLOCKSIZE] with ALG one of md5, sha1, sha256, sha512 and BLOCKSIZE like 4k or 65536, not "crc32"');
    fails(await cli(['--blkhash=sha1/0', f, 'null:']), '--blkhash: block size must be between 1 and 67108864 bytes, not 0');
    fails(await cli(['--blkhash', f, '-']), '--blkhash: the destination is stdout; write the digest with --blkhash-file=FILE');
    fails(await cli(['--summary=json', f, '-']), '--summary=json: the destination is stdout');
  });
});

// ------------------------------------------------------------------ compare

describe('nbdstream compare', () => {
  const SIZE = 8 * MiB;
  const DATA: Array<[number, number]> = [
    [0, 64 * KiB],
    [MiB, 512 * KiB],
    [6 * MiB + 4 * KiB, 100],
    [SIZE - 4 * KiB, 4 * KiB],
  ];
  const base = sparseFile('cmp-a.img', SIZE, DATA);
  const twin = sparseCopy(base, path.join(dir, 'cmp-b.img'));
  const flips: Array<[string, number]> = [
    ['start', 0],
    ['middle', MiB + 200 * KiB + 7],
    ['end', SIZE - 1],
    ['inside a hole', 3 * MiB + 12345],
  ];
  const stdout = (r: CliResult) => r.stdout.toString();

  it('identical files: exit 0, "Images are identical."', async () => {
    const r = await cli(['compare', base, twin]);
    expect(r.stderr).toBe('');
    expect(stdout(r)).toBe('Images are identical.\n');
    expect(r.status).toBe(0);
  });

  it.concurrent.each(flips)('files, a flipped byte at the %s: exit 1, the exact offset', async (name, at) => {
    const other = flipped(base, at, `cmp-flip-${name.replace(/\W/g, '')}.img`);
    for (const [x, y] of [
      [base, other],
      [other, base],
    ]) {
      const r = await cli(['compare', x, y]);
      expect(r.stderr).toBe('');
      expect(stdout(r)).toBe(`Content mismatch at offset ${at}!\n`);
      expect(r.status).toBe(1);
    }
  });

  it('identical NBD exports: exit 0, and ranges both report as zero are never read', async () => {
    const a = await kit('file', [base], { readOnly: true, log: true });
    const b = await kit('file', [twin], { readOnly: true, log: true });
    const r = await cli(['compare', a.uri, b.uri]);
    expect(r.stderr).toBe('');
    expect(stdout(r)).toBe('Images are identical.\n');
    expect(r.status).toBe(0);
    for (const s of [a, b]) {
      const reads = requests(s.logFile!, ['Read']);
      expect(reads.length).toBeGreaterThan(0);
      // every read touches data (a read is at most a few request-size pieces around it)
      for (const [, o, n] of reads) expect(DATA.some(([d, dn]) => o < d + dn && d < o + n), `read ${o}+${n}`).toBe(true);
      const bytes = reads.reduce((t, [, , n]) => t + n, 0);
      expect(bytes).toBeLessThan(2 * MiB);
    }
  });

  it.each(flips)('NBD vs NBD and file vs NBD, a flipped byte at the %s: exit 1, the exact offset', async (name, at) => {
    const other = flipped(base, at, `cmp-nbd-flip-${name.replace(/\W/g, '')}.img`);
    const a = await kit('file', [base], { readOnly: true });
    const b = await kit('file', [other], { readOnly: true });
    for (const args of [
      [a.uri, b.uri],
      [base, b.uri],
      [b.uri, base],
    ]) {
      const r = await cli(['compare', ...args]);
      expect(r.stderr).toBe('');
      expect(stdout(r), args.join(' ')).toBe(`Content mismatch at offset ${at}!\n`);
      expect(r.status).toBe(1);
    }
  });

  it('different sizes: zero tail is identical (with a warning); data in the tail differs; --strict fails on the size', async () => {
    const longer = sparseCopy(base, path.join(dir, 'cmp-longer.img'));
    fs.truncateSync(longer, SIZE + 3 * MiB + 5);
    let r = await cli(['compare', base, longer]);
    expect([stdout(r), r.stderr, r.status]).toEqual(['Warning: Image size mismatch!\nImages are identical.\n', '', 0]);
    r = await cli(['compare', '--strict', base, longer]);
    expect([stdout(r), r.stderr, r.status]).toEqual(['Strict mode: Image size mismatch!\n', '', 1]);
    r = await cli(['compare', '-s', longer, base]);
    expect([stdout(r), r.stderr, r.status]).toEqual(['Strict mode: Image size mismatch!\n', '', 1]);
    const fd = fs.openSync(longer, 'r+');
    fs.writeSync(fd, Buffer.from([7]), 0, 1, SIZE + 2 * MiB);
    fs.closeSync(fd);
    r = await cli(['compare', longer, base]);
    expect([stdout(r), r.stderr, r.status]).toEqual([`Warning: Image size mismatch!\nContent mismatch at offset ${SIZE + 2 * MiB}!\n`, '', 1]);
    // -q: only the exit status tells
    r = await cli(['compare', '-q', longer, base]);
    expect([stdout(r), r.stderr, r.status]).toEqual(['', '', 1]);
  });

  it('errors: exit 2 with one line on stderr', async () => {
    const missing = path.join(dir, 'nope.img');
    fails(await cli(['compare', base, missing]), `${missing}: cannot open: ENOENT no such file or directory`, 2);
    fails(await cli(['compare', base]), 'compare: expected two images A and B, got 1 argument (see compare --help)', 2);
    fails(await cli(['compare', '--frob-nicate', base, twin]), 'unknown option: --frob-nicate', 2);
    fails(await cli(['compare', '-x', base, twin]), 'unknown option: -x', 2);
    fails(await cli(['compare', base, 'nbd+unix:///?socket=/nonexistent/sock']), 'nbd+unix:///?socket=/nonexistent/sock: cannot connect to socket /nonexistent/sock: ENOENT', 2);
  });
});

// ------------------------------------------------------------------ --verify

/**
 * An nbdkit eval target storing its bytes in `file`, which flips one bit of byte `at` whenever
 * a write or zero request covers it: a disk that silently corrupts one byte.
 */
async function corruptingTarget(file: string, size: number, at: number): Promise<Server> {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const flip = `if [ $4 -le ${at} ] && [ $(($4 + $3)) -gt ${at} ]; then b=$(od -An -tu1 -j ${at} -N1 '${file}'); printf "\\\\$(printf %03o $(( (b ^ 1) & 255 )))" | dd of='${file}' bs=1 seek=${at} conv=notrunc status=none; fi`;
  return kit(
    'eval',
    [
      `get_size=echo ${size}`,
      'can_write=exit 0',
      'can_zero=exit 0',
      `pread=dd if='${file}' iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none`,
      `pwrite=dd of='${file}' oflag=seek_bytes seek=$4 conv=notrunc status=none; ${flip}`,
      `zero=dd if=/dev/zero of='${file}' oflag=seek_bytes seek=$4 iflag=count_bytes count=$3 conv=notrunc status=none; ${flip}`,
    ],
    { log: true },
  );
}

describe('--verify', () => {
  const SIZE = 4 * MiB;
  const DATA: Array<[number, number]> = [
    [0, 300 * KiB],
    [2 * MiB, 100 * KiB],
    [SIZE - 4 * KiB, 4 * KiB],
  ];
  const src = sparseFile('verify-src.img', SIZE, DATA);

  it('a good copy to a file passes (and says so in the summary)', async () => {
    const out = path.join(dir, 'verify-out.img');
    const lines = ok(await cli(['--verify', '--blkhash', '--summary=json', src, out])).trimEnd().split('\n');
    expect(lines[0]).toBe(pyBlkhash(src, ['sha256/65536'])['sha256/65536']);
    const summary = JSON.parse(lines[1]);
    expect(summary).toMatchObject({ size: SIZE, verified: true, blkhash: { algorithm: 'sha256', block_size: 65536, digest: lines[0] } });
  });

  it('a good NBD → NBD copy passes, re-reading only the data of the target', async () => {
    const s = await kit('data', ['1 @1048576 2 @3145727 3', `size=${SIZE}`], { readOnly: true });
    const d = await kit('memory', [`${SIZE}`], { log: true });
    ok(await cli(['--verify', s.uri, d.uri]));
    const reads = requests(d.logFile!, ['Read']);
    expect(reads.length).toBeGreaterThan(0);
    // the data bytes are at 0, 1 MiB and 3 MiB - 1 .. 3 MiB + 1
    for (const [, o, n] of reads) expect([0, MiB, 3 * MiB - 1].some((x) => o <= x + 2 && x < o + n), `read ${o}+${n}`).toBe(true);
    expect(reads.reduce((t, [, , n]) => t + n, 0)).toBeLessThanOrEqual(MiB);
  });

  const flips: Array<[string, number]> = [
    ['start', 0],
    ['middle', 2 * MiB + 50 * KiB],
    ['end', SIZE - 1],
    ['inside a hole', MiB + 12345],
  ];
  it.each(flips)('a target corrupting the byte at the %s: exit 1 naming that offset', async (name, at) => {
    const dst = await corruptingTarget(path.join(dir, `verify-bad-${name.replace(/\W/g, '')}.raw`), SIZE, at);
    fails(await cli(['--verify', '--blkhash', src, dst.uri]), `${dst.uri}: offset ${at}: verify failed: the destination differs from the source`);
    // the same target without --verify: the copy "succeeds"
    ok(await cli([src, dst.uri]));
  });

  it('a destination that cannot be read back is refused before copying', async () => {
    fails(await cli(['--verify', src, 'null:']), '--verify: the destination null: cannot be read back');
  });
});

// ------------------------------------------------------------------ progress and summary

const PROGRESS_KEYS = ['bytes_done', 'bytes_total', 'bytes_read', 'bytes_written', 'bytes_zeroed', 'rate', 'eta_s', 'phase'];

function parseLines(text: string): Array<Record<string, unknown>> {
  expect(text.endsWith('\n')).toBe(true);
  return text
    .slice(0, -1)
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('--progress=json and --summary=json', () => {
  it('--progress=json:FD: one object per line, at most every 250 ms, monotonic, ending with phase "done"', async () => {
    const size = 32 * MiB;
    const s = await kit('pattern', [`${size}`, 'rdelay=100ms'], { readOnly: true, filters: ['delay'] });
    const file = path.join(dir, 'progress.jsonl');
    const t0 = Date.now();
    const r = await cli([], { shell: `"$NBDSTREAM" --synchronous --progress=json:3 '${s.uri}' null: 3>'${file}'` });
    const elapsed = Date.now() - t0;
    ok(r);
    const lines = parseLines(fs.readFileSync(file, 'utf8'));
    expect(lines.length).toBeGreaterThan(2);
    expect(lines.length).toBeLessThanOrEqual(Math.ceil(elapsed / 250) + 2);
    for (const l of lines) {
      expect(Object.keys(l).sort()).toEqual([...PROGRESS_KEYS].sort());
      expect(l.bytes_total).toBe(size);
      expect(typeof l.rate).toBe('number');
      expect(l.eta_s === null || typeof l.eta_s === 'number').toBe(true);
    }
    for (let i = 1; i < lines.length; i++) expect(lines[i].bytes_done as number).toBeGreaterThanOrEqual(lines[i - 1].bytes_done as number);
    expect(lines.slice(0, -1).every((l) => l.phase === 'copying')).toBe(true);
    expect(lines.at(-1)).toMatchObject({ phase: 'done', bytes_done: size, bytes_total: size, bytes_read: size, eta_s: 0 });
  });

  it('--progress=json with --verify: on stderr; copying, then verifying, then done', async () => {
    const size = 16 * MiB;
    const s = await kit('pattern', [`${size}`, 'rdelay=100ms'], { readOnly: true, filters: ['delay'] });
    const d = await kit('memory', [`${size}`]);
    const r = await cli(['--synchronous', '--progress=json', '--verify', s.uri, d.uri]);
    expect(r.status).toBe(0);
    expect(r.stdout.toString()).toBe('');
    const lines = parseLines(r.stderr);
    const phases = lines.map((l) => l.phase);
    expect(phases[0]).toBe('copying');
    expect(phases.at(-1)).toBe('done');
    expect([...phases].sort((a, b) => ['copying', 'verifying', 'done'].indexOf(a as string) - ['copying', 'verifying', 'done'].indexOf(b as string))).toEqual(phases);
    for (let i = 1; i < lines.length; i++) {
      expect(lines[i].bytes_done as number).toBeGreaterThanOrEqual(lines[i - 1].bytes_done as number);
      expect(lines[i].bytes_verified as number).toBeGreaterThanOrEqual(lines[i - 1].bytes_verified as number);
    }
    expect(lines.at(-1)).toMatchObject({ phase: 'done', bytes_done: size, bytes_total: size, bytes_verified: size });
  });

  it('--summary=json prints the final summary object on stdout', async () => {
    const s = await kit('data', ['1 @1048576 2', `size=${4 * MiB}`], { readOnly: true });
    const out = path.join(dir, 'summary.img');
    const summary = JSON.parse(ok(await cli(['--summary=json', s.uri, out])));
    expect(summary).toMatchObject({
      source: s.uri,
      destination: out,
      size: 4 * MiB,
      bytes_skipped: expect.any(Number),
      requests: { read: expect.any(Number), write: expect.any(Number), zero: expect.any(Number), extents: expect.any(Number) },
      extent_errors: 0,
    });
    expect(summary.bytes_read).toBeGreaterThan(0);
    expect(summary.bytes_written).toBeGreaterThan(0);
    expect(typeof summary.elapsed_s).toBe('number');
    expect(summary.blkhash).toBeUndefined();
  });

  it('usage errors', async () => {
    fails(await cli(['--progress=json:x', 'a', 'b']), '--progress=json:FD: expected a file descriptor number, not "x"');
    fails(await cli(['--summary=xml', 'a', 'b']), '--summary: expected "json", not "xml"');
  });

  it('-p off a terminal: the plain bar; on a terminal: with rate and ETA', async () => {
    const s = await kit('pattern', [`${8 * MiB}`], { readOnly: true });
    const r = await cli(['-p', s.uri, 'null:']);
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/^(\r\[[#.]{40}\] +\d+%)+\n$/);
    expect(r.stderr).toMatch(/\r\[#{40}\] 100%\n$/);
    // script(1) gives the CLI a pseudo-terminal
    const slow = await kit('pattern', [`${16 * MiB}`, 'rdelay=100ms'], { readOnly: true, filters: ['delay'] });
    const t = await cli([], { shell: `script -qec '"$NBDSTREAM" --synchronous -p ${slow.uri} null:' /dev/null` });
    expect(t.status).toBe(0);
    const screen = t.stdout.toString();
    expect(screen).toMatch(/\] +\d+% +[\d.]+ (B|KiB|MiB|GiB)\/s +ETA \d+:\d\d/);
    expect(screen).toMatch(/\[#{40}\] 100% +[\d.]+ (B|KiB|MiB|GiB)\/s +done/);
  });
});
