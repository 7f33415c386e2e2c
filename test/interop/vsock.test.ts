/**
 * vsock: `nbdstream serve --vsock` and `nbd+vsock://CID:PORT/` through the native addon. Where the
 * kernel has vsock with its loopback transport (CID 1), the copy itself is checked byte for byte;
 * where it has no AF_VSOCK, or no loopback transport, the same tests assert the one-line error
 * instead. Nothing is skipped: which branch runs is decided by a probe with the raw addon calls.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { native, type NativeError } from '../../lib/native.js';
import { VMADDR_CID_ANY, VMADDR_CID_LOCAL } from '../../lib/nbd/vsock.js';
import { CLI, run } from '../helpers/cli.js';
import { dirPerFile } from '../helpers/fixtures.js';

type VsockState = 'no-af-vsock' | 'loopback' | 'no-loopback';

const dir = dirPerFile('nbdstream-vsock-');
// vsock ports are per machine; a random high one keeps parallel runs apart
const basePort = 40000 + Math.floor(Math.random() * 20000) * 4;

/** What this kernel offers: a listening AF_VSOCK socket, and a connection to it through CID 1. */
async function probe(port: number): Promise<VsockState> {
  try {
    execFileSync('modprobe', ['-q', 'vsock_loopback'], { stdio: 'ignore' });
  } catch {
    /* no modprobe, no module, or not root: the probe below tells */
  }
  let fd: number;
  try {
    fd = native!.vsockListen(VMADDR_CID_ANY, port);
  } catch (err) {
    if ((err as NativeError).code === 'EAFNOSUPPORT') return 'no-af-vsock';
    throw err;
  }
  try {
    const connected = await new Promise<boolean>((resolve) =>
      native!.vsockConnect(VMADDR_CID_LOCAL, port, (err, c) => {
        if (!err) fs.closeSync(c);
        resolve(!err);
      }),
    );
    return connected ? 'loopback' : 'no-loopback';
  } finally {
    fs.closeSync(fd);
  }
}

const NO_AF_VSOCK = 'vsock is not available: this kernel has no AF_VSOCK sockets (socket(AF_VSOCK): EAFNOSUPPORT)';
const hint = () => (fs.existsSync('/sys/module/vsock_loopback') ? '' : ' (this kernel has no vsock loopback transport for CID 1: modprobe vsock_loopback)');
const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

let state: VsockState;
beforeAll(async () => {
  expect(native).toBeDefined();
  state = await probe(basePort);
}, 20000);

describe('vsock (nbd+vsock://, serve --vsock)', () => {
  it('copies a sparse file served by `nbdstream serve --vsock` to a file over nbd+vsock://1:PORT/ (or says in one line why it cannot)', async () => {
    const port = basePort + 1;
    const src = path.join(dir, 'src.img');
    const out = path.join(dir, 'out.img');
    const fd = fs.openSync(src, 'w');
    fs.ftruncateSync(fd, 8 << 20);
    fs.writeSync(fd, Buffer.alloc(256 << 10, 0xa5), 0, 256 << 10, 1 << 20);
    fs.writeSync(fd, Buffer.from('last bytes'), 0, 10, (8 << 20) - 10);
    fs.closeSync(fd);
    const r = await run(['serve', '--vsock', '--port', String(port), '--read-only', src, '--run', `"${CLI}" --summary=json "$uri" "${out}"`]);
    if (state === 'loopback') {
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const summary = JSON.parse(r.stdout.toString());
      expect(summary).toMatchObject({ source: `nbd+vsock://1:${port}/`, size: 8 << 20 });
      expect(summary.bytes_read).toBeLessThan(1 << 20); // only the data extents travel
      expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
    } else if (state === 'no-loopback') {
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^nbdstream: nbd\\+vsock://1:${port}/: cannot connect to vsock CID 1 port ${port}: (ETIMEDOUT|ENODEV|ECONNRESET)${escape(hint())}\n$`));
    } else {
      expect(r.status).toBe(1);
      expect(r.stderr).toBe(`nbdstream serve: ${NO_AF_VSOCK}\n`);
    }
  }, 30000);

  it('a client with nothing listening fails in one line naming the vsock address', async () => {
    const port = basePort + 2;
    const r = await run([`nbd+vsock://1:${port}/`, path.join(dir, 'never.img')]);
    expect(r.status).toBe(1);
    const prefix = `nbdstream: nbd+vsock://1:${port}/: `;
    if (state === 'loopback') expect(r.stderr).toBe(`${prefix}cannot connect to vsock CID 1 port ${port}: ECONNRESET\n`);
    else if (state === 'no-loopback') expect(r.stderr).toMatch(new RegExp(`^${escape(prefix)}cannot connect to vsock CID 1 port ${port}: (ETIMEDOUT|ENODEV|ECONNRESET)${escape(hint())}\n$`));
    else expect(r.stderr).toBe(`${prefix}${NO_AF_VSOCK}\n`);
  }, 30000);

  it('serve --vsock takes --port only', async () => {
    const r = await run(['serve', '--vsock', '--socket', path.join(dir, 's'), '--size', '1M', 'memory:']);
    expect(r.stderr).toBe('nbdstream serve: --vsock listens on --port only (not with --socket, --bind or socket activation)\n');
    expect(r.status).toBe(1);
  });
});
