import { afterEach, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdStreamError } from '../../lib/errors.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { startActivated, type ActivatedServer } from '../../lib/endpoints/command.js';
import { tmpDir } from '../helpers/servers.js';

let cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

async function start(argv: string[], o = {}): Promise<ActivatedServer> {
  const s = await startActivated(argv, o);
  cleanups.push(() => s.stop());
  return s;
}

async function open(s: ActivatedServer): Promise<NbdClient> {
  const c = await NbdClient.connect(s.uri);
  cleanups.push(() => c.close().catch(() => {}));
  return c;
}

function isGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

async function startError(argv: string[], o = {}): Promise<NbdStreamError> {
  const t0 = Date.now();
  try {
    const s = await startActivated(argv, o);
    await s.stop();
  } catch (e) {
    expect(e).toBeInstanceOf(NbdStreamError);
    (e as NbdStreamError & { ms: number }).ms = Date.now() - t0;
    return e as NbdStreamError;
  }
  throw new Error(`startActivated(${JSON.stringify(argv)}) did not fail`);
}

function pattern(offset: number, length: number): Buffer {
  // nbdkit-pattern-plugin: each 8-byte word holds its own offset, big-endian.
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 8) b.writeBigUInt64BE(BigInt(offset + i), i);
  return b;
}

describe('startActivated (socket activation, [ CMD ARGS ])', () => {
  it('runs nbdkit memory: exact bytes written and read back; stop ends it and removes the temp dir', async () => {
    const s = await start(['nbdkit', 'memory', '1M']);
    expect(s.uri).toBe(`nbd+unix:///?socket=${s.socket}`);
    expect(fs.statSync(s.socket).isSocket()).toBe(true);
    const c = await open(s);
    expect(c.size).toBe(1 << 20);
    const data = Buffer.alloc(12345);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    await c.pwrite(4096 * 3 + 17, data);
    const r = await c.pread(4096 * 3 + 17, data.length);
    expect(Buffer.compare(r.data, data)).toBe(0);
    expect((await c.pread(0, 4096)).data.equals(Buffer.alloc(4096))).toBe(true);
    // A second connection reaches the same server.
    const c2 = await open(s);
    expect((await c2.pread(4096 * 3 + 17, data.length)).data.equals(data)).toBe(true);
    await c.close();
    await c2.close();
    expect(s.failure()).toBeUndefined();
    const dir = path.dirname(s.socket);
    await s.stop();
    expect(isGone(s.pid)).toBe(true);
    expect(fs.existsSync(dir)).toBe(false);
    await s.stop(); // idempotent
  });

  it('runs nbdkit -r pattern 1G (read-only, 1 GiB)', async () => {
    const s = await start(['nbdkit', '-r', 'pattern', '1G']);
    const c = await open(s);
    expect(c.size).toBe(2 ** 30);
    const off = 2 ** 30 - 65536;
    expect((await c.pread(off, 65536)).data.equals(pattern(off, 65536))).toBe(true);
    await expect(c.pwrite(0, Buffer.alloc(512))).rejects.toBeInstanceOf(NbdStreamError);
  });

  it('runs qemu-nbd -f raw FILE (no -t): writes land in the file', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'disk.img');
    fs.writeFileSync(file, Buffer.alloc(4 << 20));
    const s = await start(['qemu-nbd', '-f', 'raw', file]);
    const c = await open(s);
    expect(c.size).toBe(4 << 20);
    const data = Buffer.alloc(65536 + 512);
    for (let i = 0; i < data.length; i++) data[i] = (i % 253) + 1;
    await c.pwrite(1 << 20, data);
    await c.flush();
    expect((await c.pread(1 << 20, data.length)).data.equals(data)).toBe(true);
    await c.close();
    await s.stop();
    expect(isGone(s.pid)).toBe(true);
    expect(fs.existsSync(path.dirname(s.socket))).toBe(false);
    const onDisk = fs.readFileSync(file);
    expect(onDisk.subarray(1 << 20, (1 << 20) + data.length).equals(data)).toBe(true);
    expect(onDisk.subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20))).toBe(true);
  });

  it('reports a command that does not exist as ERR_CONNECT', async () => {
    const e = await startError(['nbdstream-no-such-command', 'memory', '1M']);
    expect(e.code).toBe('ERR_CONNECT');
    expect(e.message).toBe('cannot run "nbdstream-no-such-command": ENOENT');
    const e2 = await startError(['/nonexistent/dir/nbdkit']);
    expect(e2.message).toBe('cannot run "/nonexistent/dir/nbdkit": ENOENT');
  });

  it('reports an exec failure that only sh sees (bad #! interpreter) as cannot run', async () => {
    const dir = tmpDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const script = path.join(dir, 'server');
    fs.writeFileSync(script, '#!/nonexistent/interpreter\n', { mode: 0o755 });
    const e = await startError([script]);
    expect(e.code).toBe('ERR_CONNECT');
    expect(e.message).toBe(`cannot run "${script}": ENOENT`);
  });

  it('reports a command that exits at once with its status and first stderr line, quickly', async () => {
    const e = await startError(['sh', '-c', 'echo boom >&2; echo second line >&2; exit 3']);
    expect(e.code).toBe('ERR_CONNECT');
    expect(e.message).toBe('command "sh" exited with status 3: boom');
    expect((e as NbdStreamError & { ms: number }).ms).toBeLessThan(3000);
    expect(e.message).not.toMatch(/\n/);
  });

  it('reports a server that fails after starting (nbdkit with a bad plugin argument)', async () => {
    const e = await startError(['nbdkit', 'memory', 'size=banana']);
    expect(e.code).toBe('ERR_CONNECT');
    expect(e.message).toMatch(/^command "nbdkit" exited with status 1: nbdkit: .*banana/);
  });

  it('fails rather than hangs when the command closes the socket without serving', async () => {
    const e = await startError(['sh', '-c', 'exec 3>&-; exec sleep 30']);
    expect(e.code).toBe('ERR_CONNECT');
    expect(e.message).toMatch(/^command "sh" is not serving the activated socket: /);
  });

  it('times out on a command that never answers, and kills it', async () => {
    const e = await startError(['sleep', '30'], { timeoutMs: 300 });
    expect(e.code).toBe('ERR_TIMEOUT');
    expect(e.message).toBe('command "sleep" did not answer on its socket within 0.3 s');
  });

  it('failure() explains a server that died after starting', async () => {
    const s = await start(['nbdkit', 'memory', '1M']);
    process.kill(s.pid, 'SIGKILL');
    const until = Date.now() + 5000;
    while (!s.failure() && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(s.failure()?.message).toBe('command "nbdkit" was killed by signal SIGKILL');
    await expect(NbdClient.connect(s.uri)).rejects.toBeInstanceOf(NbdStreamError);
    await s.stop();
    expect(fs.existsSync(path.dirname(s.socket))).toBe(false);
  });
});
