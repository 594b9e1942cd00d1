"""Does stopping `make demo` leave nothing behind? And how fast does it stop?

Starts `make demo` on a random port in a throw-away data folder, waits for /healthz, both queue
workers and beat, checks that a second demo is refused, then sends SIGTERM to `make` (or
SIGINT to its process group, as Ctrl-C in a terminal does) and measures the seconds until no
process the demo started is left. Every such process carries the CRUCIBLE_DEMO_RUN marker in
its environment, so the check also finds processes that left the demo's process groups.

    .venv/bin/python bench/demo_stop.py              # the whole demo, training included
    .venv/bin/python bench/demo_stop.py --no-train   # serving only (what the fast test runs)
    .venv/bin/python bench/demo_stop.py --signal INT
    .venv/bin/python bench/demo_stop.py --after-kill  # a SIGKILLed demo, then the next one

Exits 1 when something is left (and kills it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MARKER_ENV = "CRUCIBLE_DEMO_RUN"
# The demo is the embedded mode in a throw-away folder, even where the environment (CI's
# production mode) points at PostgreSQL, Redis or S3.
NOT_EMBEDDED = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_BROKER_DIR", "S3_BUCKET")


def _embedded_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NOT_EMBEDDED}
    env.pop("CRUCIBLE_PUBLIC_URL", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # make and manage.py pick the default settings
    return {**env, "CRUCIBLE_DATA_DIR": str(data_dir)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARKER_ENV) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our local server
            return response.status == 200
    except OSError:
        return False


def _logged(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


def run(*, train: bool = False, sig: str = "TERM", ready_timeout: float = 600.0) -> dict:
    """Start the demo, stop it, and return the figures (``left`` lists what survived)."""
    data_dir = Path(tempfile.mkdtemp(prefix="crucible-demo-stop-"))
    port = free_port()
    marker = uuid.uuid4().hex
    env = {**_embedded_env(data_dir), MARKER_ENV: marker}
    argv = ["make", "--no-print-directory", "-o", ".venv/.installed", "demo"]
    argv += ["HOST=127.0.0.1", f"PORT={port}"] + ([] if train else ["NO_TRAIN=1"])
    out = open(data_dir / "make.out", "wb")  # noqa: SIM115
    started = time.monotonic()
    make = subprocess.Popen(  # noqa: S603
        argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    logs = data_dir / "log"
    figures: dict = {"port": port, "data_dir": str(data_dir), "signal": sig, "train": train}
    try:
        deadline = started + ready_timeout
        while time.monotonic() < deadline:
            if make.poll() is not None:
                raise RuntimeError(
                    f"make demo exited early ({make.returncode}):\n"
                    + (data_dir / "make.out").read_text(errors="replace")[-3000:]
                )
            if (
                _healthy(f"http://127.0.0.1:{port}/healthz")
                and _logged(logs / "worker-control.log", "ready.")
                and _logged(logs / "worker-long.log", "ready.")
                and _logged(logs / "beat.log", "beat: Starting")
            ):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the demo was not ready within {ready_timeout:.0f} s")
        figures["ready_s"] = round(time.monotonic() - started, 1)
        running = marked(marker)
        figures["processes"] = len(running)
        figures["banner"] = (data_dir / "make.out").read_text(errors="replace")

        # A second demo on the same installation is refused (it would start a second beat).
        second = subprocess.run(  # noqa: S603
            [sys.executable, "manage.py", "demo_run", "--no-train", "--port", str(free_port())],
            cwd=ROOT,
            env={**env, MARKER_ENV: marker + "-second"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        figures["second_refused"] = (
            second.returncode != 0 and "already running" in second.stderr + second.stdout
        )

        stop_at = time.monotonic()
        if sig == "INT":
            os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            make.send_signal(signal.SIGTERM)
        left = running
        while time.monotonic() - stop_at < 60:
            left = marked(marker)
            if not left and make.poll() is not None:
                break
            time.sleep(0.05)
        figures["stop_s"] = round(time.monotonic() - stop_at, 2)
        figures["left"] = [f"{p.pid} {' '.join(_cmdline(p))[:120]}" for p in left if _exists(p)]
        figures["make_exit"] = make.poll()
        figures["output"] = (data_dir / "make.out").read_text(errors="replace")
        return figures
    finally:
        for proc in marked(marker):
            with_suppress(proc.kill)
        if make.poll() is None:
            with_suppress(lambda: os.killpg(make.pid, signal.SIGKILL))
        out.close()


def _ready(port: int, logs: Path, since: dict[str, int]) -> bool:
    """/healthz answers and both workers and beat logged their start after ``since``."""
    wanted = {"worker-control": "ready.", "worker-long": "ready.", "beat": "beat: Starting"}
    for name, text in wanted.items():
        try:
            with open(logs / f"{name}.log", "rb") as handle:
                handle.seek(since.get(name, 0))
                if text.encode() not in handle.read():
                    return False
        except OSError:
            return False
    return _healthy(f"http://127.0.0.1:{port}/healthz")


def _log_sizes(logs: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_size for p in logs.glob("*.log")} if logs.is_dir() else {}


def run_after_kill(*, ready_timeout: float = 300.0) -> dict:
    """A demo whose supervisor was SIGKILLed leaves its processes (its signal handler never
    ran); the next demo stops them before it starts, so there is one beat, not two."""
    data_dir = Path(tempfile.mkdtemp(prefix="crucible-demo-stale-"))
    first_marker, second_marker = uuid.uuid4().hex, uuid.uuid4().hex
    env = _embedded_env(data_dir)
    logs = data_dir / "log"
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    procs: list[subprocess.Popen] = []

    def start(marker: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        since = _log_sizes(logs)
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "manage.py", "demo_run", "--no-train", "--port", str(port)],
            cwd=ROOT,
            env={**env, MARKER_ENV: marker},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + ready_timeout
        while not _ready(port, logs, since):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"demo_run not ready (exit {proc.poll()})")
            time.sleep(0.5)
        return proc, port

    figures: dict = {}
    try:
        first, _ = start(first_marker)
        first.kill()  # SIGKILL: no clean-up by the supervisor
        first.wait()
        time.sleep(1)
        figures["orphans_after_kill"] = len(marked(first_marker))
        second, _ = start(second_marker)
        figures["first_left_after_second_start"] = [
            " ".join(_cmdline(p))[:120] for p in marked(first_marker)
        ]
        figures["beats"] = sum(
            1
            for p in marked(second_marker) + marked(first_marker)
            if "beat" in _cmdline(p) and "-m" in _cmdline(p)
        )
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        time.sleep(0.5)
        figures["left"] = [
            " ".join(_cmdline(p))[:120] for p in marked(first_marker) + marked(second_marker)
        ]
        return figures
    finally:
        for marker in (first_marker, second_marker):
            for proc in marked(marker):
                with_suppress(proc.kill)
        for proc in procs:
            if proc.poll() is None:
                with_suppress(proc.kill)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return ["?"]


def _exists(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def with_suppress(fn) -> None:
    with contextlib.suppress(psutil.Error, OSError):
        fn()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-train", action="store_true", help="Skip the demo training step")
    parser.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    parser.add_argument(
        "--after-kill", action="store_true", help="SIGKILL a demo, then check the next one"
    )
    args = parser.parse_args()
    if args.after_kill:
        figures = run_after_kill()
        print(
            f"after SIGKILL: {figures['orphans_after_kill']} orphans; the next demo left "
            f"{len(figures['first_left_after_second_start'])} of them and ran "
            f"{figures['beats']} beat; left after stopping it: {len(figures['left'])}"
        )
        return 1 if figures["left"] or figures["first_left_after_second_start"] else 0
    figures = run(train=not args.no_train, sig=args.signal)
    print(
        f"demo ready in {figures['ready_s']} s with {figures['processes']} processes; "
        f"second demo refused: {figures['second_refused']}; "
        f"SIG{figures['signal']} -> everything stopped in {figures['stop_s']} s "
        f"(make exit {figures['make_exit']}); left behind: {len(figures['left'])}"
    )
    for line in figures["left"]:
        print("  left:", line)
    return 1 if figures["left"] or not figures["second_refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
