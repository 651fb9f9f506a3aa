#!/usr/bin/env bash
# The performance scenarios of docs/PERFORMANCE.md, run by `make bench` after
# `cargo bench`. Every scenario measures its baseline in the same run and
# prints the ratio, since absolute figures drift from machine to machine and
# from minute to minute on a shared one.
#
# Knobs (environment):
#   BENCH_SCENARIOS=all   which scenarios to run, space-separated, out of
#                         "noop fetch idle cold granules"
#                         (e.g. BENCH_SCENARIOS="noop fetch")
#   BENCH_SECS=5          length of each measured run (after 1 s warm-up)
#   BENCH_REPEAT=3        repetitions; medians are reported with min/max
#   BENCH_COLD_MIB=1024   size of the cold-fill blob
#   BENCH_IDLE=15000      idle connections
#   BENCH_GRANULES="65536 262144 1048576 4194304"   granule sweep ("" skips it)
#   BENCH_OUT=FILE        where the log goes (default: $TARGET/bench-results.txt)
#
# Takes about 6-8 minutes with the defaults.
set -euo pipefail
# Decimal points in $EPOCHREALTIME and awk's output, English tool output.
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ALL_SCENARIOS="noop fetch idle cold granules"
SCENARIOS=${BENCH_SCENARIOS:-all}
[ "$SCENARIOS" = all ] && SCENARIOS=$ALL_SCENARIOS
SECS=${BENCH_SECS:-5}
REPEAT=${BENCH_REPEAT:-3}
COLD_MIB=${BENCH_COLD_MIB:-1024}
IDLE=${BENCH_IDLE:-15000}
GRANULES=${BENCH_GRANULES-"65536 262144 1048576 4194304"}
OUT=${BENCH_OUT:-$TARGET/bench-results.txt}
# The cold-fill client: connections x requests in flight, 1 MiB FetchRanges.
COLD_CONNS=${BENCH_COLD_CONNS:-4}
COLD_DEPTH=${BENCH_COLD_DEPTH:-4}

die() {
    echo "bench: $*" >&2
    exit 1
}

for s in $SCENARIOS; do
    case " $ALL_SCENARIOS " in
    *" $s "*) ;;
    *) die "BENCH_SCENARIOS: unknown scenario \"$s\" (known: $ALL_SCENARIOS)" ;;
    esac
done
selected() { case " $SCENARIOS " in *" $1 "*) return 0 ;; esac; return 1; }

cd "$ROOT"
cargo build --release --bin blobmgr --example loadgen
BIN=$TARGET/release/blobmgr
LG=$TARGET/release/examples/loadgen

TMP=$(mktemp -d /tmp/blobmgr-bench.XXXXXX)
# Background processes still running: each is killed and reaped on exit,
# whatever stopped the script. A process leaves the list once reaped.
BG_PIDS=()
track() { BG_PIDS+=("$1"); }
untrack() {
    local keep=() p
    for p in "${BG_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    BG_PIDS=("${keep[@]}")
}
# stop_pid PID: SIGTERM, reap (its exit status is not of interest), untrack.
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    untrack "$1"
}
cleanup() {
    local p
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$TMP/be" "$(dirname "$OUT")"
SOCK=$TMP/blobmgr.sock
DAEMON_PID=

# wait_for SECS CMD...: runs CMD every 20 ms until it succeeds (0) or SECS
# seconds have passed (1).
wait_for() {
    local deadline=$((${EPOCHREALTIME/./} + $1 * 1000000))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "${EPOCHREALTIME/./}" -lt "$deadline" ] || return 1
        sleep 0.02
    done
}

# The daemon of the local-backend scenarios: a directory backend of
# generated blobs, a fresh work dir.
start_daemon() {
    rm -rf "$TMP/work"
    RUST_LOG=warn "$BIN" serve --sock "$SOCK" --workdir "$TMP/work" --backend "$TMP/be" \
        --max-conns 20000 "$@" 2>>"$TMP/daemon.log" &
    DAEMON_PID=$!
    track "$DAEMON_PID"
    if ! wait_for 10 "$BIN" ping --sock "$SOCK"; then
        cat "$TMP/daemon.log" >&2
        die "the daemon did not answer a ping within 10 s"
    fi
}

