/*
 * Socket reader thread: receives NBD transmission replies off the JS thread.
 *
 * One thread per connection. JS registers each NBD_CMD_READ before sending it (cookie,
 * destination buffer, export offset); the thread then parses the reply stream itself and
 * receives read payloads straight into the registered buffers, without waiting for JS between
 * replies. A 4 MiB read costs one JS callback, and several connections receive in parallel, as
 * nbdcopy's worker threads do. The thread takes only the common, well-formed cases:
 *
 *   - a structured OFFSET_DATA chunk for a registered read whose range lies inside the request:
 *     payload received into the buffer, then event DATA(cookie, offset, length, flags);
 *   - a simple reply with error 0 to a registered read (simple replies negotiated): payload
 *     received, then event SIMPLE_READ(cookie, flags).
 *
 * A read registered with a zero block size N (-S) is checked as it arrives, while its bytes are
 * still in cache: flags bit ZERO_CHECKED (1 << 16) on its DATA / SIMPLE_READ event says that
 * every N-aligned block of N bytes inside the payload was checked, and that the payload's edges
 * are N-aligned or the request's own (so no block the JS side would check was missed); the
 * all-zero blocks found are in raw, as runs: pairs of doubles (export offset, length), none if
 * raw is empty. Without the bit, JS checks the data itself.
 *
 * Every other chunk or reply (NONE, OFFSET_HOLE, BLOCK_STATUS, errors, replies to other
 * commands) is received whole and handed to JS as RAW bytes for its decoder, which checks it.
 * Anything malformed (bad magic, unknown cookie in a data chunk, a range outside the request, a
 * body over 64 MiB) is handed over as RAW from there on, and from then on every byte goes to JS
 * as RAW: the JS decoder reports the violation. End of stream is event END (midReply = 1 when
 * it cuts a reply the thread was receiving); a socket error is event ERROR(-errno).
 *
 * With extended headers (NBD_OPT_EXTENDED_HEADERS; readerStart's `extended`) every reply is a
 * chunk with a 32-byte header (magic 0x6e8a278c, flags, type, cookie, request offset, 64-bit
 * length): one_ext_reply() takes OFFSET_DATA chunks as above and hands the rest over as RAW.
 *
 *   readerStart(fd, structured, onEvent[, extended]) -> handle   fd is dup'ed: JS may close its own
 *   readerExpect(handle, cookie, buffer, offset[, N])  before sending the read; N: zero block size (-S)
 *   readerForget(handle, cookie)                       after the read's reply (idempotent)
 *   readerStop(handle)                                 stop and join; no events afterwards
 *
 * Completed reads (DATA, SIMPLE_READ) are handed over in batches, in order, with whatever event
 * follows them: before the thread waits for the socket, or after BATCH_MAX of them. A burst of
 * replies thus wakes the JS thread once rather than once per reply.
 *
 * onEvent(kind, cookie, offset, length, flags, raw): kind RAW=0 (raw: Buffer), DATA=1,
 * SIMPLE_READ=2 (raw: zero block runs, see above), END=3 (flags: midReply), ERROR=4 (length:
 * -errno).
 * JS must keep each registered buffer alive and untouched until its read is answered or
 * readerStop() returned (readerStop joins, so nothing writes afterwards).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <node_api.h>

#include "socket_reader.h"

#define SIMPLE_MAGIC 0x67446698u
#define STRUCTURED_MAGIC 0x668e33efu
#define EXTENDED_MAGIC 0x6e8a278cu
#define REPLY_TYPE_OFFSET_DATA 1
#define REPLY_FLAG_DONE 1
#define MAX_CHUNK_BODY (64u * 1024 * 1024)
#define RAW_READ 65536
/* Read payloads are received in slices of this size and checked for zero blocks slice by slice. */
#define SCAN_SLICE (256u * 1024)
#define EV_FLAG_ZERO_CHECKED (1u << 16)

enum { EV_RAW = 0, EV_DATA = 1, EV_SIMPLE_READ = 2, EV_END = 3, EV_ERROR = 4 };

typedef struct {
  uint32_t cookie;
  uint8_t *buf;
  uint64_t offset;
  uint64_t length;
  uint64_t zero_block; /* 0: no check */
} expect_t;

