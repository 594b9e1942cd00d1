"""Run a batch job's open tasks in this process, with a progress bar; or create one first."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from config.errors import CrucibleError
from jobs.batch import results, services
from jobs.batch.models import BatchTask


class Command(BaseCommand):
    help = (
        "Run a batch job in this process (tqdm progress): `run_batch JOB_ID` resumes an existing "
        "job (stale claims go back to pending; finished tasks never run again), or create one "
        "with --corpus, --frameworks, --models, --runs and a selection (--documents, --meta or "
        "--all). --export-requests/--export-results write OpenAI Batch JSONL files."
    )

    def add_arguments(self, parser):
        parser.add_argument("job", nargs="?", help="An existing job's id")
        parser.add_argument("--corpus")
        parser.add_argument("--frameworks", nargs="+", default=[])
        parser.add_argument("--models", nargs="+", default=[])
        parser.add_argument("--runs", type=int, default=None)
        parser.add_argument("--max-tokens", type=int, default=None)
        parser.add_argument("--temperature", type=float, default=None)
        parser.add_argument("--documents", nargs="+", default=[], help="Documents' own ids")
        parser.add_argument("--meta", nargs="+", default=[], help="Metadata filters key:value")
        parser.add_argument("--all", action="store_true", help="Every chunk of the corpus")
        parser.add_argument("--estimate-only", action="store_true")
        parser.add_argument("--export-requests", help="Write the OpenAI Batch input JSONL here")
        parser.add_argument("--export-results", help="Write the OpenAI Batch output JSONL here")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        try:
            job = self._job(opts)
            if job is None:
                return
            if opts["export_requests"] or opts["export_results"]:
                self._export(job, opts)
                return
            open_tasks = job.tasks.filter(status__in=BatchTask.OPEN).count()
            with tqdm(
                total=job.task_count,
                initial=job.task_count - open_tasks,
                unit="task",
                desc=f"batch {str(job.pk)[:8]}",
                disable=opts["no_progress"],
                file=self.stderr,
            ) as bar:
                summary = services.job_run_inline(job=job, progress=bar.update)
            results.stats_refresh(job_id=job.pk, force=True)
        except CrucibleError as exc:
            raise CommandError(exc.message) from exc
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Job {summary['job']}: {summary['status']} {summary['tasks']}")

    def _job(self, opts):
        if opts["job"]:
            return services.job_get(opts["job"])
        if not opts["corpus"]:
            raise CommandError("Give a job id, or --corpus with --frameworks and --models.")
        selection: dict = {}
        if opts["documents"]:
            selection["document_ids"] = opts["documents"]
        elif opts["meta"]:
            selection["filter"] = {"meta": opts["meta"]}
        elif opts["all"]:
            selection["all"] = True
        decoding = {
            k: v
            for k, v in (("max_tokens", opts["max_tokens"]), ("temperature", opts["temperature"]))
            if v is not None
        }
        params = dict(
            corpus_id=opts["corpus"],
            selection=selection,
            frameworks=opts["frameworks"],
            models=opts["models"],
            runs=opts["runs"],
            decoding=decoding,
        )
        if opts["estimate_only"]:
            plan = services.job_plan(**params)
            for key, value in plan.as_dict().items():
                self.stdout.write(f"{key}: {value}")
            return None
        job = services.job_create(user=None, start=False, **params)
        self.stdout.write(f"Created job {job.pk} ({job.task_count} tasks).")
        return job

    def _export(self, job, opts):
        for key, fn in (
            ("export_requests", services.openai_batch_requests),
            ("export_results", services.openai_batch_results),
        ):
            if opts[key]:
                with open(opts[key], "w", encoding="utf-8") as handle:
                    n = 0
                    for line in fn(job=job):
                        handle.write(line + "\n")
                        n += 1
                self.stdout.write(f"Wrote {n} lines to {opts[key]}")
