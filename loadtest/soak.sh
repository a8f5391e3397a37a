#!/usr/bin/env bash
# Load with faults: a bounded soak of abgate under steady traffic while its
# config file changes every second and the treatment upstream is killed
# and restarted. Every request must get an answer: the run fails if any is
# left without one, if abgate is not up at the end, or if its running
# config is not the file's last one.
#
#   loadtest/soak.sh
#
# - two `abgate mock` upstreams (control, treatment) and `abgate serve`,
#   SOAK_FRACTIONS alternating as the treatment fraction;
# - `loadtest run` open loop at SOAK_RATE plain requests per second, and a
#   second generator at SOAK_STREAM_RATE SSE streams per second (each
#   SOAK_CHUNKS events SOAK_CHUNK_DELAY_MS apart), both for SOAK_DURATION;
# - every second the config file is rewritten: mostly written aside and
#   renamed (atomic), every third write truncated and written in place in
#   two halves SOAK_HALF_GAP apart (a reader may see half a file), every
#   tenth write invalid (it must be rejected while the old config serves);
# - the treatment mock is killed (SIGKILL) for SOAK_DOWN, then restarted on
#   the same port for SOAK_UP, over and over.
# - SOAK_FALLBACK=1 turns on `fallback_to_control` for treatment: requests
#   whose treatment upstream is down are then answered by control.
#
# At the end: requests sent, answered and failed by kind from both
# generators; abgate's own counts from /metrics (requests by arm and status
# class, upstream errors by kind, reloads by result) taken before and after;
# abgate's RSS before and after. Writes loadtest/results/<date>-soak.{md,json}.
# Ports 18101, 18102, 18110 and 18111 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=$ROOT/loadtest/results
LOADTEST=$ROOT/target/release/loadtest
ABGATE=$ROOT/target/release/abgate

SOAK_DURATION=${SOAK_DURATION:-3m}
SOAK_RATE=${SOAK_RATE:-500}
SOAK_STREAM_RATE=${SOAK_STREAM_RATE:-20}
SOAK_CHUNKS=${SOAK_CHUNKS:-20}
SOAK_CHUNK_DELAY_MS=${SOAK_CHUNK_DELAY_MS:-50}
SOAK_FRACTIONS=${SOAK_FRACTIONS:-0.4 0.6}
SOAK_DOWN=${SOAK_DOWN:-10}
SOAK_UP=${SOAK_UP:-10}
SOAK_HALF_GAP=${SOAK_HALF_GAP:-0.05}
SOAK_FALLBACK=${SOAK_FALLBACK:-0}
# The generator gives up on a request after this; the gateway's own
# timeouts (below) are shorter, so a request that waits this long is one
# abgate left without an answer.
SOAK_TIMEOUT=${SOAK_TIMEOUT:-30s}

CONTROL_PORT=18101
TREATMENT_PORT=18102
LISTEN_PORT=18110
ADMIN_PORT=18111

command -v jq >/dev/null || {
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends jq
}
if [ ! -x "$ABGATE" ] || [ ! -x "$LOADTEST" ]; then
  cargo build --release --bin abgate --quiet && cargo build --release -p abgate-loadtest --quiet
fi

RUN=$(mktemp -d /tmp/abgate-soak.XXXXXX)
CONFIG=$RUN/abgate.toml
mkdir -p "$RESULTS"
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"

# The treatment mock is killed and restarted, so its pid is kept apart
# from STARTED; it is stopped with the rest.
TREATMENT_PID=""
stop_soak() {
  if [ -n "$TREATMENT_PID" ]; then
    STARTED+=("$TREATMENT_PID")
    TREATMENT_PID=""
  fi
  stop_all
}
trap 'stop_soak; echo "logs and raw results: $RUN" >&2' EXIT

seconds() {
  case "$1" in
    *ms) echo $(( ${1%ms} / 1000 )) ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *) echo "$1" ;;
  esac
}

# The config with treatment fraction $1. Timeouts are short enough that
# every failure is answered well inside the generator's SOAK_TIMEOUT.
config() {
  cat <<EOF
# Written by loadtest/soak.sh; rewritten every second during the soak.
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"

[experiment]
name = "soak"
treatment_fraction = $1

[identity]
header = "x-user-id"

[timeouts]
connect_ms = 1000
first_byte_ms = 5000
idle_ms = 5000
total_ms = 20000

[variants.control]
upstream = "http://127.0.0.1:$CONTROL_PORT"
model = "gpt-4o-mini"

[variants.treatment]
upstream = "http://127.0.0.1:$TREATMENT_PORT"
model = "gpt-4o-mini:ft:support-v3"
fallback_to_control = $([ "$SOAK_FALLBACK" = 1 ] && echo true || echo false)
EOF
}

