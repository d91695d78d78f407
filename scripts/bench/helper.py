#!/usr/bin/env python3
"""Helper of scripts/bench.sh (Python 3 standard library only).

    helper.py token SECRET ISSUER AUDIENCE       an HS256 bearer token with roles [admin]
    helper.py free-port                          a free TCP port on 127.0.0.1
    helper.py wrk RESULTS KEY FILE               parses wrk output into RESULTS
    helper.py put RESULTS KEY VALUE              records one number
    helper.py wait-enriched ... (see below)      polls until every user is enriched
    helper.py table RESULTS                      prints the markdown table; exit 3 when
                                                 BENCH_GUARD=1 and a ratio is below half
                                                 its goal
"""

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, issuer: str, audience: str) -> str:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "sub": "bench",
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "roles": ["admin"],
    }
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save(path, results):
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def put(path, key, value):
    results = load(path)
    results[key] = value
    save(path, results)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text):
    out = {}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"^\s+99%\s+([0-9.]+)(us|ms|s|m)\s*$", text, re.M)
    if m:
        out["p99_ms"] = float(m.group(1)) * UNITS[m.group(2)]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:.*", text)
    out["socket_errors"] = m.group(0) if m else ""
    m = re.search(r"BENCH created=(\d+) other=(\d+)", text)
    if m:
        out["created"] = int(m.group(1))
        out["other"] = int(m.group(2))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    return out


def parse_pgbench(text):
    out = {}
    m = re.search(r"tps = ([0-9.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"number of failed transactions: (\d+)", text)
    out["failed"] = int(m.group(1)) if m else 0
    m = re.search(r"latency average = ([0-9.]+) ms", text)
    if m:
        out["avg_ms"] = float(m.group(1))
    return out


def count_sqlite(db, sql):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql).fetchone()
    finally:
        con.close()


