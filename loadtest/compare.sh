#!/usr/bin/env bash
# abgate next to the physical limit and its peers, same machine, same run,
# same upstream, same CPU budget.
#
#   loadtest/compare.sh            plain requests: direct / abgate / nginx / haproxy
#   loadtest/compare.sh --stream   SSE: direct / abgate / nginx / haproxy, 1000 streams of 200 chunks
#                                  from the built-in mock
#
# Installs nginx and HAProxy from Debian if missing, builds the release
# binaries, starts the upstream on the generator's CPU and each target in
# turn alone on the proxy CPU, and writes
#   loadtest/results/<date>-compare.{md,json} and <date>-compare-latency.svg
#   loadtest/results/<date>-stream.{md,json}  and <date>-stream-first-chunk.svg
#
# The `abgate` target is the build one would deploy for speed: the release
# profile plus profile-guided optimization (loadtest/pgo.sh, a few minutes
# more); `abgate-plain` is the release build without it, measured beside
# it. PGO=0 skips the guided build, and `abgate` is then the plain build.
#
# Settings (environment): PGO, RATE, CONCURRENCY, DURATION, MAX_DURATION,
# WARMUP, ROUNDS, TARGETS, GEN_CPUS, PROXY_CPUS; for --stream: STREAMS,
# CHUNKS, CHUNK_DELAY_MS, STREAM_DURATION. Ports 18001-18022 on 127.0.0.1
# must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS=$ROOT/loadtest/peers
RESULTS=$ROOT/loadtest/results
LOADTEST=$ROOT/target/release/loadtest
ABGATE=$ROOT/target/release/abgate

MODE=plain
case "${1:-}" in
  --stream) MODE=stream ;;
  "") ;;
  *) echo "usage: $0 [--stream]" >&2; exit 2 ;;
esac

# Plain requests: the closed loop finds the maximum throughput, the open
# loop measures latency and CPU at a rate every target can sustain.
# Other work on the machine slows some runs: ROUNDS passes over all targets,
# and the report keeps each target's fastest closed loop and its open loop
# with the lowest median (the same rule for every target).
RATE=${RATE:-2000}
CONCURRENCY=${CONCURRENCY:-64}
DURATION=${DURATION:-8s}
MAX_DURATION=${MAX_DURATION:-5s}
WARMUP=${WARMUP:-2s}
# Streams: STREAMS open at once, each CHUNKS events CHUNK_DELAY_MS apart;
# the open-loop rate that keeps STREAMS open is STREAMS / stream length.
# 1000 streams of 50 ms gaps are 20,000 events/s, which the mock and the
# generator sharing one CPU keep up with; at 25 ms they fall behind even
# on the direct path.
STREAMS=${STREAMS:-1000}
CHUNKS=${CHUNKS:-200}
CHUNK_DELAY_MS=${CHUNK_DELAY_MS:-50}
STREAM_DURATION=${STREAM_DURATION:-10s}

# The CPU budget: the target alone on PROXY_CPUS; the load generator and
# the upstream share GEN_CPUS. On one CPU everything shares it.
if [ "$(nproc)" -ge 2 ]; then
  GEN_CPUS=${GEN_CPUS:-0}
  PROXY_CPUS=${PROXY_CPUS:-1}
else
  GEN_CPUS=${GEN_CPUS:-0}
  PROXY_CPUS=${PROXY_CPUS:-0}
fi

PGO=${PGO:-1}
if [ "$PGO" = 1 ]; then
  DEFAULT_TARGETS="direct abgate abgate-plain nginx haproxy"
  ABGATE_SERVED=$ROOT/target/pgo/release/abgate
else
  DEFAULT_TARGETS="direct abgate nginx haproxy"
  ABGATE_SERVED=$ABGATE
fi
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
if [ "$MODE" = plain ]; then
  ROUNDS=${ROUNDS:-2}
else
  ROUNDS=${ROUNDS:-1}
fi

# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"

# --- what it needs -----------------------------------------------------------
install_missing nginx:nginx haproxy:haproxy taskset:util-linux
cargo build --release --workspace --bins --quiet
if [ "$PGO" = 1 ] && ! "$ROOT/loadtest/pgo.sh"; then
  # No llvm-profdata for this rustc's LLVM, say: the plain build alone.
  echo "no profile-guided build: abgate is the plain release build" >&2
  PGO=0
  ABGATE_SERVED=$ABGATE
  [ "$TARGETS" = "$DEFAULT_TARGETS" ] && TARGETS="direct abgate nginx haproxy"
fi

RUN=$(mktemp -d /tmp/abgate-compare.XXXXXX)
mkdir -p "$RESULTS"
trap 'stop_all; echo "logs and raw results: $RUN" >&2' EXIT

# nginx with RUN/<name>/ as its prefix (pid file, temp files).
start_nginx() {
  local name=$1 cpus=$2 config=$3
  mkdir -p "$RUN/$name/tmp"
  taskset -c "$cpus" nginx -p "$RUN/$name/" -e stderr -c "$config" -g 'daemon off;' \
    >"$RUN/$name.log" 2>&1 &
  STARTED+=($!)
  LAST_PID=$!
}

