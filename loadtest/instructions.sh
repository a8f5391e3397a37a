#!/usr/bin/env bash
# Instructions per request: abgate's user-space work counted by callgrind,
# a number that barely moves with the machine's noise. Timed runs on a
# shared VM spread by 10% or more; this count repeats within about 1%
# (0.2% back to back), so a change of a few percent to the hot path shows.
#
#   loadtest/instructions.sh                       # the build in target/release
#   loadtest/instructions.sh path/to/abgate ...    # several builds, in turn
#
# Each build serves `peers/abgate.toml` under valgrind (callgrind) in
# front of the static nginx upstream of the comparison. A closed loop of
# 16 requests in flight warms it for 3 s, the counters are zeroed, and the
# next `WINDOW` (8 s) is counted: instructions executed by the process
# divided by the requests answered in that window. Valgrind runs the code
# about 50 times slower, so a window holds some 40,000 requests.
#
# What it does not show: time. Kernel work (the system calls, the same for
# every build) is not counted; a lock or an atomic costs one instruction
# here and tens of cycles on the CPU; and under valgrind the CPU's SHA
# extensions are not used, so the request id's HMAC counts several times
# what it costs. Use it to compare builds, with the paired timed runs in
# README.md to confirm.
#
# Prints one line per build; the callgrind files stay in the run directory
# (`callgrind_annotate --inclusive=yes FILE` lists the costs by function).
# Ports 18001, 18002, 18010 and 18019 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS=$ROOT/loadtest/peers
LOADTEST=$ROOT/target/release/loadtest
WINDOW=${WINDOW:-8s}
# As in compare.sh: the build alone on one CPU, the rest on another (how
# many requests one wake-up serves changes the count a little).
GEN_CPUS=${GEN_CPUS:-0}
if [ "$(nproc)" -ge 2 ]; then
  PROXY_CPUS=${PROXY_CPUS:-1}
else
  PROXY_CPUS=${PROXY_CPUS:-0}
fi

# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"

install_missing nginx:nginx valgrind:valgrind taskset:util-linux
cargo build --release --workspace --bins --quiet
BUILDS=("$@")
[ ${#BUILDS[@]} -gt 0 ] || BUILDS=("$ROOT/target/release/abgate")

RUN=$(mktemp -d /tmp/abgate-instructions.XXXXXX)
trap 'stop_all; echo "logs and callgrind files: $RUN" >&2' EXIT

mkdir -p "$RUN/upstream/tmp"
taskset -c "$GEN_CPUS" nginx -p "$RUN/upstream/" -e stderr -c "$PEERS/upstream-nginx.conf" -g 'daemon off;' \
  >"$RUN/upstream.log" 2>&1 &
STARTED+=($!)
wait_port 18001
wait_port 18002

load() {
  taskset -c "$GEN_CPUS" "$LOADTEST" run --url http://127.0.0.1:18010/v1/chat/completions \
    --concurrency 16 --duration "$1" --warmup 0s
}

n=0
for build in "${BUILDS[@]}"; do
  n=$((n + 1))
  out=$RUN/callgrind.$n
  taskset -c "$PROXY_CPUS" valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$build" serve --config "$PEERS/abgate.toml" >"$RUN/abgate.$n.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    (exec 3<>/dev/tcp/127.0.0.1/18010) 2>/dev/null && break
    sleep 0.2
  done
  load 3s >/dev/null
  callgrind_control --zero "$pid" >/dev/null 2>&1
  counted=$(load "$WINDOW")
  callgrind_control --dump "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  requests=$(grep -o '^ *[0-9]* sent' <<<"$counted" | grep -o '[0-9]*')
  # The dump after zeroing is the file with the part number `.1`.
  instructions=$(grep -m1 '^summary:' "$out.1" | grep -o '[0-9]*')
  printf '%s: %d requests, %d instructions per request\n' \
    "$build" "$requests" $((instructions / requests))
done
