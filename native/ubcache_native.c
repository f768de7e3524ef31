/*
 * ubcache_native: the few Linux file operations Node has no API for.
 *
 *   fallocate(fd, mode, offset, length) -> Promise<void>
 *       mode: FALLOC_FL_* bits; used for PUNCH_HOLE|KEEP_SIZE (discard) and
 *       ZERO_RANGE (fast write-zeroes). Works on regular files and, since
 *       Linux 4.9, on block devices (where it becomes a discard / zeroout).
 *   seek(fd, offset, whence) -> Promise<number>
 *       lseek with SEEK_DATA (3) or SEEK_HOLE (4); resolves -1 on ENXIO
 *       (offset at or past the last data), for block status.
 *   blkdiscard(fd, offset, length) -> Promise<void>
 *       ioctl BLKDISCARD on a block device. fallocate(PUNCH_HOLE) on a block
 *       device is a zero-out that refuses to fall back, which most SATA SSDs
 *       cannot do; a real discard (TRIM) is what a cache device wants.
 *   flock(fd, operation) -> Promise<void>
 *       flock(2) with LOCK_SH (1), LOCK_EX (2), LOCK_NB (4), LOCK_UN (8): the
 *       advisory lock that keeps two daemons off one image file (a regular
 *       file has no O_EXCL). With LOCK_NB a held lock rejects with EAGAIN.
 *
 *   preadNowait(fd, buffer, position) -> number
 *   pwriteNowait(fd, buffer, position) -> number
 *       Synchronous preadv2/pwritev2 with RWF_NOWAIT: the transfer happens
 *       only if it can complete without blocking (the data is in the page
 *       cache, no block allocation or writeback throttling is needed).
 *       Returns the bytes moved, or -errno (-EAGAIN: it would block). This is
 *       the fast path that skips libuv's thread-pool hop for page-cache hits;
 *       a caller falls back to the pool on anything but a full transfer.
 *
 * The asynchronous calls run on libuv's thread pool (napi async work) so a slow punch on a
 * large range never blocks the event loop. Errors reject with an Error whose
 * `code` is the errno name (EOPNOTSUPP, EIO, ...), like Node's own fs errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <unistd.h>

enum op_kind { OP_FALLOCATE, OP_SEEK, OP_BLKDISCARD, OP_FLOCK };

struct op {
  enum op_kind kind;
  int fd;
  int mode; /* fallocate mode or lseek whence */
  int64_t offset;
  int64_t length;
  int64_t result;
  int err;
  napi_deferred deferred;
  napi_async_work work;
};

static const char *errno_name(int e) {
  switch (e) {
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EIO: return "EIO";
    case EINVAL: return "EINVAL";
    case EBADF: return "EBADF";
    case ENOSPC: return "ENOSPC";
    case EPERM: return "EPERM";
    case EROFS: return "EROFS";
    case EFBIG: return "EFBIG";
    case ENODEV: return "ENODEV";
    case ENXIO: return "ENXIO";
    case EINTR: return "EINTR";
    case EACCES: return "EACCES";
    case ENOSYS: return "ENOSYS";
    case EBUSY: return "EBUSY";
    case ENOTTY: return "ENOTTY";
    case EAGAIN: return "EAGAIN";
    case ENOLCK: return "ENOLCK";
    default: return "EUNKNOWN";
  }
}

static void execute(napi_env env, void *data) {
  (void)env;
  struct op *op = data;
  op->err = 0;
  if (op->kind == OP_FALLOCATE) {
    int r;
    do {
      r = fallocate(op->fd, op->mode, (off_t)op->offset, (off_t)op->length);
    } while (r < 0 && errno == EINTR);
    if (r < 0) op->err = errno;
  } else if (op->kind == OP_FLOCK) {
    int r;
    do {
      r = flock(op->fd, op->mode);
    } while (r < 0 && errno == EINTR);
    if (r < 0) op->err = errno;
  } else if (op->kind == OP_BLKDISCARD) {
    uint64_t range[2] = {(uint64_t)op->offset, (uint64_t)op->length};
    if (ioctl(op->fd, BLKDISCARD, range) < 0) op->err = errno;
  } else {
    off_t r = lseek(op->fd, (off_t)op->offset, op->mode);
    if (r < 0) {
      if (errno == ENXIO) op->result = -1;
      else op->err = errno;
    } else {
      op->result = (int64_t)r;
    }
  }
}