typedef struct event {
  struct event *next; /* the next event of a batch */
  int kind;
  uint32_t cookie;
  uint64_t offset;
  int64_t length;
  uint32_t flags;
  uint8_t *raw;
  size_t raw_len;
} event_t;

/* Completed reads are handed to JS in batches: at most this many, and always before the thread
 * waits for the socket or passes on any other event, so JS wakes once per burst of replies. */
#define BATCH_MAX 64

typedef struct {
  int fd; /* our dup of the socket */
  int wakefd;
  int structured;
  int extended; /* extended headers: 32-byte reply headers (one_ext_reply) */
  pthread_t thread;
  pthread_mutex_t mu;
  expect_t *expects;
  size_t n_expects, cap_expects;
  int stopped; /* joined (main thread only) */
  int refs;    /* the JS handle and the thread-safe function; freed at 0 (main thread only) */
  napi_threadsafe_function tsfn;
  event_t *batch, *batch_tail; /* events not yet handed to JS (reader thread only) */
  int n_batch;
} reader_t;

#define CHECK(call)                  \
  do {                               \
    if ((call) != napi_ok) return 0; \
  } while (0)

static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static void unref(reader_t *r) {
  if (--r->refs) return;
  pthread_mutex_destroy(&r->mu);
  free(r->expects);
  free(r);
}

/* ------------------------------------------------------------------ registrations */

/* Find and (if take) remove the registration for cookie; returns 1 if found. */
static int lookup(reader_t *r, uint32_t cookie, expect_t *out, int take) {
  int found = 0;
  pthread_mutex_lock(&r->mu);
  for (size_t i = 0; i < r->n_expects; i++) {
    if (r->expects[i].cookie != cookie) continue;
    *out = r->expects[i];
    if (take) r->expects[i] = r->expects[--r->n_expects];
    found = 1;
    break;
  }
  pthread_mutex_unlock(&r->mu);
  return found;
}

/* ------------------------------------------------------------------ thread */

static int flush(reader_t *r);

/* Status of receive_exact: bytes all there, stopped, end of stream, or -errno. */
enum { RX_OK = 0, RX_STOP = 1, RX_EOF = 2 };

/* Receive exactly n bytes (*got counts progress, also on failure). */
static int receive_exact(reader_t *r, uint8_t *buf, size_t n, size_t *got) {
  *got = 0;
  while (*got < n) {
    ssize_t k = recv(r->fd, buf + *got, n - *got, 0);
    if (k > 0) {
      *got += (size_t)k;
      continue;
    }
    if (k == 0) return RX_EOF;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
    if (!flush(r)) return RX_STOP;
    struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->wakefd, .events = POLLIN}};
    if (poll(p, 2, -1) < 0 && errno != EINTR) return -errno;
    if (p[1].revents) return RX_STOP;
  }
  return RX_OK;
}

static void free_events(event_t *e) {
  while (e) {
    event_t *next = e->next;
    free(e->raw);
    free(e);
    e = next;
  }
}

/* Hand the batched events to JS, in order, in one call; returns 0 when the function is closing. */
static int flush(reader_t *r) {
  event_t *e = r->batch;
  if (!e) return 1;
  r->batch = r->batch_tail = NULL;
  r->n_batch = 0;
  if (napi_call_threadsafe_function(r->tsfn, e, napi_tsfn_blocking) != napi_ok) {
    free_events(e);
    return 0;
  }
  return 1;
}

/* Queue an event for JS (a completed read waits for its batch); returns 0 when the function is closing (stop). */
static int emit(reader_t *r, int kind, uint32_t cookie, uint64_t offset, int64_t length, uint32_t flags, const uint8_t *raw, size_t raw_len) {
  event_t *e = calloc(1, sizeof *e);
  if (!e) return 0;
  e->kind = kind;
  e->cookie = cookie;
  e->offset = offset;
  e->length = length;
  e->flags = flags;
  if (raw_len) {
    e->raw = malloc(raw_len);
    if (!e->raw) {
      free(e);
      return 0;
    }
    memcpy(e->raw, raw, raw_len);
    e->raw_len = raw_len;
  }
  if (r->batch_tail) r->batch_tail->next = e;
  else r->batch = e;
  r->batch_tail = e;
  r->n_batch++;
  if ((kind == EV_DATA || kind == EV_SIMPLE_READ) && r->n_batch < BATCH_MAX) return 1;
  return flush(r);
}

