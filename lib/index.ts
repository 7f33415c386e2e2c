/** nbdstream public API. */
export { NbdStreamError, type ErrorCode } from './errors.js';
export { NbdClient, type ConnectOptions, type ReadResult, type BlockStatusExtent, type ZeroOptions, type Range } from './nbd/client.js';
export { parseNbdUri, formatNbdUri, isNbdUri, type NbdAddress } from './nbd/uri.js';
export * as protocol from './nbd/protocol.js';
