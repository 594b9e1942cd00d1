"""Create, start and follow a training job from the shell.

    manage.py train --file samples/training/financial_advisor_v1.jsonl --preset smoke
    manage.py train --training-file <uuid> --preset balanced --set learning_rate=1e-4 --no-follow

Following needs no web server or Celery worker: the command serves the platform's webhook
endpoint itself on a loopback port, launches the worker in this process, and runs the
same reconcile step as the scheduler for its own job only (so an interrupted worker is
resumed here too); every other job is left to the scheduler.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.handlers.wsgi import WSGIHandler
from django.core.management.base import BaseCommand, CommandError
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from tqdm import tqdm

from config.errors import CrucibleError
from corpora.models import TrainingFile
from corpora.services import training_file_create
from training import services
from training.models import BaseModel, Preset, TrainingJob

RECONCILE_EVERY_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # the access log middleware already logs
        pass


def _parse_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


class Command(BaseCommand):
    help = "Create, start and follow a LoRA training job (with a progress bar)."

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument(
            "--file",
            help="A JSONL training file to upload (your own earlier upload of the same content "
            "is reused)",
        )
        source.add_argument("--training-file", help="ID of an uploaded training file")
        parser.add_argument(
            "--preset", default=None, help="Preset key (default: the default preset)"
        )
        parser.add_argument("--base-model", default="SmolLM2-135M-Instruct")
        parser.add_argument("--name", default="")
        parser.add_argument("--user", default=None, help="Username recorded as the creator")
        parser.add_argument("--tag", action="append", default=[], dest="tags")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Override a hyperparameter",
        )
        parser.add_argument("--no-follow", action="store_true", help="Start and return at once")
        parser.add_argument("--timeout", type=int, default=3600, help="Give up following after N s")

    def handle(self, *args, **options):
        try:
            job = self._create(options)
        except CrucibleError as exc:
            raise CommandError(f"{exc.message} {json.dumps(exc.details)[:500]}") from exc
        self.stdout.write(
            f"Job {job.pk}: {job.name} ({job.preset.name if job.preset else 'custom'})"
        )
        if options["no_follow"]:
            services.training_job_start(job=job, user=job.created_by)
            self.stdout.write("Started; a Celery worker launches it. Follow it in the dashboard.")
            return
        # One line per webhook would drown the progress bar.
        logging.getLogger("crucible.access").setLevel(logging.WARNING)
        server = self._serve_webhooks()
        try:
            settings.TRAINING_LAUNCH_INLINE = True
            services.training_job_start(job=job, user=job.created_by)
            job = self._follow(job, options["timeout"])
        finally:
            server.shutdown()
            server.server_close()
        self._report(job)

    def _create(self, options) -> TrainingJob:
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"No user named {options['user']}.")
        if options["file"]:
            path = Path(options["file"])
            if not path.is_file():
                raise CommandError(f"{path} does not exist.")
            training_file = self._upload(path, user)
        else:
            training_file = TrainingFile.objects.filter(pk=options["training_file"]).first()
            if training_file is None:
                raise CommandError(f"No training file {options['training_file']}.")
        base_model = BaseModel.objects.filter(name=options["base_model"]).first()
        if base_model is None:
            raise CommandError(f"No base model named {options['base_model']}.")
        preset = None
        if options["preset"]:
            preset = Preset.objects.filter(key=options["preset"]).first()
            if preset is None:
                keys = ", ".join(Preset.objects.values_list("key", flat=True))
                raise CommandError(f"No preset {options['preset']} (choose from {keys}).")
        overrides = {}
        for item in options["set"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise CommandError(f"--set takes KEY=VALUE, not {item!r}.")
            overrides[key.strip()] = _parse_value(value.strip())
        return services.training_job_create(
            user=user,
            training_file=training_file,
            base_model=base_model,
            preset=preset,
            name=options["name"],
            overrides=overrides,
            tags=options["tags"],
        )

    def _upload(self, path: Path, user) -> TrainingFile:
        import hashlib

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        # Only the caller's own upload of the same bytes: another person's file (another
        # name, maybe deleted or renamed later) is never borrowed silently.
        existing = (
            TrainingFile.objects.ready()
            .filter(sha256=digest, uploaded_by=user)
            .order_by("-created_at")
            .first()
        )
        if existing:
            owner = user.get_username() if user else "no user (uploaded from the shell)"
            self.stdout.write(
                f"Using training file '{existing.name}' ({existing.pk}) uploaded by {owner} on "
                f"{existing.created_at:%Y-%m-%d %H:%M}: same content as {path.name}."
            )
            return existing
        with path.open("rb") as handle:
            created = training_file_create(
                name=path.stem, upload=handle, user=user, filename=path.name
            )
        self.stdout.write(
            f"Uploaded {path.name} as training file '{created.name}' ({created.pk}): "
            f"{created.conversation_count} conversations ({created.pair_count} assistant turns)."
        )
        return created

    def _serve_webhooks(self) -> ThreadedWSGIServer:
        server = ThreadedWSGIServer(("127.0.0.1", 0), _QuietHandler)
        server.set_app(WSGIHandler())
        threading.Thread(target=server.serve_forever, daemon=True, name="webhooks").start()
        settings.CRUCIBLE_PUBLIC_URL = f"http://127.0.0.1:{server.server_address[1]}"
        return server

    def _follow(self, job: TrainingJob, timeout: int) -> TrainingJob:
        started = time.monotonic()
        last_reconcile = 0.0
        last_shown = None
        bar = tqdm(total=job.total_steps or 1, unit="step", desc="pending", dynamic_ncols=True)
        try:
            while True:
                job.refresh_from_db()
                loss = job.latest_metrics.get("train_loss")
                shown = (job.status, job.current_step, job.total_steps, loss)
                if shown != last_shown:  # redraw on change only (quiet when not a terminal)
                    if job.total_steps:
                        bar.total = job.total_steps
                    bar.n = job.current_step
                    bar.set_description(job.get_status_display())
                    bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", refresh=False)
                    bar.refresh()
                    last_shown = shown
                if job.is_terminal:
                    return job
                if time.monotonic() - last_reconcile > RECONCILE_EVERY_S:
                    # Only this job: the others belong to the scheduler's reconcile (and a
                    # relaunch from here would point their workers at this temporary port).
                    services.training_jobs_reconcile(job_ids=[job.pk])
                    last_reconcile = time.monotonic()
                if time.monotonic() - started > timeout:
                    raise CommandError(f"Still {job.status} after {timeout} s; the job goes on.")
                time.sleep(1.0)
        finally:
            bar.close()

    def _report(self, job: TrainingJob) -> None:
        if job.status == "completed":
            self.stdout.write(self.style.SUCCESS(f"Completed in {job.current_step} steps."))
            if job.perplexity_baseline and job.perplexity_trained:
                self.stdout.write(
                    f"Perplexity: {job.perplexity_baseline:.2f} -> {job.perplexity_trained:.2f} "
                    f"({job.perplexity_improvement_pct:.1f}% improvement)"
                )
            if job.recovery_summary:
                self.stdout.write(job.recovery_summary)
            kinds = ", ".join(job.artifacts.values_list("kind", flat=True))
            self.stdout.write(f"Artifacts: {kinds}")
            return
        if job.status == "failed":
            fix = job.error_details.get("fix", "")
            raise CommandError(f"{job.error_type}: {job.error_message}\nFix: {fix}")
        raise CommandError(f"The job ended {job.status}.")
