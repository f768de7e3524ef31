/*
 * The io_uring engine: file reads, writes, fdatasync and fallocate on one
 * ring per Node environment, with completions delivered on the event loop.
 * Compiled only when liburing was found at build time (UBCACHE_HAVE_URING).
 *
 * JS owns the request ids (0 .. capacity-1) and keeps each request's buffer
 * alive until its completion; this file keeps, per id, what it needs to
 * continue a transfer: the kernel may move fewer bytes than asked (a
 * partial read or write) or answer -EAGAIN/-EINTR, and a request is only
 * reported once it has moved everything, met the end of the file, made no
 * progress or failed. So JS sees exactly one completion per request.
 *
 *   uringSetup(onComplete, ids: Int32Array, results: Float64Array, workers) -> capacity
 *       Creates the ring (throws an Error with the errno name as `code`:
 *       ENOSYS or EPERM when io_uring is disabled by kernel.io_uring_disabled
 *       or a seccomp filter). capacity = ids.length (a power of two) is both
 *       the completion queue's size and the most requests in flight, so the
 *       completion queue can never overflow. `workers` caps io-wq's bounded
 *       workers, the kernel threads that run what cannot complete without
 *       blocking (buffered writes on most file systems, reads that miss the
 *       page cache where async buffered reads are not supported).
 *   uringRead(id, fd, Uint8Array, position) / uringWrite(...) -> 0 | -errno
 *   uringFdatasync(id, fd) / uringFallocate(id, fd, mode, offset, length) -> 0 | -errno
 *       Queue one request into the submission queue; nothing reaches the
 *       kernel until uringSubmit (JS calls it once per microtask turn), unless
 *       the submission queue is full, in which case it is submitted early.
 *   uringSubmit() -> submitted | -errno
 *   uringCounters() -> [in flight, continuations, retries] (for tests and metrics)
 *
 * Completions: the ring signals an eventfd, which a uv_poll_t watches on the
 * environment's loop. On readiness every completion is drained into
 * ids/results (result: bytes moved, 0 for fdatasync/fallocate, or -errno)
 * and onComplete(n) is called once per batch through napi_make_callback, so
 * promise reactions run right after it. The poll handle is referenced only
 * while requests are in flight: an idle engine never keeps the process alive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <uv.h>

#include "ubcache_native.h"

enum req_op { OP_NONE = 0, OP_READ, OP_WRITE, OP_FDATASYNC, OP_FALLOCATE };

/* One SQE moves at most this much; the rest is a continuation (the kernel caps a transfer just under 2 GiB anyway). */
#define CHUNK_MAX (1u << 30)
/* A request that keeps answering -EAGAIN without progress is given up after this many resubmissions. */
#define AGAIN_MAX 1000
/* The user_data of the cancel issued at teardown, outside the id range. */
#define CANCEL_TAG UINT64_MAX

struct req {
  enum req_op op;
  int fd;
  int mode;
  unsigned again;
  uint8_t *base;
  uint64_t length;
  int64_t position; /* < 0: the file's current position (streams) */
  uint64_t done;
};

struct uring {
  napi_env env;
  int ready;
  struct io_uring ring;
  int efd;
  uv_poll_t *poll;
  int referenced;
  uint32_t cap;
  uint32_t inflight;
  double partials; /* continuations after a partial transfer */
  double retries;  /* resubmissions after -EAGAIN/-EINTR */
  struct req *reqs;
  int32_t *ids;
  double *results;
  napi_ref callback;
  napi_ref ids_ref;
  napi_ref results_ref;
  napi_ref resource;
  napi_async_context async_ctx;
  napi_async_cleanup_hook_handle cleanup;
};

static void throw_errno(napi_env env, int e, const char *what) {
  napi_throw(env, ubcache_errno_error(env, e, what));
}

static void set_ref(struct uring *u, int on) {
  if (on && !u->referenced) {
    uv_ref((uv_handle_t *)u->poll);
    u->referenced = 1;
  } else if (!on && u->referenced) {
    uv_unref((uv_handle_t *)u->poll);
    u->referenced = 0;
  }
}

static int submit(struct uring *u) {
  int r;
  do {
    r = io_uring_submit(&u->ring);
  } while (r == -EINTR);
  return r;
}

