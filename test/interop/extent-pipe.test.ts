/**
 * Pipes that keep holes (docs/extent-stream.md) and incremental copies from dirty bitmaps, from
 * the CLI against real servers: nbdkit sparse-random → extent pipe → nbdkit memory (log filter),
 * files, truncated and damaged pipes, and qemu-nbd exporting a qcow2 dirty bitmap (-B). Checked
 * with nbdcopy, nbdinfo, qemu-img and sha256 of files. Issue 8.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { logLines, nbdcopyHash, qemuNbd } from '../helpers/servers.js';
import { allocated, dirPerFile, fileHash, serversPerTest } from '../helpers/fixtures.js';
import { ok, run, type CliResult } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 2 ** 20;
const { kit, track } = serversPerTest();
const dir = dirPerFile('nbdstream-xpipe-');
/** A one-line failure with exit status 1. */
function failed(r: CliResult, re: RegExp): void {
  expect(r.status).toBe(1);
  expect(r.stderr.split('\n').filter(Boolean)).toHaveLength(1);
  expect(r.stderr).toMatch(re);
}

/** Data extents of an export as nbdinfo --map sees them: [offset, length][]. */
function dataExtents(uri: string, context = 'base:allocation'): Array<[number, number]> {
  const out = execFileSync('nbdinfo', [`--map=${context}`, uri]).toString();
  return out
    .split('\n')
    .map((l) => /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .filter((m) => (context === 'base:allocation' ? (Number(m[3]) & 2) === 0 : (Number(m[3]) & 1) === 1))
    .map((m) => [Number(m[1]), Number(m[2])]);
}
const total = (xs: Array<[number, number]>) => xs.reduce((a, [, l]) => a + l, 0);

/** [kind, offset, count] of the Write / Zero requests in an nbdkit log filter file. */
function requests(logFile: string, kinds: string[]): Array<[string, number, number]> {
  return logLines(logFile, kinds)
    .map((l) => /\b(\w+) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [m[1], Number(m[2]), Number(m[3])]);
}

const SIZE = 256 * MiB;
// 5 % data in runs of about 256 KiB (nbdkit's default run length, 16 MiB, leaves 256 MiB nearly empty)
const sparse = (seed: number) => kit('sparse-random', [String(SIZE), 'percent=5', 'runlength=262144', `seed=${seed}`], { readOnly: true });

describe('extent pipe (--pipe-format=extents)', () => {
  it('NBD → pipe → NBD moves only data; the far side zeroes the rest with zero requests', async () => {
    const src = await sparse(1);
    const dst = await kit('memory', [String(SIZE)], { log: true });
    const stream = path.join(dir, 'a.nbdx');
    const r = await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents | tee '${stream}' | "$NBDSTREAM" - '${dst.uri}'` });
    ok(r);
    expect(nbdcopyHash(dst.uri)).toBe(nbdcopyHash(src.uri));

    // bytes through the pipe: the data plus a little framing, not the 256 MiB image
    const data = dataExtents(src.uri);
    const dataBytes = total(data);
    const piped = fs.statSync(stream).size;
    expect(dataBytes).toBeGreaterThan(5 * MiB);
    expect(piped).toBeGreaterThan(0.9 * dataBytes);
    expect(piped).toBeLessThan(dataBytes + 64 * KiB);

    // the target was written only inside the source's data extents, and zeroed elsewhere
    const reqs = requests(dst.logFile!, ['Write', 'Zero']);
    const writes = reqs.filter((q) => q[0] === 'Write');
    const zeroes = reqs.filter((q) => q[0] === 'Zero');
    expect(zeroes.length).toBeGreaterThan(0);
    const inData = (o: number, n: number) => data.some(([s, l]) => o >= s && o + n <= s + l);
    expect(writes.every(([, o, n]) => inData(o, n))).toBe(true);
    const written = writes.reduce((a, q) => a + q[2], 0);
    const zeroed = zeroes.reduce((a, q) => a + q[2], 0);
    expect(written).toBeLessThanOrEqual(dataBytes);
    expect(written + zeroed).toBe(SIZE);
    // the pipe's DATA payloads are exactly what was written
    expect(piped - written).toBeLessThan(64 * KiB);
  });

  it('--destination-is-zero on the far side: no zero requests at all; a fresh file stays sparse', async () => {
    const src = await sparse(2);
    const dst = await kit('memory', [String(SIZE)], { log: true });
    ok(await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents | "$NBDSTREAM" --destination-is-zero - '${dst.uri}'` }));
    const want = nbdcopyHash(src.uri);
    expect(nbdcopyHash(dst.uri)).toBe(want);
    expect(requests(dst.logFile!, ['Zero', 'Trim'])).toEqual([]);

    const out = path.join(dir, 'fresh.img');
    const r = await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents | "$NBDSTREAM" -v - '${out}'` });
    expect(r.status).toBe(0);
    expect(fs.statSync(out).size).toBe(SIZE);
    expect(fileHash(out)).toBe(want);
    expect(allocated(out)).toBeLessThan(total(dataExtents(src.uri)) + 4 * MiB);
    // -v on the receiving side: the header's size, the data read from the pipe, zeroes skipped
    expect(r.stderr).toMatch(new RegExp(`source -: size=${SIZE} `));
    expect(Number(/read (\d+)/.exec(r.stderr)![1])).toBeLessThanOrEqual(total(dataExtents(src.uri)));
    expect(r.stderr).toMatch(/zeroed 0, skipped [1-9]/);
  });

  it('raw stays the default and is detected as raw; --pipe-format forces either', async () => {
    const src = await kit('sparse-random', ['16M', 'percent=10', 'seed=3'], { readOnly: true });
    const want = nbdcopyHash(src.uri);
    // default output is the image bytes (`nbdstream disk.img - | hexdump` still works)
    const raw = await run([], { shell: `"$NBDSTREAM" '${src.uri}' - | sha256sum` });
    expect(raw.stdout.toString().split(' ')[0]).toBe(want);
    // a raw stream into a raw-detecting source
    const out = path.join(dir, 'raw.img');
    ok(await run([], { shell: `"$NBDSTREAM" '${src.uri}' - | "$NBDSTREAM" - '${out}'` }));
    expect(fileHash(out)).toBe(want);
    // forcing raw on the receiving side keeps the stream's bytes as they are
    const kept = path.join(dir, 'kept.nbdx');
    ok(await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents | "$NBDSTREAM" --pipe-format=raw - '${kept}'` }));
    expect(fs.readFileSync(kept).subarray(0, 8).toString('latin1')).toBe('\x89NBDX\r\n\x1a');
    // ... which a later reader detects (a saved stream is a file: read it through a pipe)
    const back = path.join(dir, 'back.img');
    ok(await run([], { shell: `cat '${kept}' | "$NBDSTREAM" - '${back}'` }));
    expect(fileHash(back)).toBe(want);
    // forcing extents on raw input is an error, not a guess
    failed(
      await run([], { shell: `"$NBDSTREAM" '${src.uri}' - 2>/dev/null | "$NBDSTREAM" --pipe-format=extents - '${path.join(dir, 'x.img')}'` }),
      /^nbdstream: -: extent stream: bad magic [0-9a-f]+ \(not an extent stream\) \(stream byte 0\)\n$/,
    );
    failed(await run(['--pipe-format=extents', '-', path.join(dir, 'x.img')]), /^nbdstream: -: extent stream: truncated: the stream is empty without an END record \(stream byte 0\)\n$/);
    failed(await run(['--pipe-format=gzip', src.uri, '-']), /--pipe-format: expected raw or extents, not "gzip"/);
  });

  it('a source of unknown size: the header has no size, END gives it', async () => {
    const img = path.join(dir, 'odd.img');
    const buf = Buffer.alloc(3 * MiB + 12345);
    buf.fill(7, MiB, MiB + 100_000);
    buf.fill(9, 3 * MiB, 3 * MiB + 12345);
    fs.writeFileSync(img, buf);
    const stream = path.join(dir, 'odd.nbdx');
    const out = path.join(dir, 'odd-out.img');
    ok(await run([], { shell: `cat '${img}' | "$NBDSTREAM" - - --pipe-format=extents > '${stream}' && "$NBDSTREAM" - '${out}' < '${stream}'` }));
    expect(fs.readFileSync(stream).readUInt32BE(12) & 1).toBe(0); // SIZE_KNOWN clear
    expect(fs.statSync(stream).size).toBeLessThan(200_000);
    expect(fs.readFileSync(out).equals(buf)).toBe(true);
  });

  it('a truncated pipe fails with exit 1 and one line, wherever it is cut', async () => {
    const src = await sparse(4);
    const stream = path.join(dir, 'cut.nbdx');
    ok(await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents > '${stream}'` }));
    const n = fs.statSync(stream).size;
    for (const cut of [5, 36, 50, Math.floor(n / 2), n - 1]) {
      const dst = await kit('memory', [String(SIZE)]);
      const r = await run([], { shell: `head -c ${cut} '${stream}' | "$NBDSTREAM" - '${dst.uri}'` });
      failed(r, cut < 36 ? /^nbdstream: -: extent stream: truncated: / : /^nbdstream: -: offset \d+: extent stream: truncated: .* without an END record \(stream byte \d+\)\n$/);
    }
    // and cut live, while the sender is still writing
    const dst = await kit('memory', [String(SIZE)]);
    const r = await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents 2>/dev/null | head -c ${Math.floor(n / 3)} | "$NBDSTREAM" - '${dst.uri}'` });
    failed(r, /^nbdstream: -: offset \d+: extent stream: truncated: /);
  });

  it('a sender that fails (a read error) ends the stream without END: the receiver fails too', async () => {
    // nbdkit's error filter: EIO on every read (the header and zero records go out first)
    const bad = await kit('sparse-random', [String(SIZE), 'percent=5', 'runlength=262144', 'seed=6', 'error-pread-rate=1', 'error=EIO'], { readOnly: true, filters: ['error'] });
    const dst = await kit('memory', [String(SIZE)]);
    const r = await run([], { shell: `"$NBDSTREAM" '${bad.uri}' - --pipe-format=extents 2>/dev/null | "$NBDSTREAM" - '${dst.uri}'` });
    failed(r, /^nbdstream: -: offset \d+: extent stream: truncated: the stream ends after image offset \d+ without an END record/);
  });

  it('a damaged pipe fails: a changed payload byte by the END digest, a changed header by its checksum', async () => {
    const src = await sparse(5);
    const stream = path.join(dir, 'bad.nbdx');
    ok(await run([], { shell: `"$NBDSTREAM" '${src.uri}' - --pipe-format=extents > '${stream}'` }));
    const good = fs.readFileSync(stream);
    const payload = Buffer.from(good);
    payload[good.length - 200] ^= 0x01; // inside the last DATA payload
    fs.writeFileSync(stream, payload);
    failed(await run([], { shell: `cat '${stream}' | "$NBDSTREAM" - '${path.join(dir, 'bad.img')}'` }), /^nbdstream: -: offset \d+: extent stream: blkhash mismatch: /);
    const header = Buffer.from(good);
    header[36 + 10] ^= 0x01; // the first record's offset
    fs.writeFileSync(stream, header);
    failed(await run([], { shell: `cat '${stream}' | "$NBDSTREAM" - '${path.join(dir, 'bad.img')}'` }), /record header checksum mismatch after image offset 0/);
  });
});