# Replaces the file the way deploy tools do: written aside, then renamed.
write_atomic() {
  printf '%s\n' "$1" >"$CONFIG.new"
  mv "$CONFIG.new" "$CONFIG"
}

# Truncates the file and writes it in place in two halves, a gap apart:
# what an editor or `cat > file` does, and a poll may read the first half.
write_in_place() {
  local text=$1 half=$(( ${#1} / 2 ))
  {
    printf '%s' "${text:0:half}"
    sleep "$SOAK_HALF_GAP"
    printf '%s\n' "${text:half}"
  } >"$CONFIG"
}

start_treatment() {
  "$ABGATE" mock --listen "127.0.0.1:$TREATMENT_PORT" --name fine-tuned \
    >>"$RUN/mock-treatment.log" 2>&1 &
  TREATMENT_PID=$!
}

vm_rss_kib() {
  awk '/^VmRSS/ {print $2}' "/proc/$1/status"
}

scrape() {
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics"
}

# Once, while treatment is down: what a client routed to it is told.
# These requests are counted (SAMPLES, SAMPLES_5XX) so that abgate's totals
# can still be held against the generators'.
SAMPLES=0 SAMPLES_5XX=0
sample_down_answer() {
  [ -s "$RUN/down-answer.txt" ] && return 0
  local user
  for user in $(seq 0 99); do
    SAMPLES=$((SAMPLES + 1))
    curl -sS -o "$RUN/down-body.txt" -D "$RUN/down-headers.txt" -w '%{http_code}' \
      -H "x-user-id: sample-$user" -H 'content-type: application/json' \
      -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' \
      "http://127.0.0.1:$LISTEN_PORT/v1/chat/completions" >"$RUN/down-status.txt" || true
    # A user in treatment: an error, or (with fallback) control's answer.
    if [ "$(cat "$RUN/down-status.txt")" != 200 ] ||
      grep -qi '^x-abgate-fallback: true' "$RUN/down-headers.txt"; then
      [ "$(cat "$RUN/down-status.txt")" != 200 ] && SAMPLES_5XX=1
      { grep -i '^x-abgate-\(variant\|fallback\|served-by\)' "$RUN/down-headers.txt" | tr -d '\r'
        cat "$RUN/down-body.txt"; } >"$RUN/down-answer.txt"
      return 0
    fi
  done
  : >"$RUN/down-answer.txt"
}

# --- start --------------------------------------------------------------------
read -r -a FRACTIONS <<<"$SOAK_FRACTIONS"
"$ABGATE" mock --listen "127.0.0.1:$CONTROL_PORT" --name base >"$RUN/mock-control.log" 2>&1 &
STARTED+=($!)
start_treatment
wait_port "$CONTROL_PORT"
wait_port "$TREATMENT_PORT"
write_atomic "$(config "${FRACTIONS[0]}")"
"$ABGATE" serve --config "$CONFIG" >"$RUN/abgate.log" 2>&1 &
ABGATE_PID=$!
STARTED+=("$ABGATE_PID")
wait_port "$LISTEN_PORT"
wait_port "$ADMIN_PORT"

DATE=$(date +%Y-%m-%d)
MACHINE="Machine: $(nproc) vCPU ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r); \
abgate $(git rev-parse --short HEAD 2>/dev/null || echo '?'). \
Taken on $(date -u +'%Y-%m-%d %H:%M UTC')."
TOTAL=$(seconds "$SOAK_DURATION")
RSS_BEFORE=$(vm_rss_kib "$ABGATE_PID")
scrape >"$RUN/metrics-before.txt"
echo "== soak: $SOAK_RATE req/s + $SOAK_STREAM_RATE streams/s for $SOAK_DURATION; logs in $RUN" >&2

# --- load ---------------------------------------------------------------------
URL=http://127.0.0.1:$LISTEN_PORT/v1/chat/completions
# No warm-up: the generators count every request they send, so their
# totals can be held against abgate's own.
"$LOADTEST" run --url "$URL" --rate "$SOAK_RATE" --duration "$SOAK_DURATION" --warmup 0s \
  --timeout "$SOAK_TIMEOUT" --label soak --watch-pid "$ABGATE_PID" --json "$RUN/plain.json" \
  >"$RUN/plain.txt" 2>&1 &
PLAIN_PID=$!
STARTED+=("$PLAIN_PID")
"$LOADTEST" run --url "$URL" --rate "$SOAK_STREAM_RATE" --stream --duration "$SOAK_DURATION" \
  --warmup 0s --timeout "$SOAK_TIMEOUT" --threads 1 --label soak-stream \
  -H "x-mock-chunks: $SOAK_CHUNKS" -H "x-mock-chunk-delay-ms: $SOAK_CHUNK_DELAY_MS" \
  --json "$RUN/stream.json" >"$RUN/stream.txt" 2>&1 &
STREAM_PID=$!
STARTED+=("$STREAM_PID")

# --- faults, once a second until the load's window is over ---------------------
writes=0 atomic=0 in_place=0 invalid=0 kills=0 restarts=0
up_since=0
treatment_up=1
started_at=$SECONDS
: >"$RUN/faults.log"
for second in $(seq 1 "$TOTAL"); do
  sleep 1
  fraction=${FRACTIONS[$(( second % ${#FRACTIONS[@]} ))]}
  if (( second % 10 == 0 )); then
    # Invalid two ways in turn: a value validation refuses, and TOML that
    # does not parse.
    if (( second % 20 == 0 )); then
      text=$(config 1.5)
    else
      text="$(config "$fraction")
[variants.treatment"
    fi
    write_atomic "$text"
    invalid=$((invalid + 1))
    echo "$((SECONDS - started_at))s invalid config" >>"$RUN/faults.log"
  elif (( second % 3 == 0 )); then
    write_in_place "$(config "$fraction")"
    in_place=$((in_place + 1))
  else
    write_atomic "$(config "$fraction")"
    atomic=$((atomic + 1))
  fi
  writes=$((writes + 1))

  up_since=$((up_since + 1))
  if (( treatment_up )) && (( up_since >= SOAK_UP )) && (( second < TOTAL )); then
    kill -9 "$TREATMENT_PID"
    wait "$TREATMENT_PID" 2>/dev/null || true
    TREATMENT_PID=""
    kills=$((kills + 1)) treatment_up=0 up_since=0
    echo "$((SECONDS - started_at))s treatment killed" >>"$RUN/faults.log"
    sample_down_answer
  elif (( ! treatment_up )) && (( up_since >= SOAK_DOWN )); then
    start_treatment
    wait_port "$TREATMENT_PORT"
    restarts=$((restarts + 1)) treatment_up=1 up_since=0
    echo "$((SECONDS - started_at))s treatment restarted" >>"$RUN/faults.log"
  fi
done
if (( ! treatment_up )); then
  start_treatment
  wait_port "$TREATMENT_PORT"
  restarts=$((restarts + 1))
fi

# The generators finish their window and wait for what is still running.
wait "$PLAIN_PID" || { cat "$RUN/plain.txt" >&2; exit 1; }
wait "$STREAM_PID" || { cat "$RUN/stream.txt" >&2; exit 1; }
cat "$RUN/plain.txt" "$RUN/stream.txt" >&2

# The running config must end as the file's last one: write a known one
# and give the watcher (250 ms polls) a second.
FINAL_FRACTION=0.25
write_atomic "$(config $FINAL_FRACTION)"
writes=$((writes + 1)) atomic=$((atomic + 1))
sleep 1.5

healthz=$(curl -fsS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/healthz" || echo down)
scrape >"$RUN/metrics-after.txt"
RSS_AFTER=$(vm_rss_kib "$ABGATE_PID")
PEAK_RSS=$(awk '/^VmHWM/ {print $2}' "/proc/$ABGATE_PID/status")
curl -fsS "http://127.0.0.1:$ADMIN_PORT/admin/rollout" >"$RUN/rollout.json" || echo '{}' >"$RUN/rollout.json"

# --- summary ------------------------------------------------------------------
# abgate's counters as {"name{labels}": after - before}, for the families
# the soak reads.
metric_deltas() {
  awk '
    FNR == NR { if ($1 !~ /^#/) before[$1] = $2; next }
    $1 ~ /^abgate_(requests_total|upstream_errors_total|config_reloads_total|fallbacks_total)\{/ {
      delta = $2 - before[$1]
      if (delta != 0) printf "%s\t%d\n", $1, delta
    }
  ' "$RUN/metrics-before.txt" "$RUN/metrics-after.txt" |
    jq -R -s 'split("\n") | map(select(length > 0) | split("\t") | {(.[0]): (.[1] | tonumber)}) | add // {}'
}
running_fraction=$(awk -F' ' '/^abgate_treatment_fraction\{/ {print $2}' "$RUN/metrics-after.txt")

jq -n \
  --arg machine "$MACHINE" \
  --arg duration "$SOAK_DURATION" \
  --slurpfile plain "$RUN/plain.json" \
  --slurpfile stream "$RUN/stream.json" \
  --argjson gateway "$(metric_deltas)" \
  --argjson rollout "$(cat "$RUN/rollout.json")" \
  --argjson writes "$writes" --argjson atomic "$atomic" --argjson in_place "$in_place" \
  --argjson invalid "$invalid" --argjson kills "$kills" --argjson restarts "$restarts" \
  --argjson down "$SOAK_DOWN" --argjson up "$SOAK_UP" \
  --argjson rss_before "$RSS_BEFORE" --argjson rss_after "$RSS_AFTER" --argjson peak_rss "$PEAK_RSS" \
  --arg healthz "$healthz" \
  --argjson final_fraction "$FINAL_FRACTION" --argjson running_fraction "${running_fraction:-null}" \
  --arg faults "$(cat "$RUN/faults.log")" \
  --argjson samples "$SAMPLES" --argjson samples_5xx "$SAMPLES_5XX" \
  --arg down_status "$(cat "$RUN/down-status.txt" 2>/dev/null || true)" \
  --arg down_answer "$(cat "$RUN/down-answer.txt" 2>/dev/null || true)" '
  def total: (.errors | add // 0);
  def side(r): {
    rate: r.rate, sent: r.sent, answered: r.ok, failed: (r | total),
    unanswered: r.unanswered, failed_by_kind: r.errors,
    latency_p50_us: r.latency_us.p50, latency_p99_us: r.latency_us.p99,
    latency_max_us: r.latency_us.max
  };
  def sum_matching(re): [$gateway | to_entries[] | select(.key | test(re)) | .value] | add // 0;
  ($plain[0]) as $p | ($stream[0]) as $s |
  {
    machine: $machine,
    duration: $duration,
    plain: side($p),
    stream: (side($s) + {events_per_stream: $s.events_per_stream}),
    faults: {
      config_writes: $writes, atomic: $atomic, in_place: $in_place, invalid: $invalid,
      treatment_kills: $kills, treatment_restarts: $restarts,
      treatment_down_seconds: $down, treatment_up_seconds: $up,
      timeline: ($faults | split("\n") | map(select(length > 0))),
      answer_while_treatment_down: {status: $down_status, body: $down_answer},
      sample_requests: $samples
    },
    gateway: {
      requests: sum_matching("^abgate_requests_total"),
      requests_by_series: ($gateway | with_entries(select(.key | test("^abgate_requests_total")))),
      upstream_errors_by_series: ($gateway | with_entries(select(.key | test("^abgate_upstream_errors_total")))),
      fallbacks_served: sum_matching("^abgate_fallbacks_total.*result=\"served\""),
      fallbacks_by_series: ($gateway | with_entries(select(.key | test("^abgate_fallbacks_total")))),
      reloads_ok: sum_matching("^abgate_config_reloads_total\\{result=\"ok\""),
      reloads_error: sum_matching("^abgate_config_reloads_total\\{result=\"error\""),
      reloads_by_series: ($gateway | with_entries(select(.key | test("^abgate_config_reloads_total")))),
      last_reload_error: ($rollout.config.last_reload_error // $rollout.last_reload_error // null)
    },
    process: {
      rss_before_kib: $rss_before, rss_after_kib: $rss_after, peak_rss_kib: $peak_rss,
      healthz: $healthz
    },
    final_config: {written_fraction: $final_fraction, running_fraction: $running_fraction}
  }
  | .sent = (.plain.sent + .stream.sent)
  | .answered = (.plain.answered + .stream.answered)
  | .failed = (.plain.failed + .stream.failed)
  | .unanswered = (.plain.unanswered + .stream.unanswered)
  | .no_http_answer = ([.plain.failed_by_kind, .stream.failed_by_kind
                        | to_entries[] | select(.key | test("^(status_|stream_error)") | not) | .value] | add // 0)
  | .checks = {
      every_request_accounted: (.sent == .answered + .failed + .unanswered),
      none_unanswered: (.unanswered == 0),
      gateway_saw_every_request: (.gateway.requests == .sent + $samples),
      gateway_5xx_are_the_generators_5xx: (sum_matching("^abgate_requests_total.*status_class=\"5xx\"")
        == ([.plain.failed_by_kind, .stream.failed_by_kind | to_entries[]
             | select(.key | test("^status_5")) | .value] | add // 0) + $samples_5xx
           + .gateway.fallbacks_served),
      every_failure_is_an_upstream_error_at_the_gateway:
        (sum_matching("^abgate_upstream_errors_total") == .failed + $samples_5xx + .gateway.fallbacks_served),
      abgate_up: ($healthz == "200"),
      running_config_is_the_last_written: ($running_fraction == $final_fraction)
    }
  | .pass = (.checks | all)
' >"$RUN/soak.json"

NAME=$DATE-soak$([ "$SOAK_FALLBACK" = 1 ] && echo -fallback || true)
cp "$RUN/soak.json" "$RESULTS/$NAME.json"
jq -r '
  def kinds(k): if (k | length) == 0 then "–" else (k | to_entries | map("\(.key) \(.value)") | join(", ")) end;
  def us: if . == null then "–" elif . < 1000 then "\(.) µs" elif . < 1000000 then "\(. / 10 | round / 100) ms" else "\(. / 10000 | round / 100) s" end;
  def mib: "\(. / 1024 * 10 | round / 10) MiB";
  def row(name; s): "| \(name) | \(s.rate)/s | \(s.sent) | \(s.answered) | \(s.failed) | \(kinds(s.failed_by_kind)) | \(s.unanswered) | \(s.latency_p50_us | us) | \(s.latency_p99_us | us) |";
  def check(ok): if ok then "yes" else "**NO**" end;
  "# Soak under faults, \(.duration)",
  "",
  .machine,
  "",
  "| load | rate | sent | answered (2xx) | failed | failed by kind | unanswered | p50 | p99 |",
  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  row("plain"; .plain),
  row("SSE"; .stream),
  "| **total** | | **\(.sent)** | **\(.answered)** | **\(.failed)** | | **\(.unanswered)** | | |",
  "",
  "Faults: \(.faults.config_writes) config writes (\(.faults.atomic) atomic, \(.faults.in_place) truncated in place, \(.faults.invalid) invalid); treatment killed \(.faults.treatment_kills) times (\(.faults.treatment_down_seconds) s down, \(.faults.treatment_up_seconds) s up).",
  "",
  "abgate (from /metrics, after minus before):",
  "",
  "- requests: \(.gateway.requests) (generators sent \(.sent), and \(.faults.sample_requests) sample requests below)",
  "- reloads: \(.gateway.reloads_ok) applied, \(.gateway.reloads_error) rejected",
  "- treatment failures answered by control (fallback): \(.gateway.fallbacks_served)",
  (.gateway.requests_by_series | to_entries[] | "- `\(.key)` \(.value)"),
  (.gateway.upstream_errors_by_series | to_entries[] | "- `\(.key)` \(.value)"),
  "- RSS \(.process.rss_before_kib | mib) before the load, \(.process.rss_after_kib | mib) after (peak \(.process.peak_rss_kib | mib)); healthz \(.process.healthz)",
  "",
  "Faults as they happened (seconds from the start of the load): \(.faults.timeline | join("; ")).",
  "",
  "A request routed to treatment while it was down was answered \(.faults.answer_while_treatment_down.status):",
  "",
  "```",
  .faults.answer_while_treatment_down.body,
  "```",
  "",
  "| check | |",
  "| --- | --- |",
  "| sent = answered + failed + unanswered | \(check(.checks.every_request_accounted)) |",
  "| no request unanswered | \(check(.checks.none_unanswered)) |",
  "| abgate counted every request sent | \(check(.checks.gateway_saw_every_request)) |",
  "| 5xx recorded by abgate = status_5xx counted by the generators + fallbacks served | \(check(.checks.gateway_5xx_are_the_generators_5xx)) |",
  "| upstream errors counted by abgate = failures counted by the generators + fallbacks served | \(check(.checks.every_failure_is_an_upstream_error_at_the_gateway)) |",
  "| abgate up at the end (healthz) | \(check(.checks.abgate_up)) |",
  "| running config is the last one written (\(.final_config.written_fraction)) | \(check(.checks.running_config_is_the_last_written)) |",
  "",
  "Failures without an HTTP answer (reset, closed, timeout...): \(.no_http_answer).",
  ""
' "$RUN/soak.json" | tee "$RESULTS/$NAME.md"
echo "wrote $RESULTS/$NAME.md and $NAME.json" >&2
jq -e '.pass' "$RUN/soak.json" >/dev/null || { echo "soak FAILED its checks" >&2; exit 1; }