static struct io_uring_sqe *get_sqe(struct uring *u) {
  struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
  if (sqe == NULL) {
    /* The submission queue is full: hand it to the kernel now rather than wait for the microtask. */
    if (submit(u) < 0) return NULL;
    sqe = io_uring_get_sqe(&u->ring);
  }
  return sqe;
}

/* Put request `id` (or what is left of it) into the submission queue: 0 or -errno. */
static int queue_req(struct uring *u, uint32_t id) {
  struct req *r = &u->reqs[id];
  struct io_uring_sqe *sqe = get_sqe(u);
  if (sqe == NULL) return -EBUSY;
  uint64_t off = r->position < 0 ? (uint64_t)-1 : (uint64_t)r->position + r->done;
  uint64_t left = r->length - r->done;
  unsigned len = left > CHUNK_MAX ? CHUNK_MAX : (unsigned)left;
  switch (r->op) {
    case OP_READ: io_uring_prep_read(sqe, r->fd, r->base + r->done, len, off); break;
    case OP_WRITE: io_uring_prep_write(sqe, r->fd, r->base + r->done, len, off); break;
    case OP_FDATASYNC: io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC); break;
    case OP_FALLOCATE: io_uring_prep_fallocate(sqe, r->fd, r->mode, (off_t)r->position, (off_t)r->length); break;
    case OP_NONE: default: io_uring_prep_nop(sqe); break;
  }
  io_uring_sqe_set_data64(sqe, id);
  return 0;
}

/*
 * What a completion means for its request: 1 and *result when the request
 * is finished, 0 when it was resubmitted to continue.
 */
static int complete_one(struct uring *u, uint32_t id, int res, double *result) {
  struct req *r = &u->reqs[id];
  int transfer = r->op == OP_READ || r->op == OP_WRITE;
  if ((res == -EAGAIN || res == -EINTR) && r->again < AGAIN_MAX) {
    r->again++;
    u->retries++;
    int q = queue_req(u, id);
    if (q == 0) return 0;
    res = q;
  } else if (transfer && res > 0) {
    r->done += (uint64_t)res;
    r->again = 0;
    if (r->done < r->length) {
      u->partials++;
      int q = queue_req(u, id);
      if (q == 0) return 0;
      res = q;
    } else {
      res = 0;
    }
  }
  /* Here res is <= 0: an error, the end of the file (read), no progress (write), or done. */
  *result = res < 0 ? (double)res : transfer ? (double)r->done : 0.0;
  r->op = OP_NONE;
  r->base = NULL;
  return 1;
}

static void deliver(struct uring *u, uint32_t n) {
  napi_env env = u->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[1], ret;
  napi_get_reference_value(env, u->callback, &cb);
  napi_get_reference_value(env, u->resource, &recv);
  napi_create_uint32(env, n, &argv[0]);
  if (napi_make_callback(env, u->async_ctx, recv, cb, 1, argv, &ret) == napi_pending_exception) {
    /* Like any callback from the loop: an exception goes to 'uncaughtException'. */
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
  napi_close_handle_scope(env, scope);
}

/* Drain the completion queue in batches of at most `cap`, one JS call per batch. */
static void drain(struct uring *u) {
  for (int round = 0; round < 16 && u->ready && io_uring_cq_ready(&u->ring) > 0; round++) {
    uint32_t n = 0;
    int resubmitted = 0;
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
      seen++;
      uint64_t id = io_uring_cqe_get_data64(cqe);
      if (id >= u->cap || u->reqs[id].op == OP_NONE) continue;
      double result;
      if (complete_one(u, (uint32_t)id, cqe->res, &result)) {
        u->ids[n] = (int32_t)id;
        u->results[n] = result;
        n++;
        if (n == u->cap) break;
      } else {
        resubmitted = 1;
      }
    }
    io_uring_cq_advance(&u->ring, seen);
    if (resubmitted) submit(u);
    if (n == 0) continue;
    u->inflight -= n;
    if (u->inflight == 0) set_ref(u, 0);
    deliver(u, n);
  }
}

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)status;
  (void)events;
  struct uring *u = handle->data;
  uint64_t count;
  /* Reset the eventfd before draining, so a completion posted meanwhile signals it again. */
  ssize_t r = read(u->efd, &count, sizeof count);
  (void)r;
  drain(u);
}