/* After receive_exact failed: report it (and what was received as RAW); returns 0 to end the thread. */
static int failed(reader_t *r, int status, const uint8_t *partial, size_t partial_len, int mid_reply) {
  if (status == RX_STOP) return 0;
  if (partial_len) emit(r, EV_RAW, 0, 0, 0, 0, partial, partial_len);
  if (status == RX_EOF) emit(r, EV_END, 0, 0, 0, (mid_reply || partial_len) ? 1 : 0, NULL, 0);
  else emit(r, EV_ERROR, 0, 0, status, 0, NULL, 0);
  return 0;
}

/* Everything from here on goes to JS as it arrives. */
static void raw_mode(reader_t *r) {
  uint8_t *buf = malloc(RAW_READ);
  if (!buf) return;
  for (;;) {
    ssize_t k = recv(r->fd, buf, RAW_READ, 0);
    if (k > 0) {
      if (!emit(r, EV_RAW, 0, 0, 0, 0, buf, (size_t)k)) break;
      continue;
    }
    if (k == 0) {
      emit(r, EV_END, 0, 0, 0, 0, NULL, 0);
      break;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      emit(r, EV_ERROR, 0, 0, -errno, 0, NULL, 0);
      break;
    }
    struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->wakefd, .events = POLLIN}};
    if (poll(p, 2, -1) < 0 && errno != EINTR) break;
    if (p[1].revents) break;
  }
  free(buf);
}

/* True if the n bytes at p are all zero. */
static int all_zero(const uint8_t *p, uint64_t n) { return p[0] == 0 && p[n - 1] == 0 && memcmp(p, p + 1, n - 1) == 0; }

/* All-zero block runs found in a payload: pairs (export offset, length) as doubles, for JS. */
typedef struct {
  double *v;
  size_t n, cap; /* doubles */
  int failed;    /* out of memory: the payload counts as unchecked */
} runs_t;

static void add_zero_block(runs_t *z, uint64_t off, uint64_t n) {
  if (z->n && (uint64_t)z->v[z->n - 2] + (uint64_t)z->v[z->n - 1] == off) {
    z->v[z->n - 1] += (double)n;
    return;
  }
  if (z->n + 2 > z->cap) {
    size_t cap = z->cap ? z->cap * 2 : 32;
    double *grown = realloc(z->v, cap * sizeof *grown);
    if (!grown) {
      z->failed = 1;
      return;
    }
    z->v = grown;
    z->cap = cap;
  }
  z->v[z->n++] = (double)off;
  z->v[z->n++] = (double)n;
}

/*
 * Receive the len payload bytes of read e at export offset off into its buffer. With a zero
 * block size, *flags gets EV_FLAG_ZERO_CHECKED if the payload's edges are aligned or the
 * request's own, and every aligned whole block inside it was checked; the all-zero ones are
 * added to *zero. The payload is received in slices, each checked right after it arrives.
 */
static int receive_payload(reader_t *r, const expect_t *e, uint64_t off, uint64_t len, uint32_t *flags, runs_t *zero) {
  uint64_t n = e->zero_block, end = off + len;
  size_t got;
  if (!n) return receive_exact(r, e->buf + (off - e->offset), len, &got);
  int checked = (off % n == 0 || off == e->offset) && (end % n == 0 || end == e->offset + e->length);
  uint64_t next = (off + n - 1) / n * n; /* the next block to check */
  for (uint64_t done = off; done < end;) {
    uint64_t slice = end - done < SCAN_SLICE ? end - done : SCAN_SLICE;
    int st = receive_exact(r, e->buf + (done - e->offset), slice, &got);
    if (st != RX_OK) return st;
    done += slice;
    for (; checked && next + n <= done; next += n)
      if (all_zero(e->buf + (next - e->offset), n)) add_zero_block(zero, next, n);
  }
  if (checked && !zero->failed) *flags |= EV_FLAG_ZERO_CHECKED;
  return RX_OK;
}

