#!/usr/bin/env bash
# The ubcache demo (`npm run demo`, after `npm ci`): the main job, a cache in
# front of a slow disk. It formats a cache and a backing image together with
# `ubcache make`, serves the bcache device over NBD with `ubcache serve` in
# writeback mode with writeback held off, writes 16 MiB through NBD, shows
# that the data is dirty in the cache and not yet on the backing image, stops
# and restarts the daemon (the data survives, served from the cache), lets
# writeback copy it to the backing image, and checks the backing image alone.
# Needs nbdinfo and nbdcopy: apt-get install libnbd-bin.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in nbdinfo nbdcopy; do
  if ! command -v "$tool" >/dev/null; then
    echo "demo: $tool is missing; install it with: sudo apt-get install libnbd-bin" >&2
    exit 1
  fi
done
if [ ! -f dist/cli/main.js ]; then
  echo "demo: dist/ is missing; run 'npm ci' (or 'npm run build') first" >&2
  exit 1
fi

work=$(mktemp -d)
daemon=
cleanup() {
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then kill "$daemon"; fi
  rm -rf "$work"
}
trap cleanup EXIT

cache=$work/cache.img
backing=$work/backing.img
sock=$work/nbd.sock
uri="nbd+unix:///bcache0?socket=$sock"
truncate -s 64M "$cache"
truncate -s 128M "$backing"

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
indent() { sed 's/^/   /'; }

# Start `ubcache serve ARGS...` and wait for its "listening on" line (or for $wait_for).
serve() {
  : >"$work/daemon.log"
  bin/ubcache serve --socket "$sock" "$@" 2>"$work/daemon.log" &
  daemon=$!
  until grep -q "${wait_for:-listening on}" "$work/daemon.log"; do
    if ! kill -0 "$daemon" 2>/dev/null; then
      cat "$work/daemon.log" >&2
      exit 1
    fi
    sleep 0.1
  done
}
stop() {
  kill -TERM "$daemon"
  local status=0
  wait "$daemon" || status=$?
  daemon=
  sed -n '/listening on/,$p' "$work/daemon.log" | tail -n +2 | indent
  echo "   exit status $status"
  [ "$status" -eq 0 ]
}
state() { bin/ubcache show-super "$backing" | grep -E 'cache_mode|cache_state' | indent; }
# Whether the backing image, past its data offset (8 KiB), holds the pattern: what the disk alone has.
on_backing() { cmp -s -n 16777216 -i 8192:0 "$backing" "$work/pattern"; }

step "ubcache make -b 64k -C cache.img -B backing.img --writeback"
bin/ubcache make -b 64k -C "$cache" -B "$backing" --writeback | indent
state

step "ubcache serve (writeback held off) and nbdinfo"
serve --set bcache0.writeback_running=0 "$cache" "$backing"
indent <"$work/daemon.log"
nbdinfo "$uri" | grep -E 'export-size|block_size|can_(flush|fua|trim|multi_conn)' | indent

step "write 16 MiB of random data at the start of bcache0, read it back, compare"
head -c 16M /dev/urandom >"$work/pattern"
nbdcopy "$work/pattern" "$uri"
nbdcopy "$uri" "$work/readback"
cmp -s -n 16777216 "$work/pattern" "$work/readback" || {
  echo "   MISMATCH: the data read back differs from what was written" >&2
  exit 1
}
echo "   round trip ok ($(sha256sum <"$work/pattern" | cut -c1-16)...)"
if on_backing; then
  echo "   unexpected: the backing image already holds the data" >&2
  exit 1
fi
echo "   the backing image does not hold it yet: it is dirty data in the cache"

step "stop with SIGTERM: the backing superblock says dirty"
stop
state

step "restart with writeback unthrottled (writeback_percent=0); served from the cache, then written back"
wait_for='marked clean' serve --set bcache0.writeback_delay=0 --set bcache0.writeback_percent=0 "$cache" "$backing"
grep -E 'replay' "$work/daemon.log" | indent
nbdcopy "$uri" "$work/readback2"
cmp -s -n 16777216 "$work/pattern" "$work/readback2" && echo "   bcache0 still reads back the same data"
stop
state
if on_backing; then
  echo "   the backing image alone now holds the 16 MiB: writeback done"
else
  echo "   MISMATCH: the backing image does not hold what was written" >&2
  exit 1
fi
