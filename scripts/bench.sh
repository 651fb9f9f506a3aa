#!/usr/bin/env bash
# The performance scenarios of docs/PERFORMANCE.md, run by `make bench` after
# `cargo bench`. Every scenario measures its baseline in the same run and
# prints the ratio, since absolute figures drift from machine to machine and
# from minute to minute on a shared one.
#
# Knobs (environment):
#   BENCH_SECS=5          length of each measured run (after 1 s warm-up)
#   BENCH_REPEAT=3        repetitions; medians are reported with min/max
#   BENCH_COLD_MIB=1024   size of the cold-fill blob
#   BENCH_IDLE=15000      idle connections
#   BENCH_GRANULES="65536 262144 1048576 4194304"   granule sweep ("" skips it)
#   BENCH_OUT=FILE        where the log goes (default: $TARGET/bench-results.txt)
#
# Takes about 6-8 minutes with the defaults.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SECS=${BENCH_SECS:-5}
REPEAT=${BENCH_REPEAT:-3}
COLD_MIB=${BENCH_COLD_MIB:-1024}
IDLE=${BENCH_IDLE:-15000}
GRANULES=${BENCH_GRANULES-"65536 262144 1048576 4194304"}
OUT=${BENCH_OUT:-$TARGET/bench-results.txt}
# The cold-fill client: connections x requests in flight, 1 MiB FetchRanges.
COLD_CONNS=${BENCH_COLD_CONNS:-4}
COLD_DEPTH=${BENCH_COLD_DEPTH:-4}

cd "$ROOT"
cargo build --release --bin blobmgr --example loadgen
BIN=$TARGET/release/blobmgr
LG=$TARGET/release/examples/loadgen

TMP=$(mktemp -d /tmp/blobmgr-bench.XXXXXX)
DAEMON_PID=
BASE_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    [ -n "$BASE_PID" ] && kill "$BASE_PID" 2>/dev/null && wait "$BASE_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

mkdir -p "$TMP/be" "$(dirname "$OUT")"
SOCK=$TMP/blobmgr.sock

start_daemon() {
    rm -rf "$TMP/work"
    RUST_LOG=warn "$BIN" serve --sock "$SOCK" --workdir "$TMP/work" --backend "$TMP/be" \
        --max-conns 20000 "$@" 2>>"$TMP/daemon.log" &
    DAEMON_PID=$!
    for _ in $(seq 500); do
        "$BIN" ping --sock "$SOCK" >/dev/null 2>&1 && return 0
        sleep 0.02
    done
    echo "daemon did not start:" >&2
    cat "$TMP/daemon.log" >&2
    exit 1
}

stop_daemon() {
    kill "$DAEMON_PID"
    wait "$DAEMON_PID" || true
    DAEMON_PID=
    rm -rf "$TMP/work"
}

log() { echo "$@" | tee -a "$OUT"; }
run() {
    echo "\$ loadgen $*" | tee -a "$OUT"
    "$LG" "$@" 2>&1 | tee -a "$OUT"
}

: >"$OUT"
log "# blobmgr bench $(date -u +%Y-%m-%dT%H:%M:%SZ)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
log "# machine: nproc $(nproc), $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
log "# runs: ${SECS} s after 1 s warm-up, x${REPEAT}; medians [min .. max]"

# Blobs: 64 MiB for cache hits, COLD_MIB MiB for cold fills.
head -c $((64 << 20)) /dev/urandom >"$TMP/be/hot"
head -c $((COLD_MIB << 20)) /dev/urandom >"$TMP/be/big"

start_daemon
C="--secs $SECS --warmup 1 --repeat $REPEAT"

log "## Noop, daemon vs raw baselines (thread per connection; one batched write per read)"
run noop --sock "$SOCK" --conns 8 --depth 1 $C --baselines
run noop --sock "$SOCK" --conns 64 --depth 1 $C --baselines
run noop --sock "$SOCK" --conns 8 --depth 16 $C --baselines

log "## FetchRange cache hits (4 KiB ranges of a 64 MiB blob) vs the daemon's own Noop"
run fetch --sock "$SOCK" --blob hot --conns 8 --depth 16 $C --compare-noop

log "## $IDLE idle connections"
run idle --sock "$SOCK" --conns "$IDLE"
"$LG" baseline --style tpc --sock "$TMP/tpc.sock" &
BASE_PID=$!
sleep 0.5
run idle --sock "$TMP/tpc.sock" --conns "$IDLE" --pid "$BASE_PID" || true
kill "$BASE_PID"; wait "$BASE_PID" 2>/dev/null || true; BASE_PID=
stop_daemon

log "## Cold fill of a $COLD_MIB MiB blob (localfs backend in page cache) vs cp of the same file"
start_daemon
run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns "$COLD_CONNS" \
    --depth "$COLD_DEPTH" --repeat "$REPEAT" --cp

log "## Responsiveness: another client's Noop latency while 8 clients cold-fill"
run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns 8 --depth 4 \
    --repeat "$REPEAT" --probe --label -probe
stop_daemon

if [ -n "$GRANULES" ]; then
    log "## Granule sweep: cold fill throughput by --granule"
    for g in $GRANULES; do
        start_daemon --granule "$g"
        run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns "$COLD_CONNS" \
            --depth "$COLD_DEPTH" --repeat "$REPEAT" --label "-granule-$g"
        stop_daemon
    done
fi

log "## Summary"
grep -E '^(SUMMARY|RATIO)' "$OUT" | tee "$OUT.summary"
echo "full log: $OUT"
