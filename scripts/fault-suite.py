#!/usr/bin/env python3
"""The fault suite: userhub under the faults production brings.

Starts private dependencies it can stop and start (a PostgreSQL cluster made by initdb
in a temporary folder, a redis-server, the MongoDB stand-in SecantusDB, the machine's
RabbitMQ behind a TCP proxy inside this script that can cut every connection), then
userhub as two processes (`serve --roles api,relay` and `serve --roles worker`). It
drives a steady load of `POST /api/users` and injects each fault in turn: kill -9 of the
api process, kill -9 of the worker, PostgreSQL restart, broker cut, document store
down, Redis down. After each fault it waits (with a deadline) until every user created
in the phase is enriched, and prints one line of figures per fault, then a table.

Exit status 0 when the goals hold: 0 users lost, 0 enriched twice, 0 dead letters, and
no 5xx (or connection error) from POST /api/users during the document store, broker
and Redis faults. 5xx and connection errors during the PostgreSQL restart and the kill
of the api process are expected; they are reported, not failures.

Python 3.11 standard library only. Talks to 127.0.0.1 only. Cleans up every process it
started and its temporary folder, also on failure or Ctrl-C.

    scripts/fault-suite.py [--binary target/debug/userhub] [--rate 25] [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RABBIT_PORT = 5672
SECANTUS_VERSION = "0.7.0b3"
PG_BIN = Path("/usr/local/bin")
# config/test.toml (APP_ENV=test) and config/default.toml
HS256_SECRET = b"userhub-test-secret-used-only-by-the-test-suite"
ISSUER = "urn:userhub:local"
AUDIENCE = "userhub"


def say(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] fault-suite:", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(what: str, check, seconds: float, interval: float = 0.1) -> None:
    """Polls `check` until it is true; raises after `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str, roles: list[str], ttl: int = 3600) -> str:
    header = {"alg": "HS256", "typ": "JWT"}
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl,
              "roles": roles}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = hmac.new(HS256_SECRET, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


# ------------------------------------------------------------------------------------
# Processes


class Cleanup:
    """What to undo, newest first; runs once (finally, atexit, or a signal)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, object]] = []
        self.done = False

    def add(self, name: str, fn) -> None:
        self.steps.append((name, fn))

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        for name, fn in reversed(self.steps):
            try:
                fn()
            except Exception as error:  # noqa: BLE001 - clean up the rest regardless
                say(f"clean-up of {name} failed: {error}")


CLEANUP = Cleanup()


def kill_group(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def stop_gently(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    kill_group(proc)


class Postgres:
    """A private cluster in tmp/pg, owned by the postgres user when we are root."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.data = tmp / "pg"
        self.sock = tmp / "pgsock"
        self.log = tmp / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data.mkdir()
        self.sock.mkdir()
        self.log.touch()
        if os.geteuid() == 0:
            for p in (self.data, self.sock, self.log):
                shutil.chown(p, "postgres", "postgres")
        self.url = f"postgres://postgres@{HOST}:{self.port}/postgres"

    def ctl(self, *args: str, check: bool = True) -> None:
        options = (f"-p {self.port} -c listen_addresses={HOST} "
                   f"-c unix_socket_directories={self.sock} -c max_connections=50")
        cmd = [*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
               "-o", options, "-w", "-t", "60", *args]
        subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ctl("start")
        CLEANUP.add("postgres", lambda: self.ctl("stop", "-m", "immediate", check=False))
        wait_until("PostgreSQL", lambda: answers(self.port), 30)

    def restart(self) -> None:
        self.ctl("restart", "-m", "fast")


class Redis:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://{HOST}:{self.port}"
        CLEANUP.add("redis", lambda: kill_group(self.proc))

    def start(self) -> None:
        log = open(self.tmp / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until("redis-server", lambda: answers(self.port), 20)

    def stop(self) -> None:
        kill_group(self.proc)


class Secantus:
    """SecantusDB (the MongoDB stand-in of scripts/test-services.sh), in memory."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.url = f"mongodb://{HOST}:{self.port}/userhub_fault?directConnection=true"
        state = ROOT / "target" / "test-services"
        self.venv = state / "venv"
        CLEANUP.add("secantusd", lambda: kill_group(self.proc))

    def install(self) -> None:
        python = self.venv / "bin" / "python"
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        ok = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m, sys; "
             f"sys.exit(m.version('SecantusDB') != '{SECANTUS_VERSION}')"],
            stderr=subprocess.DEVNULL).returncode == 0
        if not ok or not (self.venv / "bin" / "secantusd-py").exists():
            say(f"installing SecantusDB {SECANTUS_VERSION} into {self.venv}")
            subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", f"SecantusDB=={SECANTUS_VERSION}"],
                           check=True)

    def start(self) -> None:
        log = open(self.tmp / "secantusd.log", "ab")
        # From the temporary folder, so that no stray ./secantusd.toml is picked up.
        self.proc = subprocess.Popen(
            [str(self.venv / "bin" / "secantusd-py"), "--host", HOST, "--port", str(self.port),
             "--storage-path", ":memory:", "--log-level", "WARNING"],
            cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until("SecantusDB", lambda: answers(self.port), 60)

    def stop(self) -> None:
        kill_group(self.proc)


class Proxy:
    """A TCP proxy to RabbitMQ that can cut every connection and refuse new ones."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = target_port
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.closing = False
        CLEANUP.add("proxy", self.cut)

    def up(self) -> None:
        with self.lock:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((HOST, self.port))
            listener.listen(64)
            self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Closes the listener (new connections are refused) and every open connection."""
        with self.lock:
            listener, self.listener = self.listener, None
            sockets, self.sockets = self.sockets, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((HOST, self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self.sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            for s in (source, sink):
                if s in self.sockets:
                    self.sockets.discard(s)
                    s.close()


class Userhub:
    """One `userhub serve --roles …` process; each start logs to its own file."""

    def __init__(self, binary: Path, roles: str, env: dict[str, str], tmp: Path) -> None:
        self.binary = binary
        self.roles = roles
        self.port = free_port()
        self.env = {**env, "APP__SERVER__PORT": str(self.port)}
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        CLEANUP.add(f"userhub {roles}", lambda: stop_gently(self.proc))

    def start(self) -> None:
        path = self.tmp / f"userhub-{self.roles.replace(',', '-')}-{len(self.logs)}.log"
        self.logs.append(path)
        log = open(path, "ab")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--roles", self.roles],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp,
                                     start_new_session=True)

    def wait_ready(self, seconds: float = 60) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"userhub {self.roles} exited with {self.proc.returncode}; "
                                   f"see {self.logs[-1]}")
            try:
                return http_call(self.port, "GET", "/health/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(f"userhub {self.roles} ready", ready, seconds)

    def kill9(self) -> None:
        kill_group(self.proc, signal.SIGKILL)

    def log_entries(self):
        for path in self.logs:
            with open(path, errors="replace") as f:
                for line in f:
                    if line.startswith("{"):
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            pass


# ------------------------------------------------------------------------------------
# HTTP


ADMIN = token("fault-suite", ["admin"])


def http_call(port: int, method: str, path: str, body: object | None = None,
              timeout: float = 5, conn: http.client.HTTPConnection | None = None):
    """Returns (status, parsed JSON or None, headers). Raises OSError on connection errors.

    A reused keep-alive connection the server has closed meanwhile (keep_alive_secs) is
    retried once on a fresh connection (`conn` is then closed; callers reconnect)."""
    if conn is not None and conn.sock is not None:
        try:
            return _http_call(port, method, path, body, timeout, conn)
        except OSError:
            conn = None
    return _http_call(port, method, path, body, timeout, conn)


def _http_call(port, method, path, body, timeout, conn):
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            parsed = None
        return response.status, parsed, response.headers
    except (http.client.HTTPException, OSError) as error:
        conn.close()
        raise OSError(str(error)) from error
    finally:
        if own:
            conn.close()


@dataclass
class Phase:
    fault: str
    allowed_5xx: bool
    created: dict[str, float] = field(default_factory=dict)  # uuid -> wall time of the 201
    post_5xx: int = 0
    post_conn_errors: int = 0
    other_status: int = 0
    other_5xx: int = 0  # 5xx on the reads the suite makes after the fault
    fault_start: float = 0.0
    fault_end: float = 0.0
    enriched: int = 0
    lost: list[str] = field(default_factory=list)
    twice: int = 0
    once: int = 0  # enriched (the API says completed) and logged `profile enriched` once
    unlogged: int = 0  # enriched, but no `profile enriched` line names the user
    dead_letters: int = 0
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} lost")
        if self.twice:
            out.append(f"{self.twice} enriched twice")
        if self.unlogged:
            out.append(f"{self.unlogged} enriched without a `profile enriched` line")
        if self.dead_letters:
            out.append(f"{self.dead_letters} dead letters")
        if not self.allowed_5xx and (self.post_5xx or self.post_conn_errors):
            out.append(f"{self.post_5xx} 5xx / {self.post_conn_errors} connection errors on POST")
        if not self.created:
            out.append("no user created")
        return out


class Load:
    """A few threads creating users at a bounded total rate, into the current phase."""

    def __init__(self, port: int, rate: float, threads: int = 4) -> None:
        self.port = port
        self.interval = threads / rate
        self.threads = threads
        self.phase: Phase | None = None
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.workers: list[threading.Thread] = []
        self.counter = 0

    def start(self, phase: Phase) -> None:
        self.phase = phase
        self.stop_event.clear()
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(self.threads)]
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        self.stop_event.set()
        for w in self.workers:
            w.join(timeout=30)

    def _run(self, index: int) -> None:
        phase = self.phase
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        next_at = time.monotonic() + index * self.interval / self.threads
        while not self.stop_event.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self.stop_event.wait(delay):
                break
            next_at = max(next_at + self.interval, time.monotonic() - self.interval)
            with self.lock:
                self.counter += 1
                n = self.counter
            body = {"name": f"Fault Person {n}", "email": f"fault.{n}.{uuidlib.uuid4().hex[:8]}@example.com"}
            try:
                status, parsed, _ = http_call(self.port, "POST", "/api/users", body, conn=conn)
            except OSError:
                with self.lock:
                    phase.post_conn_errors += 1
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                continue
            if conn.sock is None:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            with self.lock:
                if status == 201 and parsed and "uuid" in parsed:
                    phase.created[parsed["uuid"]] = time.time()
                elif status >= 500:
                    phase.post_5xx += 1
                else:
                    phase.other_status += 1
        conn.close()


# ------------------------------------------------------------------------------------
# The suite


def parse_ts(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="userhub-faults-"))
        os.chmod(self.tmp, 0o755)
        CLEANUP.add("temporary folder", self.remove_tmp)
        self.prefix = f"fault_{uuidlib.uuid4().hex[:10]}."
        CLEANUP.add("RabbitMQ topology", self.delete_topology)
        self.phases: list[Phase] = []

    def remove_tmp(self) -> None:
        if self.args.keep:
            say(f"kept {self.tmp}")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)

    def delete_topology(self) -> None:
        """Deletes this run's queues and exchanges (by prefix) with rabbitmqctl."""
        if not shutil.which("rabbitmqctl"):
            return
        listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"],
                                capture_output=True, text=True, timeout=60)
        queues = [q.strip() for q in listed.stdout.splitlines() if q.strip().startswith(self.prefix)]
        exchanges = [f"{self.prefix}userhub.events", f"{self.prefix}userhub.dlx"]
        erl = "[" + ",".join(
            f'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"{x}">>), false, <<"fault-suite">>)'
            for x in exchanges) + "]."
        procs = [subprocess.Popen(["rabbitmqctl", "-q", "delete_queue", q],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for q in queues]
        procs.append(subprocess.Popen(["rabbitmqctl", "-q", "eval", erl],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in procs:
            p.wait(timeout=60)
        say(f"deleted {len(queues)} queues and {len(exchanges)} exchanges named {self.prefix}*")

    # -- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        binary = Path(self.args.binary)
        if not binary.is_absolute():
            binary = ROOT / binary
        if not binary.exists():
            say(f"{binary} missing: cargo build --locked")
            subprocess.run(["cargo", "build", "--locked"], cwd=ROOT, check=True)
        if not answers(RABBIT_PORT):
            raise RuntimeError("RabbitMQ does not answer on 127.0.0.1:5672")

        self.pg = Postgres(self.tmp)
        self.redis = Redis(self.tmp)
        self.mongo = Secantus(self.tmp)
        self.proxy = Proxy(RABBIT_PORT)
        self.mongo.install()
        self.pg.init()
        self.redis.start()
        self.mongo.start()
        self.proxy.up()
        say(f"PostgreSQL :{self.pg.port}, Redis :{self.redis.port}, SecantusDB :{self.mongo.port}, "
            f"RabbitMQ proxy :{self.proxy.port} -> :{RABBIT_PORT}, temporary folder {self.tmp}")

        env = {k: v for k, v in os.environ.items()
               if not k.startswith("APP_") and k not in ("RUST_LOG", "USERHUB_ROLES")}
        env.update({
            "APP_ENV": "test",
            "APP_CONFIG_DIR": str(ROOT / "config"),
            "APP__LOG__FORMAT": "json",
            "APP__LOG__LEVEL": "info,sqlx=warn",
            "APP__DATABASE__URL": self.pg.url,
            "APP__DATABASE__MAX_CONNECTIONS": "8",
            "APP__DOCUMENTS__URL": self.mongo.url,
            "APP__CACHE__URL": self.redis.url,
            "APP__CACHE__KEY_PREFIX": self.prefix,
            "APP__BUS__URL": f"amqp://guest:guest@{HOST}:{self.proxy.port}/%2f",
            "APP__BUS__PREFIX": self.prefix,
            # Production-like retries (test.toml has 20 ms backoff and 3 attempts): a
            # transient fault must not exhaust them.
            "APP__WORKER__MAX_ATTEMPTS": "5",
            "APP__WORKER__BACKOFF_BASE_MS": "500",
            "APP__WORKER__BACKOFF_MAX_MS": "5000",
            "APP__WORKER__HANDLER_TIMEOUT_MS": "10000",
            "APP__DOCUMENTS__BREAKER_COOL_DOWN_MS": "1000",
            "APP__SERVER__READINESS_CACHE_MS": "0",
        })
        self.api = Userhub(binary, "api,relay", env, self.tmp)
        self.worker = Userhub(binary, "worker", env, self.tmp)
        self.api.start()
        self.api.wait_ready()
        self.worker.start()
        self.worker.wait_ready()
        self.load = Load(self.api.port, self.args.rate)
        say(f"userhub api,relay :{self.api.port} and worker :{self.worker.port} ready")

    # -- measuring -----------------------------------------------------------------

    def dead_letter_count(self) -> int:
        total, path = 0, "/admin/dead-letters?limit=500"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, page, headers = http_call(self.api.port, "GET", path, timeout=10)
            except OSError:
                status, page, headers = 0, None, {}
            if status == 200 and isinstance(page, list):
                total += len(page)
                link = headers.get("Link") or ""
                if 'rel="next"' not in link:
                    return total
                path = link.split(">", 1)[0].lstrip("<")
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET /admin/dead-letters answered {status}")
            time.sleep(0.5)

    def enriched_log(self) -> dict[str, list[float]]:
        """user -> timestamps of its `profile enriched` lines, in every worker log."""
        out: dict[str, list[float]] = {}
        for entry in self.worker.log_entries():
            if entry.get("message") == "profile enriched" or \
                    entry.get("fields", {}).get("message") == "profile enriched":
                user = entry.get("user") or entry.get("fields", {}).get("user")
                ts = parse_ts(entry.get("timestamp", "")) or 0.0
                out.setdefault(user, []).append(ts)
        return out

    def wait_enriched(self, phase: Phase) -> None:
        pending = set(phase.created)
        deadline = time.monotonic() + self.args.recover_timeout
        pool = ThreadPoolExecutor(max_workers=8)
        local = threading.local()
        lock = threading.Lock()
        rounds = 0

        def completed(uuid: str) -> bool:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(HOST, self.api.port, timeout=5)
            try:
                status, body, _ = http_call(self.api.port, "GET", f"/api/users/{uuid}/profile",
                                            conn=conn)
            except OSError:
                local.conn = None
                return False
            if conn.sock is None:
                local.conn = None
            if status >= 500:
                with lock:
                    phase.other_5xx += 1
            return status == 200 and (body or {}).get("enrichment", {}).get("status") == "completed"

        try:
            while pending and time.monotonic() < deadline:
                # The worker's log says who is done; the API confirms it.
                logged = self.enriched_log()
                rounds += 1
                # Every 10th round also asks about users the log does not name (yet).
                candidates = [u for u in pending if u in logged or rounds % 10 == 0]
                for uuid, done in zip(candidates, pool.map(completed, candidates)):
                    if done:
                        pending.discard(uuid)
                if pending:
                    time.sleep(0.2)
            # A last look through the API at whoever the log does not name yet.
            for uuid, done in zip(list(pending), pool.map(completed, list(pending))):
                if done:
                    pending.discard(uuid)
        finally:
            pool.shutdown()
        phase.lost = sorted(pending)
        phase.enriched = len(phase.created) - len(pending)

        # The log line is written after the store write the API reads, and reaches the
        # log file through a pipe: give the last ones a moment.
        wait_deadline = time.monotonic() + 5
        done = [u for u in phase.created if u not in pending]
        logged = self.enriched_log()
        while time.monotonic() < wait_deadline and any(u not in logged for u in done):
            time.sleep(0.2)
            logged = self.enriched_log()
        phase.twice = sum(1 for u in phase.created if len(logged.get(u, [])) > 1)
        phase.once = sum(1 for u in done if len(logged.get(u, [])) == 1)
        phase.unlogged = sum(1 for u in done if not logged.get(u))
        # Recovery: the longest any user of the phase waited for its enrichment beyond
        # the end of the fault (a user created after the end counts from its creation).
        waits = []
        for u, created_at in phase.created.items():
            if logged.get(u):
                waits.append(min(logged[u]) - max(created_at, phase.fault_end))
        if waits and not phase.lost:
            phase.recover_s = max(0.0, max(waits))
        api_enriched = sum(1 for e in self.api.log_entries() if e.get("message") == "profile enriched")
        if api_enriched:
            phase.notes.append(f"the api,relay process logged {api_enriched} enrichments")

    # -- faults --------------------------------------------------------------------

    def kill_api(self) -> None:
        self.api.kill9()
        self.api.start()
        self.api.wait_ready()

    def kill_worker(self) -> None:
        self.worker.kill9()
        time.sleep(self.args.worker_down)  # the fault itself: the worker stays dead this long
        self.worker.start()
        self.worker.wait_ready()

    def restart_postgres(self) -> None:
        self.pg.restart()

    def cut_broker(self) -> None:
        self.proxy.cut()
        time.sleep(self.args.broker_down)  # the fault itself
        self.proxy.up()

    def docstore_down(self) -> None:
        # Stopped before the load starts (see run): the stand-in runs in memory, so
        # profiles written before it went down would be gone after its restart (a real
        # MongoDB keeps them).
        time.sleep(self.args.docstore_down)  # the fault itself
        self.mongo.start()

    def redis_down(self) -> None:
        self.redis.stop()
        time.sleep(self.args.redis_down)  # the fault itself
        self.redis.start()

    def run_phase(self, fault: str, inject, allowed_5xx: bool, warm_up: float,
                  before_load=None) -> Phase:
        phase = Phase(fault, allowed_5xx)
        self.phases.append(phase)
        say(f"{fault}: start")
        dead_before = self.dead_letter_count()
        if before_load is not None:
            phase.fault_start = time.time()
            before_load()
        self.load.start(phase)
        time.sleep(warm_up)  # load before the fault
        if before_load is None:
            phase.fault_start = time.time()
        try:
            inject()
        finally:
            phase.fault_end = time.time()
            time.sleep(self.args.tail)  # load after the fault
            self.load.stop()
        self.wait_enriched(phase)
        phase.dead_letters = self.dead_letter_count() - dead_before
        print(self.line(phase), flush=True)
        if phase.lost:
            say(f"{fault}: not enriched: {', '.join(phase.lost[:20])}")
        return phase

    @staticmethod
    def line(p: Phase) -> str:
        recover = f"{p.recover_s:.1f}s" if p.recover_s is not None else "n/a"
        status = "ok" if not p.failures() else "FAIL (" + ", ".join(p.failures()) + ")"
        text = (f"fault={p.fault} created={len(p.created)} post_5xx={p.post_5xx} "
                f"post_conn_errors={p.post_conn_errors} read_5xx={p.other_5xx} "
                f"enriched={p.enriched} enriched_once={p.once} enriched_twice={p.twice} "
                f"unlogged={p.unlogged} lost={len(p.lost)} "
                f"dead_letters={p.dead_letters} fault_s={p.fault_end - p.fault_start:.1f} "
                f"recover={recover} {status}")
        if p.notes:
            text += " note: " + "; ".join(p.notes)
        return text

    def table(self) -> str:
        head = ["fault", "201", "POST 5xx", "POST conn err", "enriched", "exactly once",
                "twice", "lost", "dead letters", "fault s", "recover s", "goal"]
        rows = []
        for p in self.phases:
            rows.append([p.fault, str(len(p.created)), str(p.post_5xx), str(p.post_conn_errors),
                         str(p.enriched), str(p.once), str(p.twice), str(len(p.lost)),
                         str(p.dead_letters), f"{p.fault_end - p.fault_start:.1f}",
                         f"{p.recover_s:.1f}" if p.recover_s is not None else "n/a",
                         "ok" if not p.failures() else "FAIL"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([fmt(head), sep, *map(fmt, rows)])

    def run(self) -> bool:
        started = time.monotonic()
        self.setup()
        a = self.args
        faults = [
            ("api kill -9", self.kill_api, True, a.warm_up, None),
            ("worker kill -9", self.kill_worker, False, a.warm_up, None),
            ("postgres restart", self.restart_postgres, True, a.warm_up, None),
            (f"broker cut {a.broker_down:.0f}s", self.cut_broker, False, a.warm_up, None),
            # Down before the load starts: the stand-in runs in memory, so profiles written
            # before it went down would be gone after its restart (a real MongoDB keeps
            # them). After the worker kill on purpose: the restarted stand-in has lost
            # the unique index on uuid that the worker makes once per process.
            (f"docstore down {a.docstore_down:.0f}s", self.docstore_down, False, 0.0,
             self.mongo.stop),
            (f"redis down {a.redis_down:.0f}s", self.redis_down, False, a.warm_up, None),
        ]
        for fault, inject, allowed, warm_up, before_load in faults:
            if a.only and not any(o in fault for o in a.only):
                continue
            self.run_phase(fault, inject, allowed, warm_up, before_load)
        print("\nfault suite summary (5xx and connection errors on POST are expected only "
              "for the api kill and the PostgreSQL restart)", flush=True)
        print(self.table(), flush=True)
        ok = all(not p.failures() for p in self.phases)
        print(f"fault suite: {'PASS' if ok else 'FAIL'} in {time.monotonic() - started:.0f} s",
              flush=True)
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default="target/debug/userhub")
    parser.add_argument("--rate", type=float, default=25.0, help="creates per second")
    parser.add_argument("--warm-up", type=float, default=2.0)
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument("--worker-down", type=float, default=3.0)
    parser.add_argument("--broker-down", type=float, default=30.0)
    parser.add_argument("--docstore-down", type=float, default=60.0)
    parser.add_argument("--redis-down", type=float, default=15.0)
    parser.add_argument("--recover-timeout", type=float, default=90.0)
    parser.add_argument("--only", action="append", help="run only faults whose name contains this")
    parser.add_argument("--quick", action="store_true", help="short outages (5 s) for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()
    if args.quick:
        args.broker_down = args.docstore_down = args.redis_down = 5.0

    atexit.register(CLEANUP.run)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    suite = Suite(args)
    try:
        return 0 if suite.run() else 1
    except Exception as error:  # noqa: BLE001 - report, clean up, fail
        say(f"error: {error}")
        for p in suite.phases:
            print(Suite.line(p), flush=True)
        return 2
    finally:
        CLEANUP.run()


if __name__ == "__main__":
    sys.exit(main())
