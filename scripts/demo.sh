#!/usr/bin/env bash
# The ubcache demo (`npm run demo`, after `npm ci`): export a temporary file
# over NBD on a unix socket, look at it with nbdinfo, write a random pattern
# through NBD with nbdcopy, read it back, compare, and stop the daemon with
# SIGTERM. Needs nbdinfo and nbdcopy: apt-get install libnbd-bin.
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

disk=$work/disk.img
sock=$work/nbd.sock
uri="nbd+unix:///disk.img?socket=$sock"
truncate -s 16M "$disk"

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

step "ubcache export --socket $sock $disk"
bin/ubcache export --socket "$sock" --description "ubcache demo disk" "$disk" 2>"$work/daemon.log" &
daemon=$!
until grep -q 'listening on' "$work/daemon.log"; do
  if ! kill -0 "$daemon" 2>/dev/null; then
    cat "$work/daemon.log" >&2
    exit 1
  fi
  sleep 0.1
done
sed 's/^/   /' "$work/daemon.log"

step "nbdinfo $uri"
nbdinfo "$uri" | sed 's/^/   /'

step "write 16 MiB of random data through NBD, read it back, compare"
head -c 16M /dev/urandom >"$work/pattern"
nbdcopy "$work/pattern" "$uri"
nbdcopy "$uri" "$work/readback"
if cmp -s "$work/pattern" "$work/readback" && cmp -s "$work/pattern" "$disk"; then
  echo "   round trip ok: what was written reads back, and the file holds it ($(sha256sum <"$work/pattern" | cut -c1-16)...)"
else
  echo "   MISMATCH: the data read back differs from what was written" >&2
  exit 1
fi

step "stop the daemon with SIGTERM"
kill -TERM "$daemon"
status=0
wait "$daemon" || status=$?
daemon=
tail -n +2 "$work/daemon.log" | sed 's/^/   /'
echo "   exit status $status"
exit "$status"
