#!/usr/bin/env bash
# A profile-guided release build of abgate: target/pgo/release/abgate.
#
#   loadtest/pgo.sh
#
# Builds abgate instrumented, runs it for a few seconds in front of the
# built-in mock upstreams (plain requests in a closed loop, SSE streams,
# and an open loop at a moderate rate), merges what it recorded and builds
# again with it, so that the compiler lays out and inlines the request
# path by how it runs. The release profile's fat LTO and one codegen unit
# stay. Needs llvm-profdata of the LLVM that rustc uses (Debian's
# llvm-<major>, installed if missing). Ports 18001, 18002, 18010 and
# 18019 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"

LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
PROFDATA=llvm-profdata-$LLVM_MAJOR
install_missing "$PROFDATA:llvm-$LLVM_MAJOR"

RUN=$(mktemp -d /tmp/abgate-pgo.XXXXXX)
trap 'stop_all' EXIT
PROFILES=$RUN/profiles

# The plain build runs the mocks and the load generator: only the gateway's
# own run is recorded.
cargo build --release --workspace --bins --quiet
CARGO_TARGET_DIR=$ROOT/target/pgo-generate RUSTFLAGS="-Cprofile-generate=$PROFILES" \
  cargo build --release --bin abgate --quiet

"$ROOT/target/release/abgate" mock --listen 127.0.0.1:18001 --name base --workers 1 \
  >"$RUN/mock-base.log" 2>&1 &
STARTED+=($!)
"$ROOT/target/release/abgate" mock --listen 127.0.0.1:18002 --name fine-tuned --workers 1 \
  >"$RUN/mock-tuned.log" 2>&1 &
STARTED+=($!)
wait_port 18001
wait_port 18002

"$ROOT/target/pgo-generate/release/abgate" serve --workers 1 \
  --config "$ROOT/loadtest/peers/abgate.toml" >"$RUN/abgate.log" 2>&1 &
GATEWAY=$!
wait_port 18010
URL=http://127.0.0.1:18010/v1/chat/completions
LOADTEST=$ROOT/target/release/loadtest
"$LOADTEST" run --url "$URL" --concurrency 64 --duration 5s --warmup 0s >"$RUN/closed.txt"
"$LOADTEST" run --url "$URL" --stream --rate 200 --duration 3s --warmup 0s \
  -H "x-mock-chunks: 20" -H "x-mock-chunk-delay-ms: 5" >"$RUN/stream.txt"
"$LOADTEST" run --url "$URL" --rate 2000 --duration 2s --warmup 0s >"$RUN/open.txt"
# A graceful stop: the profile is written as the process exits.
kill -INT "$GATEWAY"
wait "$GATEWAY" || true
stop_all

"$PROFDATA" merge -o "$RUN/abgate.profdata" "$PROFILES"
CARGO_TARGET_DIR=$ROOT/target/pgo RUSTFLAGS="-Cprofile-use=$RUN/abgate.profdata" \
  cargo build --release --bin abgate --quiet
echo "built $ROOT/target/pgo/release/abgate (training runs and logs: $RUN)" >&2