# noop, fetch and idle share one daemon, as they always have: the idle
# scenario measures the memory of a daemon that has just served load.
ensure_daemon() { [ -n "$DAEMON_PID" ] || start_daemon; }

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    stop_pid "$DAEMON_PID"
    DAEMON_PID=
    rm -rf "$TMP/work"
}

# need_blob NAME MIB: a random blob of MIB MiB in the backend directory,
# made the first time a scenario needs it.
need_blob() {
    [ -e "$TMP/be/$1" ] || head -c $(($2 << 20)) /dev/urandom >"$TMP/be/$1"
}

log() { echo "$@" | tee -a "$OUT"; }
run() {
    echo "\$ loadgen $*" | tee -a "$OUT"
    "$LG" "$@" 2>&1 | tee -a "$OUT"
}

C="--secs $SECS --warmup 1 --repeat $REPEAT"

scenario_noop() {
    ensure_daemon
    log "## Noop, daemon vs raw baselines (thread per connection; one batched write per read)"
    run noop --sock "$SOCK" --conns 8 --depth 1 $C --baselines
    run noop --sock "$SOCK" --conns 64 --depth 1 $C --baselines
    run noop --sock "$SOCK" --conns 8 --depth 16 $C --baselines
}

scenario_fetch() {
    need_blob hot 64
    ensure_daemon
    log "## FetchRange cache hits (4 KiB ranges of a 64 MiB blob) vs the daemon's own Noop"
    run fetch --sock "$SOCK" --blob hot --conns 8 --depth 16 $C --compare-noop
}

scenario_idle() {
    ensure_daemon
    log "## $IDLE idle connections"
    run idle --sock "$SOCK" --conns "$IDLE"
    "$LG" baseline --style tpc --sock "$TMP/tpc.sock" &
    local base=$!
    track "$base"
    wait_for 10 test -S "$TMP/tpc.sock" || die "the tpc baseline did not start"
    run idle --sock "$TMP/tpc.sock" --conns "$IDLE" --pid "$base" || true
    stop_pid "$base"
    stop_daemon
}

scenario_cold() {
    need_blob big "$COLD_MIB"
    stop_daemon
    log "## Cold fill of a $COLD_MIB MiB blob (localfs backend in page cache) vs cp of the same file"
    start_daemon
    run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns "$COLD_CONNS" \
        --depth "$COLD_DEPTH" --repeat "$REPEAT" --cp

    log "## Responsiveness: another client's Noop latency while 8 clients cold-fill"
    run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns 8 --depth 4 \
        --repeat "$REPEAT" --probe --label -probe
    stop_daemon
}

scenario_granules() {
    [ -n "$GRANULES" ] || return 0
    need_blob big "$COLD_MIB"
    stop_daemon
    log "## Granule sweep: cold fill throughput by --granule"
    for g in $GRANULES; do
        start_daemon --granule "$g"
        run cold --sock "$SOCK" --backend-dir "$TMP/be" --blob big --conns "$COLD_CONNS" \
            --depth "$COLD_DEPTH" --repeat "$REPEAT" --label "-granule-$g"
        stop_daemon
    done
}

: >"$OUT"
log "# blobmgr bench $(date -u +%Y-%m-%dT%H:%M:%SZ)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
log "# machine: nproc $(nproc), $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
log "# runs: ${SECS} s after 1 s warm-up, x${REPEAT}; medians [min .. max]; scenarios: $SCENARIOS"

for s in $ALL_SCENARIOS; do
    if selected "$s"; then
        "scenario_$s"
    fi
done
stop_daemon

log "## Summary"
grep -E '^(SUMMARY|RATIO)' "$OUT" | tee "$OUT.summary"
echo "full log: $OUT"
