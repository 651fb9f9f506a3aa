#!/usr/bin/env bash
# The performance scenarios of docs/PERFORMANCE.md, run by `make bench` after
# `cargo bench`. Every scenario measures its baseline in the same run and
# prints the ratio, since absolute figures drift from machine to machine and
# from minute to minute on a shared one.
#
# Knobs (environment):
#   BENCH_SCENARIOS=all   which scenarios to run, space-separated, out of
#                         "noop fetch idle cold granules registry"
#                         (e.g. BENCH_SCENARIOS=registry runs that one alone)
#   BENCH_SECS=5          length of each measured run (after 1 s warm-up)
#   BENCH_REPEAT=3        repetitions; medians are reported with min/max
#   BENCH_COLD_MIB=1024   size of the cold-fill blob
#   BENCH_IDLE=15000      idle connections
#   BENCH_GRANULES="65536 262144 1048576 4194304"   granule sweep ("" skips it)
#   BENCH_REG_MIB=1024    registry: the blob pulled whole and read at random
#   BENCH_REG_SMALL_MIB=256   registry: each of the four blobs pulled at once
#   BENCH_REG_READS=32    registry: cold random 4 KiB reads per round
#   BENCH_REG_SEED=1      registry: seed of their offsets
#   BENCH_REG_PARTS="pull random probe"   registry: which of its parts run
#                         ("ab" also exists: the daemon's pull, BENCH_AB
#                         against BENCH_BLOBMGR, alternating; not a default)
#   BENCH_AB=PATH         registry "ab": the other blobmgr binary, e.g. a
#                         build from before a change
#   BENCH_OUT=FILE        where the log goes (default: $TARGET/bench-results.txt)
#   BENCH_BLOBMGR=PATH    the blobmgr binary measured (default: this tree's
#                         release build), e.g. an older build for a before/after
#
# Takes about 9-11 minutes with the defaults, 2-3 of them the registry
# scenario (BENCH_REPEAT also sets its rounds).
set -euo pipefail
# Decimal points in $EPOCHREALTIME and awk's output, English tool output.
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ALL_SCENARIOS="noop fetch idle cold granules registry"
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
REG_MIB=${BENCH_REG_MIB:-1024}
REG_SMALL_MIB=${BENCH_REG_SMALL_MIB:-256}
REG_READS=${BENCH_REG_READS:-32}
REG_SEED=${BENCH_REG_SEED:-1}
REG_PARTS=${BENCH_REG_PARTS:-pull random probe}
AB_BIN=${BENCH_AB:-}

# die MESSAGE: stops the script (the EXIT trap cleans up); the message also
# goes to the log once there is one.
LOG_STARTED=
die() {
    echo "bench: $*" >&2
    [ -z "$LOG_STARTED" ] || echo "bench: $*" >>"$OUT"
    exit 1
}

for s in $SCENARIOS; do
    case " $ALL_SCENARIOS " in
    *" $s "*) ;;
    *) die "BENCH_SCENARIOS: unknown scenario \"$s\" (known: $ALL_SCENARIOS)" ;;
    esac
done
selected() { case " $SCENARIOS " in *" $1 "*) return 0 ;; esac; return 1; }

# The registry scenario's tools, checked before anything is built or run.
if selected registry; then
    for t in docker-registry curl sha256sum ss /usr/bin/time; do
        command -v "$t" >/dev/null ||
            die "the registry scenario needs $t (scripts/setup-test-deps.sh installs docker-registry; or leave registry out of BENCH_SCENARIOS)"
    done
fi

cd "$ROOT"
cargo build --release --bin blobmgr --example loadgen
BIN=${BENCH_BLOBMGR:-$TARGET/release/blobmgr}
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

# ------------------------------------------------------------------ registry
# Issue 12's benchmark: the daemon pulling blobs by reference from an OCI
# registry on 127.0.0.1 (Debian's docker-registry), next to curl pulling
# the same bytes from the same registry in the same run. Every daemon is
# fresh (new work dir), so every daemon figure is a cold pull.

REG_DIR=$TMP/registry
REG_REPO=bench/blobs
REG_PID=
REG_PORT=
REG_FILES=() # source files; [0] the big blob, [1..4] the small ones
REG_HEXES=() # their sha256
RD_PID=      # the registry scenarios' current daemon
RD_DIR=
RSOCK=

