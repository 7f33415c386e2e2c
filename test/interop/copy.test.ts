/**
 * Copies between every endpoint kind, checked by hashing source and target with independent
 * tools (nbdcopy, qemu-img, sha256 of files).
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { nbdServer, nbdcopyHash, qemuNbd, sha256 } from '../helpers/servers.js';
import { allocated, dirPerFile, fileHash, serversPerTest } from '../helpers/fixtures.js';
import { pskAdd } from '../helpers/tls.js';
import { ok, run } from '../helpers/cli.js';

const MiB = 2 ** 20;
const { kit, track } = serversPerTest();
const dir = dirPerFile('nbdstream-copy-');
const random = (seed = 1) => ['sparse-random', ['64M', 'percent=10', `seed=${seed}`], { readOnly: true }] as const;

describe('copy between endpoint kinds', () => {
  it('NBD → new file: identical bytes, holes stay holes', async () => {
    const src = await kit(...random());
    const out = path.join(dir, 'a.img');
    ok(await run([src.uri, out]));
    expect(fs.statSync(out).size).toBe(64 * MiB);
    expect(fileHash(out)).toBe(nbdcopyHash(src.uri));
    expect(allocated(out)).toBeLessThan(20 * MiB);
  });

  it('NBD → existing larger file with junk: truncated to the source size, identical', async () => {
    const src = await kit(...random(2));
    const out = path.join(dir, 'junk.img');
    fs.writeFileSync(out, Buffer.alloc(80 * MiB, 0xee));
    ok(await run([src.uri, out]));
    expect(fs.statSync(out).size).toBe(64 * MiB);
    expect(fileHash(out)).toBe(nbdcopyHash(src.uri));
  });

  it('file → NBD (memory) and NBD → NBD over several connections', async () => {
    const src = await kit(...random(3));
    const file = path.join(dir, 'b.img');
    ok(await run([src.uri, file]));
    const mem = await kit('memory', ['64M']);
    ok(await run([file, mem.uri]));
    expect(nbdcopyHash(mem.uri)).toBe(fileHash(file));
    const mem2 = await kit('memory', ['64M'], { log: true });
    ok(await run(['-C', '4', '-T', '4', mem.uri, mem2.uri]));
    expect(nbdcopyHash(mem2.uri)).toBe(fileHash(file));
    expect(fs.readFileSync(mem2.logFile!, 'utf8').match(/ Connect /g)!.length).toBeGreaterThan(1);
  });

  it('sparse file → file keeps holes and bytes', async () => {
    const src = path.join(dir, 'sparse.img');
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, 256 * MiB);
    fs.writeSync(fd, Buffer.alloc(MiB, 0x61), 0, MiB, 100 * MiB);
    fs.writeSync(fd, Buffer.from('tail'), 0, 4, 256 * MiB - 4);
    fs.closeSync(fd);
    const out = path.join(dir, 'sparse-out.img');
    ok(await run([src, out]));
    expect(fileHash(out)).toBe(fileHash(src));
    expect(allocated(out)).toBeLessThanOrEqual(allocated(src) + 64 * 1024);
  });

  it('qemu-nbd source (OFFSET_HOLE read chunks) with --no-extents: zero ranges are not written', async () => {
    const src = path.join(dir, 'q.img');
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, 64 * MiB);
    fs.writeSync(fd, Buffer.alloc(MiB, 0x33), 0, MiB, 10 * MiB);
    fs.closeSync(fd);
    const q = await qemuNbd(src, { readOnly: true });
    track(q);
    const out = path.join(dir, 'q-out.img');
    const r = await run(['-v', '--no-extents', '-S', '0', q.uri, out]);
    expect(r.status).toBe(0);
    expect(fileHash(out)).toBe(fileHash(src));
    // -S 0 and no extents: only the read replies' holes can have kept zeroes from being written
    const written = Number(/written (\d+)/.exec(r.stderr)![1]);
    expect(written).toBeLessThan(4 * MiB);
    expect(written).toBeGreaterThanOrEqual(MiB);
  });

  it('NBD → qemu-nbd qcow2 target, cross-checked by qemu-img', async () => {
    const src = await kit(...random(4));
    const qcow = path.join(dir, 't.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M']);
    const q = await qemuNbd(qcow, { format: 'qcow2' });
    track(q);
    ok(await run([src.uri, q.uri]));
    await q.stop();
    const raw = path.join(dir, 't.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, raw]);
    expect(fileHash(raw)).toBe(nbdcopyHash(src.uri));
  });

  it('nbd-server (simple replies, no block status) as source and as target', async () => {
    const src = await kit(...random(5));
    const img = path.join(dir, 'ns.img');
    fs.writeFileSync(img, Buffer.alloc(64 * MiB, 0x11));
    const ns = await nbdServer(img);
    track(ns);
    ok(await run([src.uri, ns.uri]));
    const want = nbdcopyHash(src.uri);
    expect(nbdcopyHash(ns.uri)).toBe(want);
    const out = path.join(dir, 'ns-out.img');
    ok(await run([ns.uri, out]));
    expect(fileHash(out)).toBe(want);
  });

  it('NBD → stdout, stdin → NBD, stdin → stdout', async () => {
    const src = await kit(...random(6));
    const want = nbdcopyHash(src.uri);
    const r = await run([], { shell: `"$NBDSTREAM" '${src.uri}' - | sha256sum` });
    expect(r.status).toBe(0);
    expect(r.stdout.toString().split(' ')[0]).toBe(want);
    const file = path.join(dir, 'p.img');
    ok(await run([src.uri, file]));
    const mem = await kit('memory', ['64M']);
    ok(await run([], { shell: `cat '${file}' | "$NBDSTREAM" - '${mem.uri}'` }));
    expect(nbdcopyHash(mem.uri)).toBe(want);
    const r2 = await run([], { shell: `cat '${file}' | "$NBDSTREAM" - - | sha256sum` });
    expect(r2.stdout.toString().split(' ')[0]).toBe(want);
    // stdin of unknown size into a file: the file ends where the input does
    const out = path.join(dir, 'p-out.img');
    ok(await run([], { shell: `head -c 3000001 '${file}' | "$NBDSTREAM" - '${out}'` }));
    expect(fileHash(out)).toBe(sha256(fs.readFileSync(file).subarray(0, 3000001)));
  });

  it('NBD → null: reads only data', async () => {
    const src = await kit('sparse-random', ['1G', 'percent=2', 'seed=9'], { readOnly: true, log: true });
    const r = await run(['-v', src.uri, 'null:']);
    expect(r.status).toBe(0);
    const read = Number(/read (\d+)/.exec(r.stderr)![1]);
    expect(read).toBeLessThan(64 * MiB);
    expect(read).toBeGreaterThan(0);
  });

  it('[ CMD ] on both sides: nbdkit → qemu-nbd by socket activation', async () => {
    const img = path.join(dir, 'act.img');
    fs.writeFileSync(img, Buffer.alloc(64 * MiB));
    ok(await run(['--', '[', 'nbdkit', 'sparse-random', '64M', 'percent=10', 'seed=7', ']', '[', 'qemu-nbd', '-f', 'raw', img, ']']));
    const src = await kit('sparse-random', ['64M', 'percent=10', 'seed=7'], { readOnly: true });
    expect(fileHash(img)).toBe(nbdcopyHash(src.uri));
  });

  it('TLS PSK source (nbds+unix) → file', async () => {
    const psk = pskAdd(path.join(dir, 'keys.psk'), 'alice');
    const src = await kit('sparse-random', ['64M', 'percent=10', 'seed=8'], { readOnly: true, options: ['--tls=require', `--tls-psk=${psk}`] });
    const out = path.join(dir, 'tls.img');
    const uri = `nbds+unix://alice@/?socket=${src.socket}&tls-psk-file=${psk}`;
    ok(await run([uri, out]));
    expect(fileHash(out)).toBe(execFileSync('sh', ['-c', `nbdcopy '${uri}' - | sha256sum`]).toString().split(' ')[0]);
  });

  it('NBD → block device (loop), zeroing by BLKZEROOUT', async () => {
    const backing = path.join(dir, 'loop.img');
    fs.writeFileSync(backing, Buffer.alloc(64 * MiB, 0x5a));
    const dev = execFileSync('losetup', ['-f', '--show', backing]).toString().trim();
    try {
      const src = await kit(...random(10));
      ok(await run([src.uri, dev]));
      expect(sha256(fs.readFileSync(backing))).toBe(nbdcopyHash(src.uri));
    } finally {
      execFileSync('losetup', ['-d', dev]);
    }
  });
});
