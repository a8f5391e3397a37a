#!/usr/bin/env python3
"""Recompute the guard's report from abgate's events file.

Reads the JSON lines `[events]` writes (`"event": "request"` and
`"event": "feedback"`), takes the `[guardrails]` settings from the config
file, and computes each check the way the gateway does
(crates/abgate-sequential): the same counts, the same estimates, and each
check's always-valid interval at this one look, with its decision.

    python3 tools/recompute_report.py --events events.jsonl --config abgate.toml \
        [--experiment NAME] [--since RFC3339] [--compare report.json]

With --compare (the JSON of `GET /admin/report` or `abgate rollout report
--json`) it checks the gateway's numbers against these and exits 1 on any
disagreement. What may differ, and why:

- p95s: the gateway reads a sketch whose buckets are 1% wide, this script
  the exact values, so p95s and their bounds agree within 1.5%.
- intervals: the gateway's is the intersection of the intervals of every
  look of the stage, so it lies inside this one (the last look's) and may
  be narrower; a decision this look reaches, the gateway must have reached.

Only the Python standard library (3.11+, for tomllib).
"""

import argparse
import json
import math
import sys
import tomllib
from datetime import datetime

CHECKS = ["error_rate", "latency_p95", "ttft_p95", "response_length", "completion_rate", "rating"]
DEFAULTS = {
    "enabled": True,
    "alpha": 0.001,
    "checks": CHECKS,
    "min_requests_per_arm": 500,
    "min_feedback_per_arm": 100,
    "max_latency_p95_increase": 0.20,
    "max_ttft_p95_increase": 0.20,
    "max_response_length_change": 0.30,
    "max_completion_rate_decrease": 0.05,
    "max_error_rate_increase": 0.01,
    "max_rating_decrease": 0.1,
    "completion_outcome": "completed",
}
# Where each boundary is tightest (abgate_sequential::decision defaults).
TARGET = {
    "error_rate": 1e4,
    "quantile": 2e3,
    "response_length": 1e4,
    "completion_rate": 2e3,
    "rating": 2e3,
}
WHOLE_UNIT_VARIANCE = 1.0 / 12.0
QUANTILE = 0.95


# ---------------------------------------------------------------- boundaries


def tuning_level(alpha):
    l = -2.0 * math.log(alpha)
    return l + math.log(1.0 + l)


def mixture_radius(s2, n_total, alpha, target):
    """Normal-mixture CS radius, tau^2 = rho^2 N s2, rho^2 = level / target."""
    r = tuning_level(alpha) / target * n_total
    if not (s2 >= 0 and r > 0 and 0 < alpha < 1):
        return math.inf
    return math.sqrt(2.0 * s2 * (1.0 + r) / r * (0.5 * math.log1p(r) - math.log(alpha)))


def interval(estimate, s2, n_total, alpha, target):
    if not (math.isfinite(estimate) and math.isfinite(s2) and s2 > 0):
        return None
    radius = mixture_radius(s2, n_total, alpha, target)
    if not math.isfinite(radius):
        return None
    return estimate, estimate - radius, estimate + radius


def diff_of_proportions(t, c, alpha, target):
    (nt, xt), (nc, xc) = t, c
    smooth = lambda n, x: (x + 1.0) / (n + 2.0)
    st, sc = smooth(nt, xt), smooth(nc, xc)
    s2 = st * (1 - st) / nt + sc * (1 - sc) / nc
    return interval(xt / nt - xc / nc, s2, nt + nc, alpha, target)


def log_ratio_of_proportions(t, c, alpha, target):
    (nt, xt), (nc, xc) = t, c
    pt, pc = (xt + 0.5) / (nt + 1.0), (xc + 0.5) / (nc + 1.0)
    s2 = (1 - pt) / (nt * pt) + (1 - pc) / (nc * pc)
    return interval(math.log(pt) - math.log(pc), s2, nt + nc, alpha, target)


