/*
 * Socket reader thread: receives NBD replies off the JS thread.
 *
 * One thread per connection. JS hands it one job at a time: "receive at least MIN bytes into
 * BUFFER (more, up to its length, if already there)". The thread recv()s on the non-blocking
 * socket, waiting in poll() when nothing is queued, and reports the byte count to the JS
 * callback through a thread-safe function: n > 0 bytes received, 0 end of stream, -errno.
 * A job may name a second buffer, AHEAD: once BUFFER has MIN bytes, whatever is already queued
 * (up to AHEAD's length) is received into it without waiting, and its count is the callback's
 * second argument. JS passes the next reply's header there, so a reply costs one callback.
 * The JS side parses what arrived and hands out the next job. A 4 MiB read payload thus costs
 * one JS callback (not one per ~200 KiB socket read), and the kernel copies of several
 * connections run in parallel, as nbdcopy's worker threads do.
 *
 *   readerStart(fd, onRead(n, nAhead)) -> handle  start the thread (the fd stays owned by JS)
 *   readerFill(handle, buffer, min[, ahead])      queue the job; throws if one is queued or it stopped
 *   readerStop(handle)                            stop and join the thread; idempotent; no callbacks after
 *
 * The caller must keep BUFFER alive until its callback, and call readerStop() before it
 * reuses BUFFER for anything else or closes the fd (readerStop joins, so then nothing writes).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <node_api.h>

#include "socket_reader.h"

typedef struct {
  int fd;
  int wakefd;
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint8_t *buf; /* current job, NULL when none */
  size_t min, max;
  uint8_t *ahead; /* optional second buffer, filled without waiting */
  size_t ahead_len;
  int busy;    /* a job is queued or running (set by JS, cleared by the thread) */
  int stop;    /* readerStop() was called */
  int stopped; /* joined */
  int refs;    /* the JS handle and the thread-safe function; freed at 0 (main thread only) */
  napi_threadsafe_function tsfn;
} reader_t;

#define CHECK(call)                  \
  do {                               \
    if ((call) != napi_ok) return 0; \
  } while (0)

static void unref(reader_t *r) {
  if (--r->refs) return;
  pthread_mutex_destroy(&r->mu);
  pthread_cond_destroy(&r->cv);
  free(r);
}

/* Receive at least r->min bytes; returns the count, 0 at end of stream, -errno, or INT64_MIN on stop. */
static int64_t receive(reader_t *r, uint8_t *buf, size_t min, size_t max) {
  size_t got = 0;
  while (got < min) {
    ssize_t n = recv(r->fd, buf + got, max - got, 0);
    if (n > 0) {
      got += (size_t)n;
      continue;
    }
    if (n == 0) break;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return got ? (int64_t)got : -(int64_t)errno;
    struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->wakefd, .events = POLLIN}};
    if (poll(p, 2, -1) < 0 && errno != EINTR) return got ? (int64_t)got : -(int64_t)errno;
    if (p[1].revents) return INT64_MIN;
  }
  return (int64_t)got;
}

static void *run(void *arg) {
  reader_t *r = arg;
  for (;;) {
    pthread_mutex_lock(&r->mu);
    while (!r->buf && !r->stop) pthread_cond_wait(&r->cv, &r->mu);
    if (r->stop) {
      pthread_mutex_unlock(&r->mu);
      return NULL;
    }
    uint8_t *buf = r->buf, *ahead = r->ahead;
    size_t min = r->min, max = r->max, ahead_len = r->ahead_len;
    pthread_mutex_unlock(&r->mu);

    int64_t n = receive(r, buf, min, max);
    if (n == INT64_MIN) return NULL;
    int64_t m = 0;
    if (n > 0 && ahead) {
      ssize_t a;
      do a = recv(r->fd, ahead, ahead_len, MSG_DONTWAIT);
      while (a < 0 && errno == EINTR);
      m = a > 0 ? a : 0; /* end of stream or an error shows up in the next job */
    }
    /* one value through the queue: n * 256 + m (m <= 255), or n <= 0 alone */
    n = n > 0 ? n * 256 + m : n;
    pthread_mutex_lock(&r->mu);
    r->buf = NULL;
    r->busy = 0;
    pthread_mutex_unlock(&r->mu);
    if (napi_call_threadsafe_function(r->tsfn, (void *)(intptr_t)n, napi_tsfn_blocking) != napi_ok) return NULL;
  }
}