/*
 * The payload of an OFFSET_DATA chunk for registered read e, of len bytes at export offset off
 * (h: the chunk's header, h_len bytes, all received so far): into the read's buffer, then event
 * DATA. A range outside the request goes to JS as RAW (-1: raw mode from here on); returns as
 * one_reply.
 */
static int data_chunk(reader_t *r, expect_t *e, uint32_t cookie, uint16_t flags, uint64_t off, uint64_t len, const uint8_t *h, size_t h_len) {
  if (len == 0 || off < e->offset || off - e->offset > e->length || len > e->length - (off - e->offset)) {
    emit(r, EV_RAW, 0, 0, 0, 0, h, h_len);
    return -1;
  }
  uint32_t ev_flags = flags;
  runs_t zero = {0};
  int st = receive_payload(r, e, off, len, &ev_flags, &zero);
  if (st != RX_OK) {
    free(zero.v);
    return failed(r, st, NULL, 0, 1);
  }
  if (flags & REPLY_FLAG_DONE) lookup(r, cookie, e, 1);
  int ok = emit(r, EV_DATA, cookie, off, (int64_t)len, ev_flags, (const uint8_t *)zero.v, zero.n * sizeof(double));
  free(zero.v);
  return ok;
}

/*
 * A chunk JS decodes: its header (h, h_len bytes, received) and its body of length bytes (at most
 * MAX_CHUNK_BODY), received whole and handed over as one RAW event; returns as one_reply.
 */
static int whole_chunk(reader_t *r, const uint8_t *h, size_t h_len, uint64_t length) {
  size_t got;
  uint8_t *chunk = malloc(h_len + (size_t)length);
  if (!chunk) {
    emit(r, EV_RAW, 0, 0, 0, 0, h, h_len);
    return -1;
  }
  memcpy(chunk, h, h_len);
  int st = receive_exact(r, chunk + h_len, length, &got);
  if (st != RX_OK) {
    int ret = failed(r, st, chunk, h_len + got, 0);
    free(chunk);
    return ret;
  }
  int ok = emit(r, EV_RAW, 0, 0, 0, 0, chunk, h_len + (size_t)length);
  free(chunk);
  return ok;
}

/* One reply (simple) or chunk (structured); returns 0 to end the thread, -1 to switch to raw mode. */
static int one_reply(reader_t *r) {
  uint8_t h[32];
  size_t got;
  int st = receive_exact(r, h, 16, &got);
  if (st != RX_OK) return failed(r, st, h, got, 0);
  uint32_t magic = be32(h);
  uint32_t cookie_hi = be32(h + 8), cookie = be32(h + 12);
  expect_t e;

  if (magic == SIMPLE_MAGIC) {
    uint32_t error = be32(h + 4);
    if (!r->structured && error == 0 && cookie_hi == 0 && lookup(r, cookie, &e, 1)) {
      uint32_t ev_flags = 0;
      runs_t zero = {0};
      st = receive_payload(r, &e, e.offset, e.length, &ev_flags, &zero);
      int ok = st == RX_OK ? emit(r, EV_SIMPLE_READ, cookie, 0, 0, ev_flags, (const uint8_t *)zero.v, zero.n * sizeof(double)) : failed(r, st, NULL, 0, 1);
      free(zero.v);
      return ok;
    }
    /* errors, replies to other commands; anything JS rejects ends the connection there */
    return emit(r, EV_RAW, 0, 0, 0, 0, h, 16);
  }
  if (magic != STRUCTURED_MAGIC || !r->structured) {
    emit(r, EV_RAW, 0, 0, 0, 0, h, 16);
    return -1;
  }
  uint16_t flags = be16(h + 4), type = be16(h + 6);
  if (type == REPLY_TYPE_OFFSET_DATA) {
    if (cookie_hi != 0 || !lookup(r, cookie, &e, 0)) {
      emit(r, EV_RAW, 0, 0, 0, 0, h, 16);
      return -1;
    }
    st = receive_exact(r, h + 16, 12, &got);
    if (st != RX_OK) return failed(r, st, h, 16 + got, 0);
    uint32_t length = be32(h + 16);
    return data_chunk(r, &e, cookie, flags, be64(h + 20), length >= 8 ? length - 8 : 0, h, 28);
  }
  /* any other chunk: whole, to JS. One that ends a read's reply (NONE, a hole, an error) ends
     its registration here and now: a data chunk after it must not land in a buffer JS may
     already have handed on (JS's readerForget comes later). */
  if (flags & REPLY_FLAG_DONE && cookie_hi == 0) lookup(r, cookie, &e, 1);
  st = receive_exact(r, h + 16, 4, &got);
  if (st != RX_OK) return failed(r, st, h, 16 + got, 0);
  uint32_t length = be32(h + 16);
  if (length > MAX_CHUNK_BODY) {
    emit(r, EV_RAW, 0, 0, 0, 0, h, 20);
    return -1;
  }
  return whole_chunk(r, h, 20, length);
}