# calc DIGITS EXPR: EXPR evaluated by awk, printed with DIGITS decimals.
calc() { awk "BEGIN { printf \"%.$1f\", $2 }"; }
# median X...: the median of the numbers.
median() {
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 } END { printf "%.6f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# mean X...
mean() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.6f", s / NR }'; }
# verdict VALUE >=|<= TARGET: "met" or "missed" (printed, never asserted).
verdict() {
    awk -v v="$1" -v op="$2" -v t="$3" \
        'BEGIN { ok = op == ">=" ? v >= t : v <= t; print ok ? "met" : "missed" }'
}
# alive PID: the process exists and is not a zombie (an exited child not
# yet reaped still answers kill -0).
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) && [ "$state" != Z ]
}
# cpu_ticks PID: utime + stime of all of PID's threads, in clock ticks
# (/proc/PID/stat fields 14 and 15, counted after the command name).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
CLK_TCK=$(getconf CLK_TCK)

# A TCP port nothing listens on right now (docker-registry cannot be told
# to take port 0 and report it).
free_port() {
    local used p
    used=$(ss -Htln | awk '{ sub(/.*:/, "", $4); print $4 }')
    for _ in $(seq 100); do
        p=$((20000 + RANDOM % 40000))
        grep -qx "$p" <<<"$used" || {
            echo "$p"
            return 0
        }
    done
    return 1
}

reg_url() { echo "http://127.0.0.1:$REG_PORT/v2/$REG_REPO/blobs/sha256:$1"; }
reg_ref() { echo "127.0.0.1:$REG_PORT/$REG_REPO@sha256:$1"; }
reg_up_or_gone() { ! alive "$REG_PID" || curl -sf -o /dev/null "http://127.0.0.1:$REG_PORT/v2/"; }

# The registry: filesystem storage in the temp dir, anonymous, plain HTTP
# on 127.0.0.1 (the config of tests/common/registry.rs), its access log
# (one Combined Log Format line per request) on stdout into access.log.
# A port taken between free_port and the registry's bind makes it exit at
# once; then another port is tried.
reg_start() {
    mkdir -p "$REG_DIR/storage"
    for _ in 1 2 3; do
        REG_PORT=$(free_port) || die "no free TCP port"
        cat >"$REG_DIR/config.yml" <<YAML
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $REG_DIR/storage
http:
  addr: 127.0.0.1:$REG_PORT
YAML
        docker-registry serve "$REG_DIR/config.yml" </dev/null \
            >>"$REG_DIR/access.log" 2>>"$REG_DIR/registry.log" &
        REG_PID=$!
        track "$REG_PID"
        wait_for 20 reg_up_or_gone || die "docker-registry did not answer /v2/ within 20 s"
        alive "$REG_PID" && return 0
        stop_pid "$REG_PID"
    done
    cat "$REG_DIR/registry.log" >&2
    die "docker-registry did not start"
}

