/**
 * Disk image formats by name, against qemu-img on real images: header detection, the warning for
 * an image copied as raw bytes, --format (qemu-nbd -r by socket activation: the result equals
 * qemu-img convert's and only allocated clusters are read) and --target-format=qcow2.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { detectImageFormat, IMAGE_HEADER_BYTES } from '../../lib/image-format.js';
import { ok, run } from '../helpers/cli.js';
import { dirPerFile } from '../helpers/fixtures.js';

const dir = dirPerFile('nbdstream-image-format-');
const K = 1024;
const M = 1024 * K;
const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { encoding: 'utf8' });
const qemuIo = (file: string, ...cmds: string[]) => execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { stdio: 'ignore' });
const header = (f: string) => fs.readFileSync(f).subarray(0, IMAGE_HEADER_BYTES);
const f = (name: string) => path.join(dir, name);

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}
/** qemu-img map: the ranges holding data (from the image or its backing chain). */
function dataRanges(file: string, format = 'qcow2'): Array<[number, number]> {
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', format, file)) as MapEntry[];
  const out: Array<[number, number]> = [];
  for (const e of map.filter((e) => e.data)) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.length]);
  }
  return out;
}

/**
 * top.qcow2 (64 MiB) over base.qcow2: data in the top, data only in the base, a zero cluster
 * written over base data, a zero cluster over nothing, and holes everywhere else.
 */