def count_psql(dburl, sql):
    out = subprocess.run(
        ["psql", "-X", "-At", "-F", "|", "-d", dburl, "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return tuple(None if v == "" else v for v in out.split("|"))


def wait_enriched(results, key, users_kind, users_where, profiles_db, post_end, limit):
    """Polls until the profile store (SQLite file `profiles_db`) holds as many completed
    profiles as there are users (in the SQLite file or PostgreSQL database
    `users_where`), for at most `limit` seconds after `post_end` (a Unix time with
    fraction: when the POST load ended, i.e. the last 201). Records the wall-clock
    lag, the lag by the stores' own timestamps (last profile written minus last user
    created), and the drain rate after the load."""
    post_end = float(post_end)
    users_sql = "SELECT count(*) FROM users"
    profiles_sql = "SELECT count(*) FROM enriched_profiles"

    def users():
        if users_kind == "sqlite":
            return int(count_sqlite(users_where, users_sql)[0])
        return int(count_psql(users_where, users_sql)[0])

    def profiles():
        return int(count_sqlite(profiles_db, profiles_sql)[0])

    total = users()
    first = None
    done_at = None
    deadline = post_end + float(limit)
    while time.time() < deadline:
        n = profiles()
        now = time.time()
        if first is None:
            first = (now, n)
        if n >= total:
            done_at = now
            break
        time.sleep(0.05)
    out = {"users": total, "enriched": profiles()}
    if done_at is None:
        out["lag_s"] = None
        out["timed_out_after_s"] = float(limit)
    else:
        out["lag_s"] = max(0.0, done_at - post_end)
        # The stores' timestamps: last profile written vs last user created.
        if users_kind == "sqlite":
            last_user = count_sqlite(
                users_where, "SELECT (julianday(max(created_at)) - 2440587.5) * 86400 FROM users")[0]
        else:
            last_user = count_psql(
                users_where, "SELECT extract(epoch FROM max(created_at)) FROM users")[0]
        last_profile = count_sqlite(
            profiles_db,
            "SELECT (julianday(max(created_at)) - 2440587.5) * 86400 FROM enriched_profiles")[0]
        if last_user is not None and last_profile is not None:
            out["store_lag_s"] = max(0.0, float(last_profile) - float(last_user))
        backlog = total - first[1]
        drain = done_at - first[0]
        if backlog > 0 and drain > 0:
            out["drain_per_s"] = backlog / drain
            out["backlog_at_end"] = backlog
    put(results, key, out)
    print(f"bench: {key}: {json.dumps(out)}", file=sys.stderr)


# The rows of the table: (path, userhub key, ceiling key, ceiling label, goal ratio).
ROWS = [
    ("`GET /api/users/{uuid}` ceiling: minimal actix-web JSON handler", "ceiling_get", None, None, None),
    ("`GET /health`, embedded, whole middleware stack", "embedded_health", "ceiling_get", "actix-web JSON handler", None),
    ("`GET /api/users/{uuid}`, embedded, memory cache hit", "embedded_get", "ceiling_get", "actix-web JSON handler", 0.7),
    ("`GET /api/users/{uuid}`, PostgreSQL, Redis cache hit", "services_get", "ceiling_get", "actix-web JSON handler", 0.5),
    ("`POST /api/users`, PostgreSQL + RabbitMQ", "services_post", "pgbench_create", "pgbench insert+outbox, 16 clients", 0.6),
    ("`POST /api/users`, embedded SQLite", "embedded_post", None, None, None),
]


def fmt_rate(r):
    if r is None:
        return "—"
    s = f"{r.get('rps', 0):,.0f} req/s"
    if r.get("p99_ms") is not None:
        s += f", p99 {r['p99_ms']:.1f} ms"
    bad = r.get("non2xx", 0) + r.get("other", 0)
    if bad:
        s += f" ({bad} non-2xx)"
    return s


def table(path):
    results = load(path)
    guard = os.environ.get("BENCH_GUARD") == "1"
    skip = set(filter(None, os.environ.get("BENCH_GUARD_SKIP", "").split(",")))
    # The debug binaries' ratios are not the release binaries': BENCH_GOAL_SCALE scales
    # the goals the guard checks (the table still shows the goals themselves).
    scale = float(os.environ.get("BENCH_GOAL_SCALE", "1"))
    failures = []
    lines = [
        f"duration per path: {results.get('duration', '?')}, wrk -t2 -c64, "
        f"binary: {results.get('profile', '?')}, {results.get('started', '')}",
        "",
        "| path | userhub | ceiling (same run) | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    for label, key, ckey, clabel, goal in ROWS:
        r = results.get(key)
        if key == "ceiling_get":
            lines.append(f"| {label} | — | {fmt_rate(r)} | — | — |")
            continue
        c = results.get(ckey) if ckey else None
        ratio = None
        if r and c and r.get("rps") and c.get("rps"):
            ratio = r["rps"] / c["rps"]
        ceiling = "—" if not ckey else (f"{clabel}: {fmt_rate(c)}" if c else "not measured")
        goal_s = f"≥ {goal}" if goal else "—"
        if r is None:
            lines.append(f"| {label} | not measured ({results.get(key + '_skipped', 'skipped')}) | {ceiling} | — | {goal_s} |")
            if guard and goal and key not in skip:
                failures.append(f"{key}: not measured")
            continue
        ratio_s = "—" if ratio is None else f"{ratio:.2f}"
        if goal and ratio is not None:
            ok = ratio >= goal
            ratio_s += " ✓" if ok else " ✗"
            if guard and key not in skip and ratio < goal * scale / 2:
                failures.append(f"{key}: ratio {ratio:.2f} < half of goal {goal}"
                                + (f" × {scale}" if scale != 1 else ""))
        lines.append(f"| {label} | {fmt_rate(r)} | {ceiling} | {ratio_s} | {goal_s} |")
    for key, label in [("embedded_enrich", "embedded (SQLite, in-process bus)"),
                       ("services_enrich", "PostgreSQL + RabbitMQ, SQLite profile store")]:
        e = results.get(key)
        post = results.get(key.replace("enrich", "post"))
        name = f"enrichment keep-up, {label}: last enriched after last 201"
        if e is None:
            lines.append(f"| {name} | not measured ({results.get(key + '_skipped', 'skipped')}) | — | — | ≤ 2 s |")
            if guard and key not in skip:
                failures.append(f"{key}: not measured")
            continue
        if e.get("lag_s") is None:
            value = f"not done after {e.get('timed_out_after_s')} s ({e['enriched']}/{e['users']} enriched)"
            ok = False
            lag = float("inf")
        else:
            lag = e["lag_s"]
            value = f"{lag:.2f} s ({e['users']:,} users; stores' timestamps: {e.get('store_lag_s', 0):.2f} s)"
            ok = lag <= 2.0
        post_s = f"POST rate {post['rps']:,.0f}/s" if post and post.get("rps") else "—"
        ratio_s = "—"
        if e.get("drain_per_s") and post and post.get("rps"):
            ratio_s = f"{min(e['drain_per_s'], 1e9) / post['rps']:.2f} (drain {e['drain_per_s']:,.0f}/s)"
        lines.append(f"| {name} | {value} | {post_s} | {ratio_s} {'✓' if ok else '✗'} | ≤ 2 s |")
        if guard and key not in skip and lag > 4.0 / scale:
            failures.append(f"{key}: last enriched {lag:.2f} s after the last 201 (> 2 × 2 s)")
    print("\n".join(lines))
    if failures:
        print("", file=sys.stderr)
        for f in failures:
            print(f"bench: GUARD FAILED: {f}", file=sys.stderr)
        return 3
    if guard:
        print("\nbench: guard passed (no ratio below half its goal"
              + (f"; not guarded: {', '.join(sorted(skip))}" if skip else "") + ")", file=sys.stderr)
    return 0


def main(argv):
    cmd = argv[1]
    if cmd == "token":
        print(token(argv[2], argv[3], argv[4]))
    elif cmd == "free-port":
        print(free_port())
    elif cmd == "wrk":
        with open(argv[4]) as f:
            parsed = parse_wrk(f.read())
        put(argv[2], argv[3], parsed)
        print(f"bench: {argv[3]}: {json.dumps(parsed)}", file=sys.stderr)
    elif cmd == "pgbench":
        with open(argv[4]) as f:
            parsed = parse_pgbench(f.read())
        put(argv[2], argv[3], parsed)
        print(f"bench: {argv[3]}: {json.dumps(parsed)}", file=sys.stderr)
    elif cmd == "put":
        put(argv[2], argv[3], argv[4])
    elif cmd == "wait-enriched":
        wait_enriched(*argv[2:])
    elif cmd == "table":
        return table(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
