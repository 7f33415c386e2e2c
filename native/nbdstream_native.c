/*
 * nbdstream_native: thin synchronous wrappers over the Linux calls that node:fs lacks (and
 * vsock sockets, below, which libuv cannot create).
 *
 * Contract for every function:
 *  - arguments are (fd, offset[, length]); fd is an int32, offset/length are integral JS numbers
 *    in [0, 2^53); anything else throws a TypeError/RangeError (code ERR_INVALID_ARG_*).
 *  - a failing system call throws an Error shaped like node:fs errors:
 *    { code: 'ENXIO', errno: -6, syscall: 'lseek' } (errno negative, as libuv reports it).
 *  - EINTR is retried; nothing else is.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/vm_sockets.h>
#include <node_api.h>

#include "socket_reader.h"

#define MAX_SAFE_INTEGER 9007199254740991.0

/* Return on a pending exception (or a failed napi call). */
#define CHECK(call)                  \
  do {                               \
    if ((call) != napi_ok) return 0; \
  } while (0)

static const char *errno_name(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
    case EOPNOTSUPP: return "EOPNOTSUPP"; /* == ENOTSUP on Linux */
    case EDQUOT: return "EDQUOT";
    default: break;
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  {
    const char *name = strerrorname_np(err);
    if (name != NULL) return name;
  }
#endif
  return NULL;
}

/* An Error for `err` from `syscall` shaped like node:fs errors, or NULL if it cannot be made. */
static napi_value errno_error(napi_env env, int err, const char *syscall) {
  char code_buf[32];
  const char *code = errno_name(err);
  if (code == NULL) {
    snprintf(code_buf, sizeof code_buf, "Unknown system error %d", err);
    code = code_buf;
  }
  char msg_buf[256];
  snprintf(msg_buf, sizeof msg_buf, "%s: %s, %s", code, strerror(err), syscall);

  napi_value msg, code_v, errno_v, syscall_v, error;
  if (napi_create_string_utf8(env, msg_buf, NAPI_AUTO_LENGTH, &msg) != napi_ok ||
      napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_int32(env, -err, &errno_v) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) != napi_ok ||
      napi_create_error(env, NULL, msg, &error) != napi_ok ||
      napi_set_named_property(env, error, "code", code_v) != napi_ok ||
      napi_set_named_property(env, error, "errno", errno_v) != napi_ok ||
      napi_set_named_property(env, error, "syscall", syscall_v) != napi_ok)
    return NULL;
  return error;
}

/* Throw an Error for `err` from `syscall`; always returns NULL for `return throw_errno(...)`. */
static napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_value error = errno_error(env, err, syscall);
  if (error != NULL) napi_throw(env, error);
  else napi_throw_error(env, errno_name(err), strerror(err));
  return NULL;
}

/* Read args[i] as an fd (int32). */
static int get_fd(napi_env env, napi_value v, int *fd) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  if (t != napi_number) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "fd must be a number");
    return 0;
  }
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return 0;
  if (d != d || d < INT_MIN || d > INT_MAX || d != (double)(int64_t)d) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "fd must be an int32");
    return 0;
  }
  *fd = (int)d;
  return 1;
}

/* Read v as an integral number in [0, 2^53); `what` names it in the error. */
static int get_u53(napi_env env, napi_value v, const char *what, uint64_t *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return 0;
  char msg[96];
  if (t != napi_number) {
    snprintf(msg, sizeof msg, "%s must be a number", what);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return 0;
  }
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return 0;
  /* NaN fails every comparison, so test the accepted range positively. */
  if (!(d >= 0 && d <= MAX_SAFE_INTEGER) || d != (double)(uint64_t)d) {
    snprintf(msg, sizeof msg, "%s must be an integer in [0, 2^53)", what);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return 0;
  }
  *out = (uint64_t)d;
  return 1;
}

/* Fetch exactly `n` arguments: fd, then offset, then length. */
static int get_args(napi_env env, napi_callback_info info, size_t n, int *fd, uint64_t *offset,
                    uint64_t *length) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < n) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "missing arguments");
    return 0;
  }
  if (!get_fd(env, argv[0], fd)) return 0;
  if (n >= 2 && !get_u53(env, argv[1], "offset", offset)) return 0;
  if (n >= 3 && !get_u53(env, argv[2], "length", length)) return 0;
  if (n >= 3 && *offset + *length > (uint64_t)MAX_SAFE_INTEGER) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "offset + length must be below 2^53");
    return 0;
  }
  return 1;
}