static void call_js(napi_env env, napi_value cb, void *context, void *data) {
  reader_t *r = context;
  if (!env || r->stopped) return; /* torn down, or stopped after this result was queued */
  int64_t v = (int64_t)(intptr_t)data;
  napi_value undefined, argv[2];
  if (napi_get_undefined(env, &undefined) != napi_ok) return;
  if (napi_create_int64(env, v > 0 ? v / 256 : v, &argv[0]) != napi_ok || napi_create_int64(env, v > 0 ? v % 256 : 0, &argv[1]) != napi_ok) return;
  napi_call_function(env, undefined, cb, 2, argv, NULL);
}

static void stop(reader_t *r) {
  if (r->stopped) return;
  pthread_mutex_lock(&r->mu);
  r->stop = 1;
  pthread_cond_signal(&r->cv);
  pthread_mutex_unlock(&r->mu);
  uint64_t one = 1;
  ssize_t w;
  do w = write(r->wakefd, &one, sizeof one);
  while (w < 0 && errno == EINTR);
  pthread_join(r->thread, NULL);
  r->stopped = 1;
  close(r->wakefd);
  napi_release_threadsafe_function(r->tsfn, napi_tsfn_abort);
}

static void tsfn_finalize(napi_env env, void *data, void *hint) { unref(data); }

static void handle_finalize(napi_env env, void *data, void *hint) {
  stop(data);
  unref(data);
}

static reader_t *get_reader(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_external || napi_get_value_external(env, v, &p) != napi_ok || !p) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected a reader handle");
    return NULL;
  }
  return p;
}

/* readerStart(fd, onRead) -> handle */
static napi_value ReaderStart(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  napi_valuetype t;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 || napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerStart(fd, onRead)");
    return NULL;
  }
  reader_t *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "readerStart: out of memory");
    return NULL;
  }
  r->fd = fd;
  r->refs = 2;
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->cv, NULL);
  r->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  napi_value name;
  if (r->wakefd < 0 || napi_create_string_utf8(env, "nbdstream socket reader", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, argv[1], NULL, name, 0, 1, r, tsfn_finalize, r, call_js, &r->tsfn) != napi_ok) {
    if (r->wakefd >= 0) close(r->wakefd);
    free(r);
    napi_throw_error(env, "ERR_NATIVE", "readerStart: cannot set up the reader");
    return NULL;
  }
  if (pthread_create(&r->thread, NULL, run, r) != 0) {
    close(r->wakefd);
    r->stopped = 1;
    r->refs = 1; /* only the thread-safe function's */
    napi_release_threadsafe_function(r->tsfn, napi_tsfn_abort);
    napi_throw_error(env, "ERR_NATIVE", "readerStart: cannot start a thread");
    return NULL;
  }
  napi_value handle;
  if (napi_create_external(env, r, handle_finalize, NULL, &handle) != napi_ok) {
    stop(r);
    unref(r);
    return NULL;
  }
  return handle;
}

/* readerFill(handle, buffer, min[, ahead]) */
static napi_value ReaderFill(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerFill(handle, buffer, min)");
    return NULL;
  }
  reader_t *r = get_reader(env, argv[0]);
  if (!r) return NULL;
  void *data;
  size_t len;
  int64_t min;
  if (napi_get_buffer_info(env, argv[1], &data, &len) != napi_ok || napi_get_value_int64(env, argv[2], &min) != napi_ok || len == 0 || min < 1 ||
      (uint64_t)min > len) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "readerFill: need a non-empty buffer and 1 <= min <= its length");
    return NULL;
  }
  void *ahead = NULL;
  size_t ahead_len = 0;
  napi_valuetype at = napi_undefined;
  if (argc > 3 && napi_typeof(env, argv[3], &at) == napi_ok && at != napi_undefined) {
    if (napi_get_buffer_info(env, argv[3], &ahead, &ahead_len) != napi_ok || ahead_len == 0 || ahead_len > 255) {
      napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "readerFill: ahead must be a buffer of 1 to 255 bytes");
      return NULL;
    }
  }
  pthread_mutex_lock(&r->mu);
  int refused = r->stop || r->busy;
  if (!refused) {
    r->buf = data;
    r->min = (size_t)min;
    r->max = len;
    r->ahead = ahead;
    r->ahead_len = ahead_len;
    r->busy = 1;
    pthread_cond_signal(&r->cv);
  }
  pthread_mutex_unlock(&r->mu);
  if (refused) napi_throw_error(env, "ERR_INVALID_STATE", "readerFill: reader stopped or busy");
  return NULL;
}

/* readerStop(handle) */
static napi_value ReaderStop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerStop(handle)");
    return NULL;
  }
  reader_t *r = get_reader(env, argv[0]);
  if (r) stop(r);
  return NULL;
}

napi_status socket_reader_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"readerStart", NULL, ReaderStart, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readerFill", NULL, ReaderFill, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readerStop", NULL, ReaderStop, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
