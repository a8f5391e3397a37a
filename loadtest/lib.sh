# Shell helpers shared by the scripts in loadtest/ (sourced, not run).

# Waits up to 10 s for something to listen on 127.0.0.1:$1; exits the
# script otherwise, pointing at the logs in $RUN.
wait_port() {
  local port=$1
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$port; see the logs in $RUN" >&2
  exit 1
}

# Installs from Debian what is missing; each argument is `command:package`
# (the package that provides the command).
install_missing() {
  local missing=() need
  for need in "$@"; do
    command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Stops every process whose pid the script added to STARTED, and waits
# for each.
STARTED=()
stop_all() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  STARTED=()
}