describe('--dirty-bitmap (qemu-nbd -B)', () => {
  /** A qcow2 with data, copied in full, then a bitmap and more writes (data and a zero range). */
  function prepare(name: string): { qcow2: string; raw: string } {
    const qcow2 = path.join(dir, `${name}.qcow2`);
    const raw = path.join(dir, `${name}.raw`);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '64M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 10M 2M', '-c', 'write -P 0x55 30M 64K', qcow2], { stdio: 'ignore' });
    return { qcow2, raw };
  }
  function changeAfterBitmap(qcow2: string): void {
    execFileSync('qemu-img', ['bitmap', '--add', '--enable', qcow2, 'b0']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 512K 64K', '-c', 'write -z 10M 1M', '-c', 'write -P 0x44 40M 128K', '-c', 'write -z 30M 64K', qcow2], {
      stdio: 'ignore',
    });
  }
  const reference = (qcow2: string): string => {
    const out = path.join(dir, `${path.basename(qcow2)}.ref`);
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, out]);
    return fileHash(out);
  };

  it('full copy, then an incremental copy into the same raw file: equal to qemu-img convert, reading only the dirty data', async () => {
    const { qcow2, raw } = prepare('inc');
    let q = await qemuNbd(qcow2, { format: 'qcow2', readOnly: true });
    ok(await run([q.uri, raw]));
    await q.stop();
    const before = fileHash(raw);
    changeAfterBitmap(qcow2);
    q = await qemuNbd(qcow2, { format: 'qcow2', readOnly: true, extra: ['-B', 'b0'] });
    track(q);
    const dirty = dataExtents(q.uri, 'qemu:dirty-bitmap:b0');
    expect(dirty).toEqual([
      [512 * KiB, 64 * KiB],
      [10 * MiB, MiB],
      [30 * MiB, 64 * KiB],
      [40 * MiB, 128 * KiB],
    ]);
    const r = await run(['-v', '--dirty-bitmap=b0', q.uri, raw]);
    expect(r.status).toBe(0);
    expect(fileHash(raw)).toBe(reference(qcow2));
    expect(fileHash(raw)).not.toBe(before);
    // read = the dirty data (64 KiB + 128 KiB); the dirty zero ranges (1 MiB + 64 KiB) were zeroed
    const read = Number(/read (\d+)/.exec(r.stderr)![1]);
    const zeroed = Number(/zeroed (\d+)/.exec(r.stderr)![1]);
    expect(read).toBe(192 * KiB);
    expect(Number(/written (\d+)/.exec(r.stderr)![1])).toBe(192 * KiB);
    expect(zeroed).toBe(MiB + 64 * KiB);
    expect(r.stderr).toMatch(/partial=1/);
  });

  it('an incremental copy through an extent pipe: only dirty ranges cross, the far file keeps the rest', async () => {
    const { qcow2, raw } = prepare('incpipe');
    let q = await qemuNbd(qcow2, { format: 'qcow2', readOnly: true });
    ok(await run([q.uri, raw]));
    await q.stop();
    changeAfterBitmap(qcow2);
    q = await qemuNbd(qcow2, { format: 'qcow2', readOnly: true, extra: ['-B', 'b0'] });
    track(q);
    const stream = path.join(dir, 'inc.nbdx');
    ok(await run([], { shell: `"$NBDSTREAM" --dirty-bitmap=b0 '${q.uri}' - --pipe-format=extents | tee '${stream}' | "$NBDSTREAM" - '${raw}'` }));
    expect(fileHash(raw)).toBe(reference(qcow2));
    const s = fs.readFileSync(stream);
    expect(s.readUInt32BE(12)).toBe(3); // SIZE_KNOWN | INCREMENTAL
    expect(s.length).toBeLessThan(192 * KiB + 4 * KiB);
    // an incremental stream needs an existing target
    failed(await run([], { shell: `cat '${stream}' | "$NBDSTREAM" - '${path.join(dir, 'missing.raw')}'` }), /missing\.raw: cannot open: ENOENT/);
    // and cannot go down a raw pipe
    failed(await run(['--dirty-bitmap=b0', q.uri, '-']), /^nbdstream: -: the source is partial \(a dirty bitmap\): a raw pipe cannot leave ranges untouched; use --pipe-format=extents\n$/);
  });

  it('a server without the bitmap: a clear error before anything is written', async () => {
    const { qcow2, raw } = prepare('nobitmap');
    fs.writeFileSync(raw, Buffer.alloc(MiB, 0xab));
    const q = await qemuNbd(qcow2, { format: 'qcow2', readOnly: true });
    track(q);
    failed(await run(['--dirty-bitmap=b0', q.uri, raw]), /the server does not export dirty bitmap "b0" \(meta context qemu:dirty-bitmap:b0\)\n$/);
    expect(fs.readFileSync(raw).equals(Buffer.alloc(MiB, 0xab))).toBe(true);
    failed(await run(['--dirty-bitmap=b0', raw, path.join(dir, 'y.raw')]), /--dirty-bitmap needs an NBD source/);
  });
});
