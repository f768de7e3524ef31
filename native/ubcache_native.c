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
 *   execve(path, argv[], env[]) -> never returns; throws on failure
 *       Replaces the process image, keeping its pid, its stdio and its
 *       place under whoever supervises it. The CLI uses it once at startup
 *       to restart itself with UV_THREADPOOL_SIZE set: libuv sizes its pool
 *       at the first use, and Node 20's ES module loader uses the pool
 *       before any of our code runs.
 *
 *   notifySend, setParentDeathSignal (daemon.c): sd_notify and
 *       --exit-with-parent for serve.
 *
 *   uringSetup, uringRead, ... (uring.c, only when built with liburing):
 *       the io_uring I/O engine.
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
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "ubcache_native.h"

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

const char *ubcache_errno_name(int e) {
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
    case ENOMEM: return "ENOMEM";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case EEXIST: return "EEXIST";
    case ENOENT: return "ENOENT";
    case EDQUOT: return "EDQUOT";
    case ESPIPE: return "ESPIPE";
    case ECANCELED: return "ECANCELED";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENOTSOCK: return "ENOTSOCK";
    case EPROTOTYPE: return "EPROTOTYPE";
    default: return "EUNKNOWN";
  }
}

napi_value ubcache_errno_error(napi_env env, int e, const char *what) {
  napi_value msg, code, error, errnum;
  const char *name = ubcache_errno_name(e);
  char text[256];
  if (what != NULL) snprintf(text, sizeof text, "%s: %s (%s)", name, strerror(e), what);
  else snprintf(text, sizeof text, "%s: %s", name, strerror(e));
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &error);
  napi_create_int32(env, -e, &errnum);
  napi_set_named_property(env, error, "errno", errnum);
  return error;
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
    napi_reject_deferred(env, op->deferred, ubcache_errno_error(env, op->err, NULL));
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

/* Read a JS array of strings into a NULL-terminated, malloc'd vector; NULL on a wrong type. */
static char **string_vector(napi_env env, napi_value array) {
  uint32_t n;
  bool is_array;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array || napi_get_array_length(env, array, &n) != napi_ok)
    return NULL;
  char **v = calloc((size_t)n + 1, sizeof *v);
  if (v == NULL) return NULL;
  for (uint32_t i = 0; i < n; i++) {
    napi_value item;
    size_t len;
    if (napi_get_element(env, array, i, &item) != napi_ok ||
        napi_get_value_string_utf8(env, item, NULL, 0, &len) != napi_ok || (v[i] = malloc(len + 1)) == NULL ||
        napi_get_value_string_utf8(env, item, v[i], len + 1, &len) != napi_ok) {
      for (uint32_t j = 0; j <= i; j++) free(v[j]);
      free(v);
      return NULL;
    }
  }
  return v;
}

static void free_vector(char **v) {
  if (v == NULL) return;
  for (char **p = v; *p != NULL; p++) free(*p);
  free(v);
}

static napi_value js_execve(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char path[4096];
  size_t len;
  char **args = NULL, **envp = NULL;
  if (argc < 3 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok ||
      len >= sizeof path - 1 || (args = string_vector(env, argv[1])) == NULL ||
      (envp = string_vector(env, argv[2])) == NULL) {
    free_vector(args);
    napi_throw_type_error(env, NULL, "ubcache_native: expected (path, string[], string[])");
    return NULL;
  }
  /* The new image must find stdio where this one had it. */
  for (int fd = 0; fd <= 2; fd++) {
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0 && (flags & FD_CLOEXEC)) fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  }
  execve(path, args, envp);
  int e = errno;
  free_vector(args);
  free_vector(envp);
  napi_throw(env, ubcache_errno_error(env, e, "execve"));
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, NULL},
    {"seek", NULL, js_seek, NULL, NULL, NULL, napi_default, NULL},
    {"blkdiscard", NULL, js_blkdiscard, NULL, NULL, NULL, napi_default, NULL},
    {"flock", NULL, js_flock, NULL, NULL, NULL, napi_default, NULL},
    {"preadNowait", NULL, js_pread_nowait, NULL, NULL, NULL, napi_default, NULL},
    {"pwriteNowait", NULL, js_pwrite_nowait, NULL, NULL, NULL, napi_default, NULL},
    {"execve", NULL, js_execve, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  ubcache_daemon_register(env, exports);
#ifdef UBCACHE_HAVE_URING
  ubcache_uring_register(env, exports);
#endif
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