start_upstream() {
  if [ "$MODE" = plain ]; then
    start_nginx upstream "$GEN_CPUS" "$PEERS/upstream-nginx.conf"
  else
    # The mock streams: every chunk is paced by its own timer.
    taskset -c "$GEN_CPUS" "$ABGATE" mock --listen 127.0.0.1:18001 --name base \
      >"$RUN/mock-base.log" 2>&1 &
    STARTED+=($!)
    taskset -c "$GEN_CPUS" "$ABGATE" mock --listen 127.0.0.1:18002 --name fine-tuned \
      >"$RUN/mock-tuned.log" 2>&1 &
    STARTED+=($!)
  fi
  wait_port 18001
  wait_port 18002
}

# Starts a target on the proxy CPUs; sets URL and WATCH (its pids).
start_target() {
  local target=$1
  WATCH=()
  case "$target" in
    direct)
      URL=http://127.0.0.1:18001/v1/chat/completions
      return ;;
    abgate | abgate-plain)
      # Logging at its default level: what an operator would run.
      local binary=$ABGATE_SERVED
      [ "$target" = abgate-plain ] && binary=$ABGATE
      taskset -c "$PROXY_CPUS" "$binary" serve --config "$PEERS/abgate.toml" \
        >"$RUN/$target.log" 2>&1 &
      STARTED+=($!)
      WATCH=($!)
      URL=http://127.0.0.1:18010/v1/chat/completions
      wait_port 18010 ;;
    nginx)
      start_nginx nginx "$PROXY_CPUS" "$PEERS/nginx.conf"
      URL=http://127.0.0.1:18011/v1/chat/completions
      wait_port 18011
      # The master and its worker: both are charged.
      local worker=""
      for _ in $(seq 50); do
        worker=$(pgrep -P "$LAST_PID" || true)
        [ -n "$worker" ] && break
        sleep 0.1
      done
      WATCH=("$LAST_PID" $worker) ;;
    haproxy)
      taskset -c "$PROXY_CPUS" haproxy -db -f "$PEERS/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
      STARTED+=($!)
      WATCH=($!)
      URL=http://127.0.0.1:18012/v1/chat/completions
      wait_port 18012 ;;
    *)
      echo "unknown target $target (direct, abgate, abgate-plain, nginx, haproxy)" >&2
      exit 2 ;;
  esac
}

# Stops the target but leaves the upstream running.
stop_target() {
  local keep=$1
  for pid in "${STARTED[@]:$keep}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  STARTED=("${STARTED[@]:0:$keep}")
}

generate() {
  local args=(--url "$URL")
  for pid in "${WATCH[@]}"; do
    args+=(--watch-pid "$pid")
  done
  taskset -c "$GEN_CPUS" "$LOADTEST" run "${args[@]}" "$@"
}

DATE=$(date +%Y-%m-%d)
MACHINE="Machine: $(nproc) vCPU ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r); \
load generator and upstream on CPU $GEN_CPUS, target alone on CPU $PROXY_CPUS (taskset). \
abgate $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$PGO" = 1 ] && echo ' (abgate: profile-guided build; abgate-plain: release build)'), \
$(nginx -v 2>&1 | sed 's/^nginx version: //'), \
$(haproxy -v | head -1 | awk '{print "HAProxy " $3}'). \
Taken on $(date -u +'%Y-%m-%d %H:%M UTC')."

start_upstream
UPSTREAM_PIDS=${#STARTED[@]}
runs=()
for round in $(seq "$ROUNDS"); do
  for target in $TARGETS; do
    echo "== $target, round $round of $ROUNDS" >&2
    start_target "$target"
    if [ "$MODE" = plain ]; then
      generate --label "$target" --concurrency "$CONCURRENCY" --duration "$MAX_DURATION" \
        --warmup "$WARMUP" --json "$RUN/$target-$round-closed.json"
      generate --label "$target" --rate "$RATE" --duration "$DURATION" \
        --warmup "$WARMUP" --json "$RUN/$target-$round-open.json"
      runs+=("$RUN/$target-$round-closed.json" "$RUN/$target-$round-open.json")
    else
      # Enough streams per second that STREAMS are open at once; the
      # warm-up lasts one stream, so the window starts at that level.
      stream_ms=$((CHUNKS * CHUNK_DELAY_MS))
      rate=$((STREAMS * 1000 / stream_ms))
      generate --label "$target" --stream --rate "$rate" --duration "$STREAM_DURATION" \
        --warmup "$((stream_ms + 1000))ms" --timeout 120s \
        -H "x-mock-chunks: $CHUNKS" -H "x-mock-chunk-delay-ms: $CHUNK_DELAY_MS" \
        --json "$RUN/$target-$round-stream.json"
      runs+=("$RUN/$target-$round-stream.json")
    fi
    stop_target "$UPSTREAM_PIDS"
  done
done
stop_all

if [ "$MODE" = plain ]; then
  name=$DATE-compare
  "$LOADTEST" plot --out "$RESULTS/$name-latency.svg" \
    --title "latency by percentile at $RATE req/s (open loop), $DATE" \
    $(printf '%s\n' "${runs[@]}" | grep -- '-open.json')
else
  name=$DATE-stream
  "$LOADTEST" plot --metric first-chunk --out "$RESULTS/$name-first-chunk.svg" \
    --title "time to first chunk, $STREAMS concurrent streams, $DATE" "${runs[@]}"
fi
"$LOADTEST" report --machine "$MACHINE" --markdown "$RESULTS/$name.md" \
  --json "$RESULTS/$name.json" "${runs[@]}"
echo "wrote $RESULTS/$name.md, $name.json and the plot" >&2