static struct uring *this_uring(napi_env env, napi_callback_info info, size_t *argc, napi_value *argv) {
  void *data = NULL;
  napi_get_cb_info(env, info, argc, argv, NULL, &data);
  return data;
}

static napi_value int_result(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

/* Claim id for a new request: NULL (and a JS exception) if the arguments are wrong. */
static struct req *claim(napi_env env, struct uring *u, napi_value id_value, napi_value fd_value, uint32_t *id) {
  int32_t fd;
  if (!u->ready) {
    throw_errno(env, EBADF, "io_uring engine is not set up");
    return NULL;
  }
  if (napi_get_value_uint32(env, id_value, id) != napi_ok || *id >= u->cap ||
      napi_get_value_int32(env, fd_value, &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected a request id below the capacity and an fd");
    return NULL;
  }
  struct req *r = &u->reqs[*id];
  if (r->op != OP_NONE) {
    napi_throw_error(env, NULL, "ubcache_native: request id already in flight");
    return NULL;
  }
  memset(r, 0, sizeof *r);
  r->fd = fd;
  return r;
}

/* Queue a claimed request; on failure it is released and -errno returned to JS. */
static napi_value enqueue(napi_env env, struct uring *u, uint32_t id) {
  int q = queue_req(u, id);
  if (q < 0) {
    u->reqs[id].op = OP_NONE;
    return int_result(env, q);
  }
  if (u->inflight++ == 0) set_ref(u, 1);
  return int_result(env, 0);
}

static napi_value transfer(napi_env env, napi_callback_info info, enum req_op op) {
  size_t argc = 4;
  napi_value argv[4];
  struct uring *u = this_uring(env, info, &argc, argv);
  if (argc < 4) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (id, fd, Uint8Array, position)");
    return NULL;
  }
  uint32_t id;
  struct req *r = claim(env, u, argv[0], argv[1], &id);
  if (r == NULL) return NULL;
  napi_typedarray_type type;
  size_t length;
  void *data;
  int64_t position;
  if (napi_get_typedarray_info(env, argv[2], &type, &length, &data, NULL, NULL) != napi_ok ||
      type != napi_uint8_array || napi_get_value_int64(env, argv[3], &position) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (id, fd, Uint8Array, position)");
    return NULL;
  }
  r->op = op;
  r->base = data;
  r->length = length;
  r->position = position;
  return enqueue(env, u, id);
}

static napi_value js_read(napi_env env, napi_callback_info info) { return transfer(env, info, OP_READ); }
static napi_value js_write(napi_env env, napi_callback_info info) { return transfer(env, info, OP_WRITE); }

static napi_value js_fdatasync(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  struct uring *u = this_uring(env, info, &argc, argv);
  if (argc < 2) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (id, fd)");
    return NULL;
  }
  uint32_t id;
  struct req *r = claim(env, u, argv[0], argv[1], &id);
  if (r == NULL) return NULL;
  r->op = OP_FDATASYNC;
  return enqueue(env, u, id);
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  struct uring *u = this_uring(env, info, &argc, argv);
  if (argc < 5) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (id, fd, mode, offset, length)");
    return NULL;
  }
  uint32_t id;
  struct req *r = claim(env, u, argv[0], argv[1], &id);
  if (r == NULL) return NULL;
  int32_t mode;
  int64_t offset, length;
  if (napi_get_value_int32(env, argv[2], &mode) != napi_ok || napi_get_value_int64(env, argv[3], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[4], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (id, fd, mode, offset, length)");
    return NULL;
  }
  r->op = OP_FALLOCATE;
  r->mode = mode;
  r->position = offset;
  r->length = (uint64_t)length;
  return enqueue(env, u, id);
}

static napi_value js_submit(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  struct uring *u = this_uring(env, info, &argc, NULL);
  if (!u->ready) return int_result(env, -EBADF);
  return int_result(env, submit(u));
}

