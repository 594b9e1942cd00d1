"""Run the demo: train once (reused later), then serve with the two queue workers and beat.

`make demo` ends in this command. It is a small supervisor:

- every process it starts (the demo training, the web server, the `control` and `long` Celery
  workers, the beat scheduler) gets its own process group, so one signal reaches a process and
  everything it forked;
- SIGINT/SIGTERM (Ctrl-C, or SIGTERM to `make`, which GNU make forwards to its children) stops
  them all: SIGTERM to each group, then SIGKILL after ``--grace`` seconds. A Celery worker's warm
  shutdown would otherwise wait for a validation run of up to hours to finish; an interrupted
  long task is picked up again by the reconcile on the next start;
- local training workers that a Celery worker launched detach into their own session by design
  (they survive a worker restart). The supervisor makes itself a child subreaper (Linux) and
  stops every descendant too, so stopping the demo leaves nothing behind;
- a lock under ``<data dir>/run/`` refuses a second demo (and so a second beat scheduler) while
  one runs; processes left by a demo that was SIGKILLed are stopped on the next start.

We supervise by hand rather than with honcho/supervisord: neither kills a process's whole group
and its detached descendants, nor holds a lock against a second scheduler.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from config.management.commands.demo_setup import (
    DEMO_PASSWORD,
    DEMO_USERNAME,
    chat_curl,
    demo_samples_lines,
)

DEMO_FILE = "samples/training/financial_advisor_v1.jsonl"
DEMO_JOB_NAME = "Demo: Elena Morales smoke run"
DEMO_TAG = "demo"
MARKER_ENV = "CRUCIBLE_DEMO_RUN"  # set on every process the demo starts (tests find them by it)
# A Celery worker's warm shutdown (SIGTERM) waits for running tasks, a validation run for hours;
# its cold shutdown (SIGQUIT) stops the pool at once. The reconcile resumes interrupted work.
COLD_SHUTDOWN = signal.SIGQUIT
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}  # noqa: S104 - names, not a bind


def public_url(host: str, port: int) -> str:
    """The address links and webhooks use: the served one, loopback for a wildcard bind."""
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def demo_job_to_reuse():
    """The newest completed demo job (tagged ``demo``), or None."""
    from training.models import JobStatus, TrainingJob

    candidates = TrainingJob.objects.filter(
        status=JobStatus.COMPLETED, name__startswith="Demo:"
    ).order_by("-completed_at", "-created_at")[:20]
    return next((job for job in candidates if DEMO_TAG in (job.tags or [])), None)


class Supervisor:
    """Starts commands in their own process groups and stops all of them, and their
    descendants, on request."""

    def __init__(self, *, env: dict, log_dir: Path, grace: float, stdout, state_file: Path):
        self.env = env
        self.log_dir = log_dir
        self.grace = grace
        self.stdout = stdout
        self.state_file = state_file
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.signal_name = ""
        self.killed: list[str] = []
        self.stop_signals: dict[int, int] = {}

    def start(
        self, name: str, argv: list[str], *, log: bool = True, stop_signal: int = signal.SIGTERM
    ) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.log", "ab") if log else None  # noqa: SIM115
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and tools
            argv,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a signal reaches its forks too
        )
        if out is not None:
            out.close()
        self.children[name] = process
        self.stop_signals[process.pid] = stop_signal
        self._save_state()
        return process

    def _save_state(self) -> None:
        state = {"supervisor": os.getpid(), "groups": [p.pid for p in self.children.values()]}
        self.state_file.write_text(json.dumps(state))

    def on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stopping = True

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process().children(recursive=True)
        except psutil.Error:
            return []

    def stop_all(self) -> float:
        """SIGTERM every group and descendant, SIGKILL what is left after the grace period.
        Returns the seconds it took."""
        started = time.monotonic()
        procs = {p.pid: p for p in self.descendants()}
        custom = set()  # groups whose leader stops its own forks (a Celery worker's pool)
        for child in self.children.values():
            sig = self.stop_signals.get(child.pid, signal.SIGTERM)
            if sig == signal.SIGTERM:
                _signal_group(child.pid, signal.SIGTERM)
            else:
                custom.add(child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, sig)
        for proc in procs.values():
            if proc.pid not in custom and _pgid(proc.pid) not in custom:
                _signal(proc, signal.SIGTERM)
        deadline = started + self.grace
        while time.monotonic() < deadline:
            # Orphans of the dying processes are reparented to us (subreaper): include them.
            procs.update({p.pid: p for p in self.descendants()})
            alive = [p for p in procs.values() if _alive(p)]
            if not alive:
                break
            time.sleep(0.1)
        procs.update({p.pid: p for p in self.descendants()})
        self.killed = [" ".join(_cmdline(p))[:80] for p in procs.values() if _alive(p)]
        for child in self.children.values():
            _signal_group(child.pid, signal.SIGKILL)
        procs.update({p.pid: p for p in self.descendants()})
        for proc in procs.values():
            _signal(proc, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in procs.values()):
            time.sleep(0.05)
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        self._reap_orphans()
        self.children.clear()
        self.state_file.unlink(missing_ok=True)
        return time.monotonic() - started

    def _reap_orphans(self) -> None:
        """Reap exited orphans reparented to us (as subreaper); our own children are left to
        their Popen objects, which need their exit status."""
        ours = {p.pid for p in self.children.values()}
        for proc in psutil.Process().children():
            if proc.pid not in ours and not _alive(proc):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(proc.pid, os.WNOHANG)

    def wait(self, critical: set[str]) -> str | None:
        """Sleep until a signal arrives or a critical process exits; the name of the one that
        exited, or None for a signal."""
        while not self.stopping:
            for name in critical:
                process = self.children.get(name)
                if process is not None and process.poll() is not None:
                    return name
            self._reap_orphans()
            time.sleep(0.2)
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return ["?"]


def _signal(proc: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _become_subreaper() -> None:
    """Orphaned descendants (a detached training worker whose Celery worker died) are
    reparented to us instead of init, so stop_all still finds them. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _stop_stale(state_file: Path, stdout) -> None:
    """Stop the process groups a SIGKILLed demo left (a stale beat would be a second
    scheduler). Only groups whose processes still carry a demo marker are touched."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return
    stale = []
    for pgid in state.get("groups", []):
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == pgid and MARKER_ENV in proc.environ():
                    stale.append(proc)
            except (ProcessLookupError, psutil.Error, OSError):
                continue
    if stale:
        stdout.write(f"Stopping {len(stale)} process(es) left by an earlier demo that was killed.")
        for proc in stale:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(stale, timeout=5)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
    state_file.unlink(missing_ok=True)


class Command(BaseCommand):
    help = (
        "Run the demo: train the sample file once (reused on later runs), then serve the "
        "dashboard with the control and long Celery workers and beat. Ctrl-C or SIGTERM stops "
        "everything it started."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--retrain", action="store_true", help="Train a new demo job even if one completed"
        )
        parser.add_argument("--no-train", action="store_true", help="Skip the demo training")
        parser.add_argument(
            "--grace", type=float, default=3.0, help="Seconds between SIGTERM and SIGKILL"
        )

    def handle(self, *args, host, port, retrain, no_train, grace, **options):
        run_dir = Path(settings.DATA_DIR) / "run"
        log_dir = Path(settings.DATA_DIR) / "log"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)

        # One demo at a time: the lock is released by the kernel however this process ends.
        lock = open(run_dir / "demo.lock", "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise CommandError(
                f"A demo is already running (pid {holder}); stop it first (Ctrl-C in its "
                "terminal, or kill that pid). Two demos would run two beat schedulers."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()

        state_file = run_dir / "demo.json"
        _stop_stale(state_file, self.stdout)
        # Nothing of the platform runs now: the metric files of earlier runs' processes go.
        from config.metrics import reset_dir

        reset_dir()
        _become_subreaper()

        url = os.environ.get("CRUCIBLE_PUBLIC_URL") or public_url(host, port)
        env = {
            **os.environ,
            "CRUCIBLE_PUBLIC_URL": url,
            MARKER_ENV: os.environ.get(MARKER_ENV) or uuid.uuid4().hex,
            "PYTHONUNBUFFERED": "1",
        }
        supervisor = Supervisor(
            env=env, log_dir=log_dir, grace=grace, stdout=self.stdout, state_file=state_file
        )
        previous = {
            sig: signal.signal(sig, supervisor.on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }

        python = sys.executable
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        celery = [python, "-m", "celery"]  # the same interpreter, whatever its bin/ holds
        try:
            if not no_train:
                job = None if retrain else demo_job_to_reuse()
                if job is not None:
                    self.stdout.write(
                        f"Reusing the demo job “{job.name}” ({job.pk}); "
                        "`make demo RETRAIN=1` trains a new one."
                    )
                else:
                    self.stdout.write("Training the demo job (a few minutes on a CPU)...")
                    supervisor.start(
                        "train",
                        [
                            python,
                            manage,
                            "train",
                            "--file",
                            str(Path(settings.BASE_DIR) / DEMO_FILE),
                            "--preset",
                            "smoke",
                            "--user",
                            DEMO_USERNAME,
                            "--name",
                            DEMO_JOB_NAME,
                            "--tag",
                            DEMO_TAG,
                        ],
                        log=False,  # its progress goes to this terminal
                    )
                    supervisor.wait({"train"})
                    if supervisor.stopping:
                        return self._stop(supervisor)
                    if supervisor.children["train"].returncode != 0:
                        self.stdout.write(
                            self.style.WARNING(
                                "The demo training job failed: the dashboard shows why."
                            )
                        )
                    del supervisor.children["train"]

            supervisor.start("web", [python, manage, "runserver", f"{host}:{port}", "--noreload"])
            if os.environ.get("MODEL_SERVER") == "1":
                # Opt-in: the OpenAI-compatible model server (gpu/serve.py) beside the web, as
                # the gateway's crucible-server provider (README: Serving). Without it the
                # offline models load in-process on first use.
                server_port = os.environ.get("MODEL_SERVER_PORT", "8765")
                supervisor.start("model-server", [python, "-m", "gpu.serve", "--port", server_port])
                supervisor.start(
                    "model-server-sync",
                    [python, manage, "model_server", "--wait", "300",
                     "--url", f"http://127.0.0.1:{server_port}/v1"],
                )  # fmt: skip
            supervisor.start(
                "worker-control",
                [*celery, "-A", "config", "worker", "-Q", "control", "-c", "2", "-n",
                 "control@%h", "--loglevel=INFO"],
                stop_signal=COLD_SHUTDOWN,
            )  # fmt: skip
            supervisor.start(
                "worker-long",
                [*celery, "-A", "config", "worker", "-Q", "long", "-c", "1", "-n", "long@%h",
                 "--loglevel=INFO"],
                stop_signal=COLD_SHUTDOWN,
            )  # fmt: skip
            supervisor.start(
                "beat",
                [*celery, "-A", "config", "beat", "--loglevel=INFO",
                 "--pidfile", str(run_dir / "celerybeat.pid")],
            )  # fmt: skip
            self._banner(url, log_dir)
            exited = supervisor.wait({"web", "worker-control", "worker-long", "beat"})
            if exited:
                self.stderr.write(
                    f"The {exited} process stopped (see {log_dir / (exited + '.log')}); "
                    "stopping the demo."
                )
            return self._stop(supervisor, failed=bool(exited))
        except BaseException:
            supervisor.stop_all()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.close()

    def _banner(self, url: str, log_dir: Path) -> None:
        from rest_framework.authtoken.models import Token

        token = Token.objects.filter(user__username=DEMO_USERNAME).first()
        host = urlsplit(url).netloc
        self.stdout.write(
            self.style.SUCCESS(f"Dashboard: {url}/")
            + f"  (sign in as {DEMO_USERNAME} / {DEMO_PASSWORD})"
            + (
                f"\nTry:       curl -H 'Authorization: Token {token.key}' {url}/api/v1/me"
                if token
                else ""
            )
            + "\nSample work on the offline models (the workers run what is still queued):\n"
            + "\n".join(demo_samples_lines(url))
            + ("\nOpenAI-compatible API (/v1/):\n  " + chat_curl(url, token.key) if token else "")
            + f"\nServing on {host} with the control and long Celery workers and beat; "
            f"logs in {log_dir}/.\nPress Ctrl-C to stop everything."
        )
        self.stdout.flush()

    def _stop(self, supervisor: Supervisor, failed: bool = False) -> None:
        why = f" ({supervisor.signal_name})" if supervisor.signal_name else ""
        self.stdout.write(f"Stopping the demo{why}...")
        self.stdout.flush()
        seconds = supervisor.stop_all()
        if supervisor.killed:
            self.stdout.write(
                f"Killed after {supervisor.grace:.0f} s: " + "; ".join(supervisor.killed)
            )
        self.stdout.write(f"Demo stopped in {seconds:.1f} s: nothing it started is running.")
        if failed:
            raise CommandError("A demo process stopped unexpectedly.", returncode=1)