def moments(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return n, mean, max(var, WHOLE_UNIT_VARIANCE)


def diff_of_means(t, c, alpha, target):
    (nt, mt, vt), (nc, mc, vc) = moments(t), moments(c)
    return interval(mt - mc, vt / nt + vc / nc, nt + nc, alpha, target)


def log_ratio_of_means(t, c, alpha, target):
    (nt, mt, vt), (nc, mc, vc) = moments(t), moments(c)
    if not (mt > 0 and mc > 0):
        return None
    s2 = vt / (nt * mt * mt) + vc / (nc * mc * mc)
    return interval(math.log(mt) - math.log(mc), s2, nt + nc, alpha, target)


def quantile_bounds(values, alpha, target, p=QUANTILE):
    """Howard & Ramdas' fixed-quantile CS with the beta-binomial mixture:
    (lower, upper) order statistics, None where there is none."""
    t = len(values)
    c = max(target / tuning_level(alpha) - 1.0, 1.0)
    a, b = p * c, (1 - p) * c
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    threshold = -math.log(alpha)

    def inside(k):
        log_m = (math.lgamma(a + k) + math.lgamma(b + t - k) - math.lgamma(a + b + t)
                 - lbeta - k * math.log(p) - (t - k) * math.log(1 - p))
        return log_m < threshold

    ks = [k for k in range(t + 1) if inside(k)]
    if not ks:
        return None, None
    k_lo, k_hi = ks[0], ks[-1]
    ordered = sorted(values)
    lower = ordered[k_lo - 1] if k_lo >= 1 else None
    upper = ordered[k_hi] if k_hi + 1 <= t else None
    return lower, upper


def quantile(values, p=QUANTILE):
    """The value at 0-based rank floor(p (n - 1)), as DDSketch reads it."""
    ordered = sorted(values)
    return ordered[math.floor(p * (len(ordered) - 1))] if ordered else None


# -------------------------------------------------------------------- events


def read_events(path, experiment, since):
    arms = {v: {"requests": 0, "errors": 0, "latency": [], "ttft": [], "tokens": [],
                "bytes": [], "reports": 0, "outcomes": [], "ratings": []}
            for v in ("control", "treatment")}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            event = json.loads(line)
            if experiment and event.get("experiment") != experiment:
                continue
            if since and parse_time(event["timestamp"]) < since:
                continue
            arm = arms.get(event.get("variant"))
            if arm is None:
                continue
            if event.get("event") == "feedback":
                arm["reports"] += 1
                arm["outcomes"].append(event["outcome"])
                if event.get("rating") is not None:
                    arm["ratings"].append(float(event["rating"]))
                continue
            if event.get("forced"):
                continue
            arm["requests"] += 1
            if event["status"] >= 500 or event.get("error_kind") == "status_429":
                arm["errors"] += 1
            arm["latency"].append(event["latency_ms"] / 1000.0)
            if event.get("stream") and event.get("time_to_first_byte_ms") is not None:
                arm["ttft"].append(event["time_to_first_byte_ms"] / 1000.0)
            if event.get("completion_tokens") is not None:
                arm["tokens"].append(float(event["completion_tokens"]))
            arm["bytes"].append(float(event["response_bytes"]))
    return arms


def parse_time(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -------------------------------------------------------------------- checks


def judge(lower, upper, breach_above=None, breach_below=None, ni_lower=None, ni_upper=None):
    lo = -math.inf if lower is None else lower
    hi = math.inf if upper is None else upper
    if (breach_above is not None and lo > breach_above) or (
            breach_below is not None and hi < breach_below):
        return "breach"
    if (ni_lower is None or lo >= ni_lower) and (ni_upper is None or hi <= ni_upper):
        return "non_inferior"
    return "undecided"


def relative(native):
    """A log-ratio interval as treatment / control - 1."""
    estimate, lower, upper = native
    return math.expm1(estimate), math.expm1(lower), math.expm1(upper)


def recompute(arms, guard):
    enabled = [c for c in CHECKS if guard["enabled"] and c in guard["checks"]]
    alpha = guard["alpha"] / max(len(enabled), 1)
    c, t = arms["control"], arms["treatment"]
    min_requests, min_feedback = guard["min_requests_per_arm"], guard["min_feedback_per_arm"]
    completion = guard["completion_outcome"]
    results = {}
    for check in enabled:
        out = {"check": check, "alpha": alpha}
        if check == "error_rate":
            n = (c["requests"], t["requests"])
            out["control"] = c["errors"] / c["requests"] if c["requests"] else None
            out["treatment"] = t["errors"] / t["requests"] if t["requests"] else None
            compute = lambda: diff_of_proportions((t["requests"], t["errors"]),
                                                  (c["requests"], c["errors"]),
                                                  alpha, TARGET[check])
            lines = dict(breach_above=0.0, ni_upper=guard["max_error_rate_increase"])
            minimum = min_requests
        elif check in ("latency_p95", "ttft_p95"):
            key = "latency" if check == "latency_p95" else "ttft"
            margin = guard["max_latency_p95_increase" if key == "latency" else "max_ttft_p95_increase"]
            n = (len(c[key]), len(t[key]))
            out["control"], out["treatment"] = quantile(c[key]), quantile(t[key])

            def compute(key=key):
                lt, ut = quantile_bounds(t[key], alpha / 2, TARGET["quantile"])
                lc, uc = quantile_bounds(c[key], alpha / 2, TARGET["quantile"])
                ratio = lambda x, y: x / y if x is not None and y else None
                estimate = ratio(out["treatment"], out["control"])
                lower, upper = ratio(lt, uc), ratio(ut, lc)
                return ((estimate - 1 if estimate is not None else None),
                        (lower - 1 if lower is not None else None),
                        (upper - 1 if upper is not None else None))
            lines = dict(breach_above=margin, ni_upper=margin)
            minimum = min_requests
        elif check == "response_length":
            use_tokens = all(2 * len(a["tokens"]) >= len(a["bytes"]) for a in (c, t))
            key = "tokens" if use_tokens else "bytes"
            out["measure"] = "mean completion tokens" if use_tokens else "mean response bytes"
            n = (len(c[key]), len(t[key]))
            mean = lambda xs: sum(xs) / len(xs) if xs else None
            out["control"], out["treatment"] = mean(c[key]), mean(t[key])
            compute = lambda key=key: (lambda iv: iv and relative(iv))(
                log_ratio_of_means(t[key], c[key], alpha, TARGET[check]))
            m = guard["max_response_length_change"]
            low = -m if m < 1 else None
            lines = dict(breach_above=m, breach_below=low, ni_lower=low, ni_upper=m)
            minimum = min_requests
        elif check == "completion_rate":
            done = lambda a: sum(1 for o in a["outcomes"] if o == completion)
            n = (c["reports"], t["reports"])
            out["control"] = done(c) / c["reports"] if c["reports"] else None
            out["treatment"] = done(t) / t["reports"] if t["reports"] else None
            compute = lambda: (lambda iv: iv and relative(iv))(
                log_ratio_of_proportions((t["reports"], done(t)), (c["reports"], done(c)),
                                         alpha, TARGET[check]))
            m = guard["max_completion_rate_decrease"]
            lines = dict(breach_below=-m, ni_lower=-m)
            minimum = min_feedback
        else:  # rating
            n = (len(c["ratings"]), len(t["ratings"]))
            mean = lambda xs: sum(xs) / len(xs) if xs else None
            out["control"], out["treatment"] = mean(c["ratings"]), mean(t["ratings"])
            compute = lambda: diff_of_means(t["ratings"], c["ratings"], alpha, TARGET[check])
            lines = dict(breach_below=0.0, ni_lower=-guard["max_rating_decrease"])
            minimum = min_feedback
        out["observations"] = {"control": n[0], "treatment": n[1]}
        iv = compute() if min(n) >= max(minimum, 1) else None
        if iv is None:
            out.update(decision="insufficient_data", estimate=None, lower=None, upper=None)
        else:
            estimate, lower, upper = iv
            out.update(estimate=estimate, lower=lower, upper=upper,
                       decision=judge(lower, upper, **lines))
        results[check] = out
    counts = {v: {"requests": a["requests"], "errors": a["errors"], "answers": len(a["latency"]),
                  "streams": len(a["ttft"]), "answers_with_usage": len(a["tokens"]),
                  "feedback_reports": a["reports"], "ratings": len(a["ratings"])}
              for v, a in arms.items()}
    return {"alpha_per_check": alpha, "counts": counts, "checks": results}


# ------------------------------------------------------------------- compare


def close(a, b, rel, absolute=1e-9):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= max(absolute, rel * max(abs(a), abs(b)))


def compare(mine, report):
    problems = []
    evaluation = report["guardrails"]["last_evaluation"]
    for variant in ("control", "treatment"):
        theirs = evaluation[variant]
        for key, value in mine["counts"][variant].items():
            if theirs.get(key) != value:
                problems.append(f"{variant} {key}: gateway {theirs.get(key)}, events {value}")
    gateway = {c["check"]: c for c in evaluation["checks"]}
    if set(gateway) != set(mine["checks"]):
        problems.append(f"checks run: gateway {sorted(gateway)}, config {sorted(mine['checks'])}")
    for name, ours in mine["checks"].items():
        theirs = gateway.get(name)
        if theirs is None:
            continue
        sketch = name in ("latency_p95", "ttft_p95")
        rel = 0.015 if sketch else 1e-9
        if not close(theirs["alpha"], ours["alpha"], 1e-12):
            problems.append(f"{name} alpha: gateway {theirs['alpha']}, events {ours['alpha']}")
        for key in ("control", "treatment"):
            if not close(theirs[key], ours[key], rel):
                problems.append(f"{name} {key}: gateway {theirs[key]}, events {ours[key]}")
        if ours["decision"] == "insufficient_data":
            if theirs["decision"] != "insufficient_data" and not theirs["decision"] == "breach":
                problems.append(f"{name}: gateway {theirs['decision']} on too little data")
            continue
        if not close(theirs["estimate"], ours["estimate"], 1e-9, 0.03 if sketch else 1e-9):
            problems.append(f"{name} estimate: gateway {theirs['estimate']}, events {ours['estimate']}")
        # The gateway's interval is inside this look's (bucket edges aside).
        slack = lambda x: 0.03 * (1 + abs(x)) if sketch else 1e-9
        lower, upper = theirs["confidence_interval"]["lower"], theirs["confidence_interval"]["upper"]
        if ours["lower"] is not None and (lower is None or lower < ours["lower"] - slack(ours["lower"])):
            problems.append(f"{name} lower bound: gateway {lower} below this look's {ours['lower']}")
        if ours["upper"] is not None and (upper is None or upper > ours["upper"] + slack(ours["upper"])):
            problems.append(f"{name} upper bound: gateway {upper} above this look's {ours['upper']}")
        if ours["decision"] != "undecided" and theirs["decision"] != ours["decision"]:
            problems.append(f"{name} decision: gateway {theirs['decision']}, events {ours['decision']}")
    return problems


def show(mine):
    fmt = lambda x: "-" if x is None else f"{x:+.4f}"
    print(f"alpha per check {mine['alpha_per_check']:.3g}")
    for variant, counts in mine["counts"].items():
        print(f"{variant}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"{'check':<16} {'decision':<18} {'control':>10} {'treatment':>10} {'estimate':>9}  interval")
    for c in mine["checks"].values():
        value = lambda x: "-" if x is None else f"{x:.4g}"
        print(f"{c['check']:<16} {c['decision']:<18} {value(c['control']):>10} {value(c['treatment']):>10}"
              f" {fmt(c['estimate']):>9}  [{fmt(c['lower'])}, {fmt(c['upper'])}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", required=True, help="the events file ([events] path)")
    parser.add_argument("--config", help="the gateway's config (its [guardrails] section)")
    parser.add_argument("--experiment", help="only this experiment's events")
    parser.add_argument("--since", help="the stage's start (RFC 3339; the report's stage.since)")
    parser.add_argument("--compare", help="a /admin/report JSON to check against")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    guard = dict(DEFAULTS)
    if args.config:
        with open(args.config, "rb") as f:
            guard.update(tomllib.load(f).get("guardrails", {}))
    report = None
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            report = json.load(f)
    since = parse_time(args.since) if args.since else None
    if since is None and report is not None:
        since = parse_time(report["stage"]["since"])
    experiment = args.experiment or (report or {}).get("experiment")
    mine = recompute(read_events(args.events, experiment, since), guard)
    if args.json:
        print(json.dumps(mine, indent=2))
    else:
        show(mine)
    if report is not None:
        problems = compare(mine, report)
        for problem in problems:
            print(f"DISAGREES: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("the gateway's report agrees with the events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
