"""The demo: set-up (user, token, sample corpus), reuse of the demo job, its addresses, and
that stopping `make demo` leaves no process behind (bench/demo_stop.py)."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from config.management.commands import demo_run
from corpora.models import Corpus
from corpora.services import training_file_create
from tests.training.conftest import conversations
from tests.training.test_pages import completed_job, make_job
from training.models import BaseModel, JobStatus, Preset, TrainingJob

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("demo_stop", ROOT / "bench" / "demo_stop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_stop"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8765, "http://127.0.0.1:8765"),
        ("0.0.0.0", 9000, "http://127.0.0.1:9000"),  # noqa: S104 - a wildcard bind is linked by loopback
        ("::", 9000, "http://127.0.0.1:9000"),
        ("crucible.internal", 80, "http://crucible.internal:80"),
        ("::1", 8000, "http://[::1]:8000"),
    ],
)
def test_public_url_is_the_served_address(host, port, url):
    assert demo_run.public_url(host, port) == url


@pytest.mark.django_db
def test_demo_setup_loads_the_sample_corpus_once_and_prints_the_real_address():
    out = StringIO()
    call_command("demo_setup", "--url", "http://127.0.0.1:8765", "--force", stdout=out)
    text = out.getvalue()
    assert "http://127.0.0.1:8765/api/v1/me" in text and "127.0.0.1:8000" not in text
    corpus = Corpus.objects.get(name="Sample: speeches and declarations")
    assert corpus.record_count == 4 and corpus.status == Corpus.Status.READY
    assert "loaded now" in text
    again = StringIO()
    call_command("demo_setup", "--url", "http://127.0.0.1:8765", "--force", stdout=again)
    assert Corpus.objects.filter(name=corpus.name).count() == 1
    assert "already loaded" in again.getvalue()


@pytest.mark.django_db
def test_the_demo_job_is_reused_only_when_completed_and_tagged_demo():
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations()), user=None
    )
    smollm = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    smoke = Preset.objects.get(key="smoke")
    assert demo_run.demo_job_to_reuse() is None
    # A failed demo and an untagged job named like one are not reused.
    make_job(
        training_file, smollm, smoke, name=demo_run.DEMO_JOB_NAME, tags=["demo"],
        status=JobStatus.FAILED,
    )  # fmt: skip
    completed_job(training_file, smollm, smoke, name="Demo: someone else's run")
    assert demo_run.demo_job_to_reuse() is None
    done = completed_job(training_file, smollm, smoke, name=demo_run.DEMO_JOB_NAME)
    TrainingJob.objects.filter(pk=done.pk).update(tags=["demo"])
    assert demo_run.demo_job_to_reuse().pk == done.pk


@pytest.mark.slow
def test_stopping_the_demo_with_sigterm_leaves_no_process_behind():
    """`make demo` (training skipped: it changes nothing about stopping) on a random port,
    ready with web, both queue workers and beat; a second demo is refused; SIGTERM to make
    stops every process it started within seconds."""
    figures = _bench().run(train=False, ready_timeout=300)
    assert figures["processes"] >= 5  # make's child, runserver, 2 workers (+ pools), beat
    assert figures["second_refused"], figures.get("output", "")[-2000:]
    assert figures["left"] == [], figures["left"]
    assert figures["stop_s"] < 10, figures
    port = figures["port"]
    assert f"Dashboard: http://127.0.0.1:{port}/" in figures["banner"]
    assert f"http://127.0.0.1:{port}/api/v1/me" in figures["banner"]
    assert "Demo stopped" in figures["output"]


@pytest.fixture
def recorded_processes(monkeypatch, settings, tmp_path):
    """demo_run with every process replaced by `sleep` (still supervised and stopped for real)
    and a Ctrl-C as soon as it would wait: which processes it starts, in order."""
    settings.DATA_DIR = tmp_path
    started: list[str] = []
    real_start = demo_run.Supervisor.start

    def start(self, name, argv, **kwargs):
        started.append(name)
        return real_start(self, name, ["sleep", "60"], **kwargs)

    def wait(self, critical):
        self.stopping, self.signal_name = True, "SIGINT"
        return None

    monkeypatch.setattr(demo_run.Supervisor, "start", start)
    monkeypatch.setattr(demo_run.Supervisor, "wait", wait)
    monkeypatch.setattr(demo_run, "_become_subreaper", lambda: None)  # not the test process
    return started


@pytest.mark.django_db
def test_a_second_make_demo_reuses_the_demo_job(recorded_processes, training_file_and_model):
    training_file, smollm, smoke = training_file_and_model
    done = completed_job(training_file, smollm, smoke, name=demo_run.DEMO_JOB_NAME)
    TrainingJob.objects.filter(pk=done.pk).update(tags=["demo"])
    out = StringIO()
    call_command("demo_run", "--port", "8765", "--grace", "1", stdout=out)
    assert recorded_processes == ["web", "worker-control", "worker-long", "beat"]
    assert "Reusing the demo job" in out.getvalue() and "RETRAIN=1" in out.getvalue()
    assert "Dashboard: http://127.0.0.1:8765/" in out.getvalue()
    assert "Demo stopped" in out.getvalue()


@pytest.mark.django_db
def test_retrain_trains_again_and_a_stop_during_training_stops_it(
    recorded_processes, training_file_and_model
):
    training_file, smollm, smoke = training_file_and_model
    done = completed_job(training_file, smollm, smoke, name=demo_run.DEMO_JOB_NAME)
    TrainingJob.objects.filter(pk=done.pk).update(tags=["demo"])
    out = StringIO()
    call_command("demo_run", "--retrain", "--grace", "1", stdout=out)
    assert recorded_processes == ["train"]  # Ctrl-C during training: nothing else starts
    assert "Stopping the demo (SIGINT)" in out.getvalue()


@pytest.fixture
def training_file_and_model(db):
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(conversations()), user=None
    )
    return (
        training_file,
        BaseModel.objects.get(name="SmolLM2-135M-Instruct"),
        Preset.objects.get(key="smoke"),
    )


@pytest.mark.slow
def test_a_demo_killed_with_sigkill_is_cleaned_up_by_the_next_one():
    """SIGKILL skips the supervisor's clean-up; the next demo stops what it left (never two
    beat schedulers) and leaves nothing itself."""
    figures = _bench().run_after_kill(ready_timeout=300)
    assert figures["orphans_after_kill"] >= 4  # web, two workers, beat (+ pools) survived it
    assert figures["first_left_after_second_start"] == []
    assert figures["beats"] == 1
    assert figures["left"] == []


_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker deep in a long validation run
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
# A local training worker: detached into its own session, as the local executor starts it.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("started", flush=True)
time.sleep(120)
"""


def test_stop_all_kills_a_busy_worker_and_its_detached_training_worker(tmp_path):
    import time

    import psutil

    supervisor = demo_run.Supervisor(
        env={**os.environ}, log_dir=tmp_path, grace=1.0, stdout=StringIO(),
        state_file=tmp_path / "demo.json",
    )  # fmt: skip
    child = supervisor.start(
        "worker-long", [sys.executable, "-c", _STUBBORN], stop_signal=demo_run.COLD_SHUTDOWN
    )
    deadline = time.monotonic() + 60
    while "started" not in (tmp_path / "worker-long.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    family = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    assert len(family) == 2
    assert os.getsid(family[1].pid) != os.getsid(child.pid)  # detached like a training worker
    took = supervisor.stop_all()
    assert took < 1.0 + 3
    assert not [p for p in family if demo_run._alive(p)]
    assert supervisor.killed  # it needed the SIGKILL: SIGTERM and SIGQUIT were ignored
    assert not (tmp_path / "demo.json").exists()