/* One chunk with extended headers (32-byte header); returns as one_reply. */
static int one_ext_reply(reader_t *r) {
  uint8_t h[40];
  size_t got;
  int st = receive_exact(r, h, 32, &got);
  if (st != RX_OK) return failed(r, st, h, got, 0);
  uint32_t magic = be32(h);
  uint32_t cookie_hi = be32(h + 8), cookie = be32(h + 12);
  uint16_t flags = be16(h + 4), type = be16(h + 6);
  uint64_t length = be64(h + 24);
  expect_t e;
  if (magic != EXTENDED_MAGIC || (type == REPLY_TYPE_OFFSET_DATA && (cookie_hi != 0 || !lookup(r, cookie, &e, 0))) || (type != REPLY_TYPE_OFFSET_DATA && length > MAX_CHUNK_BODY)) {
    emit(r, EV_RAW, 0, 0, 0, 0, h, 32);
    return -1;
  }
  if (type == REPLY_TYPE_OFFSET_DATA) {
    st = receive_exact(r, h + 32, 8, &got);
    if (st != RX_OK) return failed(r, st, h, 32 + got, 0);
    return data_chunk(r, &e, cookie, flags, be64(h + 32), length >= 8 ? length - 8 : 0, h, 40);
  }
  /* any other chunk: whole, to JS (one that ends a read's reply ends its registration, as in one_reply) */
  if (flags & REPLY_FLAG_DONE && cookie_hi == 0) lookup(r, cookie, &e, 1);
  return whole_chunk(r, h, 32, length);
}

static void *run(void *arg) {
  reader_t *r = arg;
  int st;
  while ((st = r->extended ? one_ext_reply(r) : one_reply(r)) > 0) {
  }
  if (st < 0 && flush(r)) raw_mode(r);
  flush(r);
  return NULL;
}

/* ------------------------------------------------------------------ JS side */

static void call_js(napi_env env, napi_value cb, void *context, void *data) {
  reader_t *r = context;
  event_t *e = data;
  for (event_t *x = e; x && env && !r->stopped; x = x->next) {
    napi_value undefined, argv[6];
    if (napi_get_undefined(env, &undefined) != napi_ok || napi_create_int32(env, x->kind, &argv[0]) != napi_ok ||
        napi_create_uint32(env, x->cookie, &argv[1]) != napi_ok || napi_create_double(env, (double)x->offset, &argv[2]) != napi_ok ||
        napi_create_double(env, (double)x->length, &argv[3]) != napi_ok || napi_create_uint32(env, x->flags, &argv[4]) != napi_ok)
      break;
    void *copy;
    if (x->raw_len ? napi_create_buffer_copy(env, x->raw_len, x->raw, &copy, &argv[5]) != napi_ok : napi_get_undefined(env, &argv[5]) != napi_ok) break;
    /* a callback that threw leaves an exception pending: the rest of the batch is dropped with it */
    if (napi_call_function(env, undefined, cb, 6, argv, NULL) != napi_ok) break;
  }
  free_events(e);
}

static void stop(reader_t *r) {
  if (r->stopped) return;
  uint64_t one = 1;
  ssize_t w;
  do w = write(r->wakefd, &one, sizeof one);
  while (w < 0 && errno == EINTR);
  pthread_join(r->thread, NULL);
  r->stopped = 1;
  close(r->wakefd);
  close(r->fd);
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

/* The reader handle in argv[0] of a call with at least n arguments; NULL (and a pending exception) if not. */
static reader_t *reader_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv, const char *usage) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < n) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", usage);
    return NULL;
  }
  return get_reader(env, argv[0]);
}