# reg_push FILE: a monolithic upload (POST .../blobs/uploads/ for a
# Location, then PUT Location?digest= with the body); appends FILE and its
# digest to REG_FILES / REG_HEXES.
reg_push() {
    local file=$1 hex loc code
    hex=$(sha256sum "$file" | cut -d' ' -f1)
    loc=$(curl -sS -f -X POST -o /dev/null -D - "http://127.0.0.1:$REG_PORT/v2/$REG_REPO/blobs/uploads/" |
        tr -d '\r' | sed -n 's/^[Ll]ocation: *//p')
    [ -n "$loc" ] || die "the registry answered the upload POST without a Location"
    case $loc in /*) loc=http://127.0.0.1:$REG_PORT$loc ;; esac
    case $loc in *'?'*) loc="$loc&" ;; *) loc="$loc?" ;; esac
    # -T streams the file (--data-binary would hold it all in memory).
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' -T "$file" "${loc}digest=sha256:$hex")
    [ "$code" = 201 ] || die "pushing $file: HTTP $code"
    REG_FILES+=("$file")
    REG_HEXES+=("$hex")
}

# The setup of every registry part: the registry, one big blob (the whole
# pull and the random reads) and four small ones (the concurrent pulls),
# random content each.
reg_setup() {
    [ -z "$REG_PID" ] || return 0
    reg_start
    log "# registry: docker-registry $(docker-registry --version | awk '{ print $NF }') on 127.0.0.1:$REG_PORT, repository $REG_REPO"
    mkdir -p "$TMP/regsrc"
    local i f
    for i in 0 1 2 3 4; do
        f=$TMP/regsrc/blob$i
        if [ "$i" = 0 ]; then
            head -c $((REG_MIB << 20)) /dev/urandom >"$f"
        else
            head -c $((REG_SMALL_MIB << 20)) /dev/urandom >"$f"
        fi
        reg_push "$f"
        log "# pushed $(($(stat -c %s "$f") >> 20)) MiB as sha256:${REG_HEXES[i]}"
        # Only the big blob's bytes are needed again (to check the random
        # reads); the registry holds its own copy of the others.
        [ "$i" = 0 ] || rm -f "$f"
    done
}

# reg_daemon_start NAME: a fresh daemon, its socket and work dir in a new
# directory. No --backend: it fetches blobs by reference only. It runs in
# that directory, so the ./blobs it makes for its default backend stays in
# the temp dir.
reg_daemon_start() {
    RD_DIR=$TMP/daemon-$1
    rm -rf "$RD_DIR"
    mkdir -p "$RD_DIR"
    RSOCK=$RD_DIR/blobmgr.sock
    (cd "$RD_DIR" && export RUST_LOG=warn &&
        exec "$BIN" serve --sock "$RSOCK" --workdir "$RD_DIR/work" --min-free 0) \
        2>>"$TMP/registry-daemons.log" &
    RD_PID=$!
    track "$RD_PID"
    if ! wait_for 10 "$BIN" ping --sock "$RSOCK"; then
        cat "$TMP/registry-daemons.log" >&2
        die "the daemon did not answer a ping within 10 s"
    fi
}

reg_daemon_stop() {
    stop_pid "$RD_PID"
    RD_PID=
    rm -rf "$RD_DIR"
}

# check_sha FILE HEX WHO: the pulled file has the blob's digest, or the
# script stops: a fast wrong answer is no result.
check_sha() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || die "$3 pulled bytes with sha256 $got, not $2"
}

# reg_requests_since LINE HEX: the registry's requests for blob HEX logged
# after line LINE of its access log and the body bytes it sent for them,
# e.g. "257 (HEAD 1, GET 256), 1024.0 MiB sent". A line
# is written when its handler returns, so a marked request of our own is
# made first and waited for; informative only (a handler still running
# when the mark is logged would be missed).
# It runs in a command substitution's subshell, so the mark is made unique
# by the clock, not by a counter.
reg_requests_since() {
    local from=$1 hex=$2 mark
    mark="bench-mark=${EPOCHREALTIME/./}"
    curl -sf -o /dev/null "http://127.0.0.1:$REG_PORT/v2/?$mark" || die "the registry did not answer /v2/"
    wait_for 10 grep -qF "GET /v2/?$mark " "$REG_DIR/access.log" ||
        die "the registry did not log $mark within 10 s"
    tail -n +"$((from + 1))" "$REG_DIR/access.log" | awk -v blob="/blobs/sha256:$hex " '
        index($0, blob) { m = $6; sub(/^"/, "", m); n[m]++; all++; bytes += $10 }
        END {
            s = ""
            for (k in n) s = s (s == "" ? "" : ", ") k " " n[k]
            printf "%d (%s), %.1f MiB sent", all, s, bytes / 1048576
        }'
}

# One timed cold whole-blob pull by curl, written to a fresh file: sets
# PULL_S (wall) and PULL_CPU (curl's user + sys).
pull_curl() {
    local out=$TMP/pull.out tf=$TMP/pull.time t0 t1
    rm -f "$out"
    # Start from no dirty pages, so no run pays for an earlier one's
    # writeback.
    sync
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$tf" curl -sS -f -o "$out" "$(reg_url "${REG_HEXES[0]}")" ||
        die "curl pull failed"
    t1=$EPOCHREALTIME
    PULL_S=$(calc 3 "$t1 - $t0")
    PULL_CPU=$(tail -n 1 "$tf" | awk '{ printf "%.2f", $1 + $2 }')
    check_sha "$out" "${REG_HEXES[0]}" curl
    rm -f "$out"
}

# One timed cold whole-blob pull through a fresh daemon (`blobmgr cat` of
# the reference into a fresh file): sets PULL_S (wall of the cat),
# PULL_CPU (the daemon's CPU over the cat, from /proc), CAT_CPU (the cat
# process's own) and PULL_REQS (the registry's requests for the blob).
pull_daemon() {
    local out=$TMP/pull.out tf=$TMP/pull.time t0 t1 c0 c1 from
    reg_daemon_start pull
    rm -f "$out"
    from=$(wc -l <"$REG_DIR/access.log")
    sync
    c0=$(cpu_ticks "$RD_PID")
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$tf" "$BIN" cat --sock "$RSOCK" "$(reg_ref "${REG_HEXES[0]}")" >"$out" ||
        die "blobmgr cat failed (daemon log: $TMP/registry-daemons.log)"
    t1=$EPOCHREALTIME
    c1=$(cpu_ticks "$RD_PID")
    PULL_S=$(calc 3 "$t1 - $t0")
    PULL_CPU=$(calc 2 "($c1 - $c0) / $CLK_TCK")
    CAT_CPU=$(tail -n 1 "$tf" | awk '{ printf "%.2f", $1 + $2 }')
    PULL_REQS=$(reg_requests_since "$from" "${REG_HEXES[0]}")
    reg_daemon_stop
    check_sha "$out" "${REG_HEXES[0]}" "the daemon"
    rm -f "$out"
}

# Cold whole-blob pull, curl against the daemon, BENCH_REPEAT rounds; the
# order alternates so neither side always runs on the machine the other
# just left.
registry_pull() {
    local gib r order side
    gib=$(calc 6 "$(stat -c %s "${REG_FILES[0]}") / 1073741824")
    local curl_s=() daemon_s=() ratio=() dcpu=() ccpu=()
    log "## Registry: cold pull of the $REG_MIB MiB blob, curl vs a fresh daemon, $REPEAT round(s), alternating"
    log "\$ curl -s -o FILE $(reg_url "${REG_HEXES[0]}")"
    log "\$ blobmgr serve --sock S --workdir W --min-free 0   # fresh each round"
    log "\$ blobmgr cat --sock S $(reg_ref "${REG_HEXES[0]}") > FILE"
    log "  (outputs checked with sha256sum after each pull; daemon CPU = utime+stime from /proc over the cat)"
    for r in $(seq "$REPEAT"); do
        # Odd rounds curl first, even rounds the daemon first.
        order="curl daemon"
        [ $((r % 2)) = 1 ] || order="daemon curl"
        for side in $order; do
            if [ "$side" = curl ]; then
                pull_curl
                curl_s+=("$PULL_S")
                ccpu+=("$(calc 3 "$PULL_CPU / $gib")")
            else
                pull_daemon
                daemon_s+=("$PULL_S")
                dcpu+=("$(calc 3 "$PULL_CPU / $gib")")
            fi
        done
        ratio+=("$(calc 3 "${curl_s[-1]} / ${daemon_s[-1]}")")
        log "round $r: curl ${curl_s[-1]} s, daemon ${daemon_s[-1]} s, curl/daemon ${ratio[-1]}; daemon CPU ${dcpu[-1]} s/GiB, curl CPU ${ccpu[-1]} s/GiB (cat's own CPU $CAT_CPU s); registry requests for the daemon pull: $PULL_REQS"
    done
    PULL_RATIO=$(median "${ratio[@]}")
    PULL_DCPU=$(median "${dcpu[@]}")
    PULL_CCPU=$(median "${ccpu[@]}")
    log "SUMMARY registry-pull curl: s $(calc 3 "$(median "${curl_s[@]}")")  CPU s/GiB $(calc 3 "$PULL_CCPU")  (n=$REPEAT)"
    log "SUMMARY registry-pull daemon: s $(calc 3 "$(median "${daemon_s[@]}")")  CPU s/GiB $(calc 3 "$PULL_DCPU")  (n=$REPEAT)"
    log "RATIO registry-pull curl/daemon: $(calc 2 "$PULL_RATIO") (median of the per-round ratios)"
}

# One build's cold pull against another's (BENCH_AB against this tree's
# or BENCH_BLOBMGR), BENCH_REPEAT pairs, the order alternating: wall and
# daemon CPU per round, then the medians and their ratio. For a change's
# before and after, in the same run.
registry_ab() {
    local r order side a_s=() b_s=() a_cpu=() b_cpu=() ratio=()
    [ -n "$AB_BIN" ] && [ -x "$AB_BIN" ] || die "BENCH_REG_PARTS=ab needs BENCH_AB=PATH of another blobmgr binary"
    log "## Registry: cold pull of the $REG_MIB MiB blob by two builds, $REPEAT pair(s), alternating"
    log "\$ blobmgr cat --sock S $(reg_ref "${REG_HEXES[0]}") > FILE   # a fresh daemon each, A = $AB_BIN, B = $BIN"
    for r in $(seq "$REPEAT"); do
        order="A B"
        [ $((r % 2)) = 1 ] || order="B A"
        for side in $order; do
            if [ "$side" = A ]; then
                # For the call only (bash's prefix assignment).
                BIN=$AB_BIN pull_daemon
                a_s+=("$PULL_S")
                a_cpu+=("$PULL_CPU")
            else
                pull_daemon
                b_s+=("$PULL_S")
                b_cpu+=("$PULL_CPU")
            fi
        done
        ratio+=("$(calc 3 "${a_s[-1]} / ${b_s[-1]}")")
        log "pair $r: A ${a_s[-1]} s (daemon CPU ${a_cpu[-1]} s), B ${b_s[-1]} s (daemon CPU ${b_cpu[-1]} s), A/B ${ratio[-1]}"
    done
    log "SUMMARY registry-ab A: s $(calc 3 "$(median "${a_s[@]}")")  daemon CPU s $(calc 2 "$(median "${a_cpu[@]}")")  (n=$REPEAT)"
    log "SUMMARY registry-ab B: s $(calc 3 "$(median "${b_s[@]}")")  daemon CPU s $(calc 2 "$(median "${b_cpu[@]}")")  (n=$REPEAT)"
    log "RATIO registry-ab wall A/B: $(calc 2 "$(median "${ratio[@]}")") (median of the per-pair ratios; above 1: B is faster)"
}

# Cold random 4 KiB reads, one at a time: `loadgen random` through a
# fresh daemon (FetchRange + pread per read, each timed), then curl with a
# Range header for the same offsets, which loadgen prints; curl's
# time_total leaves out its process start.
registry_random() {
    local r offs off out=$TMP/random.out line code size t from reqs
    local dmed=() cmed=() ratio=()
    log "## Registry: $REG_READS cold random 4 KiB reads of the $REG_MIB MiB blob, a fresh daemon vs curl, $REPEAT round(s)"
    log "\$ curl -s -o /dev/null -r A-B -w '%{time_total}' $(reg_url "${REG_HEXES[0]}")   # per offset"
    for r in $(seq "$REPEAT"); do
        reg_daemon_start random
        from=$(wc -l <"$REG_DIR/access.log")
        run random --sock "$RSOCK" --blob "$(reg_ref "${REG_HEXES[0]}")" --len 4096 \
            --count "$REG_READS" --seed "$REG_SEED" --check "${REG_FILES[0]}" --label -registry |
            tee "$out"
        reqs=$(reg_requests_since "$from" "${REG_HEXES[0]}")
        reg_daemon_stop
        IFS=, read -ra offs <<<"$(sed -n 's/^offsets //p' "$out")"
        [ "${#offs[@]}" = "$REG_READS" ] || die "loadgen random printed no offsets"
        local times=()
        for off in "${offs[@]}"; do
            line=$(curl -sS -o /dev/null -r "$off-$((off + 4095))" \
                -w '%{http_code} %{size_download} %{time_total}' "$(reg_url "${REG_HEXES[0]}")")
            read -r code size t <<<"$line"
            [ "$code" = 206 ] && [ "$size" = 4096 ] || die "curl range at $off: HTTP $code, $size bytes"
            times+=("$(calc 1 "$t * 1000000")")
        done
        dmed+=("$(sed -n 's/^SUMMARY .* read median us \([0-9.]*\) .*/\1/p' "$out")")
        [ -n "${dmed[-1]}" ] || die "loadgen random printed no SUMMARY"
        cmed+=("$(median "${times[@]}")")
        ratio+=("$(calc 3 "${dmed[-1]} / ${cmed[-1]}")")
        log "round $r: per-read median daemon ${dmed[-1]} us, curl $(calc 1 "${cmed[-1]}") us (mean $(calc 1 "$(mean "${times[@]}")") us), daemon/curl ${ratio[-1]}; registry requests for the daemon's reads: $reqs"
    done
    RANDOM_RATIO=$(median "${ratio[@]}")
    RANDOM_D=$(median "${dmed[@]}")
    RANDOM_C=$(median "${cmed[@]}")
    log "SUMMARY registry-random-4k curl: read median us $(calc 1 "$RANDOM_C")  (n=$REPEAT)"
    log "SUMMARY registry-random-4k daemon: read median us $(calc 1 "$RANDOM_D")  (n=$REPEAT)"
    log "RATIO registry-random-4k daemon/curl: $(calc 2 "$RANDOM_RATIO") (median of the per-round ratios)"
}