/* [requests in flight, continuations after partial transfers, resubmissions after EAGAIN/EINTR] */
static napi_value js_counters(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  struct uring *u = this_uring(env, info, &argc, NULL);
  napi_value out, v;
  napi_create_array_with_length(env, 3, &out);
  napi_create_uint32(env, u->inflight, &v);
  napi_set_element(env, out, 0, v);
  napi_create_double(env, u->partials, &v);
  napi_set_element(env, out, 1, v);
  napi_create_double(env, u->retries, &v);
  napi_set_element(env, out, 2, v);
  return out;
}

/* The kernel must have every operation the engine uses (IORING_OP_READ/WRITE need Linux 5.6). */
static const char *missing_opcode(struct io_uring *ring) {
  struct io_uring_probe *p = io_uring_get_probe_ring(ring);
  if (p == NULL) return "IORING_REGISTER_PROBE";
  const char *missing = NULL;
  if (!io_uring_opcode_supported(p, IORING_OP_READ)) missing = "IORING_OP_READ";
  else if (!io_uring_opcode_supported(p, IORING_OP_WRITE)) missing = "IORING_OP_WRITE";
  else if (!io_uring_opcode_supported(p, IORING_OP_FSYNC)) missing = "IORING_OP_FSYNC";
  else if (!io_uring_opcode_supported(p, IORING_OP_FALLOCATE)) missing = "IORING_OP_FALLOCATE";
  io_uring_free_probe(p);
  return missing;
}

static napi_value js_setup(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  struct uring *u = this_uring(env, info, &argc, argv);
  if (u->ready) {
    throw_errno(env, EEXIST, "io_uring engine already set up in this environment");
    return NULL;
  }
  napi_valuetype cb_type;
  napi_typedarray_type ids_type, results_type;
  size_t ids_len, results_len;
  void *ids_data, *results_data;
  uint32_t workers;
  if (argc < 4 || napi_typeof(env, argv[0], &cb_type) != napi_ok || cb_type != napi_function ||
      napi_get_typedarray_info(env, argv[1], &ids_type, &ids_len, &ids_data, NULL, NULL) != napi_ok ||
      ids_type != napi_int32_array ||
      napi_get_typedarray_info(env, argv[2], &results_type, &results_len, &results_data, NULL, NULL) != napi_ok ||
      results_type != napi_float64_array || results_len != ids_len || ids_len < 2 || (ids_len & (ids_len - 1)) != 0 ||
      ids_len > 32768 || napi_get_value_uint32(env, argv[3], &workers) != napi_ok) {
    napi_throw_type_error(env, NULL,
                          "ubcache_native: expected (onComplete, Int32Array, Float64Array of one power-of-two "
                          "length, workers)");
    return NULL;
  }

  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_CQSIZE;
  p.cq_entries = (unsigned)ids_len;
  int r = io_uring_queue_init_params((unsigned)ids_len / 2, &u->ring, &p);
  if (r < 0) {
    throw_errno(env, -r, "io_uring_queue_init");
    return NULL;
  }
  const char *missing = missing_opcode(&u->ring);
  if (missing != NULL) {
    io_uring_queue_exit(&u->ring);
    char what[96];
    snprintf(what, sizeof what, "this kernel's io_uring lacks %s", missing);
    throw_errno(env, ENOSYS, what);
    return NULL;
  }
  if (workers > 0) {
    unsigned limits[2] = {workers, 0};
    /* Not fatal: kernels before 5.15 lack it and keep their default. */
    (void)io_uring_register_iowq_max_workers(&u->ring, limits);
  }
  u->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (u->efd < 0 || (r = io_uring_register_eventfd(&u->ring, u->efd)) < 0) {
    int e = u->efd < 0 ? errno : -r;
    if (u->efd >= 0) close(u->efd);
    io_uring_queue_exit(&u->ring);
    throw_errno(env, e, "io_uring eventfd");
    return NULL;
  }
  struct uv_loop_s *loop;
  u->poll = calloc(1, sizeof *u->poll);
  u->cap = p.cq_entries < ids_len ? p.cq_entries : (uint32_t)ids_len;
  u->reqs = calloc(u->cap, sizeof *u->reqs);
  if (u->poll == NULL || u->reqs == NULL || napi_get_uv_event_loop(env, &loop) != napi_ok ||
      uv_poll_init(loop, u->poll, u->efd) != 0) {
    free(u->poll);
    free(u->reqs);
    u->poll = NULL;
    u->reqs = NULL;
    close(u->efd);
    io_uring_queue_exit(&u->ring);
    throw_errno(env, ENOMEM, "io_uring engine setup");
    return NULL;
  }
  u->poll->data = u;
  uv_poll_start(u->poll, UV_READABLE, on_readable);
  /* Idle until the first request: an engine alone must not keep the process alive. */
  uv_unref((uv_handle_t *)u->poll);
  u->referenced = 0;

  napi_value resource, name;
  napi_create_object(env, &resource);
  napi_create_string_utf8(env, "ubcache.io_uring", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, resource, name, &u->async_ctx);
  napi_create_reference(env, resource, 1, &u->resource);
  napi_create_reference(env, argv[0], 1, &u->callback);
  napi_create_reference(env, argv[1], 1, &u->ids_ref);
  napi_create_reference(env, argv[2], 1, &u->results_ref);
  u->ids = ids_data;
  u->results = results_data;
  u->inflight = 0;
  u->ready = 1;
  napi_value cap;
  napi_create_uint32(env, u->cap, &cap);
  return cap;
}

