/**
 * NBD extended headers (NBD_OPT_EXTENDED_HEADERS) between our client and our server (nbdkit 1.32
 * and qemu 7.2 here lack them: against those the client falls back to structured replies, which
 * the other interop tests cover). Request logs come from the served endpoints, wrapped.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { copy } from '../../lib/copy.js';
import { NbdClient } from '../../lib/nbd/client.js';
import { NbdServer } from '../../lib/nbd/server.js';
import { SparseMemoryEndpoint } from '../../lib/nbd/server-export.js';
import type { Endpoint } from '../../lib/endpoints/endpoint.js';
import {
  ServerDecoder,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeGreeting,
  encodeInfoExport,
  encodeOptionReply,
  encodeRepMetaContext,
} from '../../lib/nbd/server-codec.js';
import * as P from '../../lib/nbd/protocol.js';
import { nbdkit, tmpDir } from '../helpers/servers.js';
import { run } from '../helpers/cli.js';

const TiB = 2 ** 40;
const dir = tmpDir();
let cleanups: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
});

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

let nSock = 0;
const sockPath = () => path.join(dir, `s${nSock++}`);

/** The endpoint with its extents/read/write/zero calls logged as "name offset+length". */
function logged(ep: Endpoint, log: string[]): Endpoint {
  return new Proxy(ep, {
    get(target, key) {
      const v = Reflect.get(target, key, target);
      if (typeof v !== 'function') return v;
      if (!['extents', 'read', 'write', 'zero'].includes(key as string)) return v.bind(target);
      return (offset: number, b: number | Buffer, ...rest: unknown[]) => {
        log.push(`${String(key)} ${offset}+${typeof b === 'number' ? b : b.length}`);
        return v.call(target, offset, b, ...rest);
      };
    },
  });
}

async function serve(ep: Endpoint): Promise<string> {
  const server = new NbdServer(ep);
  await server.listen({ path: sockPath() });
  cleanups.push(() => server.close(200));
  return server.uri!;
}

describe('extended headers, client and server', () => {
  it('a 1 TiB hole costs one block status and one zero request', async () => {
    const srcLog: string[] = [];
    const dstLog: string[] = [];
    const src = await serve(logged(new SparseMemoryEndpoint(TiB), srcLog));
    const dst = await serve(logged(new SparseMemoryEndpoint(TiB), dstLog));
    const s = await copy(src, dst);
    expect(s.requests).toMatchObject({ read: 0, write: 0, zero: 1, extents: 1 });
    expect(srcLog).toEqual([`extents 0+${TiB}`]);
    expect(dstLog).toEqual([`zero 0+${TiB}`]);
  });

  it('data in a 1 TiB image: one block status, zero requests around it spanning hundreds of GiB', async () => {
    const srcLog: string[] = [];
    const dstLog: string[] = [];
    const mem = new SparseMemoryEndpoint(TiB);
    await mem.write(TiB / 2, Buffer.alloc(4096, 0xab));
    const src = await serve(logged(mem, srcLog));
    const target = new SparseMemoryEndpoint(TiB);
    const dst = await serve(logged(target, dstLog));
    const s = await copy(src, dst);
    expect(s.requests).toMatchObject({ read: 1, write: 1, extents: 1 });
    // the server reads only the piece's allocated pages (its extents), the rest goes out as a hole
    expect(srcLog).toEqual([`extents 0+${TiB}`, `extents ${TiB / 2}+262144`, `read ${TiB / 2}+65536`]);
    // in the piece read: 4 KiB of data, 60 KiB of zero blocks (-S), a 192 KiB hole (OFFSET_HOLE)
    expect(dstLog).toEqual([
      `zero 0+${TiB / 2}`,
      `write ${TiB / 2}+4096`,
      `zero ${TiB / 2 + 4096}+61440`,
      `zero ${TiB / 2 + 65536}+196608`,
      `zero ${TiB / 2 + 262144}+${TiB / 2 - 262144}`,
    ]);
    expect((await target.read(TiB / 2 - 4096, 3 * 4096)).data).toEqual(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(4096, 0xab), Buffer.alloc(4096)]));
  });

  it('without them (extendedHeaders: false) lengths stay below 4 GiB', async () => {
    const dstLog: string[] = [];
    const dst = await serve(logged(new SparseMemoryEndpoint(TiB), dstLog));
    const c = await NbdClient.connect(dst, { extendedHeaders: false });
    cleanups.push(() => c.close());
    expect(c.extendedHeaders).toBe(false);
    expect(await c.blockStatus(0, TiB)).toEqual([{ offset: 0, length: 2 ** 32 - 65536, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO }]);
    await c.zero(0, 16 * 2 ** 32);
    expect(dstLog.slice(1, 3)).toEqual([`zero 0+${2 ** 32 - 65536}`, `zero ${2 ** 32 - 65536}+${2 ** 32 - 65536}`]);
    expect(dstLog).toHaveLength(1 + 17);
    const e = await NbdClient.connect(dst);
    cleanups.push(() => e.close());
    expect(e.extendedHeaders).toBe(true);
    expect(await e.blockStatus(0, TiB)).toEqual([{ offset: 0, length: TiB, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO }]);
  });

  it('-v shows extendedHeaders=1 with nbdstream serve, and nothing of it with nbdkit', async () => {
    const r = await run([], { shell: `"$NBDSTREAM" serve --size 1T memory: --run '"$NBDSTREAM" -v "$uri" null:'` });
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/^nbdstream: source nbd\+unix:\S+ size=1099511627776 .* readOnly=0 extendedHeaders=1 preferredBlockSize=4096/m);
    expect(r.stderr).toContain('requests read=0 write=0 zero=0 extents=1\n');
    const kit = await nbdkit('memory', ['1T']);
    cleanups.push(() => kit.stop());
    const k = await run(['-v', kit.uri, 'null:']);
    expect(k.status).toBe(0);
    expect(k.stderr).toMatch(/^nbdstream: source nbd\+unix:\S+ size=1099511627776 .* readOnly=0 preferredBlockSize=4096/m);
    expect(k.stderr).not.toContain('extendedHeaders');
  });
});

