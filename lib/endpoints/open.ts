/**
 * openEndpoint(spec, mode): choose the endpoint kind from its spec — an NBD URI, `null:`, `-`,
 * `[ CMD ARGS ]` (given as an argv array), or a path (regular file or block device; FIFOs,
 * character devices and sockets are pipes). Pipes read or write raw bytes or the extent stream
 * format (opts.pipeFormat; a source detects it); a target opened with opts.update keeps its
 * contents (files are not truncated); opts.dirtyBitmap applies to NBD sources; opts.format opens a
 * file as a disk image through qemu-nbd (image.ts). A `{ file, fs }` object is a regular file
 * opened through its own options (fs: a node:fs-compatible file system such as a memfs volume).
 */
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import { NbdStreamError, checkOptionNames } from '../errors.js';
import { isNbdUri } from '../nbd/uri.js';
import { checkNotSource, fileIdentity, type Endpoint, type OpenMode, type OpenOptions } from './endpoint.js';
import type { NbdEndpoint } from './nbd.js';
import type { FileOptions } from './file.js';
// Endpoint kinds are loaded when used: a copy pays start-up time only for the kinds it opens.

/** A regular file (or block device) with the file endpoint's own options, e.g. `{ file: '/out.img', fs: vol }`. */
export interface FileSpec extends Pick<FileOptions, 'fs'> {
  file: string;
}

/** A URI, path, "-", "null:", the argv of a server command to socket-activate, or a FileSpec. */
export type EndpointSpec = string | string[] | FileSpec;

/** An opened Endpoint rather than a spec (a string, an argv array or a FileSpec). */
export function isEndpoint(x: EndpointSpec | Endpoint): x is Endpoint {
  return typeof x === 'object' && x !== null && !Array.isArray(x) && typeof (x as Endpoint).read === 'function';
}

export function describeSpec(spec: EndpointSpec): string {
  return Array.isArray(spec) ? `[ ${spec.join(' ')} ]` : typeof spec === 'object' ? spec.file : spec;
}

/** Start `argv` by socket activation (command.ts) and open its export; the command stops on close(). */
export async function openCommand(argv: string[], opts: OpenOptions, name: string): Promise<NbdEndpoint> {
  const [{ startActivated }, { openNbd }] = await Promise.all([import('./command.js'), import('./nbd.js')]);
  // --timeout also bounds the wait for the command's server to answer (default 60 s)
  const server = await startActivated(argv, { name, timeoutMs: opts.timeout !== undefined ? opts.timeout * 1000 : undefined });
  try {
    return await openNbd(server.uri, opts, name, () => server.stop());
  } catch (err) {
    await server.stop();
    throw err;
  }
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
  if (typeof spec !== 'string' && (typeof spec !== 'object' || spec === null))
    throw new TypeError(`an endpoint is a URI or path, an argv array, a { file, fs } object or an Endpoint, not ${spec === null ? 'null' : typeof spec}`);
  if (mode !== 'source' && opts.dirtyBitmap !== undefined) opts = { ...opts, dirtyBitmap: undefined };
  // format is the copy's `format` for a source, `targetFormat` for a target
  const formatOption = mode === 'source' ? 'format' : 'targetFormat';
  if (opts.format !== undefined && (Array.isArray(spec) || spec === '-' || spec === 'null:' || (typeof spec === 'string' && /^[a-z][a-z0-9+.-]*:\/\//i.test(spec))))
    throw new NbdStreamError('ERR_USAGE', `${formatOption} applies to a file ${mode}`, { endpoint: describeSpec(spec), option: formatOption });
  if (Array.isArray(spec)) return sizedForMode(await openCommand(spec, opts, describeSpec(spec)), mode);
  if (typeof spec === 'string') {
    if (isNbdUri(spec)) return sizedForMode(await (await import('./nbd.js')).openNbd(spec, opts), mode);
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) throw new NbdStreamError('ERR_URI', `unsupported URI scheme`, { endpoint: spec });
    if (spec === 'null:') {
      if (mode === 'source') throw new NbdStreamError('ERR_USAGE', 'null: can only be a destination, not a source');
      return (await import('./null.js')).openNull();
    }
  }
  if (opts.dirtyBitmap !== undefined && mode === 'source')
    throw new NbdStreamError('ERR_USAGE', `dirtyBitmap needs an NBD source (qemu:dirty-bitmap:${opts.dirtyBitmap}), not ${spec === '-' ? 'a pipe' : 'a file'}`, { endpoint: describeSpec(spec), option: 'dirtyBitmap' });
  if (typeof spec === 'object') return openFileSpec(spec, mode, opts);
  const pipeOpts = { format: opts.pipeFormat, size: opts.sourceSize, update: opts.update };
  if (spec === '-') {
    // stdin or stdout may be a regular file or device (`< s.img`, `1<> s.img`): it has an identity
    const fd = mode === 'source' ? 0 : 1;
    let identity: string | undefined;
    try {
      identity = fileIdentity(fs.fstatSync(fd));
    } catch {
      identity = undefined; // closed: the pipe endpoint reports it
    }
    if (mode === 'target') checkNotSource(spec, identity, opts.sourceIdentity);
    const ep = await (await import('./pipe.js')).openPipe(fd, '-', mode, pipeOpts);
    return identity === undefined ? ep : Object.assign(ep, { identity });
  }
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(spec);
  } catch {
    st = undefined; // missing: a source fails in openFile, a target is created
  }
  if (st && (st.isFIFO() || st.isCharacterDevice() || st.isSocket())) {
    // async open: opening a FIFO waits for its other end, which must not block the event loop
    if (opts.format !== undefined) throw new NbdStreamError('ERR_USAGE', `${formatOption} applies to a file ${mode}, not a pipe`, { endpoint: spec, option: formatOption });
    const fd = await promisify(fs.open)(spec, mode === 'source' ? 'r' : 'w');
    return (await import('./pipe.js')).openPipe(fd, spec, mode, pipeOpts);
  }
  return openFileSpec({ file: spec }, mode, opts);
}

const FILE_SPEC_KEYS: Readonly<Record<keyof FileSpec, true>> = { file: true, fs: true };

async function openFileSpec(spec: FileSpec, mode: OpenMode, opts: OpenOptions): Promise<Endpoint> {
  checkOptionNames('a { file } endpoint', spec, FILE_SPEC_KEYS);
  if (typeof spec.file !== 'string') throw new TypeError('a { file } endpoint needs a path: { file: string, fs? }');
  if (opts.format !== undefined) {
    if (spec.fs !== undefined) throw new NbdStreamError('ERR_UNSUPPORTED', 'a disk image format needs node:fs (qemu-nbd opens the file), not an injected fs', { endpoint: spec.file });
    return (await import('./image.js')).openImage(spec.file, mode, opts.format, opts);
  }
  // a partial source (dirty bitmap, incremental stream) updates an existing file in place
  return (await import('./file.js')).openFile(spec.file, mode === 'target' && opts.update ? 'update' : mode, { sourceSize: opts.sourceSize, sourceIdentity: opts.sourceIdentity, fs: spec.fs });
}