/*
 * Teardown when the environment goes away (process exit, a worker thread
 * ending). Requests still in flight would write into buffers that are about
 * to be freed, so they are cancelled and waited for before the ring closes.
 */
static void wait_idle(struct uring *u) {
  if (u->inflight == 0) return;
  struct io_uring_sqe *sqe = get_sqe(u);
  if (sqe != NULL) {
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, CANCEL_TAG);
  }
  submit(u);
  while (u->inflight > 0) {
    struct io_uring_cqe *cqe;
    int r = io_uring_wait_cqe(&u->ring, &cqe);
    if (r == -EINTR) continue;
    if (r < 0) break;
    uint64_t id = io_uring_cqe_get_data64(cqe);
    if (id < u->cap && u->reqs[id].op != OP_NONE) {
      u->reqs[id].op = OP_NONE;
      u->inflight--;
    }
    io_uring_cqe_seen(&u->ring, cqe);
  }
}

static void on_poll_closed(uv_handle_t *handle) {
  struct uring *u = handle->data;
  napi_async_cleanup_hook_handle cleanup = u->cleanup;
  free(handle);
  free(u->reqs);
  free(u);
  napi_remove_async_cleanup_hook(cleanup);
}

static void on_env_cleanup(napi_async_cleanup_hook_handle handle, void *arg) {
  struct uring *u = arg;
  u->cleanup = handle;
  if (!u->ready) {
    free(u);
    napi_remove_async_cleanup_hook(handle);
    return;
  }
  u->ready = 0;
  uv_poll_stop(u->poll);
  wait_idle(u);
  io_uring_queue_exit(&u->ring);
  close(u->efd);
  napi_delete_reference(u->env, u->callback);
  napi_delete_reference(u->env, u->ids_ref);
  napi_delete_reference(u->env, u->results_ref);
  napi_delete_reference(u->env, u->resource);
  napi_async_destroy(u->env, u->async_ctx);
  uv_close((uv_handle_t *)u->poll, on_poll_closed);
}

void ubcache_uring_register(napi_env env, napi_value exports) {
  struct uring *u = calloc(1, sizeof *u);
  if (u == NULL) return;
  u->env = env;
  u->efd = -1;
  if (napi_add_async_cleanup_hook(env, on_env_cleanup, u, NULL) != napi_ok) {
    free(u);
    return;
  }
  napi_property_descriptor props[] = {
    {"uringSetup", NULL, js_setup, NULL, NULL, NULL, napi_default, u},
    {"uringRead", NULL, js_read, NULL, NULL, NULL, napi_default, u},
    {"uringWrite", NULL, js_write, NULL, NULL, NULL, napi_default, u},
    {"uringFdatasync", NULL, js_fdatasync, NULL, NULL, NULL, napi_default, u},
    {"uringFallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, u},
    {"uringSubmit", NULL, js_submit, NULL, NULL, NULL, napi_default, u},
    {"uringCounters", NULL, js_counters, NULL, NULL, NULL, napi_default, u},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
