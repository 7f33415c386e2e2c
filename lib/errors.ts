/**
 * Typed errors. Every failure the library reports is an NbdStreamError with a stable `code`;
 * only bin/ turns them into text and exit codes.
 */

export type ErrorCode =
  | 'ERR_USAGE' // bad option or argument
  | 'ERR_URI' // malformed or unsupported NBD URI
  | 'ERR_CONNECT' // socket could not be opened or was closed
  | 'ERR_HANDSHAKE' // server refused or failed option negotiation
  | 'ERR_TLS' // TLS required, refused or failed
  | 'ERR_PROTOCOL' // peer violated the NBD protocol
  | 'ERR_SERVER' // server answered a request with an error
  | 'ERR_UNSUPPORTED' // the export cannot do what was asked (read-only, no trim ...)
  | 'ERR_ALIGNMENT' // request violates the server's block size constraints
  | 'ERR_RANGE' // request outside the export
  | 'ERR_CLOSED' // connection closed while requests were pending
  | 'ERR_TIMEOUT'
  | 'ERR_IO' // local file or device error
  | 'ERR_TARGET_TOO_SMALL'
  | 'ERR_SAME_FILE' // the target is the source's file or block device
  | 'ERR_BROKEN_PIPE' // a pipe target's reader has gone (EPIPE)
  | 'ERR_VERIFY' // --verify: the target does not read back as the source
  | 'ABORT_ERR'; // the AbortSignal passed in was aborted (the error's name is 'AbortError', as Node's)

export interface ErrorDetails {
  /** Which endpoint (URI or path) the error concerns. */
  endpoint?: string;
  /** Byte offset of the failing request, when there is one. */
  offset?: number;
  /** NBD command name, e.g. NBD_CMD_READ. */
  command?: string;
  /** Server error name, e.g. EIO (from an NBD error reply). */
  nbdError?: string;
  /** The library option the error is about (e.g. 'requestSize'); the message starts with it. */
  option?: string;
  cause?: unknown;
}

export class NbdStreamError extends Error {
  readonly code: ErrorCode;
  endpoint?: string;
  offset?: number;
  command?: string;
  nbdError?: string;
  option?: string;
  /** Local file errors, as on Node's own errors: the negative errno (util.getSystemErrorName gives "ENOENT"), the call and the path. */
  errno?: number;
  syscall?: string;
  path?: string;

  constructor(code: ErrorCode, message: string, details: ErrorDetails = {}) {
    super(message, details.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = 'NbdStreamError';
    this.code = code;
    this.endpoint = details.endpoint;
    this.offset = details.offset;
    this.command = details.command;
    this.nbdError = details.nbdError;
    if (details.option !== undefined) this.option = details.option;
  }

  /** One line: "endpoint: at offset N: message". */
  describe(): string {
    const parts: string[] = [];
    if (this.endpoint) parts.push(this.endpoint);
    if (this.offset !== undefined) parts.push(`offset ${this.offset}`);
    parts.push(this.message);
    return parts.join(': ');
  }
}

/** Wrap any thrown value as an NbdStreamError, keeping existing ones (and filling the endpoint). */
export function asNbdStreamError(err: unknown, code: ErrorCode, endpoint?: string): NbdStreamError {
  if (err instanceof NbdStreamError) {
    if (endpoint && !err.endpoint) err.endpoint = endpoint;
    return err;
  }
  const e = err as NodeJS.ErrnoException | undefined;
  const msg = e && typeof e.message === 'string' ? e.message : String(err);
  return new NbdStreamError(code, msg, { endpoint, cause: err });
}

/**
 * The rejection of an operation whose AbortSignal was aborted: as Node's own (name 'AbortError',
 * code 'ABORT_ERR', the signal's reason as `cause`), and an NbdStreamError like every other.
 */
export function abortError(signal: AbortSignal): NbdStreamError {
  const err = new NbdStreamError('ABORT_ERR', 'The operation was aborted', { cause: signal.reason });
  err.name = 'AbortError';
  return err;
}

/** Throw abortError(signal) if the signal is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortError(signal);
}

/**
 * Options objects are checked by name: a misspelt option is a TypeError naming it (and the
 * known option nearest to it), not silently ignored. `known` lists every option `fn` takes.
 */
export function checkOptionNames(fn: string, options: object | undefined, known: Readonly<Record<string, unknown>>): void {
  if (options === undefined || options === null) return;
  if (typeof options !== 'object') throw new TypeError(`${fn}: options must be an object, not ${typeof options}`);
  for (const name of Object.keys(options)) {
    if (Object.hasOwn(known, name)) continue;
    const near = Object.keys(known).find((k) => k.toLowerCase() === name.toLowerCase());
    throw new TypeError(`${fn}: unknown option "${name}"${near ? ` (did you mean "${near}"?)` : ''}`);
  }
}
