/*
 * The daemon's two Linux calls Node has no API for (serve as a service):
 *
 *   notifySend(address, message) -> undefined; throws on failure
 *       One datagram on an AF_UNIX SOCK_DGRAM socket: sd_notify(3)'s protocol
 *       for $NOTIFY_SOCKET (READY=1, STATUS=..., STOPPING=1). Node's dgram
 *       module has no unix domain sockets. An address starting with '@' is in
 *       the abstract namespace, as systemd writes it. The socket is opened and
 *       closed per message (a few a minute at most), non-blocking: a full
 *       receive queue is EAGAIN, never a stalled event loop.
 *
 *   setParentDeathSignal(signo) -> undefined; throws on failure
 *       prctl(PR_SET_PDEATHSIG): the kernel sends `signo` to this process when
 *       the thread that forked it exits (nbdkit's --exit-with-parent). Kept
 *       across execve (the CLI re-executes itself once at startup).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ubcache_native.h"

static napi_value js_notify_send(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  struct sockaddr_un addr;
  char message[4096];
  size_t path_len, message_len;
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (argc < 2 ||
      napi_get_value_string_utf8(env, argv[0], addr.sun_path, sizeof addr.sun_path, &path_len) != napi_ok ||
      napi_get_value_string_utf8(env, argv[1], message, sizeof message, &message_len) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (address, message)");
    return NULL;
  }
  /* The copies truncate silently: refuse what did not fit instead. */
  if (path_len == 0 || path_len >= sizeof addr.sun_path - 1 || message_len >= sizeof message - 1) {
    napi_throw(env, ubcache_errno_error(env, EINVAL, "notify: address or message too long"));
    return NULL;
  }
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';
  socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    napi_throw(env, ubcache_errno_error(env, errno, "notify: socket"));
    return NULL;
  }
  ssize_t r;
  do {
    r = sendto(fd, message, message_len, MSG_NOSIGNAL, (struct sockaddr *)&addr, len);
  } while (r < 0 && errno == EINTR);
  int e = errno;
  close(fd);
  if (r < 0) {
    napi_throw(env, ubcache_errno_error(env, e, "notify: sendto"));
    return NULL;
  }
  return NULL;
}

static napi_value js_set_parent_death_signal(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t signo = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &signo) != napi_ok) {
    napi_throw_type_error(env, NULL, "ubcache_native: expected (signal number)");
    return NULL;
  }
  if (prctl(PR_SET_PDEATHSIG, (unsigned long)signo) != 0) {
    napi_throw(env, ubcache_errno_error(env, errno, "prctl(PR_SET_PDEATHSIG)"));
    return NULL;
  }
  return NULL;
}

void ubcache_daemon_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"notifySend", NULL, js_notify_send, NULL, NULL, NULL, napi_default, NULL},
    {"setParentDeathSignal", NULL, js_set_parent_death_signal, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