# probe_under_pulls KIND: a fresh daemon serves four concurrent
# `blobmgr cat` of the four small blobs (cold; to /dev/null, so no
# client's writeback joins in) while `loadgen probe` sends a Noop every
# 200 us to KIND: "daemon", the pulling daemon itself, or "echo", a
# trivial batching Noop server (`loadgen baseline --style batch`) on the
# same loaded machine: what a Noop costs there anyway. Sets PROBE_P99 and
# PULLS_S.
probe_under_pulls() {
    local kind=$1 psock echo_pid= probe_pid p i t0 t1
    local stop=$TMP/probe.stop pout=$TMP/probe.out pids=()
    reg_daemon_start "probe-$kind"
    if [ "$kind" = daemon ]; then
        psock=$RSOCK
    else
        psock=$TMP/echo.sock
        rm -f "$psock"
        "$LG" baseline --style batch --sock "$psock" &
        echo_pid=$!
        track "$echo_pid"
        wait_for 10 test -S "$psock" || die "the echo server did not start"
    fi
    rm -f "$stop"
    "$LG" probe --sock "$psock" --until-file "$stop" --label "-$kind" >"$pout" 2>&1 &
    probe_pid=$!
    track "$probe_pid"
    wait_for 10 grep -q '^probe.*: running' "$pout" || die "the probe did not start: $(cat "$pout")"
    sync
    t0=$EPOCHREALTIME
    for i in 1 2 3 4; do
        "$BIN" cat --sock "$RSOCK" "$(reg_ref "${REG_HEXES[i]}")" >/dev/null &
        pids+=($!)
        track "$!"
    done
    for p in "${pids[@]}"; do
        wait "$p" || die "a blobmgr cat under the probe failed (daemon log: $TMP/registry-daemons.log)"
        untrack "$p"
    done
    t1=$EPOCHREALTIME
    touch "$stop"
    wait "$probe_pid" || die "the probe failed: $(cat "$pout")"
    untrack "$probe_pid"
    [ -z "$echo_pid" ] || stop_pid "$echo_pid"
    reg_daemon_stop
    PULLS_S=$(calc 3 "$t1 - $t0")
    PROBE_P99=$(sed -n 's/^SUMMARY .* p99 us \([0-9.]*\) .*/\1/p' "$pout")
    [ -n "$PROBE_P99" ] || die "the probe printed no SUMMARY: $(cat "$pout")"
    tee -a "$OUT" <"$pout"
}