static napi_value make_number(napi_env env, int64_t n) {
  napi_value v;
  CHECK(napi_create_int64(env, n, &v));
  return v;
}

static napi_value do_lseek(napi_env env, napi_callback_info info, int whence) {
  int fd;
  uint64_t offset;
  if (!get_args(env, info, 2, &fd, &offset, NULL)) return NULL;
  off_t r = lseek(fd, (off_t)offset, whence);
  if (r < 0) {
    int err = errno;
    /* SEEK_DATA: ENXIO means no data at or after offset (inside a trailing hole, or past EOF). */
    if (whence == SEEK_DATA && err == ENXIO) return make_number(env, -1);
    return throw_errno(env, err, "lseek");
  }
  return make_number(env, (int64_t)r);
}

/* seekData(fd, offset) -> offset of the next data at or after offset, or -1 if none. */
static napi_value SeekData(napi_env env, napi_callback_info info) {
  return do_lseek(env, info, SEEK_DATA);
}

/* seekHole(fd, offset) -> offset of the next hole at or after offset (EOF counts as a hole). */
static napi_value SeekHole(napi_env env, napi_callback_info info) {
  return do_lseek(env, info, SEEK_HOLE);
}

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode) {
  int fd;
  uint64_t offset, length;
  if (!get_args(env, info, 3, &fd, &offset, &length)) return NULL;
  int r;
  do {
    r = fallocate(fd, mode, (off_t)offset, (off_t)length);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, errno, "fallocate");
  return NULL;
}

/* punchHole(fd, offset, length): deallocate the range; it reads back as zeros; size unchanged. */
static napi_value PunchHole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
}

/* zeroRange(fd, offset, length): zero the range, keeping it allocated; size unchanged. */
static napi_value ZeroRange(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
}

static napi_value do_blk_range(napi_env env, napi_callback_info info, unsigned long req,
                               const char *name) {
  int fd;
  uint64_t offset, length;
  if (!get_args(env, info, 3, &fd, &offset, &length)) return NULL;
  uint64_t range[2] = {offset, length};
  int r;
  do {
    r = ioctl(fd, req, range);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, errno, name);
  return NULL;
}

/* blkZeroOut(fd, offset, length): block device range reads back as zeros (kernel may write). */
static napi_value BlkZeroOut(napi_env env, napi_callback_info info) {
  return do_blk_range(env, info, BLKZEROOUT, "ioctl(BLKZEROOUT)");
}

/* blkDiscard(fd, offset, length): discard hint; contents afterwards are unspecified. */
static napi_value BlkDiscard(napi_env env, napi_callback_info info) {
  return do_blk_range(env, info, BLKDISCARD, "ioctl(BLKDISCARD)");
}

/* blkGetSize64(fd) -> block device size in bytes. */
static napi_value BlkGetSize64(napi_env env, napi_callback_info info) {
  int fd;
  if (!get_args(env, info, 1, &fd, NULL, NULL)) return NULL;
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0) return throw_errno(env, errno, "ioctl(BLKGETSIZE64)");
  if (size > (uint64_t)MAX_SAFE_INTEGER) return throw_errno(env, EOVERFLOW, "ioctl(BLKGETSIZE64)");
  return make_number(env, (int64_t)size);
}

/*
 * setParentDeathSignal(signal): prctl(PR_SET_PDEATHSIG): the kernel sends `signal` to this
 * process when its parent (the thread that forked it) exits; 0 turns it off.
 */
static napi_value SetParentDeathSignal(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t sig;
  if (argc < 1 || napi_get_value_int32(env, argv[0], &sig) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "signal must be a number");
    return NULL;
  }
  if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) < 0)
    return throw_errno(env, errno, "prctl(PR_SET_PDEATHSIG)");
  return NULL;
}

/*
 * vsock (AF_VSOCK, <linux/vm_sockets.h>): sockets libuv cannot create. JS wraps the returned fd in
 * a stream handle (lib/nbd/vsock.ts). Both fds are SOCK_CLOEXEC and blocking; libuv makes them
 * non-blocking when it adopts them.
 */

/* Read args[i] as a vsock CID or port (u32). */
static int get_u32(napi_env env, napi_value v, const char *what, unsigned int *out) {
  uint64_t n;
  if (!get_u53(env, v, what, &n)) return 0;
  if (n > 0xffffffffu) {
    char msg[64];
    snprintf(msg, sizeof msg, "%s must be below 2^32", what);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return 0;
  }
  *out = (unsigned int)n;
  return 1;
}

