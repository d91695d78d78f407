#!/usr/bin/env python3
"""Helper of scripts/bench.sh (Python 3 standard library only; the mongo-* commands and
wait-profiles on a MongoDB store import pymongo, which bench.sh makes sure of first).

    helper.py token SECRET ISSUER AUDIENCE       an HS256 bearer token with roles [admin]
    helper.py free-port                          a free TCP port on 127.0.0.1
    helper.py wrk RESULTS KEY FILE               parses wrk output into RESULTS
    helper.py pgbench RESULTS KEY FILE           parses pgbench output into RESULTS
    helper.py put RESULTS KEY VALUE              records one value
    helper.py wait-up URL PID T0 LIMIT [RESULTS KEY]
                                                 polls URL every 10 ms until it answers
                                                 200; prints the seconds since T0; with
                                                 RESULTS KEY records them and the idle RSS
    helper.py wait-enriched ... (see below)      polls until every user is enriched
    helper.py half-rate RESULTS KEY              half the req/s measured as KEY
    helper.py creation-latency ... (see below)   creation→enriched latency of tagged users
    helper.py wait-queue QUEUE N LIMIT           polls until a RabbitMQ queue holds N
                                                 messages (N=0: until it is empty)
    helper.py wait-profiles ... (see below)      consumer throughput: polls the store
    helper.py sqlite-ceiling RESULTS KEY STORE_RS DB N LIMIT
    helper.py mongo-ceiling RESULTS KEY URL N LIMIT [store]
                                                 the store's own ceiling: a bare driver
                                                 loop of the consumer's upsert
    helper.py mongo-drop URL DB…                 drops MongoDB databases
    helper.py table RESULTS                      prints the markdown table; exit 3 when
                                                 BENCH_GUARD=1 and a row regressed grossly
"""

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid


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


def record(path, key, value):
    put(path, key, value)
    print(f"bench: {key}: {json.dumps(value)}", file=sys.stderr)


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


# --- start-up and idle memory ------------------------------------------------------------

# How long a freshly started process idles before its RSS is read.
IDLE_S = 1.0


def alive(pid):
    """False once the process has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "zombie" not in line and "dead" not in line
    except FileNotFoundError:
        return False
    return True


def vm_rss_mb(pid):
    """The process's resident set (VmRSS, which /proc gives in KiB) in MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return None


def answers_200(host, port, path):
    # http.client rather than urllib: no proxy settings from the environment apply.
    con = http.client.HTTPConnection(host, port, timeout=1)
    try:
        con.request("GET", path)
        return con.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        con.close()


def wait_up(url, pid, t0, limit, results=None, key=None):
    """Polls `url` every 10 ms until it answers 200, for at most `limit` seconds after
    `t0` (the Unix time just before the process `pid` was started); prints the seconds
    from `t0` to that first 200. With `results` and `key`, also records them and the
    process's VmRSS after it has idled IDLE_S seconds more (before any load)."""
    t0, pid, deadline = float(t0), int(pid), float(t0) + float(limit)
    parts = urllib.parse.urlsplit(url)
    while not answers_200(parts.hostname, parts.port, parts.path or "/"):
        if not alive(pid):
            print(f"bench: the process (pid {pid}) exited before {url} answered", file=sys.stderr)
            return 1
        if time.time() >= deadline:
            print(f"bench: {url} did not answer 200 within {limit} s", file=sys.stderr)
            return 1
        time.sleep(0.01)
    ready = time.time()
    up = ready - t0
    print(f"{up:.3f}")
    if results:
        # Idling is what is measured here, not a wait for something to happen.
        time.sleep(max(0.0, ready + IDLE_S - time.time()))
        record(results, key, {"start_s": up, "rss_mb": vm_rss_mb(pid), "idle_s": IDLE_S})
    return 0


# --- the stores ---------------------------------------------------------------------------

def query_sqlite(db, sql, params=()):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def count_sqlite(db, sql):
    return query_sqlite(db, sql)[0]


