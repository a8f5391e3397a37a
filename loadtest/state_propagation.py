#!/usr/bin/env python3
"""How long a rollout change takes to reach every replica through [state].

Starts a redis-server and three `abgate serve` processes sharing it (and
two `abgate mock` upstreams), all on loopback; makes CHANGES changes of the
treatment fraction, each through the admin API of one replica in turn, and
for each measures the time from sending it to the moment the last of the
other two replicas shows it in GET /admin/rollout (polled in a tight loop,
about a millisecond a poll). Prints p50, p99 and the maximum.

    cargo build --release --locked --bin abgate
    python3 loadtest/state_propagation.py [CHANGES]

Ports: free ones, picked at start. Needs redis-server on PATH. Standard
library only.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABGATE = os.path.join(ROOT, "target", "release", "abgate")
TOKEN = "propagation-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.load(answer)


def main():
    changes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    work = tempfile.mkdtemp(prefix="abgate-propagation-")
    processes = []
    try:
        redis_port = free_port()
        processes.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL))
        wait_for(redis_port)
        upstreams = []
        for name in ("base", "fine-tuned"):
            port = free_port()
            processes.append(subprocess.Popen(
                [ABGATE, "mock", "--listen", f"127.0.0.1:{port}", "--name", name, "--workers", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(port)
            upstreams.append(port)
        admins = []
        for i in range(3):
            listen, admin = free_port(), free_port()
            path = os.path.join(work, f"replica{i}.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"""[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
[experiment]
name = "propagation"
treatment_fraction = 0.05
[variants.control]
upstream = "http://127.0.0.1:{upstreams[0]}"
[variants.treatment]
upstream = "http://127.0.0.1:{upstreams[1]}"
[admin]
token_env = "PROPAGATION_TOKEN"
[guardrails]
enabled = false
[state]
url = "redis://127.0.0.1:{redis_port}/0"
""")
            state_dir = os.path.join(work, f"state{i}")
            os.mkdir(state_dir)
            processes.append(subprocess.Popen(
                [ABGATE, "serve", "--config", path, "--state-dir", state_dir, "--workers", "1"],
                env={**os.environ, "PROPAGATION_TOKEN": TOKEN, "ABGATE_LOG": "warn"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(admin)
            admins.append(f"http://127.0.0.1:{admin}")
        times = []
        fractions = [0.05, 0.25, 0.5, 1.0, 0.0]
        for n in range(changes):
            fraction = fractions[n % len(fractions)]
            writer = admins[n % 3]
            others = [a for a in admins if a != writer]
            started = time.perf_counter()
            call("PUT", f"{writer}/admin/rollout", {"treatment_fraction": fraction})
            for other in others:
                while call("GET", f"{other}/admin/rollout")["treatment_fraction"] != fraction:
                    if time.perf_counter() - started > 5:
                        raise SystemExit(f"change {n} did not reach {other} within 5 s")
            times.append(time.perf_counter() - started)
        times.sort()
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
        print(f"{changes} changes over 3 replicas, time until the last replica applied each: "
              f"p50 {pick(0.5) * 1000:.1f} ms, p99 {pick(0.99) * 1000:.1f} ms, "
              f"max {times[-1] * 1000:.1f} ms")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