/* Fetch `n` (2 or 3) arguments into argv; the first two are the CID and the port. */
static int get_vsock_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv, unsigned int *cid,
                          unsigned int *port) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < n) {
    napi_throw_type_error(env, "ERR_MISSING_ARGS", "missing arguments");
    return 0;
  }
  return get_u32(env, argv[0], "cid", cid) && get_u32(env, argv[1], "port", port);
}

static struct sockaddr_vm vsock_address(unsigned int cid, unsigned int port) {
  struct sockaddr_vm a;
  memset(&a, 0, sizeof a);
  a.svm_family = AF_VSOCK;
  a.svm_cid = cid;
  a.svm_port = port;
  return a;
}

typedef struct {
  unsigned int cid, port;
  int fd, err;
  const char *syscall;
  napi_ref callback;
  napi_async_work work;
} vsock_connect_t;

/* Worker thread: a blocking connect (the kernel times out unanswered ones, 2 s by default). */
static void vsock_connect_execute(napi_env env, void *data) {
  vsock_connect_t *c = data;
  c->fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    c->err = errno;
    c->syscall = "socket(AF_VSOCK)";
    return;
  }
  struct sockaddr_vm a = vsock_address(c->cid, c->port);
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) == 0) return;
  c->err = errno;
  c->syscall = "connect";
  close(c->fd);
  c->fd = -1;
}

static void vsock_connect_complete(napi_env env, napi_status status, void *data) {
  vsock_connect_t *c = data;
  napi_value callback, global, args[2];
  if (napi_get_reference_value(env, c->callback, &callback) == napi_ok && napi_get_global(env, &global) == napi_ok &&
      napi_get_null(env, &args[0]) == napi_ok && napi_create_int32(env, c->fd, &args[1]) == napi_ok) {
    napi_value error = c->err ? errno_error(env, c->err, c->syscall) : NULL;
    if (error != NULL) args[0] = error; /* else (out of memory) JS sees fd -1 */
    napi_call_function(env, global, callback, 2, args, NULL);
  }
  napi_delete_reference(env, c->callback);
  napi_delete_async_work(env, c->work);
  free(c);
}

/* vsockConnect(cid, port, callback(err, fd)): socket(AF_VSOCK) connected on a worker thread. */
static napi_value VsockConnect(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  unsigned int cid, port;
  if (!get_vsock_args(env, info, 3, argv, &cid, &port)) return NULL;
  napi_valuetype t;
  CHECK(napi_typeof(env, argv[2], &t));
  if (t != napi_function) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "callback must be a function");
    return NULL;
  }
  vsock_connect_t *c = calloc(1, sizeof *c);
  if (c == NULL) return throw_errno(env, ENOMEM, "vsockConnect");
  c->cid = cid;
  c->port = port;
  c->fd = -1;
  napi_value name;
  if (napi_create_reference(env, argv[2], 1, &c->callback) != napi_ok) {
    free(c);
    return NULL;
  }
  if (napi_create_string_utf8(env, "nbdstream:vsockConnect", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, vsock_connect_execute, vsock_connect_complete, c, &c->work) != napi_ok) {
    napi_delete_reference(env, c->callback);
    free(c);
    return NULL;
  }
  if (napi_queue_async_work(env, c->work) != napi_ok) {
    napi_delete_async_work(env, c->work);
    napi_delete_reference(env, c->callback);
    free(c);
  }
  return NULL;
}

/* vsockListen(cid, port) -> fd of a socket(AF_VSOCK) bound to cid:port and listening. */
static napi_value VsockListen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  unsigned int cid, port;
  if (!get_vsock_args(env, info, 2, argv, &cid, &port)) return NULL;
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "socket(AF_VSOCK)");
  struct sockaddr_vm a = vsock_address(cid, port);
  const char *syscall = "bind";
  if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0) {
    syscall = "listen";
    if (listen(fd, SOMAXCONN) == 0) return make_number(env, fd);
  }
  int err = errno;
  close(fd);
  return throw_errno(env, err, syscall);
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blkZeroOut", NULL, BlkZeroOut, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blkDiscard", NULL, BlkDiscard, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blkGetSize64", NULL, BlkGetSize64, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setParentDeathSignal", NULL, SetParentDeathSignal, NULL, NULL, NULL, napi_enumerable, NULL},
      {"vsockConnect", NULL, VsockConnect, NULL, NULL, NULL, napi_enumerable, NULL},
      {"vsockListen", NULL, VsockListen, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  CHECK(socket_reader_init(env, exports));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
