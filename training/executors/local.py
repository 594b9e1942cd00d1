"""The local executor: the worker (`python -m gpu.train`) as a subprocess of this machine.

The handle is ``<pid>:<start time>`` so a recycled pid is never mistaken for the worker.
Logs go to ``<data dir>/jobs/<job id>/worker-<attempt>.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from config.addresses import answers_healthz, explicit_public_url
from gpu.webhooks import REACHABLE_AGAIN_MARK, REJECTED_MARK, UNREACHABLE_MARK
from training.errors import PlatformAddressError
from training.executors.base import ExecutorState, ExecutorStatus

LOG_TAIL_BYTES = 256 * 1024  # enough of a worker log to find its last delivery report


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[19]


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _reap(pid: int) -> int | None:
    """Collect the exit status when this process is the worker's parent."""
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if waited == 0:
        return None
    return os.waitstatus_to_exitcode(status)


class LocalExecutor:
    name = "local"

    def job_dir(self, job_id: str) -> Path:
        path = Path(settings.DATA_DIR) / "jobs" / str(job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def check_webhook(self, url: str) -> None:
        """Refuse a worker that could not report: nothing answers at the platform's address."""
        base = url.split("/api/v1/", 1)[0]
        if answers_healthz(base):
            return
        if explicit_public_url():
            where = f"CRUCIBLE_PUBLIC_URL={explicit_public_url()}"
        else:
            where = f"{base}, the newest address a web server of this installation answered on"
        raise PlatformAddressError(
            f"Nothing answers at {base}/healthz ({where}), so the worker could not report. "
            "Start the web server, or set CRUCIBLE_PUBLIC_URL to the address it serves "
            "(`make demo PORT=8765` sets it for you).",
            error_type="PlatformUnreachableError",
            url=base,
        )

    def launch(self, *, job_id: str, attempt: int, spec: dict, env: dict) -> str:
        url = (spec.get("webhook") or {}).get("url")
        if url:
            self.check_webhook(url)
        folder = self.job_dir(job_id)
        spec_path = folder / f"spec-{attempt}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        spec_path.chmod(0o600)  # holds the webhook secret
        log = open(folder / f"worker-{attempt}.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gpu.train", "--spec", str(spec_path)],
            cwd=settings.BASE_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # survives a restart of the Celery worker that launched it
        )
        log.close()
        return f"{process.pid}:{_proc_start_time(process.pid) or ''}"

    def _pid(self, ref: str) -> tuple[int, str]:
        pid, _, started = ref.partition(":")
        return int(pid), started

    def status(self, *, ref: str) -> ExecutorStatus:
        pid, started = self._pid(ref)
        exit_code = _reap(pid)
        state = _proc_state(pid)
        if state is None or state in ("Z", "X") or exit_code is not None:
            return ExecutorStatus(ExecutorState.EXITED, exit_code=exit_code)
        if started and _proc_start_time(pid) != started:
            return ExecutorStatus(ExecutorState.EXITED, detail="pid reused by another process")
        return ExecutorStatus(ExecutorState.RUNNING)

    def cancel(self, *, ref: str, force: bool = False) -> None:
        if not self.status(ref=ref).alive:
            return
        pid, _ = self._pid(ref)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)

    def delivery_problem(self, *, job_id: str, attempt: int) -> str:
        """Why the worker's webhooks are not delivered, from its log ("" when they are, as
        far as its log says): the worker spools events it cannot deliver and logs so."""
        path = Path(settings.DATA_DIR) / "jobs" / str(job_id) / f"worker-{attempt}.log"
        try:
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = text.splitlines()
        last = {
            mark: max((i for i, line in enumerate(lines) if mark in line), default=-1)
            for mark in (UNREACHABLE_MARK, REACHABLE_AGAIN_MARK, REJECTED_MARK)
        }
        rejected = lines[last[REJECTED_MARK]].split(REJECTED_MARK, 1)[-1].strip()
        if last[REJECTED_MARK] > last[REACHABLE_AGAIN_MARK] and rejected[:3] in ("401", "404"):
            line = lines[last[REJECTED_MARK]]
            return "the address answered but refused the events (" + (
                line.split(REJECTED_MARK, 1)[1].strip()[:200] + "): another server answers there"
            )
        if last[UNREACHABLE_MARK] > last[REACHABLE_AGAIN_MARK]:
            line = lines[last[UNREACHABLE_MARK]]
            return line.split(UNREACHABLE_MARK, 1)[1].strip("; ")[:400]
        return ""

    def logs(self, *, job_id: str, tail: int = 200) -> str:
        folder = Path(settings.DATA_DIR) / "jobs" / str(job_id)
        logs = sorted(folder.glob("worker-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        lines: list[str] = []
        for path in logs:
            lines.append(f"===== {path.name} =====")
            lines.extend(path.read_text(errors="replace").splitlines())
        return "\n".join(lines[-tail:])