# The reactor's latency under pull load against the same load with the
# probe on an echo server, BENCH_REPEAT rounds, the order alternating.
registry_probe() {
    local r kind dp99=() ep99=() ratio=() dpulls eps
    log "## Registry: Noop p99 while 4 clients cold-pull a $REG_SMALL_MIB MiB blob each, probe on the daemon vs on an echo server, $REPEAT round(s)"
    log "\$ blobmgr cat --sock S 127.0.0.1:$REG_PORT/$REG_REPO@sha256:... > /dev/null   # x4 at once, a fresh daemon per run"
    log "\$ loadgen probe --sock S --until-file F                 # the daemon's socket"
    log "\$ loadgen baseline --style batch --sock E & loadgen probe --sock E --until-file F   # an echo server's"
    for r in $(seq "$REPEAT"); do
        local kinds="daemon echo"
        [ $((r % 2)) = 1 ] || kinds="echo daemon"
        for kind in $kinds; do
            probe_under_pulls "$kind"
            if [ "$kind" = daemon ]; then
                dp99+=("$PROBE_P99")
                dpulls=$PULLS_S
            else
                ep99+=("$PROBE_P99")
                eps=$PULLS_S
            fi
        done
        ratio+=("$(calc 3 "${dp99[-1]} / ${ep99[-1]}")")
        log "round $r: Noop p99 daemon ${dp99[-1]} us (4 pulls took $dpulls s), echo ${ep99[-1]} us (4 pulls took $eps s), daemon/echo ${ratio[-1]}"
    done
    PROBE_RATIO=$(median "${ratio[@]}")
    PROBE_D=$(median "${dp99[@]}")
    PROBE_E=$(median "${ep99[@]}")
    log "SUMMARY registry-probe daemon: Noop p99 us $(calc 1 "$PROBE_D")  (n=$REPEAT)"
    log "SUMMARY registry-probe echo: Noop p99 us $(calc 1 "$PROBE_E")  (n=$REPEAT)"
    log "RATIO registry-probe daemon/echo: $(calc 2 "$PROBE_RATIO") (median of the per-round ratios)"
}

