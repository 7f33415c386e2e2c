/**
 * Disk images opened by format name (--format, --target-format): the file is served by qemu-nbd,
 * started by socket activation as `[ CMD ARGS ]` endpoints are (command.ts), so that a qcow2
 * source is read as the disk it contains (qemu-nbd's block status: only allocated clusters are
 * read) and a qcow2 target stays sparse.
 *
 * Contracts:
 *  - Source: `qemu-nbd -r -f FMT FILE`; FMT `auto` is the format the header shows
 *    (lib/image-format.ts); `raw`, or `auto` finding none, opens the file directly.
 *  - Target: an existing FILE that is already a FMT image at least the source's size is opened
 *    and written in place; anything else is (re)created with `qemu-img create -f FMT FILE SIZE`
 *    (as a raw file target is truncated) and then reads as zeroes (isZeroInitialised), so no
 *    zero requests reach it. `raw` opens the file directly.
 *  - Paths are made absolute, so qemu never reads "proto:..." in a file name as a protocol.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { NbdStreamError } from '../errors.js';
import { nodeChildProcess } from '../builtins.js';
import { detectImageFormat, IMAGE_HEADER_BYTES } from '../image-format.js';
import type { Endpoint, OpenMode, OpenOptions } from './endpoint.js';
import { openCommand } from './open.js';

/** The format the first bytes of `file` show, or undefined (raw, or shorter than a header). */
function probe(file: string): string | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return undefined; // missing or unreadable: the caller's open reports it
  }
  try {
    const header = Buffer.alloc(IMAGE_HEADER_BYTES);
    return detectImageFormat(header.subarray(0, fs.readSync(fd, header, 0, header.length, 0)));
  } finally {
    fs.closeSync(fd);
  }
}

/** The qemu-nbd command serving `file` as `format`; -e lets every multi-conn connection in, -t keeps it up for reconnects. */
function qemuNbd(file: string, format: string, readOnly: boolean, connections: number): string[] {
  return ['qemu-nbd', ...(readOnly ? ['-r'] : []), '-f', format, '-t', '-e', String(Math.max(connections, 1)), '--', path.resolve(file)];
}

async function qemuImgCreate(file: string, format: string, size: number): Promise<void> {
  try {
    await promisify(nodeChildProcess().execFile)('qemu-img', ['create', '-q', '-f', format, '--', path.resolve(file), String(size)]);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    const why = e.code === 'ENOENT' ? 'cannot run "qemu-img": ENOENT' : `qemu-img create failed: ${(e.stderr ?? e.message).trim().split('\n')[0]}`;
    throw new NbdStreamError('ERR_IO', why, { endpoint: file, cause: err });
  }
}

/** Open a file source or target as a `format` image (see the header). */
export async function openImage(file: string, mode: OpenMode, format: string, opts: OpenOptions): Promise<Endpoint> {
  // the copy option it comes from (the CLI says --format, --target-format)
  const option = mode === 'source' ? 'format' : 'targetFormat';
  if (!/^[a-z0-9_-]+$/.test(format)) throw new NbdStreamError('ERR_USAGE', `${option}: bad format name "${format}"`, { endpoint: file, option });
  const { openFile } = await import('./file.js');
  const connections = opts.connections ?? 4;

  if (mode === 'source') {
    const fmt = format === 'auto' ? probe(file) ?? 'raw' : format;
    if (fmt === 'raw') return openFile(file, 'source', opts);
    return openCommand(qemuNbd(file, fmt, true, connections), opts, file);
  }

  if (format === 'auto') throw new NbdStreamError('ERR_USAGE', `${option}: expected a format name such as qcow2, not "auto"`, { endpoint: file, option });
  if (format === 'raw') return openFile(file, opts.update ? 'update' : 'target', opts);
  const size = opts.sourceSize;
  if (size === undefined) throw new NbdStreamError('ERR_USAGE', `${option}: the source's size is unknown (a pipe); an image needs it`, { endpoint: file, option });
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(file);
  } catch {
    st = undefined;
  }
  if (st && !st.isFile()) throw new NbdStreamError('ERR_USAGE', `${option}: the destination must be a regular file`, { endpoint: file, option });
  if (st && probe(file) === format) {
    const ep = await openCommand(qemuNbd(file, format, false, connections), opts, file);
    if (ep.size >= size) return ep;
    await ep.close();
  }
  if (opts.update) throw new NbdStreamError('ERR_USAGE', `${option}: a partial copy needs an existing ${format} image at least ${size} bytes large`, { endpoint: file, option });
  await qemuImgCreate(file, format, size);
  const ep = await openCommand(qemuNbd(file, format, false, connections), opts, file);
  ep.capabilities.isZeroInitialised = true;
  return ep;
}