/* readerStart(fd, structured, onEvent[, extended]) -> handle */
static napi_value ReaderStart(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  bool structured;
  napi_valuetype t;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 || napi_get_value_bool(env, argv[1], &structured) != napi_ok ||
      napi_typeof(env, argv[2], &t) != napi_ok || t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerStart(fd, structured, onEvent)");
    return NULL;
  }
  bool extended = false;
  if (argc >= 4 && napi_get_value_bool(env, argv[3], &extended) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerStart(fd, structured, onEvent, extended)");
    return NULL;
  }
  reader_t *r = calloc(1, sizeof *r);
  if (!r) {
    napi_throw_error(env, "ENOMEM", "readerStart: out of memory");
    return NULL;
  }
  r->structured = structured;
  r->extended = extended;
  r->refs = 2;
  r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  pthread_mutex_init(&r->mu, NULL);
  r->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  napi_value name;
  if (r->fd < 0 || r->wakefd < 0 || napi_create_string_utf8(env, "nbdstream socket reader", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, r, tsfn_finalize, r, call_js, &r->tsfn) != napi_ok) {
    if (r->fd >= 0) close(r->fd);
    if (r->wakefd >= 0) close(r->wakefd);
    pthread_mutex_destroy(&r->mu);
    free(r);
    napi_throw_error(env, "ERR_NATIVE", "readerStart: cannot set up the reader");
    return NULL;
  }
  if (pthread_create(&r->thread, NULL, run, r) != 0) {
    close(r->fd);
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

/* readerExpect(handle, cookie, buffer, offset[, zeroBlock]) */
static napi_value ReaderExpect(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 4) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerExpect(handle, cookie, buffer, offset[, zeroBlock])");
    return NULL;
  }
  reader_t *r = get_reader(env, argv[0]);
  if (!r) return NULL;
  uint32_t cookie, zero_block = 0;
  void *data;
  size_t len;
  double offset;
  napi_valuetype t = napi_undefined;
  if (argc > 4 && napi_typeof(env, argv[4], &t) != napi_ok) return NULL;
  if (napi_get_value_uint32(env, argv[1], &cookie) != napi_ok || napi_get_buffer_info(env, argv[2], &data, &len) != napi_ok || len == 0 ||
      napi_get_value_double(env, argv[3], &offset) != napi_ok || offset < 0 || offset > 9007199254740991.0 ||
      (t != napi_undefined && napi_get_value_uint32(env, argv[4], &zero_block) != napi_ok)) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "readerExpect: need a cookie, a non-empty buffer, an offset and optionally a zero block size");
    return NULL;
  }
  pthread_mutex_lock(&r->mu);
  int ok = 1;
  if (r->n_expects == r->cap_expects) {
    size_t cap = r->cap_expects ? r->cap_expects * 2 : 64;
    expect_t *grown = realloc(r->expects, cap * sizeof *grown);
    if (grown) {
      r->expects = grown;
      r->cap_expects = cap;
    } else ok = 0;
  }
  if (ok) r->expects[r->n_expects++] = (expect_t){.cookie = cookie, .buf = data, .offset = (uint64_t)offset, .length = len, .zero_block = zero_block};
  pthread_mutex_unlock(&r->mu);
  if (!ok) napi_throw_error(env, "ENOMEM", "readerExpect: out of memory");
  return NULL;
}

/* readerForget(handle, cookie) */
static napi_value ReaderForget(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  reader_t *r = reader_args(env, info, 2, argv, "readerForget(handle, cookie)");
  uint32_t cookie;
  if (!r) return NULL;
  if (napi_get_value_uint32(env, argv[1], &cookie) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "readerForget(handle, cookie)");
    return NULL;
  }
  expect_t e;
  lookup(r, cookie, &e, 1);
  return NULL;
}

/* readerStop(handle) */
static napi_value ReaderStop(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  reader_t *r = reader_args(env, info, 1, argv, "readerStop(handle)");
  if (r) stop(r);
  return NULL;
}

napi_status socket_reader_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"readerStart", NULL, ReaderStart, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readerExpect", NULL, ReaderExpect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readerForget", NULL, ReaderForget, NULL, NULL, NULL, napi_enumerable, NULL},
      {"readerStop", NULL, ReaderStop, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