/**
 * A hostile server written with the pure server codec: it negotiates base:allocation, accepts
 * or refuses extended headers, and answers block status with the reply `answer` builds.
 */
async function hostile(acceptExtended: boolean, answer: (cookie: bigint, offset: number, length: number) => Buffer): Promise<string> {
  const socket = sockPath();
  const server = net.createServer((s) => {
    s.on('error', () => undefined);
    const d: ServerDecoder = new ServerDecoder({
      onClientFlags: () => undefined,
      onOption: (o) => {
        if (o === P.NBD_OPT_EXTENDED_HEADERS && !acceptExtended) s.write(encodeOptionReply(o, P.NBD_REP_ERR_UNSUP));
        else if (o === P.NBD_OPT_SET_META_CONTEXT) s.write(Buffer.concat([encodeOptionReply(o, P.NBD_REP_META_CONTEXT, encodeRepMetaContext(1, 'base:allocation')), encodeOptionReply(o, P.NBD_REP_ACK)]));
        else if (o === P.NBD_OPT_GO) s.write(Buffer.concat([encodeOptionReply(o, P.NBD_REP_INFO, encodeInfoExport(TiB, P.NBD_FLAG_HAS_FLAGS)), encodeOptionReply(o, P.NBD_REP_ACK)]));
        else s.write(encodeOptionReply(o, P.NBD_REP_ACK));
        if (o === P.NBD_OPT_GO) d.expectRequests(acceptExtended);
        else d.expectOption();
      },
      onRequest: (r) => {
        if (r.type === P.NBD_CMD_BLOCK_STATUS) s.write(answer(r.cookie, r.offset, r.length));
      },
      onProtocolError: () => s.destroy(),
    });
    s.on('data', (b) => d.push(b));
    s.write(encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES));
  });
  await new Promise<void>((r) => server.listen(socket, r));
  cleanups.push(() => new Promise((r) => server.close(r)));
  return `nbd+unix:///?socket=${socket}`;
}

describe('extended headers, hostile servers', () => {
  it('an extended reply without negotiation is a protocol error', async () => {
    const uri = await hostile(false, (cookie, offset, length) => encodeBlockStatusExt(P.NBD_REPLY_FLAG_DONE, cookie, offset, 1, [{ length, flags: 0 }]));
    const c = await NbdClient.connect(uri);
    cleanups.push(() => c.close().catch(() => undefined));
    expect(c.extendedHeaders).toBe(false);
    expect(c.structuredReplies).toBe(true);
    await expect(c.blockStatus(0, TiB)).rejects.toMatchObject({
      code: 'ERR_PROTOCOL',
      message: 'extended reply received but extended headers were not negotiated',
      offset: 0,
    });
  });

  it('a compact structured reply after negotiation is a protocol error', async () => {
    const uri = await hostile(true, (cookie, _offset, length) => encodeBlockStatus(P.NBD_REPLY_FLAG_DONE, cookie, 1, [{ length: Math.min(length, 2 ** 32 - 1), flags: 0 }]));
    const c = await NbdClient.connect(uri);
    cleanups.push(() => c.close().catch(() => undefined));
    expect(c.extendedHeaders).toBe(true);
    await expect(c.blockStatus(0, TiB)).rejects.toMatchObject({ code: 'ERR_PROTOCOL', message: 'structured reply received after extended headers were negotiated' });
  });

  it('the CLI says so in one line', async () => {
    const uri = await hostile(false, (cookie, offset, length) => encodeBlockStatusExt(P.NBD_REPLY_FLAG_DONE, cookie, offset, 1, [{ length, flags: 0 }]));
    const r = await run([uri, 'null:']);
    expect(r.status).toBe(1);
    expect(r.stderr).toBe(`nbdstream: ${uri}: extended reply received but extended headers were not negotiated\n`);
  });
});
