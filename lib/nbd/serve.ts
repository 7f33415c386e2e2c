/**
 * serve(what, options): an NbdServer, listening — the library's `nbdstream serve`.
 *
 *   const server = await serve('disk.img', { path: '/tmp/sock', signal });
 *   server.uri;   // nbd+unix:///?socket=/tmp/sock
 *
 * `what` is an Endpoint, a list of exports, or a spec as `nbdstream serve` takes it (a file or
 * block device served in place, or 'memory:' with `size`). An endpoint opened here from a spec
 * is closed with the server; Endpoints passed in are left open. `signal` closes the server.
 */
import { NbdStreamError, checkOptionNames, throwIfAborted } from '../errors.js';
import type { Endpoint } from '../endpoints/endpoint.js';
import { NbdServer, SERVER_OPTIONS, type ExportDefinition, type ListenOptions, type NbdServerOptions } from './server.js';
import { openServedEndpoint } from './server-export.js';

export interface ServeOptions extends NbdServerOptions, ListenOptions {
  /** Export name of a single endpoint or spec (default ''). */
  exportName?: string;
  /** Its description (NBD_INFO_DESCRIPTION). */
  description?: string;
  /** Size of a 'memory:' image, in bytes. */
  size?: number;
}

const LISTEN_OPTIONS: Readonly<Record<keyof ListenOptions, true>> = { path: true, port: true, host: true, fd: true, vsockPort: true };
const SERVE_OPTIONS: Readonly<Record<keyof ServeOptions, true>> = { ...SERVER_OPTIONS, ...LISTEN_OPTIONS, exportName: true, description: true, size: true };

/** A server that owns the endpoint it serves: it closes it after itself. */
class OwningServer extends NbdServer {
  constructor(
    private readonly owned: Endpoint,
    defs: ExportDefinition[],
    opts: NbdServerOptions,
  ) {
    super(defs, opts);
  }

  override close(graceMs?: number): Promise<void> {
    return super.close(graceMs).then(() => this.owned.close());
  }
}

export async function serve(what: string | Endpoint | ExportDefinition[], options: ServeOptions = {}): Promise<NbdServer> {
  checkOptionNames('serve()', options, SERVE_OPTIONS);
  const { path, port, host, fd, vsockPort, exportName, description, size, ...serverOptions } = options;
  if (path === undefined && port === undefined && fd === undefined && vsockPort === undefined) throw new TypeError('serve(): give one of path, port, fd or vsockPort to listen on');
  if (Array.isArray(what) && (exportName !== undefined || description !== undefined))
    throw new TypeError('serve(): exportName and description are for one endpoint; a list of exports names its own');
  if (typeof what !== 'string' && size !== undefined) throw new NbdStreamError('ERR_USAGE', 'size only applies to memory:', { option: 'size' });
  throwIfAborted(options.signal);
  const owned = typeof what === 'string' ? await openServedEndpoint(what, { readOnly: options.readOnly, size }) : undefined;
  let server: NbdServer;
  try {
    const endpoint = owned ?? (what as Endpoint);
    const defs = Array.isArray(what) ? what : [{ name: exportName ?? '', endpoint, description }];
    server = owned ? new OwningServer(owned, defs, serverOptions) : new NbdServer(defs, serverOptions);
  } catch (err) {
    await owned?.close();
    throw err;
  }
  try {
    await server.listen({ path, port, host, fd, vsockPort });
  } catch (err) {
    await server.close(0);
    throwIfAborted(options.signal);
    throw err;
  }
  return server;
}
