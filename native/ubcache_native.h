/* Shared between the addon's C files. */
#ifndef UBCACHE_NATIVE_H
#define UBCACHE_NATIVE_H

#include <node_api.h>

/* The errno's name (EIO, ENOSPC, ...), or "EUNKNOWN". */
const char *ubcache_errno_name(int e);

/* A JS Error whose `code` is the errno name and `errno` is -e, as Node's fs errors. */
napi_value ubcache_errno_error(napi_env env, int e, const char *what);

/* Adds notifySend and setParentDeathSignal (daemon.c) to the exports. */
void ubcache_daemon_register(napi_env env, napi_value exports);

#ifdef UBCACHE_HAVE_URING
/* Adds the io_uring functions (uringSetup, uringRead, ...) to the exports. */
void ubcache_uring_register(napi_env env, napi_value exports);
#endif

#endif
