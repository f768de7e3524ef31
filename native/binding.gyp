{
  "targets": [
    {
      "target_name": "ubcache_native",
      "sources": ["ubcache_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