# target WHAT VALUE >=|<= GOAL NOTE: one line of the summary block, "TARGET"
# first so the final summary collects it with the SUMMARY and RATIO lines.
target() {
    local note=${5:+  ($5)}
    if [ "$2" = nan ]; then
        log "$(printf 'TARGET registry %-44s %6s' "$1" 'not run (BENCH_REG_PARTS)')"
        return
    fi
    log "$(printf 'TARGET registry %-44s %6s   target %s %-4s %-6s%s' "$1" "$(calc 2 "$2")" "$3" "$4" "$(verdict "$2" "$3" "$4")" "$note")"
}

scenario_registry() {
    # The local-backend daemon has no part here: only what is measured runs.
    stop_daemon
    reg_setup
    PULL_RATIO=nan PULL_DCPU=nan PULL_CCPU=nan RANDOM_RATIO=nan RANDOM_D=nan RANDOM_C=nan
    PROBE_RATIO=nan PROBE_D=nan PROBE_E=nan
    for part in $REG_PARTS; do
        case $part in
        pull | random | probe | ab) "registry_$part" ;;
        *) die "BENCH_REG_PARTS: unknown part '$part' (pull, random, probe, ab)" ;;
        esac
    done
    stop_pid "$REG_PID"
    REG_PID=
    log "## Registry summary (issue 12): medians over $REPEAT round(s), each ratio measured side by side in this run; targets are reported, not asserted"
    target "cold pull $REG_MIB MiB, curl/daemon wall time" "$PULL_RATIO" '>=' 0.8 ""
    target "daemon CPU per GiB pulled, s" "$PULL_DCPU" '<=' 1.2 "curl $(calc 2 "$PULL_CCPU") s/GiB"
    target "cold random 4 KiB read, daemon/curl median" "$RANDOM_RATIO" '<=' 1.5 \
        "daemon $(calc 0 "$RANDOM_D") us, curl $(calc 0 "$RANDOM_C") us"
    target "Noop p99 under 4 pulls, daemon/echo" "$PROBE_RATIO" '<=' 1.5 \
        "daemon $(calc 0 "$PROBE_D") us, echo $(calc 0 "$PROBE_E") us"
}

: >"$OUT"
LOG_STARTED=1
log "# blobmgr bench $(date -u +%Y-%m-%dT%H:%M:%SZ)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
log "# blobmgr measured: $BIN ($("$BIN" --version 2>/dev/null | head -1))"
log "# machine: nproc $(nproc), $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
log "# runs: ${SECS} s after 1 s warm-up, x${REPEAT}; medians [min .. max]; scenarios: $SCENARIOS"

for s in $ALL_SCENARIOS; do
    if selected "$s"; then
        "scenario_$s"
    fi
done
stop_daemon

log "## Summary"
# The SUMMARY lines of single `loadgen probe` and `loadgen random` runs are
# left out: the registry scenario prints its own over all rounds.
grep -E '^(SUMMARY|RATIO|TARGET)' "$OUT" | grep -vE '^SUMMARY (probe|random)[-:]' | tee "$OUT.summary"
echo "full log: $OUT"