function makeChain(): string {
  const base = f('base.qcow2');
  const top = f('top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
  qemuIo(base, 'write -P 0x11 4M 512K', 'write -P 0x12 40M 64K');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
  qemuIo(top, 'write -P 0x21 0 1M', 'write -z 4M 128K', 'write -z 20M 1M', 'write -P 0x22 63M 64K');
  return top;
}

describe('image format detection (lib/image-format.ts) on images qemu-img made', () => {
  for (const fmt of ['qcow2', 'qcow', 'qed', 'vmdk', 'vhdx', 'vdi', 'vpc'] as const)
    it(`${fmt}`, () => {
      const file = f(`detect.${fmt}`);
      qemuImg('create', '-q', '-f', fmt, file, '1M');
      expect(detectImageFormat(header(file))).toBe(fmt);
    });
  it('vmdk descriptor files, LUKS headers; raw data and short headers are no format', () => {
    const flat = f('flat.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', flat, '1M');
    expect(detectImageFormat(header(flat))).toBe('vmdk');
    // the LUKS1/LUKS2 magic and version (qemu-img create -f luks costs seconds of key stretching)
    expect(detectImageFormat(Buffer.concat([Buffer.from('LUKS\xba\xbe\x00\x01', 'latin1'), Buffer.alloc(504)]))).toBe('luks');
    expect(detectImageFormat(Buffer.alloc(512))).toBeUndefined();
    expect(detectImageFormat(Buffer.from('QFI'))).toBeUndefined();
    expect(detectImageFormat(Buffer.alloc(0))).toBeUndefined();
  });
});

describe('--format, --target-format (qemu-nbd by socket activation)', () => {
  it('a qcow2 source without --format is copied as raw bytes, with one warning line', async () => {
    const top = makeChain();
    const out = f('container.raw');
    const r = await run([top, out]);
    expect(r.stderr).toBe(`nbdstream: warning: ${top} is a qcow2 image, copied as raw bytes (use --format=auto to copy the disk inside)\n`);
    expect(r.status).toBe(0);
    expect(fs.readFileSync(out).equals(fs.readFileSync(top))).toBe(true);
    // the disk inside, as raw, draws no warning
    const inside = f('inside.raw');
    qemuImg('convert', '-O', 'raw', top, inside);
    ok(await run([inside, f('plain.raw')]));
  });

  it('--format=auto and --format=qcow2 equal qemu-img convert -O raw over a backing chain, reading only allocated clusters', async () => {
    const top = makeChain();
    const ref = f('ref.raw');
    qemuImg('convert', '-O', 'raw', top, ref);
    // what qemu-img map says is data: top's own clusters and base's where top does not cover them
    const data = dataRanges(top);
    expect(data).toEqual([
      [0, 1 * M],
      [4 * M + 128 * K, 384 * K],
      [40 * M, 64 * K],
      [63 * M, 64 * K],
    ]);
    for (const format of ['auto', 'qcow2']) {
      const out = f(`out-${format}.raw`);
      const summary = JSON.parse(ok(await run([`--format=${format}`, '--request-size=64K', '--summary=json', top, out])));
      expect(fs.readFileSync(out).equals(fs.readFileSync(ref))).toBe(true);
      expect(summary.size).toBe(64 * M);
      expect(summary.bytes_read).toBe(data.reduce((n, [, len]) => n + len, 0));
      expect(summary.requests.read).toBe(data.length); // one read per data run (each under 4 MiB)
    }
  });

  it('--format=auto on a raw file opens it directly; --format on a pipe or NBD URI is a usage error', async () => {
    const raw = f('auto.raw');
    fs.writeFileSync(raw, Buffer.alloc(M, 7));
    const out = f('auto-out.raw');
    ok(await run(['--format=auto', raw, out]));
    expect(fs.readFileSync(out).equals(fs.readFileSync(raw))).toBe(true);
    let r = await run(['--format=qcow2', '-', out], { input: Buffer.alloc(0) });
    expect([r.status, r.stderr]).toEqual([1, 'nbdstream: -: --format applies to a file source\n']);
    r = await run(['--target-format=qcow2', raw, 'null:']);
    expect([r.status, r.stderr]).toEqual([1, 'nbdstream: null:: --target-format applies to a file target\n']);
    r = await run(['--target-format=qcow2', '-', f('from-pipe.qcow2')], { input: Buffer.alloc(0) });
    expect([r.status, r.stderr]).toEqual([1, `nbdstream: ${f('from-pipe.qcow2')}: --target-format: the source's size is unknown (a pipe); an image needs it\n`]);
    // the wrong format: qemu-nbd's own reason, in one line
    r = await run(['--format=qcow2', raw, out]);
    expect([r.status, r.stderr]).toEqual([1, `nbdstream: ${raw}: command "qemu-nbd" exited with status 1: qemu-nbd: Failed to blk_new_open '${raw}': Image is not in qcow2 format\n`]);
  });

  it('--target-format=qcow2 turns a sparse raw file into a sparse qcow2 (qemu-img compare, qemu-img map)', async () => {
    const raw = f('sparse.raw');
    const fd = fs.openSync(raw, 'w');
    fs.ftruncateSync(fd, 64 * M);
    fs.writeSync(fd, Buffer.alloc(M, 0x5a), 0, M, 0);
    fs.writeSync(fd, Buffer.alloc(64 * K, 0x6b), 0, 64 * K, 32 * M);
    fs.closeSync(fd);
    const qcow = f('sparse.qcow2');
    const summary = JSON.parse(ok(await run(['--target-format=qcow2', '--summary=json', raw, qcow])));
    expect(summary.requests.zero).toBe(0); // a new image reads as zeroes: nothing to zero
    expect(qemuImg('compare', '-f', 'raw', '-F', 'qcow2', raw, qcow)).toBe('Images are identical.\n');
    expect(dataRanges(qcow)).toEqual([
      [0, M],
      [32 * M, 64 * K],
    ]);
    expect(JSON.parse(qemuImg('info', '--output=json', qcow))).toMatchObject({ format: 'qcow2', 'virtual-size': 64 * M });
  });

  it('--target-format=qcow2 writes into an existing qcow2 large enough, and re-creates a smaller one', async () => {
    const raw = f('src16.raw');
    fs.writeFileSync(raw, Buffer.alloc(16 * M));
    fs.writeFileSync(raw, Buffer.alloc(128 * K, 0x33), { flag: 'r+' });
    const big = f('big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', big, '32M');
    qemuIo(big, 'write -P 0x77 8M 64K'); // overwritten: the source has zeroes there
    ok(await run(['--target-format=qcow2', raw, big]));
    const info = JSON.parse(qemuImg('info', '--output=json', big));
    expect(info).toMatchObject({ 'virtual-size': 32 * M, 'cluster-size': 4096 }); // the same image, kept
    const back = f('big-back.raw');
    qemuImg('convert', '-O', 'raw', big, back);
    expect(fs.readFileSync(back).subarray(0, 16 * M).equals(fs.readFileSync(raw))).toBe(true);

    const small = f('small.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', small, '1M');
    ok(await run(['--target-format=qcow2', raw, small]));
    expect(JSON.parse(qemuImg('info', '--output=json', small))).toMatchObject({ 'virtual-size': 16 * M, 'cluster-size': 65536 });
    expect(qemuImg('compare', '-f', 'raw', '-F', 'qcow2', raw, small)).toBe('Images are identical.\n');
  });
});
