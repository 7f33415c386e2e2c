/** nbdstream public API. */
export { NbdStreamError, type ErrorCode, type ErrorDetails } from './errors.js';
export { copy, type CopyOptions, type CopySummary } from './copy.js';
export { copyProgress, type CopyProgressOptions } from './copy-progress.js';
export { ProgressTracker, throttle, progressPercent, type CopyProgress, type CopyPhase } from './progress.js';
export {
  BlockHasher,
  BlkhashStream,
  blkhashBuffer,
  hashEndpoint,
  parseBlkhash,
  zeroBlockDigest,
  BLKHASH_ALGORITHMS,
  DEFAULT_BLKHASH,
  type BlkhashAlgorithm,
  type BlkhashOptions,
  type BlkhashResult,
  type BlkhashSpec,
  type HashEndpointOptions,
} from './blkhash.js';
export { compare, compareEndpoints, endpointView, type CompareOptions, type CompareResult } from './compare.js';
export { verifyCopy } from './verify.js';
export { WORK_RANGE, clipExtents, ExtentMap, type Chunk } from './extents.js';
export { ExtentSource, type ExtentSourceOptions } from './streams/extent-source.js';
export { ZeroDetect, splitZeroBlocks } from './streams/zero-detect.js';
export { ExtentEncoder, ExtentDecoder, type ExtentEncoderOptions, type ExtentDecoderOptions } from './streams/extent-format.js';
export { ExtentFrameEncoder, ExtentFrameDecoder, encodeExtentStream, decodeExtentStream, type ExtentStreamHeader, type DecodeResult } from './streams/extent-codec.js';
export { ExtentStreamSource, ExtentStreamTarget, openStreamSource } from './endpoints/extent-pipe.js';
export { Sink, type SinkOptions } from './streams/sink.js';
export { newStats, type CopyStats } from './streams/stats.js';
export type { Endpoint, Capabilities, ExtentRun, ReadResult as EndpointReadResult, ZeroOptions as EndpointZeroOptions, OpenOptions } from './endpoints/endpoint.js';
export { openEndpoint, type EndpointSpec, type FileSpec } from './endpoints/open.js';
export { NbdEndpoint, openNbd } from './endpoints/nbd.js';
export { openFile, type FileOptions } from './endpoints/file.js';
export type { FileSystem, FileStats } from './endpoints/file-system.js';
export { openPipe } from './endpoints/pipe.js';
export { openNull } from './endpoints/null.js';
export { MemoryEndpoint } from './endpoints/memory.js';
export { startActivated, type ActivatedServer } from './endpoints/command.js';
export { NbdClient, connect, type ConnectOptions, type ReadResult, type BlockStatusExtent, type ZeroOptions, type Range } from './nbd/client.js';
export {
  NbdServer,
  type NbdServerOptions,
  type ListenOptions,
  type ExportDefinition,
  type DirtyRange,
  type DirtyBitmapSource,
  type ServerFaults,
  type ServerTlsOptions,
} from './nbd/server.js';
export { serve, type ServeOptions } from './nbd/serve.js';
export { parseNbdUri, formatNbdUri, isNbdUri, type NbdAddress } from './nbd/uri.js';
export * as protocol from './nbd/protocol.js';
// streamx's pipeline helpers, for composing ExtentSource / ZeroDetect / Sink by hand
export { pipeline, pipelinePromise } from 'streamx';