static void complete(napi_env env, napi_status status, void *data) {
  struct op *op = data;
  if (status != napi_ok && op->err == 0) op->err = EIO;
  if (op->err != 0) {
    napi_value msg, code, error;
    const char *name = errno_name(op->err);
    char text[160];
    snprintf(text, sizeof text, "%s: %s", name, strerror(op->err));
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &error);
    napi_value errnum;
    napi_create_int32(env, -op->err, &errnum);
    napi_set_named_property(env, error, "errno", errnum);
    napi_reject_deferred(env, op->deferred, error);
  } else {
    napi_value value;
    if (op->kind == OP_SEEK) napi_create_int64(env, op->result, &value);
    else napi_get_undefined(env, &value);
    napi_resolve_deferred(env, op->deferred, value);
  }
  napi_delete_async_work(env, op->work);
  free(op);
}

static napi_value start(napi_env env, napi_callback_info info, enum op_kind kind) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  size_t need = kind == OP_FALLOCATE ? 4 : kind == OP_FLOCK ? 2 : 3;
  if (argc < need) {
    napi_throw_type_error(env, NULL, "ubcache_native: too few arguments");
    return NULL;
  }
  struct op *op = calloc(1, sizeof *op);
  if (op == NULL) {
    napi_throw_error(env, NULL, "ubcache_native: out of memory");
    return NULL;
  }
  op->kind = kind;
  int32_t fd = 0, mode = 0;
  int64_t offset = 0, length = 0;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      (kind == OP_FALLOCATE && napi_get_value_int32(env, argv[1], &mode) != napi_ok) ||
      (kind == OP_FALLOCATE && napi_get_value_int64(env, argv[2], &offset) != napi_ok) ||
      (kind == OP_FALLOCATE && napi_get_value_int64(env, argv[3], &length) != napi_ok) ||
      (kind == OP_SEEK && napi_get_value_int64(env, argv[1], &offset) != napi_ok) ||
      (kind == OP_SEEK && napi_get_value_int32(env, argv[2], &mode) != napi_ok) ||
      (kind == OP_BLKDISCARD && napi_get_value_int64(env, argv[1], &offset) != napi_ok) ||
      (kind == OP_BLKDISCARD && napi_get_value_int64(env, argv[2], &length) != napi_ok) ||
      (kind == OP_FLOCK && napi_get_value_int32(env, argv[1], &mode) != napi_ok)) {
    free(op);
    napi_throw_type_error(env, NULL, "ubcache_native: arguments must be numbers");
    return NULL;
  }
  op->fd = fd;
  op->mode = mode;
  op->offset = offset;
  op->length = length;
  napi_value promise, name;
  napi_create_promise(env, &op->deferred, &promise);
  const char *resource = kind == OP_FALLOCATE   ? "ubcache.fallocate"
                         : kind == OP_SEEK      ? "ubcache.seek"
                         : kind == OP_FLOCK     ? "ubcache.flock"
                                                : "ubcache.blkdiscard";
  napi_create_string_utf8(env, resource, NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, op, &op->work);
  napi_queue_async_work(env, op->work);
  return promise;
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) { return start(env, info, OP_FALLOCATE); }
static napi_value js_seek(napi_env env, napi_callback_info info) { return start(env, info, OP_SEEK); }
static napi_value js_blkdiscard(napi_env env, napi_callback_info info) { return start(env, info, OP_BLKDISCARD); }
static napi_value js_flock(napi_env env, napi_callback_info info) { return start(env, info, OP_FLOCK); }

/* The RWF_NOWAIT fast path: (fd, Uint8Array, position) -> bytes or -errno. */
static napi_value nowait(napi_env env, napi_callback_info info, int write) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd = 0;
  int64_t position = 0;
  void *data = NULL;
  size_t length = 0;
  napi_typedarray_type type;
  napi_value arraybuffer;
  size_t byte_offset = 0;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, &arraybuffer, &byte_offset) != napi_ok ||
      type != napi_uint8_array || napi_get_value_int64(env, argv[2], &position) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (fd, Uint8Array, position)");
    return NULL;
  }
  struct iovec iov = {.iov_base = data, .iov_len = length};
  ssize_t r;
  do {
    r = write ? pwritev2(fd, &iov, 1, (off_t)position, RWF_NOWAIT)
              : preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  napi_value result;
  napi_create_int64(env, r < 0 ? -(int64_t)errno : (int64_t)r, &result);
  return result;
}

static napi_value js_pread_nowait(napi_env env, napi_callback_info info) { return nowait(env, info, 0); }
static napi_value js_pwrite_nowait(napi_env env, napi_callback_info info) { return nowait(env, info, 1); }

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, NULL},
    {"seek", NULL, js_seek, NULL, NULL, NULL, napi_default, NULL},
    {"blkdiscard", NULL, js_blkdiscard, NULL, NULL, NULL, napi_default, NULL},
    {"flock", NULL, js_flock, NULL, NULL, NULL, napi_default, NULL},
    {"preadNowait", NULL, js_pread_nowait, NULL, NULL, NULL, napi_default, NULL},
    {"pwriteNowait", NULL, js_pwrite_nowait, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
