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
