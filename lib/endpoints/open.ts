/**
 * openEndpoint(spec, mode): choose the endpoint kind from its spec — an NBD URI, `null:`, `-`,
 * `[ CMD ARGS ]` (given as an argv array), or a path (regular file or block device; FIFOs,
 * character devices and sockets are pipes). Pipes read or write raw bytes or the extent stream
 * format (opts.pipeFormat; a source detects it); a target opened with opts.update keeps its
 * contents (files are not truncated); opts.dirtyBitmap applies to NBD sources.
 */
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import { NbdStreamError } from '../errors.js';
import { isNbdUri } from '../nbd/uri.js';
import type { Endpoint, OpenMode, OpenOptions } from './endpoint.js';
// Endpoint kinds are loaded when used: a copy pays start-up time only for the kinds it opens.

/** A URI, path, "-", "null:", or the argv of a server command to socket-activate. */
export type EndpointSpec = string | string[];

export function describeSpec(spec: EndpointSpec): string {
  return Array.isArray(spec) ? `[ ${spec.join(' ')} ]` : spec;
}

/**
 * Sources are walked with offsets as JS numbers: one of 2^53 bytes or more (an NBD export may be
 * up to 2^63 - 1) is refused here, before anything is written. Targets of any size are fine.
 */
async function sizedForMode(ep: Endpoint, mode: OpenMode): Promise<Endpoint> {
  if (mode !== 'source' || ep.exactSize === undefined) return ep;
  await ep.close().catch(() => undefined);
  throw new NbdStreamError('ERR_UNSUPPORTED', `source size ${ep.exactSize} is larger than 2^53 - 1 bytes, the largest source nbdstream can read`, { endpoint: ep.name });
}

export async function openEndpoint(spec: EndpointSpec, mode: OpenMode, opts: OpenOptions = {}): Promise<Endpoint> {
  if (mode !== 'source' && opts.dirtyBitmap !== undefined) opts = { ...opts, dirtyBitmap: undefined };
  if (Array.isArray(spec)) {
    const name = describeSpec(spec);
    const [{ startActivated }, { openNbd }] = await Promise.all([import('./command.js'), import('./nbd.js')]);
    const server = await startActivated(spec, { name });
    try {
      return await sizedForMode(await openNbd(server.uri, opts, name, () => server.stop()), mode);
    } catch (err) {
      await server.stop();
      throw err;
    }
  }
  if (isNbdUri(spec)) return sizedForMode(await (await import('./nbd.js')).openNbd(spec, opts), mode);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) throw new NbdStreamError('ERR_URI', `unsupported URI scheme`, { endpoint: spec });
  if (spec === 'null:') {
    if (mode === 'source') throw new NbdStreamError('ERR_USAGE', 'null: can only be a destination, not a source');
    return (await import('./null.js')).openNull();
  }
  if (opts.dirtyBitmap !== undefined && mode === 'source')
    throw new NbdStreamError('ERR_USAGE', `--dirty-bitmap needs an NBD source (qemu:dirty-bitmap:${opts.dirtyBitmap}), not ${spec === '-' ? 'a pipe' : 'a file'}`, { endpoint: spec });
  const pipeOpts = { format: opts.pipeFormat, size: opts.sourceSize, update: opts.update };
  if (spec === '-') {
    const { openPipe } = await import('./pipe.js');
    return mode === 'source' ? openPipe(0, '-', 'source', pipeOpts) : openPipe(1, '-', 'target', pipeOpts);
  }
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(spec);
  } catch {
    st = undefined; // missing: a source fails in openFile, a target is created
  }
  if (st && (st.isFIFO() || st.isCharacterDevice() || st.isSocket())) {
    // async open: opening a FIFO waits for its other end, which must not block the event loop
    const fd = await promisify(fs.open)(spec, mode === 'source' ? 'r' : 'w');
    return (await import('./pipe.js')).openPipe(fd, spec, mode, pipeOpts);
  }
  // a partial source (dirty bitmap, incremental stream) updates an existing file in place
  return (await import('./file.js')).openFile(spec, mode === 'target' && opts.update ? 'update' : mode, opts);
}
