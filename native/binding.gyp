{
  # have_uring=1 (scripts/build.mjs passes it when liburing-dev is installed)
  # adds the io_uring engine, with liburing linked statically so the addon
  # needs no liburing.so at run time.
  "variables": {
    "have_uring%": 0
  },
  "targets": [
    {
      "target_name": "ubcache_native",
      "sources": ["ubcache_native.c", "daemon.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "conditions": [
        [
          "have_uring==1",
          {
            "sources": ["uring.c"],
            "defines": ["UBCACHE_HAVE_URING"],
            "libraries": ["-l:liburing.a"],
            # Keep liburing's symbols private to the addon.
            "ldflags": ["-Wl,--exclude-libs,liburing.a"]
          }
        ]
      ]
    }
  ]
}