def query_psql(dburl, sql):
    out = subprocess.run(
        ["psql", "-X", "-At", "-F", "|", "-d", dburl, "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return [tuple(None if v == "" else v for v in line.split("|")) for line in out.splitlines()]


def count_psql(dburl, sql):
    return query_psql(dburl, sql)[0]


def epoch_of(text):
    """Unix time of a SQLite timestamp as the stores write it (2026-11-30T08:00:00.123Z)."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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
    record(results, key, out)


def half_rate(results, key):
    rps = (load(results).get(key) or {}).get("rps")
    if not rps:
        print(f"bench: no req/s recorded as {key}", file=sys.stderr)
        return 1
    print(max(1, round(rps / 2)))
    return 0


def scaled_rate(results, key, factor):
    """`factor` times the rate recorded as `key`, in whole requests a second."""
    rps = (load(results).get(key) or {}).get("rps")
    if not rps:
        print(f"bench: no rate recorded as {key}", file=sys.stderr)
        return 1
    print(max(1, round(rps * float(factor))))
    return 0


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def creation_latency(results, key, users_kind, users_where, profiles_db, tag, wrk_key,
                     target_rps, limit):
    """Creation→enriched latency of the users whose e-mail is bench-TAG-… (one phase of
    post_users.lua): polls for at most `limit` seconds until each has a completed
    profile in the SQLite profile store `profiles_db`, then joins the two stores by uuid
    and records p50/p99/max of (profile created_at − user created_at). The profile's
    created_at is the database's clock when the row was inserted (the column's
    default; the upsert does not set it), i.e. when the profile was written: its
    enriched_at and updated_at are the worker's clock when it derived the profile, before
    the write waited for its group commit."""
    like = f"bench-{tag}-%"
    if users_kind == "sqlite":
        users = {u.lower(): epoch_of(t) for u, t in query_sqlite(
            users_where, "SELECT uuid, created_at FROM users WHERE email LIKE ?", (like,))}
    else:
        users = {u.lower(): float(t) for u, t in query_psql(
            users_where,
            f"SELECT uuid, extract(epoch FROM created_at) FROM users WHERE email LIKE '{like}'")}
    completed = "FROM enriched_profiles WHERE email LIKE ? AND status = 'completed'"
    deadline = time.time() + float(limit)
    while query_sqlite(profiles_db, f"SELECT count(*) {completed}", (like,))[0][0] < len(users):
        if time.time() >= deadline:
            break
        time.sleep(0.05)
    profiles = {u.lower(): epoch_of(t) for u, t in query_sqlite(
        profiles_db, f"SELECT uuid, created_at {completed}", (like,))}
    lags = sorted((profiles[u] - created) * 1000 for u, created in users.items() if u in profiles)
    w = load(results).get(wrk_key) or {}
    out = {"users": len(users), "enriched": len(lags), "target_rps": float(target_rps),
           "rps": w.get("rps"), "post_p99_ms": w.get("p99_ms")}
    if lags:
        out.update(p50_ms=percentile(lags, 50), p99_ms=percentile(lags, 99), max_ms=lags[-1])
    if len(lags) < len(users):
        out["timed_out_after_s"] = float(limit)
    record(results, key, out)


# --- consumer throughput ----------------------------------------------------------------

def queue_depth(queue):
    """Messages (ready and unacknowledged) in a RabbitMQ queue; None when it is absent."""
    out = subprocess.run(
        ["timeout", "30", "rabbitmqctl", "-q", "list_queues", "name", "messages"],
        check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[0] == queue and fields[1].isdigit():
            return int(fields[1])
    return None


def wait_queue(queue, n, limit):
    """Polls until `queue` holds `n` messages (n = 0: until it is empty) or `limit`
    seconds pass (exit 1)."""
    n, deadline = int(n), time.time() + float(limit)
    while True:
        depth = queue_depth(queue)
        if depth is not None and (depth >= n if n else depth == 0):
            print(f"bench: {queue} holds {depth} messages", file=sys.stderr)
            return 0
        if time.time() >= deadline:
            print(f"bench: {queue} holds {depth} messages, not {n}, after {limit} s", file=sys.stderr)
            return 1
        time.sleep(0.2)


# The Mongo store's collection (src/enrichment/mongo_store.rs).
MONGO_COLLECTION = "enriched_users"


def mongo_database(url):
    import pymongo
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
    return client, client.get_default_database()


def wait_profiles(results, key, kind, where, n, t0, limit):
    """Consumer throughput: polls until the profile store (kind sqlite: the file
    `where`; kind mongo: the database of the URL `where`) holds `n` profiles, for at
    most `limit` seconds after `t0` (when the worker process was started). Records
    msg/s from the first profile written to the n-th (the worker's start-up left out,
    like the ceiling's set-up), and the wall time from the process start.

    SQLite: by the store's own timestamps, created_at being the database's clock when
    the row was inserted. MongoDB: a document's created_at is the worker's clock when it
    derived the profile, which can precede the write by a whole prefetch (256 messages)
    on a slow server; so the poll's own clock instead, from the first poll that found
    a profile (minus the profiles it found) to the poll that found them all."""
    n, t0 = int(n), float(t0)
    deadline = t0 + float(limit)
    if kind == "sqlite":
        def count():
            try:
                return count_sqlite(where, "SELECT count(*) FROM enriched_profiles")[0]
            except sqlite3.Error:  # not created or migrated yet
                return 0

        def completed():
            return count_sqlite(where, "SELECT count(*) FROM enriched_profiles"
                                       " WHERE status = 'completed'")[0]

        def span():
            lo, hi = count_sqlite(where, "SELECT min(created_at), max(created_at)"
                                         " FROM enriched_profiles")
            return epoch_of(hi) - epoch_of(lo)
    else:
        client, db = mongo_database(where)
        profiles = db[MONGO_COLLECTION]

        def count():
            # The collection's count, not a query: cheap for the server polled.
            return profiles.estimated_document_count()

        def completed():
            return profiles.count_documents({"status": "completed"})
    first = None
    done = count()
    while done < n and time.time() < deadline:
        time.sleep(0.02)
        done = count()
        if first is None and done > 0:
            first = (time.time(), done)
    finished = time.time()
    out = {"messages": n, "written": done}
    if done >= n:
        out["wall_s"] = finished - t0
        out["completed"] = completed()
        if kind == "sqlite":
            window, counted = span(), n - 1
        elif first is not None:
            window, counted = finished - first[0], n - first[1]
        else:  # all written before the first poll
            window, counted = finished - t0, n
        out["window_s"] = window
        out["msg_per_s"] = counted / window if window > 0 else None
    else:
        out["timed_out_after_s"] = float(limit)
    record(results, key, out)
    return 0 if done >= n else 1


def store_upsert(store_rs):
    """The consumer's upsert statement, read from src/enrichment/store.rs (UPSERT), so
    the ceiling always runs the statement the store runs."""
    with open(store_rs) as f:
        m = re.search(r'const UPSERT: &str = "(.*?)";', f.read(), re.S)
    if not m:
        raise SystemExit(f"bench: no `const UPSERT: &str = \"…\";` in {store_rs}")
    return m.group(1)


def messages(n):
    """n profiles as the consumer derives them: one new user each."""
    stamp = datetime.datetime.now(datetime.timezone.utc)
    for i in range(n):
        handle = f"benchuser{i}"
        yield {
            "uuid": str(uuid.uuid4()),
            "name": f"Bench User {i}",
            "email": f"bench-ceiling-{i}@example.com",
            "linkedin": f"linkedin.com/in/{handle}",
            "github": f"github.com/{handle}",
            "source_event_id": str(uuid.uuid4()),
            "version": 1,
            "at": stamp + datetime.timedelta(milliseconds=i),
        }


def sqlite_ceiling(results, key, store_rs, db, n, limit):
    """The SQLite store's ceiling: the consumer's upsert (read from `store_rs`) of `n` new
    profiles in a bare sqlite3 loop, one transaction per message, on the fresh file
    `db` (migrated by `userhub migrate`), with the store's pragmas (WAL,
    synchronous=FULL). Stops early after `limit` seconds."""
    rows = [(m["uuid"], m["name"], m["email"], m["linkedin"], m["github"],
             m["source_event_id"], m["version"],
             m["at"].strftime("%Y-%m-%dT%H:%M:%S.") + f"{m['at'].microsecond // 1000:03d}Z")
            for m in messages(int(n))]
    upsert = store_upsert(store_rs)
    con = sqlite3.connect(db, isolation_level=None, timeout=5)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute("PRAGMA foreign_keys = ON")
    deadline = time.time() + float(limit)
    done = 0
    start = time.perf_counter()
    for row in rows:
        con.execute("BEGIN")
        written = con.execute(upsert, row).rowcount
        con.execute("COMMIT")
        if written != 1:
            raise SystemExit(f"bench: the upsert wrote {written} rows, not 1")
        done += 1
        if time.time() >= deadline:
            break
    elapsed = time.perf_counter() - start
    con.close()
    record(results, key, {"rows": done, "elapsed_s": elapsed, "rows_per_s": done / elapsed})


def store_filter(m):
    """MongoProfileStore::upsert's filter (src/enrichment/mongo_store.rs): the user, not
    a tombstone, and an older version or the same version from another event."""
    version = m["version"]
    return {
        "uuid": m["uuid"],
        "status": {"$ne": "deleted"},
        "$or": [
            {"$or": [{"version": {"$lt": version}}, {"version": {"$exists": False}}]},
            {"version": version, "$or": [
                {"status": {"$ne": "completed"}},
                {"source_event_id": {"$ne": m["source_event_id"]}},
            ]},
        ],
    }


def mongo_ceiling(results, key, url, n, limit, which="uuid"):
    """The MongoDB store's ceiling for an idempotent upsert: update_one({uuid}, {$set …,
    $setOnInsert created_at}, upsert=True) of `n` new profiles in a bare pymongo loop,
    one call a message, with the store's write concern (majority) and unique index on
    uuid, on the fresh database of `url`. Stops early after `limit` seconds.

    which=store: the same with the store's own filter (store_filter), for comparison: a
    server that does not serve its version and tombstone conditions from the uuid index,
    like SecantusDB, scans the collection for each upsert."""
    from pymongo import WriteConcern
    client, db = mongo_database(url)
    profiles = db.get_collection(MONGO_COLLECTION, write_concern=WriteConcern("majority"))
    profiles.create_index("uuid", unique=True)
    docs = list(messages(int(n)))
    deadline = time.time() + float(limit)
    done = 0
    start = time.perf_counter()
    for m in docs:
        profiles.update_one(
            store_filter(m) if which == "store" else {"uuid": m["uuid"]},
            {
                "$set": {
                    "name": m["name"], "email": m["email"],
                    "linkedin": m["linkedin"], "github": m["github"],
                    "status": "completed", "error": None,
                    "source_event_id": m["source_event_id"], "version": m["version"],
                    "enriched_at": m["at"], "updated_at": m["at"],
                },
                "$setOnInsert": {"created_at": m["at"]},
            },
            upsert=True,
        )
        done += 1
        if time.time() >= deadline:
            break
    elapsed = time.perf_counter() - start
    client.close()
    record(results, key, {"rows": done, "elapsed_s": elapsed, "rows_per_s": done / elapsed})


def mongo_drop(url, *databases):
    import pymongo
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)
    for name in databases:
        client.drop_database(name)
    client.close()


# --- the table ------------------------------------------------------------------------------

# Rows left out of the guard on debug binaries, and why (printed whenever they are).
UNGUARDED_ON_DEBUG = {
    "services_post_paced": "a CPU-bound debug server may not sustain 0.6 × pgbench's tps, "
                           "and then the p99 is a queue: it measures the debug build's "
                           "speed, which the POST ratio already guards",
}

# Rows whose guard on debug binaries takes a smaller scale than BENCH_GOAL_SCALE, and
# why (printed whenever they are).
DEBUG_SCALE = {
    "services_post": (0.2, "the debug server is CPU-bound near 1,200 req/s while pgbench, "
                           "which no longer waits for a NOTIFY at each commit, reaches "
                           "about 10,000: 0.12 of it in one quick run"),
}


def fmt_rate(r, unit="req/s"):
    if r is None:
        return "—"
    s = f"{r.get('rps', 0):,.0f} {unit}"
    if r.get("p99_ms") is not None:
        s += f", p99 {r['p99_ms']:.1f} ms"
    bad = r.get("non2xx", 0) + r.get("other", 0)
    if bad:
        s += f" ({bad} non-2xx)"
    return s


def mark(ok):
    return "✓" if ok else "✗"


class Table:
    """The markdown table, and the guard's verdict on each row.

    A row with a goal is guarded against a gross regression only: a ratio or rate below
    half its goal × BENCH_GOAL_SCALE, a time or size above twice its goal ÷ the scale."""

    def __init__(self, results):
        self.results = results
        self.guard = os.environ.get("BENCH_GUARD") == "1"
        self.skip = set(filter(None, os.environ.get("BENCH_GUARD_SKIP", "").split(",")))
        # The debug binaries' ratios are not the release binaries': BENCH_GOAL_SCALE
        # scales the goals the guard checks (the table still shows the goals themselves).
        self.scale = float(os.environ.get("BENCH_GOAL_SCALE", "1"))
        self.debug = results.get("profile") == "debug"
        self.failures = []
        self.unguarded = {}
        self.rescaled = {}
        self.lines = []

    def row(self, label, value, ceiling="—", check="—", goal="—"):
        self.lines.append(f"| {label} | {value} | {ceiling} | {check} | {goal} |")

    def guarded(self, key):
        if not self.guard or key in self.skip:
            return False
        if self.debug and key in UNGUARDED_ON_DEBUG:
            self.unguarded[key] = UNGUARDED_ON_DEBUG[key]
            return False
        return True

    def fail(self, key, why):
        if self.guarded(key):
            self.failures.append(f"{key}: {why}")

    def missing(self, key, label, goal, optional=False):
        """A row that was not measured: a guard failure, unless the row is optional."""
        why = self.results.get(key + "_skipped", "skipped")
        self.row(label, f"not measured ({why})", goal=goal)
        if not optional:
            self.fail(key, "not measured")

    def at_least(self, key, value, goal, what):
        """A ratio or rate that should be ≥ goal."""
        scale = self.scale
        if self.debug and key in DEBUG_SCALE:
            scale, why = DEBUG_SCALE[key]
            self.rescaled[key] = f"goal × {scale}: {why}"
        if value < goal * scale / 2:
            self.fail(key, f"{what} {value:,.2f} < half of goal {goal:,}"
                      + (f" × {scale}" if scale != 1 else ""))
        return mark(value >= goal)

    def at_most(self, key, value, goal, unit):
        """A time or size that should be ≤ goal."""
        if value > 2 * goal / self.scale:
            self.fail(key, f"{value:,.2f} {unit} > twice the goal {goal:,} {unit}"
                      + (f" ÷ {self.scale}" if self.scale != 1 else ""))
        return mark(value <= goal)


CEILING = "actix-web JSON handler"

# The throughput rows: (path, userhub key, ceiling key, ceiling label, goal ratio).
RATE_ROWS = [
    ("`GET /health`, embedded, whole middleware stack", "embedded_health", "ceiling_get", CEILING, None),
    ("`GET /api/users/{uuid}`, embedded, memory cache hit", "embedded_get", "ceiling_get", CEILING, 0.7),
    ("`GET /api/users/{uuid}`, PostgreSQL, Redis cache hit", "services_get", "ceiling_get", CEILING, 0.5),
    ("`POST /api/users`, PostgreSQL + RabbitMQ", "services_post", "pgbench_create",
     "pgbench of the same user+event statement, 16 clients", 0.6),
    ("`POST /api/users`, embedded SQLite", "embedded_post", None, None, None),
]

PROFILES = {
    "embedded": "embedded (SQLite, in-process bus)",
    "services": "PostgreSQL + RabbitMQ, SQLite profile store",
}


def rate_rows(t):
    r = t.results
    t.row("`GET /api/users/{uuid}` ceiling: minimal actix-web JSON handler", "—",
          fmt_rate(r.get("ceiling_get")))
    for label, key, ckey, clabel, goal in RATE_ROWS:
        u = r.get(key)
        c = r.get(ckey) if ckey else None
        goal_s = f"≥ {goal}" if goal else "—"
        if u is None:
            t.missing(key, label, goal_s, optional=not goal)
            continue
        ceiling = "—" if not ckey else (f"{clabel}: {fmt_rate(c)}" if c else "not measured")
        paired = [r.get(k) for k in r.get(f"{key}_ceilings", "").split(",") if k]
        if paired and all(p and p.get("rps") for p in paired):
            # A read row ran between two runs of the ceiling: its ratio is to their mean.
            c = {"rps": sum(p["rps"] for p in paired) / len(paired)}
            runs = " and ".join(f"{p['rps']:,.0f}" for p in paired)
            ceiling = f"{clabel}, run before and after: {runs} req/s"
        check = "—"
        if u.get("rps") and c and c.get("rps"):
            ratio = u["rps"] / c["rps"]
            check = f"{ratio:.2f}"
            if goal:
                check += " " + t.at_least(key, ratio, goal, "ratio")
        t.row(label, fmt_rate(u), ceiling, check, goal_s)
    # The POST goal has a latency half too: the p99 at 0.6 × pgbench's tps (flat out,
    # the p99 in the row above is mostly the queue of 64 connections).
    key = "services_post_paced"
    label = "`POST /api/users` p99 at 0.6 × pgbench's tps, PostgreSQL + RabbitMQ"
    post = r.get(key)
    if post is None or post.get("p99_ms") is None:
        t.missing(key, label, "≤ 50 ms")
    else:
        # Met only at that rate: a server that falls short of it answers from a queue
        # of its own, and the p99 is not the one asked for. Within 15%, as the
        # half-load rows.
        target = r.get("services_post_paced_target")
        rps = post.get("rps", 0)
        reached = target is None or rps >= 0.85 * float(target)
        load_s = f"POST at {rps:,.0f} req/s" + (
            f", target {target} ({'reached' if reached else 'not reached'} within 15%)"
            if target else "")
        check = t.at_most(key, post["p99_ms"], 50, "ms")
        if not reached:
            check = mark(False)
        t.row(label, f"{post['p99_ms']:.1f} ms", load_s, check=check, goal="≤ 50 ms")


def keep_up_rows(t):
    for profile, label in PROFILES.items():
        key = f"{profile}_enrich"
        e = t.results.get(key)
        post = t.results.get(f"{profile}_post")
        name = f"enrichment keep-up, {label}: last enriched after last 201"
        if e is None:
            t.missing(key, name, "≤ 2 s")
            continue
        if e.get("lag_s") is None:
            value = f"not done after {e.get('timed_out_after_s')} s ({e['enriched']}/{e['users']} enriched)"
            lag = float("inf")
        else:
            lag = e["lag_s"]
            value = f"{lag:.2f} s ({e['users']:,} users; stores' timestamps: {e.get('store_lag_s', 0):.2f} s)"
        post_s = f"POST rate {post['rps']:,.0f}/s for {t.results.get('keepup_duration', '?')}" if post and post.get("rps") else "—"
        drain = "—"
        if e.get("drain_per_s") and post and post.get("rps"):
            drain = f"{min(e['drain_per_s'], 1e9) / post['rps']:.2f} (drain {e['drain_per_s']:,.0f}/s)"
        t.row(name, value, post_s, f"{drain} {t.at_most(key, lag, 2, 's')}", "≤ 2 s")


def half_load_rows(t):
    for profile, label in PROFILES.items():
        key = f"{profile}_halfload"
        h = t.results.get(key)
        name = f"creation→enriched at half the POST load, {label}: p99 of profile written − user created"
        if h is None:
            t.missing(key, name, "p99 ≤ 50 ms")
            continue
        target, rps = h["target_rps"], h.get("rps") or 0
        off = abs(rps / target - 1) if target else 1
        load = (f"POST at {rps:,.0f} req/s, target {target:,.0f} (½ flat out) "
                + ("±15% ✓" if off <= 0.15 else f"off by {off:.0%} ✗"))
        if h.get("post_p99_ms") is not None:
            load += f"; POST p99 {h['post_p99_ms']:.1f} ms"
        if h.get("p99_ms") is None:
            t.row(name, f"no user enriched ({h['users']} created)", load, "✗", "p99 ≤ 50 ms")
            t.fail(key, "no user enriched")
            continue
        value = f"p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, max {h['max_ms']:.1f} ms ({h['enriched']:,} users)"
        p99 = h["p99_ms"]
        if h["enriched"] < h["users"]:
            value += f"; {h['users'] - h['enriched']} not enriched after {h.get('timed_out_after_s')} s"
            p99 = float("inf")
        t.row(name, value, load, t.at_most(key, p99, 50, "ms"), "p99 ≤ 50 ms")


CONSUMER_NOTE = " without APP_ENV=production (see the note)"


def consumer_rows(t):
    r = t.results
    for store, label, ceiling_label, optional in [
        ("sql", "SQLite profile store", "python sqlite3 loop, one transaction a message", False),
        ("mongo", "MongoDB profile store on 127.0.0.1:27017", "pymongo loop, one update_one({uuid}, upsert) a message", True),
    ]:
        key = f"consumer_{store}"
        name = f"consumer throughput, RabbitMQ → {label}, worker-only process{CONSUMER_NOTE if store == 'sql' else ''}"
        c, ceil = r.get(key), r.get(f"{key}_ceiling")
        if c is None:
            t.missing(key, name, "≥ 1.0 × the store's ceiling", optional=optional)
            if store == "sql":
                t.missing(f"{key}_rate", f"consumer throughput, {label}, absolute", "≥ 2,000 msg/s")
            continue
        if c.get("timed_out_after_s") is not None:
            value, rate = f"not done after {c['timed_out_after_s']} s ({c['written']:,}/{c['messages']:,} written)", 0.0
        elif not c.get("msg_per_s"):
            value, rate = f"{c['messages']:,} messages, too fast to time ({c['wall_s']:.2f} s from process start)", 0.0
        else:
            rate = c["msg_per_s"]
            value = f"{rate:,.0f} msg/s ({c['messages']:,} messages in {c['window_s']:.2f} s; {c['wall_s']:.2f} s from process start)"
        if c.get("completed") is not None and c["completed"] < c["messages"]:
            value += f"; only {c['completed']:,} completed (the others failed)"
        if ceil is None:
            t.row(name, value, "not measured", "—", "≥ 1.0")
            if not optional:
                t.fail(key, "ceiling not measured")
        else:
            ratio = rate / ceil["rows_per_s"]
            ceiling = f"{ceiling_label}: {ceil['rows_per_s']:,.0f} msg/s ({ceil['rows']:,} messages)"
            alike = r.get(f"{key}_ceiling_store")
            if alike:
                ceiling += f"; the same loop with the store's own filter: {alike['rows_per_s']:,.0f} msg/s"
            t.row(name, value, ceiling, f"{ratio:.2f} {t.at_least(key, ratio, 1.0, 'ratio')}", "≥ 1.0")
        if store == "sql":
            t.row(f"consumer throughput, {label}, absolute", f"{rate:,.0f} msg/s", "—",
                  t.at_least(f"{key}_rate", rate, 2000, "msg/s"), "≥ 2,000 msg/s")


def start_rows(t):
    for profile, label in PROFILES.items():
        key = f"{profile}_start"
        s = t.results.get(key)
        start_name = f"start → first 200 from `/health`, {label} (migrated database, polled every 10 ms)"
        rss_name = f"idle RSS (VmRSS {s['idle_s'] if s else 1:g} s after the first 200, before any load), {label}"
        if s is None:
            t.missing(key, start_name, "≤ 1 s")
            t.missing(f"{profile}_rss", rss_name, "≤ 50 MB")
            continue
        t.row(start_name, f"{s['start_s']:.3f} s", check=t.at_most(key, s["start_s"], 1, "s"), goal="≤ 1 s")
        t.row(rss_name, f"{s['rss_mb']:.1f} MB", check=t.at_most(f"{profile}_rss", s["rss_mb"], 50, "MB"),
              goal="≤ 50 MB")


def table(path):
    results = load(path)
    t = Table(results)
    rate_rows(t)
    keep_up_rows(t)
    half_load_rows(t)
    consumer_rows(t)
    start_rows(t)
    header = [
        f"duration per path: {results.get('duration', '?')}, wrk -t2 -c64, POST for the keep-up "
        f"rows: {results.get('keepup_duration', '?')}, binary: {results.get('profile', '?')}, "
        f"{results.get('started', '')}",
        "",
        "| path | userhub | ceiling or load (same run) | ratio / check | goal |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(header + t.lines))
    notes = [v for k, v in sorted(results.items()) if k.startswith("note_")]
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    for key, why in sorted(t.unguarded.items()):
        print(f"bench: not guarded on debug binaries: {key}: {why}", file=sys.stderr)
    for key, why in sorted(t.rescaled.items()):
        print(f"bench: guarded on debug binaries with {key}'s {why}", file=sys.stderr)
    if t.failures:
        print("", file=sys.stderr)
        for f in t.failures:
            print(f"bench: GUARD FAILED: {f}", file=sys.stderr)
        return 3
    if t.guard:
        print("\nbench: guard passed (no gross regression"
              + (f"; not guarded: {', '.join(sorted(t.skip))}" if t.skip else "") + ")", file=sys.stderr)
    return 0


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "token":
        print(token(*args))
    elif cmd == "free-port":
        print(free_port())
    elif cmd in ("wrk", "pgbench"):
        with open(args[2]) as f:
            parsed = (parse_wrk if cmd == "wrk" else parse_pgbench)(f.read())
        record(args[0], args[1], parsed)
    elif cmd == "put":
        put(*args)
    elif cmd == "wait-up":
        return wait_up(*args)
    elif cmd == "wait-enriched":
        wait_enriched(*args)
    elif cmd == "half-rate":
        return half_rate(*args)
    elif cmd == "scaled-rate":
        return scaled_rate(*args)
    elif cmd == "creation-latency":
        creation_latency(*args)
    elif cmd == "wait-queue":
        return wait_queue(*args)
    elif cmd == "wait-profiles":
        return wait_profiles(*args)
    elif cmd == "sqlite-ceiling":
        sqlite_ceiling(*args)
    elif cmd == "mongo-ceiling":
        mongo_ceiling(*args)
    elif cmd == "mongo-drop":
        mongo_drop(*args)
    elif cmd == "table":
        return table(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
