"""Dedicated services for the fault-injection tests (tests/config/test_faults.py).

Each test stack owns its own PostgreSQL cluster, Redis server and moto S3 server, on free
loopback ports in a temporary folder, and runs the platform against them in subprocesses: the
web server (gunicorn, as ``make serve``), Celery workers (as ``make worker``) and, through the
local executor, the real training worker. Stopping or restarting one of these services
affects only the processes of that stack, never the machine's shared PostgreSQL (5432) or
Redis (6379).

The test process itself reads the stack's database with psycopg (``Stack.sql``) and talks to
the platform through its HTTP API, as a user would; it never connects Django to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.workers import wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pg_binary(name: str) -> str | None:
    for folder in PG_BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def missing_binaries() -> list[str]:
    """The service binaries these tests need and this machine lacks."""
    missing = [name for name in ("initdb", "pg_ctl") if not pg_binary(name)]
    if not shutil.which("redis-server"):
        missing.append("redis-server")
    if not (BIN / "moto_server").exists():
        missing.append("moto_server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a 'postgres' user (initdb refuses to run as root)")
    return missing


class Postgres:
    """A throw-away PostgreSQL cluster (trust auth, fsync off) on a free loopback port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.port = free_port()
        self.name = "crucible"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/{self.name}"
        self._run_as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as "postgres"
            user = pwd.getpwnam("postgres")
            os.chown(folder, user.pw_uid, user.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self._ctl(
            [
                pg_binary("initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )

    def _ctl(self, command: list) -> None:
        subprocess.run(
            [*self._run_as, *command], check=True, capture_output=True, timeout=120, cwd=self.folder
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._ctl(
            [
                pg_binary("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._ctl([pg_binary("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop"])

    def create_database(self) -> None:
        with self.connect("postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def connect(self, dbname: str | None = None):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=dbname or self.name,
            connect_timeout=5,
        )


class Redis:
    """A redis-server without persistence (as CI's): a restart loses everything in it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=(self.folder / "redis.log").open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: _port_open(self.port), 20, "redis-server to listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


class Moto:
    """The S3 server (moto) in its own process, behind a TCP gate owned by the test.

    moto keeps buckets and objects in memory, so a restarted moto has lost every object, which
    a real S3 outage does not do. To the platform and the training worker, a stopped S3
    server is an address that refuses connections: the gate stops listening and drops every
    open connection (``down()``) and listens again (``up()``), while moto keeps its data.
    """

    def __init__(self, folder: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=(folder / "moto.log").open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # The gate's address is known at once; it forwards once moto listens (``wait``).
        self.gate = TcpGate(self.port)
        self.url = f"http://127.0.0.1:{self.gate.port}"

    def wait(self) -> None:
        wait_until(
            lambda: self.proc.poll() is not None or _port_open(self.port),
            60,
            "moto_server to listen",
        )
        assert self.proc.poll() is None, "moto_server exited"

    def stop(self) -> None:
        self.gate.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class TcpGate:
    """A loopback TCP forwarder that can refuse connections for a while."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.refused_since: float | None = None
        self._armed: tuple[bytes, float] | None = None
        self.tripped_at: float | None = None
        self.restored_at: float | None = None
        self.up()

    def arm(self, pattern: bytes, down_for: float | None = None) -> None:
        """At the first request that carries ``pattern``, cut it midway and refuse every
        connection for ``down_for`` seconds, or until ``up()`` when None (``tripped_at``,
        ``restored_at``: monotonic)."""
        self._armed = (pattern, down_for)
        self.tripped_at = self.restored_at = None

    def _trip(self) -> None:
        self._armed, (_, down_for) = None, self._armed
        self.tripped_at = time.monotonic()
        self.down()
        if down_for is None:
            return

        def restore() -> None:
            time.sleep(down_for)
            self.up()

        threading.Thread(target=restore, daemon=True).start()

    def up(self) -> None:
        if self._listener is not None:
            return
        if self.tripped_at is not None and self.restored_at is None:
            self.restored_at = time.monotonic()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self.refused_since = None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        self.refused_since = time.monotonic()
        if listener:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, server))
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upstream), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool = False) -> None:
        try:
            while data := source.recv(65536):
                armed = self._armed
                if upstream and armed and armed[0] in data:
                    sink.sendall(data[: len(data) // 2])  # half a request reaches the server
                    self._trip()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(source)


class Stack:
    """PostgreSQL, Redis, moto, the web server and Celery workers, all this stack's own."""

    def __init__(self, extra_env: dict[str, str] | None = None, web: bool = True):
        self.folder = Path(tempfile.mkdtemp(prefix="crucible-faults-"))
        self.folder.chmod(0o755)
        self.data_dir = self.folder / "data"
        self.data_dir.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self._migrate: subprocess.Popen | None = None
        try:
            self._start(extra_env, web)
        except BaseException:
            self.stop()  # whatever had started: a failed set-up leaves no server behind
            raise

    def _start(self, extra_env: dict[str, str] | None, web: bool) -> None:
        """Everything boots side by side where it can: moto while the cluster is created, the
        web server and the bucket while the database is migrated (a minute on a busy CI
        machine, the longest part)."""
        self.timings: dict[str, float] = {}
        started = time.monotonic()
        self.bucket = "crucible-faults"
        self.redis = Redis(self._sub("redis"))
        self.redis.start()
        self.s3 = Moto(self._sub("s3"))
        self.pg = Postgres(self._sub("pg"))
        self.pg.start()
        self.pg.create_database()
        self.timings["postgres_s"] = time.monotonic() - started
        self.web_port = free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))},
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.pg.url,
            "DB_CONN_MAX_AGE": "60",
            "REDIS_URL": self.redis.url,
            "CELERY_BROKER_URL": self.redis.url,
            "S3_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.s3.url,
            "S3_ACCESS_KEY_ID": "ci",
            "S3_SECRET_ACCESS_KEY": "ci-secret",
            "S3_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "ci",
            "AWS_SECRET_ACCESS_KEY": "ci-secret",
            "CRUCIBLE_DATA_DIR": str(self.data_dir),
            "CRUCIBLE_MODEL_CACHE": str(ROOT / "var" / "models"),
            "CRUCIBLE_PUBLIC_URL": self.url,
            "PROMETHEUS_MULTIPROC_DIR": str(self.data_dir / "prometheus"),
            "SECRET_KEY": uuid.uuid4().hex * 2,
            "API_RATE_LIMIT": "100000/m",
            "LOG_FORMAT": "text",
            "EVALUATION_AUTO_START": "0",
            # The worker resends quickly once the platform answers again.
            "CRUCIBLE_WEBHOOK_BACKOFF_BASE": "0.5",
            "CRUCIBLE_WEBHOOK_IDLE_RETRY": "1",
            **(extra_env or {}),
        }
        # One Django process migrates and creates the admin (each start costs seconds).
        migrate_log = self.folder / "migrate.log"
        self._migrate = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "shell",
                "-c",
                "from django.core.management import call_command; "
                "call_command('migrate', interactive=False, verbosity=0); "
                "call_command('crucible_user', 'faults', role='admin', token=True)",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=migrate_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.s3.wait()
        self._create_bucket()
        if web:
            self.start_web()  # /healthz needs no database
        assert self._migrate.wait(timeout=600) == 0, migrate_log.read_text()[-4000:]
        self.timings["migrated_s"] = time.monotonic() - started
        out = migrate_log.read_text()
        self.token = out.rsplit("API token:", 1)[1].split()[0]

    # --- processes -----------------------------------------------------------------------------
    def _sub(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir()
        path.chmod(0o777)
        return path

    def _create_bucket(self) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.s3.url,
            region_name="us-east-1",
            aws_access_key_id="ci",
            aws_secret_access_key="ci-secret",
        ).create_bucket(Bucket=self.bucket)

    def manage(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-4000:])
        return result.stdout

    def spawn(
        self, name: str, command: list[str], ready: Callable[[str], bool]
    ) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill takes its children with it
        )
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        wait_until(
            lambda: proc.poll() is not None or ready(log.read_text(errors="replace")),
            120,
            f"{name} to start",
        )
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return proc

    def start_web(self) -> subprocess.Popen:
        return self.spawn(
            "web",
            [
                str(BIN / "gunicorn"),
                "config.wsgi",
                "--bind",
                f"127.0.0.1:{self.web_port}",
                "--workers",
                "1",
                "--threads",
                "8",
                "--timeout",
                "120",
            ],
            lambda text: "Booting worker" in text and self.healthz(),
        )

    def start_worker(self, name: str, queues: str, concurrency: int = 2, app: str = "config"):
        return self.spawn(
            name,
            [
                str(BIN / "celery"),
                "-A",
                app,
                "worker",
                "-Q",
                queues,
                "-c",
                str(concurrency),
                "-n",
                f"{name}-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            lambda text: " ready." in text,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)

    def stop(self) -> None:
        if self._migrate is not None and self._migrate.poll() is None:
            os.killpg(self._migrate.pid, signal.SIGKILL)
            self._migrate.wait()
        # All at once, then waited for (one by one, each would cost its own shutdown).
        running = [proc for proc in self.procs.values() if proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3  # nothing of theirs needs keeping
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._kill_training_workers()
        if hasattr(self, "s3"):
            self.s3.stop()
        if hasattr(self, "redis"):
            self.redis.stop()
        if hasattr(self, "pg"):
            with contextlib.suppress(Exception):
                self.pg.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_training_workers(self) -> None:
        """Training workers run in their own sessions (they outlive a Celery restart)."""
        marker = str(self.data_dir)
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "gpu.train" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(proc_dir.name), signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    # --- talking to it -------------------------------------------------------------------------
    def healthz(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:  # noqa: S310
                return response.status == 200
        except OSError:
            return False

    def request(
        self, method: str, path: str, body=None, headers=None, timeout: float = 30, anonymous=False
    ):
        """(status, JSON body) of an API call as the stack's admin (or nobody)."""
        auth = {} if anonymous else {"Authorization": f"Token {self.token}"}
        data, all_headers = None, {**auth, **(headers or {})}
        if isinstance(body, dict):
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        elif body is not None:
            data = body
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.url}{path}", data=data, method=method, headers=all_headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def readyz(self) -> dict:
        # Anonymous: a token is checked in the database, which may be the part that is down.
        status, body = self.request("GET", "/readyz", timeout=15, anonymous=True)
        return body if isinstance(body, dict) else {"status": f"HTTP {status}"}

    def upload_training_file(self, content: bytes, name: str = "faults") -> str:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{name}.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, answer = self.request(
            "POST",
            "/api/v1/training-files",
            body=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert status == 201, answer
        return answer["id"]

    def create_job(self, training_file_id: str, name: str, overrides: dict) -> str:
        status, answer = self.request(
            "POST",
            "/api/v1/training/jobs",
            {
                "training_file_id": training_file_id,
                "preset": "smoke",
                "name": name,
                "overrides": overrides,
                "start": True,
            },
        )
        assert status == 201, answer
        return answer["id"]

    def redis_queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue of this stack's Redis (every priority list)."""
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            keys = [k for k in client.keys(f"{queue}*") if client.type(k) == b"list"]
            return sum(client.llen(k) for k in keys)
        finally:
            client.close()

    def sql(self, query: str, *params) -> list[tuple]:
        with self.pg.connect() as conn:
            return conn.execute(query, params).fetchall()

    def send_task(self, name: str, args: tuple = (), queue: str = "control") -> None:
        """Enqueue a task on this stack's broker, as the beat scheduler does."""
        from celery import Celery

        sender = Celery("faults-sender", broker=self.redis.url)
        try:
            sender.send_task(name, args=args, queue=queue, routing_key=queue)
        finally:
            sender.close()
