#!/usr/bin/env bash
# Read throughput through `blobmgr mount` next to pread on the cache file
# itself (docs/MOUNT.md, "Performance"). As root: it mounts.
#
# One blob, fetched whole into the cache first, so every figure compares
# ways of reading the same bytes from the page cache:
#   direct        pread on WORKDIR/data/<id> (the daemon's cache file)
#   fuse          through the mount, on a fresh mount (the FUSE file's own
#                 page cache empty: every byte crosses /dev/fuse once)
#   fuse-warm     the same mount read again (the FUSE file's page cache)
#   passthrough   through a mount with --passthrough (a fresh one)
# Sequential: 1 MiB reads over the whole blob. Random: 4 KiB preads at
# random 4 KiB-aligned offsets (seeded), MOUNT_BENCH_RANDOM of them.
#
# Knobs: MOUNT_BENCH_MIB=512 (blob size), MOUNT_BENCH_RANDOM=20000,
# MOUNT_BENCH_REPEAT=3 (medians reported). BIN=path of blobmgr
# (default: target/release/blobmgr; build it first).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BIN:-$TARGET/release/blobmgr}
MIB=${MOUNT_BENCH_MIB:-512}
RANDOM_READS=${MOUNT_BENCH_RANDOM:-20000}
REPEAT=${MOUNT_BENCH_REPEAT:-3}
[ "$(id -u)" -eq 0 ] || { echo "mount-bench: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "mount-bench: no $BIN (cargo build --release)" >&2; exit 1; }

TMP=$(mktemp -d)
DAEMON=""
MOUNT=""
stop_mount() {
  if [ -n "$MOUNT" ]; then
    kill -TERM "$MOUNT" 2>/dev/null || true
    wait "$MOUNT" 2>/dev/null || true
    MOUNT=""
  fi
}
cleanup() {
  stop_mount
  [ -n "$DAEMON" ] && { kill -TERM "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true; }
  umount -l "$TMP/mnt" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$TMP/be" "$TMP/mnt"
head -c "$((MIB << 20))" /dev/urandom > "$TMP/be/blob"
RUST_LOG=warn "$BIN" serve --sock "$TMP/s.sock" --workdir "$TMP/work" --backend "$TMP/be" &
DAEMON=$!
for _ in $(seq 100); do "$BIN" ping --sock "$TMP/s.sock" >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN" fetch --sock "$TMP/s.sock" blob >/dev/null

start_mount() {
  RUST_LOG=warn "$BIN" mount --sock "$TMP/s.sock" "$@" "$TMP/mnt" &
  MOUNT=$!
  for _ in $(seq 100); do grep -q " $TMP/mnt fuse.blobmgr " /proc/self/mountinfo 2>/dev/null && return; sleep 0.05; done
  grep -q " $TMP/mnt " /proc/self/mountinfo || { echo "mount-bench: not mounted" >&2; exit 1; }
}

# bench.py MODE PATH -> "MiB/s" (seq) or "IOPS MiB/s" (rand)
cat > "$TMP/bench.py" <<'EOF'
import os, random, sys, time
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
t = time.perf_counter()
if mode == "seq":
    done = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        done += len(b)
    s = time.perf_counter() - t
    print(f"{done / s / 2**20:.0f}")
else:
    rng = random.Random(42)
    blocks = size // 4096
    for _ in range(n):
        os.pread(fd, 4096, rng.randrange(blocks) * 4096)
    s = time.perf_counter() - t
    print(f"{n / s:.0f} {n * 4096 / s / 2**20:.0f}")
EOF

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
CACHE="$TMP/work/data/blob"
run() { python3 "$TMP/bench.py" "$1" "$2" "$RANDOM_READS"; }

declare -A SEQ RIOPS
measure() { # name mount-args...: a fresh mount per run, cold FUSE page cache
  local name=$1; shift
  local seq="" rnd="" warm_seq="" warm_rnd=""
  for _ in $(seq "$REPEAT"); do
    start_mount "$@"; seq+="$(run seq "$TMP/mnt/blob")"$'\n'; warm_seq+="$(run seq "$TMP/mnt/blob")"$'\n'; stop_mount
    start_mount "$@"; rnd+="$(run rand "$TMP/mnt/blob" | cut -d' ' -f1)"$'\n'; warm_rnd+="$(run rand "$TMP/mnt/blob" | cut -d' ' -f1)"$'\n'; stop_mount
  done
  SEQ[$name]=$(printf '%s' "$seq" | median); RIOPS[$name]=$(printf '%s' "$rnd" | median)
  SEQ[$name-warm]=$(printf '%s' "$warm_seq" | median); RIOPS[$name-warm]=$(printf '%s' "$warm_rnd" | median)
}

run seq "$CACHE" >/dev/null # the cache file in the page cache
d_seq="" d_rnd=""
for _ in $(seq "$REPEAT"); do
  d_seq+="$(run seq "$CACHE")"$'\n'; d_rnd+="$(run rand "$CACHE" | cut -d' ' -f1)"$'\n'
done
SEQ[direct]=$(printf '%s' "$d_seq" | median); RIOPS[direct]=$(printf '%s' "$d_rnd" | median)
measure fuse
measure passthrough --passthrough

printf '%-18s %10s %8s %14s %8s\n' "path ($MIB MiB)" "seq MiB/s" "x direct" "rand 4K IOPS" "x direct"
for name in direct fuse fuse-warm passthrough passthrough-warm; do
  printf '%-18s %10s %8s %14s %8s\n' "$name" "${SEQ[$name]}" \
    "$(echo "${SEQ[$name]} ${SEQ[direct]}" | awk '{printf "%.2f", $1/$2}')" "${RIOPS[$name]}" \
    "$(echo "${RIOPS[$name]} ${RIOPS[direct]}" | awk '{printf "%.2f", $1/$2}')"
done
