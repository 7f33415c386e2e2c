/* Socket reader thread (socket_reader.c): adds readerStart/readerFill/readerStop to exports. */
#ifndef NBDSTREAM_SOCKET_READER_H
#define NBDSTREAM_SOCKET_READER_H
#include <node_api.h>
napi_status socket_reader_init(napi_env env, napi_value exports);
#endif
