"""Batch LLM job workflows: framework sync, planning (validation, task count, token and cost
estimate, budget check), creation with the frozen audit record, bulk task creation, bounded
dispatch per model, the task run through the gateway, pause/resume/cancel, crash recovery and
the OpenAI batch JSONL exports."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import Count, F, Q, Sum
from django.utils import timezone

from config import longtasks
from config.backpressure import check_backpressure
from config.errors import Conflict, InvalidInput, NotFound
from corpora import filters as corpus_filters
from corpora.models import Chunk, Corpus
from jobs import gateway
from jobs.batch.frameworks import FrameworkError, all_frameworks, render_messages, validate_answer
from jobs.batch.kinds import Outcome, TaskKind, kind_get, kind_register
from jobs.batch.models import BatchJob, BatchTask, Framework, FrameworkVersion
from jobs.models import GatewaySettings, RegisteredModel

logger = logging.getLogger("crucible.batch")

RUNS_MIN, RUNS_MAX = 1, 20
MAX_TASKS = 1_000_000
BULK_BATCH = 2_000
BULK_MEMO = 64
# Dispatch window: at most what a model's rate limit serves in this many seconds sits queued
# or running; a model without a rate limit gets BATCH_MAX_WINDOW.
WINDOW_S = 10.0
MAX_WINDOW = 64
# A dispatch message carries up to this many tasks of one model (one Celery message, one
# window runner), run BATCH_THREADS at a time in the worker process.
MESSAGE_TASKS = 16
BATCH_THREADS = int(os.environ.get("BATCH_THREADS", "8"))
TASK_MAX_ATTEMPTS = 4  # task-level tries after the gateway's own retries are exhausted
DECODING_KEYS = {
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
}
DEFAULT_DECODING = {"temperature": 0.7, "max_tokens": 128}
CHARS_PER_TOKEN = 4  # the estimate's prompt tokens: characters / 4 (the gateway counts exactly)


def _invalid(field_name: str, message: str) -> InvalidInput:
    return InvalidInput(message, details={"fields": [{"field": field_name, "message": message}]})


# --- Frameworks ---------------------------------------------------------------------------------


def framework_sync() -> list[FrameworkVersion]:
    """Load jobs/frameworks/*.json into the database: a new version becomes a row; a known
    version whose content changed is refused (FrameworkError): content never changes under a
    version."""
    out = []
    for name, spec in all_frameworks().items():
        fw, _ = Framework.objects.get_or_create(
            name=name,
            defaults={"title": spec.data["title"], "description": spec.data["description"]},
        )
        row = FrameworkVersion.objects.filter(framework=fw, version=spec.version).first()
        if row is None:
            row = FrameworkVersion.objects.create(
                framework=fw, version=spec.version, sha256=spec.sha256, content=spec.data
            )
            Framework.objects.filter(pk=fw.pk).update(
                title=spec.data["title"], description=spec.data["description"]
            )
        elif row.sha256 != spec.sha256:
            raise FrameworkError(
                f"framework {name!r} {spec.version} was edited without a new version "
                f"(stored sha256 {row.sha256[:12]}, file {spec.sha256[:12]}); raise its version "
                "with `manage.py frameworks_lock --bump patch " + name + "`",
                pointer="/version",
            )
        out.append(row)
    return out


def framework_resolve(ref: str) -> FrameworkVersion:
    """``name`` (the newest version) or ``name@version``."""
    name, _, version = str(ref).partition("@")
    qs = FrameworkVersion.objects.select_related("framework").filter(framework__name=name)
    if version:
        qs = qs.filter(version=version)
    row = qs.order_by("-created_at", "-pk").first()
    if row is None:
        raise _invalid("frameworks", f"Unknown framework {ref!r}.")
    return row


# --- Planning -----------------------------------------------------------------------------------


@dataclass
class Plan:
    corpus: Corpus
    chunk_ids: list[int]
    frameworks: list[FrameworkVersion]
    models: list[RegisteredModel]
    runs: int
    decoding: dict
    selection: dict
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    per_model: list[dict] = field(default_factory=list)
    budget: dict = field(default_factory=dict)

    @property
    def task_count(self) -> int:
        return len(self.chunk_ids) * len(self.frameworks) * len(self.models) * self.runs

    def as_dict(self) -> dict:
        return {
            "corpus": str(self.corpus.pk),
            "chunks": len(self.chunk_ids),
            "frameworks": [f.label for f in self.frameworks],
            "models": [m.key for m in self.models],
            "runs": self.runs,
            "decoding": self.decoding,
            "tasks": self.task_count,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": str(self.cost.quantize(Decimal("0.000001"))),
            "per_model": self.per_model,
            "budget": self.budget,
        }


def _selected_chunks(corpus: Corpus, selection: dict) -> list[int]:
    chunk_ids = selection.get("chunk_ids") or []
    document_ids = selection.get("document_ids") or []
    flt = selection.get("filter") or {}
    qs = Chunk.objects.filter(corpus=corpus)
    if chunk_ids:
        found = list(qs.filter(pk__in=chunk_ids).order_by("pk").values_list("pk", flat=True))
        missing = sorted(set(chunk_ids) - set(found))
        if missing:
            raise _invalid("chunk_ids", f"Chunks not in this corpus: {missing[:10]}.")
        return found
    if document_ids:
        docs = corpus.documents.filter(external_id__in=document_ids)
        known = set(docs.values_list("external_id", flat=True))
        missing = sorted(set(document_ids) - known)
        if missing:
            raise _invalid("document_ids", f"Documents not in this corpus: {missing[:10]}.")
        qs = qs.filter(document__in=docs)
    elif flt:
        allowed = {"document_type", "language", "author", "meta", "q"}
        unknown = sorted(set(flt) - allowed)
        if unknown:
            raise _invalid("filter", f"Unknown filter keys {unknown}; use {sorted(allowed)}.")
        meta = flt.get("meta") or []
        if isinstance(meta, str):
            meta = [meta]
        docs = corpus_filters.documents(
            corpus.documents.all(),
            q=flt.get("q") or "",
            document_type=flt.get("document_type") or "",
            language=flt.get("language") or "",
            author=flt.get("author") or "",
            meta=meta,
        )
        qs = qs.filter(document__in=docs.values("pk"))
    elif not selection.get("all"):
        raise _invalid("selection", "Select texts: chunk_ids, document_ids, a filter or all.")
    return list(qs.order_by("document__position", "position").values_list("pk", flat=True))


def _rate_per_minute(model: RegisteredModel) -> int | None:
    return model.requests_per_minute or model.provider.requests_per_minute


def window_size(model: RegisteredModel) -> int:
    rpm = _rate_per_minute(model)
    if not rpm:
        return MAX_WINDOW
    return max(1, min(MAX_WINDOW, math.ceil(rpm * WINDOW_S / 60)))


def job_plan(
    *,
    corpus_id,
    selection: dict,
    frameworks: list[str],
    models: list[str],
    runs: int | None = None,
    decoding: dict | None = None,
) -> Plan:
    """Validate a job's parameters and estimate it; writes nothing (frameworks are synced)."""
    try:
        corpus = Corpus.objects.get(pk=corpus_id)
    except (Corpus.DoesNotExist, ValueError, TypeError) as exc:
        raise _invalid("corpus", f"Unknown corpus {corpus_id!r}.") from exc
    if runs is None:
        runs = GatewaySettings.load().default_runs
    if not isinstance(runs, int) or not RUNS_MIN <= runs <= RUNS_MAX:
        raise _invalid("runs", f"Runs per model must be {RUNS_MIN} to {RUNS_MAX}, not {runs}.")
    if not frameworks:
        raise _invalid("frameworks", "Choose at least one framework.")
    if not models:
        raise _invalid("models", "Choose at least one model.")
    if len(set(frameworks)) != len(frameworks) or len(set(models)) != len(models):
        raise _invalid("frameworks", "A framework or model is listed twice.")
    decoding = dict(DEFAULT_DECODING | (decoding or {}))
    unknown = sorted(set(decoding) - DECODING_KEYS)
    if unknown:
        raise _invalid("decoding", f"Unknown decoding settings {unknown}.")
    max_tokens = decoding.get("max_tokens")
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
        raise _invalid("decoding", "decoding.max_tokens must be an integer from 1 to 8192.")
    temperature = decoding.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        raise _invalid("decoding", "decoding.temperature must be from 0 to 2.")
    framework_sync()
    fws = [framework_resolve(ref) for ref in frameworks]
    chosen = []
    found = {
        m.key: m for m in RegisteredModel.objects.select_related("provider").filter(key__in=models)
    }
    for key in models:
        model = found.get(key)
        if model is None:
            raise _invalid("models", f"Unknown model {key!r}.")
        if not (model.enabled and model.provider.enabled):
            raise _invalid("models", f"Model {key!r} is disabled.")
        if not model.has_capability("chat"):
            raise _invalid("models", f"Model {key!r} cannot chat.")
        if not (model.is_priced or model.allow_unpriced):
            raise _invalid("models", f"Model {key!r} has no price and is not allowed unpriced.")
        chosen.append(model)
    chunk_ids = _selected_chunks(corpus, selection)
    if not chunk_ids:
        raise _invalid("selection", "The selection matches no text.")
    plan = Plan(corpus, chunk_ids, fws, chosen, runs, decoding, selection)
    if plan.task_count > MAX_TASKS:
        raise _invalid("selection", f"{plan.task_count} tasks is over the limit of {MAX_TASKS}.")
    _estimate(plan)
    return plan


def _estimate(plan: Plan) -> None:
    """Prompt tokens from the characters of each chunk plus each framework's template;
    completion tokens at max_tokens (an upper bound); prices from the registry."""
    chunk_chars = (
        Chunk.objects.filter(pk__in=plan.chunk_ids).aggregate(c=Sum("char_count"))["c"] or 0
    )
    prompt = 0
    for fw in plan.frameworks:
        template = len(fw.content["prompt"]["system"]) + len(fw.content["prompt"]["user"])
        prompt += (chunk_chars + template * len(plan.chunk_ids)) // CHARS_PER_TOKEN
    prompt *= plan.runs
    completion = (
        len(plan.chunk_ids) * len(plan.frameworks) * plan.runs * plan.decoding["max_tokens"]
    )
    total = Decimal(0)
    for model in plan.models:
        cost = gateway.call_cost(model, prompt, completion)
        total += cost
        plan.per_model.append(
            {
                "model": model.key,
                "tasks": plan.task_count // len(plan.models),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost": str(cost.quantize(Decimal("0.000001"))),
                "window": window_size(model),
                "requests_per_minute": _rate_per_minute(model),
            }
        )
    plan.prompt_tokens = prompt * len(plan.models)
    plan.completion_tokens = completion * len(plan.models)
    plan.cost = total
    plan.budget = budget_remaining()
    plan.budget["fits"] = Decimal(plan.budget["remaining"]) >= total


def budget_remaining() -> dict:
    from billing import services as billing

    month = billing.month_start()
    budget = billing.budget_get(month=month)
    spent = billing.month_spent(month=month)
    reserved = billing.llm_reserved(month=month)
    held = sum((j.estimate_cost - _job_spent(j) for j in BatchJob.objects.active()), Decimal(0))
    remaining = Decimal(budget.amount) - Decimal(spent) - Decimal(reserved) - max(held, Decimal(0))
    return {
        "amount": str(budget.amount),
        "spent": str(spent),
        "reserved": str(reserved + max(held, Decimal(0))),
        "remaining": str(remaining.quantize(Decimal("0.000001"))),
    }


def _job_spent(job: BatchJob) -> Decimal:
    return job.tasks.aggregate(s=Sum("cost"))["s"] or Decimal(0)


# --- Creation -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_version() -> str:
    repo = Path(settings.BASE_DIR)
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],  # noqa: S607 - git on PATH
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "crucible " + version("crucible")
    except PackageNotFoundError:
        return "unknown"


def task_id(job_id, source, framework_label: str, model_key: str, run: int) -> str:
    """The deterministic id of a task: its job, input (a chunk id, or ``item:<id>``), what is
    applied to it, model and run."""
    raw = f"{job_id}|{source}|{framework_label}|{model_key}|{run}"
    return "t" + hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TaskSpec:
    """What varies between the task rows of one job (everything else is the row defaults).
    A framework task names its chunk and framework version; another kind's task its input row
    (``item_id``), with ``framework_label`` naming what it applies (a rubric's label)."""

    chunk_id: int | None
    framework_version_id: int | None
    framework_label: str
    model_key: str
    run: int
    model_revision: str = ""
    item_id: int | None = None


def _task_specs(plan: Plan) -> Iterator[TaskSpec]:
    for chunk_id in plan.chunk_ids:
        for fw in plan.frameworks:
            for model in plan.models:
                for run in range(1, plan.runs + 1):
                    yield TaskSpec(chunk_id, fw.pk, fw.label, model.key, run, model.revision)


def _insert_sql() -> tuple[str, list]:
    fields = list(BatchTask._meta.concrete_fields)
    table = connection.ops.quote_name(BatchTask._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})"  # noqa: S608
    return sql, fields


def _executemany(sql: str, rows: Iterable[list], batch_size: int) -> int:
    count, batch = 0, []
    with transaction.atomic(), connection.cursor() as cursor:
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_size:
                cursor.executemany(sql, batch)
                count += len(batch)
                batch = []
        if batch:
            cursor.executemany(sql, batch)
            count += len(batch)
    return count


def tasks_bulk_insert(*, job_id, specs: Iterable[TaskSpec], batch_size: int = BULK_BATCH) -> int:
    """Insert a job's task rows from a generator of specs, in batches of one ``executemany``
    each: memory stays flat whatever the count. The row defaults are prepared for the
    database once (one template row through each field's ``pre_save`` and
    ``get_db_prep_save``, as ``bulk_create`` would); a row then costs its id's hash and a list
    copy with the six columns that vary."""
    sql, fields = _insert_sql()
    template_obj = BatchTask(id="", job_id=job_id, run=1)
    template = [f.get_db_prep_save(f.pre_save(template_obj, add=True), connection) for f in fields]
    index = {f.attname: i for i, f in enumerate(fields)}
    i_id, i_chunk, i_fw = index["id"], index["chunk_id"], index["framework_version_id"]
    i_model, i_run, i_rev = index["model_key"], index["run"], index["model_revision"]
    i_item = index["item_id"]
    job_key = str(job_id)  # the same text task_id formats, converted once

    def rows() -> Iterator[list]:
        for spec in specs:
            row = template.copy()
            source = spec.chunk_id if spec.item_id is None else f"item:{spec.item_id}"
            row[i_id] = task_id(job_key, source, spec.framework_label, spec.model_key, spec.run)
            row[i_chunk] = spec.chunk_id
            row[i_fw] = spec.framework_version_id
            row[i_item] = spec.item_id
            row[i_model] = spec.model_key
            row[i_run] = spec.run
            row[i_rev] = spec.model_revision
            yield row

    return _executemany(sql, rows(), batch_size)


def tasks_bulk_create(rows: Iterable[BatchTask], *, batch_size: int = BULK_BATCH) -> int:
    """Insert task rows (model instances) from a generator in batches: memory stays flat.

    One ``executemany`` of an INSERT with every column per batch, not ``bulk_create``: on
    SQLite Django splits a bulk insert to stay under 999 parameters (35 rows of this table per
    statement); values go through each field's ``get_db_prep_save`` exactly as
    ``bulk_create`` would, each field's prepared value kept per raw value (up to BULK_MEMO a
    field: defaults repeat in every row). ``tasks_bulk_insert`` (specs) is faster still."""
    sql, fields = _insert_sql()
    memo: list[dict | None] = [{} for _ in fields]
    prep = [(f.pre_save, f.get_db_prep_save) for f in fields]

    def values(obj: BatchTask) -> list:
        out = []
        for i, (pre_save, prepare) in enumerate(prep):
            raw = pre_save(obj, True)
            seen = memo[i]
            if seen is None:
                out.append(prepare(raw, connection))
                continue
            try:
                key = (type(raw), raw)
                value = seen[key]
            except TypeError:  # unhashable (a JSON list or dict)
                out.append(prepare(raw, connection))
                continue
            except KeyError:
                value = seen[key] = prepare(raw, connection)
                if len(seen) > BULK_MEMO:
                    memo[i] = None  # a per-row value (the id): stop keeping them
            out.append(value)
        return out

    return _executemany(sql, (values(row) for row in rows), batch_size)


def _frozen(plan: Plan) -> dict:
    chunks = (
        Chunk.objects.filter(pk__in=plan.chunk_ids)
        .select_related("document")
        .only("pk", "text", "document__external_id", "position")
    )
    return {
        "corpus": {
            "id": str(plan.corpus.pk),
            "name": plan.corpus.name,
            "checksum": plan.corpus.checksum,
        },
        "frameworks": [
            {"name": f.framework.name, "version": f.version, "sha256": f.sha256}
            for f in plan.frameworks
        ],
        "models": [
            {
                "key": m.key,
                "provider": m.provider.slug,
                "remote_id": m.remote_id,
                "revision": m.revision,
                "parent": m.parent,
                "price_input_per_m": str(m.price_input_per_m),
                "price_output_per_m": str(m.price_output_per_m),
            }
            for m in plan.models
        ],
        "runs": plan.runs,
        "decoding": plan.decoding,
        "selection": plan.selection,
        "chunks": [
            {
                "id": c.pk,
                "document": c.document.external_id,
                "position": c.position,
                "sha256": hashlib.sha256(c.text.encode()).hexdigest(),
            }
            for c in chunks.order_by("pk")
        ],
        "code_version": code_version(),
    }


def job_create(
    *,
    user,
    corpus_id,
    selection: dict,
    frameworks: list[str],
    models: list[str],
    runs: int | None = None,
    decoding: dict | None = None,
    name: str = "",
    start: bool = True,
) -> BatchJob:
    """Plan, refuse when over budget, then create the job and its tasks in one transaction and
    start dispatching after commit."""
    plan = job_plan(
        corpus_id=corpus_id,
        selection=selection,
        frameworks=frameworks,
        models=models,
        runs=runs,
        decoding=decoding,
    )
    check_backpressure("long")  # 503 + Retry-After while the batch queue is at its limit
    if not plan.budget["fits"]:
        raise gateway.BudgetExceeded(
            f"This job's estimate ({plan.cost:.4f}) is over what is left of the month's budget "
            f"({plan.budget['remaining']}).",
            details={"estimate": str(plan.cost), **plan.budget},
        )
    frozen = _frozen(plan)
    sha = hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()
    with transaction.atomic():
        job = BatchJob.objects.create(
            name=name
            or f"{', '.join(f.framework.name for f in plan.frameworks)} on {plan.corpus.name}",
            corpus=plan.corpus,
            created_by=user if getattr(user, "is_authenticated", False) else None,
            selection=selection,
            frozen=frozen,
            parameters_sha256=sha,
            runs=plan.runs,
            task_count=plan.task_count,
            estimate_prompt_tokens=plan.prompt_tokens,
            estimate_completion_tokens=plan.completion_tokens,
            estimate_cost=plan.cost,
            status=BatchJob.Status.RUNNING if start else BatchJob.Status.PAUSED,
        )
        tasks_bulk_insert(job_id=job.pk, specs=_task_specs(plan))
        if start:
            transaction.on_commit(lambda: enqueue_dispatch(job.pk))
    return job


def job_create_items(
    *,
    kind: str,
    name: str,
    user,
    label: str,
    item_ids: list[int],
    models: list[str],
    runs: int,
    frozen: dict,
    start: bool = True,
) -> BatchJob:
    """Create a job of another kind (registered in kinds.py) and its tasks, one per (item x
    model x run), in the caller's transaction; dispatch starts after commit. The caller has
    validated the items and models; ``frozen`` is its audit record, completed here with the
    models' registry entries, the decoding and the code version the engine reads."""
    kind_get(kind)  # refuses an unregistered kind before anything is written
    registered = {
        m.key: m for m in RegisteredModel.objects.select_related("provider").filter(key__in=models)
    }
    frozen = {
        "decoding": {},
        **frozen,
        "models": [
            {
                "key": key,
                "provider": registered[key].provider.slug if key in registered else "",
                "remote_id": registered[key].remote_id if key in registered else key,
                "revision": registered[key].revision if key in registered else "",
            }
            for key in models
        ],
        "runs": runs,
        "code_version": code_version(),
    }
    sha = hashlib.sha256(json.dumps(frozen, sort_keys=True, default=str).encode()).hexdigest()
    job = BatchJob.objects.create(
        name=name,
        kind=kind,
        created_by=user if getattr(user, "pk", None) else None,
        selection={"items": len(item_ids)},
        frozen=frozen,
        parameters_sha256=sha,
        runs=runs,
        task_count=len(item_ids) * len(models) * runs,
        status=BatchJob.Status.RUNNING if start else BatchJob.Status.PAUSED,
    )
    revisions = {key: (registered[key].revision if key in registered else "") for key in models}
    tasks_bulk_insert(
        job_id=job.pk,
        specs=(
            TaskSpec(None, None, label, key, run, revisions[key], item_id=item)
            for item in item_ids
            for key in models
            for run in range(1, runs + 1)
        ),
    )
    if start:
        transaction.on_commit(lambda: enqueue_dispatch(job.pk))
    return job


# --- Dispatch -----------------------------------------------------------------------------------


def enqueue_dispatch(job_id) -> None:
    from jobs.batch.tasks import batch_dispatch

    batch_dispatch.delay(str(job_id))


def _enqueue_window(job_id, task_ids: list[str]) -> None:
    from jobs.batch.tasks import batch_run_window

    batch_run_window.delay(str(job_id), task_ids)


def job_dispatch(*, job_id, enqueue: Callable[[object, list[str]], object] | None = None) -> dict:
    """Top up each model's window: move pending tasks to queued (at most the window minus what
    is queued or running) and enqueue them, MESSAGE_TASKS to a message (one window runner
    each). Returns {model: queued now}."""
    enqueue = enqueue or _enqueue_window
    job = BatchJob.objects.filter(pk=job_id).first()
    if job is None or job.status != BatchJob.Status.RUNNING:
        return {}
    models = {
        m.key: m
        for m in RegisteredModel.objects.select_related("provider").filter(
            key__in=[m["key"] for m in job.frozen["models"]]
        )
    }
    open_counts = dict(
        job.tasks.filter(status__in=(BatchTask.Status.QUEUED, BatchTask.Status.RUNNING))
        .values_list("model_key")
        .annotate(n=Count("pk"))
    )
    now = timezone.now()
    out = {}
    for key, model in models.items():
        room = window_size(model) - open_counts.get(key, 0)
        if room <= 0:
            continue
        ids = list(
            job.tasks.filter(model_key=key, status=BatchTask.Status.PENDING)
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .order_by("id")
            .values_list("pk", flat=True)[:room]
        )
        if not ids:
            continue
        token = uuid.uuid4().hex
        BatchTask.objects.filter(pk__in=ids, status=BatchTask.Status.PENDING).update(
            status=BatchTask.Status.QUEUED, dispatch_token=token, queued_at=now
        )
        mine = list(
            BatchTask.objects.filter(pk__in=ids, dispatch_token=token, status="queued").values_list(
                "pk", flat=True
            )
        )
        # Split so that every worker process gets a share of a small window too.
        size = max(1, min(MESSAGE_TASKS, math.ceil(len(mine) / 4)))
        for start in range(0, len(mine), size):
            enqueue(job.pk, mine[start : start + size])
        out[key] = len(mine)
    return out


def job_finish_if_done(job_id) -> bool:
    """Mark a running job completed (or failed when some task failed) once no task is open."""
    job = BatchJob.objects.filter(pk=job_id).only("status").first()
    if job is None or job.status != BatchJob.Status.RUNNING:
        return False
    if BatchTask.objects.filter(job_id=job_id, status__in=BatchTask.OPEN).exists():
        return False
    failed = BatchTask.objects.filter(job_id=job_id, status=BatchTask.Status.FAILED).exists()
    status = BatchJob.Status.FAILED if failed else BatchJob.Status.COMPLETED
    done = (
        BatchJob.objects.filter(pk=job_id, status=BatchJob.Status.RUNNING).update(
            status=status, finished_at=timezone.now()
        )
        == 1
    )
    if done:
        job_kind(job_id).progress(job_id=job_id, final=True)
    return done


# --- Running one task ---------------------------------------------------------------------------


def job_kind(job_id) -> TaskKind:
    kind = BatchJob.objects.filter(pk=job_id).values_list("kind", flat=True).first()
    return kind_get(kind or BatchJob.FRAMEWORK)


def job_context(job_id):
    """The context of a job's kind (what its tasks share), or None when the job is gone."""
    job = BatchJob.objects.select_related("created_by").filter(pk=job_id).first()
    return None if job is None else kind_get(job.kind).context(job)


def _prompt_values(chunk: Chunk) -> dict:
    doc = chunk.document
    return {
        "text": chunk.text,
        "title": doc.title or doc.external_id,
        "author": doc.author or "unknown",
        "date": doc.date or "unknown",
    }


def task_messages(task: BatchTask, content: dict | None = None) -> list[dict]:
    content = task.framework_version.content if content is None else content
    return render_messages(content, _prompt_values(task.chunk))


def framework_response_format(*, content: dict) -> dict:
    """OpenAI structured outputs for a framework: its answer schema as ``json_schema``, not
    strict (strict mode refuses schemas with e.g. minimum/maximum); the answer is validated
    against the schema all the same."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(content.get("name") or "answer"))[:64]
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": content["answer_schema"], "strict": False},
    }


def task_request(task: BatchTask, decoding: dict, content: dict | None = None) -> dict:
    content = task.framework_version.content if content is None else content
    body = {
        "messages": task_messages(task, content),
        "response_format": framework_response_format(content=content),
        **decoding,
    }
    body.setdefault("seed", task.run)
    return body


class JobContext:
    """What every task of a job shares, read once per window instead of once per task: the
    job's creator (the ledger's user), its frozen decoding settings and the framework
    versions' content (the job row's frozen record holds every chunk's hash: decoding it per
    task cost more than the task's own queries)."""

    def __init__(self, job: BatchJob):
        self.job_id = job.pk
        self.user = job.created_by
        self.decoding = job.frozen["decoding"]
        self._contents: dict[int, dict] = {}

    @classmethod
    def load(cls, job_id) -> JobContext | None:
        job = BatchJob.objects.select_related("created_by").filter(pk=job_id).first()
        return None if job is None else cls(job)

    @property
    def kind(self) -> TaskKind:
        return FRAMEWORK_KIND

    def content(self, framework_version_id: int) -> dict:
        content = self._contents.get(framework_version_id)
        if content is None:  # two threads may both read it once: same value
            content = FrameworkVersion.objects.values_list("content", flat=True).get(
                pk=framework_version_id
            )
            self._contents[framework_version_id] = content
        return content


_TASK_FIELDS = (
    "id",
    "job_id",
    "chunk_id",
    "framework_version_id",
    "model_key",
    "run",
    "attempts",
    "model_revision",
    "item_id",
    "chunk__text",
    "chunk__document__title",
    "chunk__document__external_id",
    "chunk__document__author",
    "chunk__document__date",
)


def _repair_messages(messages: list[dict], raw: str, errors: list[str]) -> list[dict]:
    problems = "\n".join(f"- {e}" for e in errors[:10])
    return [
        *messages,
        {"role": "assistant", "content": raw},
        {
            "role": "user",
            "content": "Your answer was not valid for the required JSON schema:\n"
            f"{problems}\nAnswer again with only the corrected JSON object.",
        },
    ]


def _call_and_validate(task: BatchTask, ctx: JobContext) -> Outcome:
    content = ctx.content(task.framework_version_id)
    body = task_request(task, ctx.decoding, content)
    caller = gateway.Caller(user=ctx.user, feature="batch", subject=task)
    totals = {
        "calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost": Decimal(0),
        "latency_ms": 0.0,
    }
    all_errors: list[str] = []
    repairs = 0
    while True:
        result = gateway.chat(
            model=task.model_key,
            request=body,
            caller=caller,
            interactive=False,
            run_index=task.run,
        )
        meta = result.meta
        totals["calls"] += 1
        totals["prompt_tokens"] += meta.prompt_tokens
        totals["completion_tokens"] += meta.completion_tokens
        totals["cost"] += meta.cost
        totals["latency_ms"] += meta.latency_ms
        raw = result.text
        parsed, errors, kind = validate_answer(content, raw)
        common = {
            **totals,
            "raw_output": raw,
            "repairs": repairs,
            "response_id": str(result.response.get("id") or "")[:200],
            "model_revision": task.model_revision or str(result.response.get("model") or ""),
        }
        if not kind:
            return Outcome(
                BatchTask.Status.SUCCEEDED,
                {
                    **common,
                    "parsed_output": parsed,
                    "validation_errors": all_errors,
                    "error_code": "",
                    "error_message": "",
                },
            )
        all_errors += [f"[{kind}] {e}" for e in errors]
        if repairs >= 1:
            return Outcome(
                BatchTask.Status.FAILED,
                {
                    **common,
                    "parsed_output": parsed if isinstance(parsed, dict) else None,
                    "validation_errors": all_errors,
                    "error_code": kind,
                    "error_message": f"Invalid answer after one repair: {errors[0]}",
                },
            )
        repairs += 1
        body = {**body, "messages": _repair_messages(body["messages"], raw, errors)}


class FrameworkKind:
    """The engine's own kind: a framework's prompt over a corpus chunk, the answer parsed and
    validated against the framework's schema (repaired once), statistics as tasks finish."""

    name = BatchJob.FRAMEWORK

    def context(self, job: BatchJob) -> JobContext:
        return JobContext(job)

    def run(self, task: BatchTask, ctx: JobContext) -> Outcome:
        return _call_and_validate(task, ctx)

    def failed(self, *, job_id, task_ids: list[str], code: str, message: str) -> None:
        return None  # the task row holds everything a framework task keeps

    def progress(self, *, job_id, final: bool) -> None:
        from jobs.batch.results import stats_schedule

        stats_schedule(job_id=job_id, final=final)


FRAMEWORK_KIND = FrameworkKind()
kind_register(FRAMEWORK_KIND)


def task_run(
    *,
    task_id: str,
    claim: str | None = None,
    dispatch: bool = True,
    ctx: JobContext | None = None,
    finish: bool = True,
) -> str | None:
    """Claim a queued task (one conditional UPDATE), run it through the gateway, store its one
    result (the final write is conditional on the claim), then top up the model's window
    (``dispatch``) and finish the job when it was the last (``finish``; a window runner does
    both once for its window). Returns the task's final status, or None when the task was not
    this worker's to run."""
    claim = claim or longtasks.worker_claim()
    now = timezone.now()
    claimed = BatchTask.objects.filter(
        pk=task_id, status__in=(BatchTask.Status.QUEUED, BatchTask.Status.PENDING)
    ).update(
        status=BatchTask.Status.RUNNING,
        claimed_by=claim,
        heartbeat_at=now,
        started_at=now,
        attempts=F("attempts") + 1,
    )
    if claimed != 1:
        return None
    # The job's status comes with the task (one round trip): a paused or cancelled job's
    # task goes back unrun.
    task = BatchTask.objects.select_related("chunk", "chunk__document", "job")
    task = task.only(*_TASK_FIELDS, "job__status").get(pk=task_id)
    job_status = task.job.status
    mine = BatchTask.objects.filter(pk=task_id, status=BatchTask.Status.RUNNING, claimed_by=claim)
    if job_status != BatchJob.Status.RUNNING:
        back = BatchTask.Status.CANCELLED if job_status == "cancelled" else BatchTask.Status.PENDING
        mine.update(status=back, claimed_by="", attempts=F("attempts") - 1)
        return back
    if ctx is None or ctx.job_id != task.job_id:
        ctx = job_context(task.job_id)
    kind = ctx.kind
    failed_outside = False  # failed by the engine, not by the kind's own run
    try:
        outcome = kind.run(task, ctx)
    except gateway.GatewayError as exc:
        outcome = _failure(task, exc)
        failed_outside = outcome.status == BatchTask.Status.FAILED
    except Exception as exc:  # a bug or an unexpected library error: fail the task, keep going
        logger.exception("batch task %s crashed", task_id)
        outcome = Outcome(
            BatchTask.Status.FAILED,
            {"error_code": "internal_error", "error_message": f"{type(exc).__name__}: {exc}"},
        )
        failed_outside = True
    fields = dict(outcome.fields)
    if "calls" in fields:
        fields["calls"] = F("calls") + fields["calls"]
    if outcome.status == BatchTask.Status.PENDING:
        fields.update(claimed_by="", dispatch_token="")
    else:
        fields["finished_at"] = timezone.now()
    wrote = mine.update(status=outcome.status, **fields) == 1
    if not wrote:
        return None
    if failed_outside:
        kind.failed(
            job_id=task.job_id,
            task_ids=[task.pk],
            code=outcome.fields["error_code"],
            message=outcome.fields.get("error_message", ""),
        )
    if dispatch or finish:
        after_task(job_id=task.job_id, dispatch=dispatch)
    return outcome.status


def tasks_run_window(
    *,
    job_id,
    task_ids: list[str],
    threads: int | None = None,
    dispatch: bool = True,
    on_done: Callable[[str | None], object] | None = None,
) -> dict:
    """Run a window of a job's tasks in this process: each is claimed atomically just before
    it runs (as ``task_run`` alone does: a task claimed elsewhere is skipped, and a claim's
    heartbeat is its own start), ``threads`` at a time (their calls wait on the gateway's
    shared rate limits); then the window tops up the job's dispatch, finishes the job when it
    was the last, and schedules the statistics, once for the window. Returns {status: n}."""
    ctx = job_context(job_id)
    out: dict[str, int] = {}
    if ctx is None or not task_ids:
        return out
    threads = max(1, min(len(task_ids), threads or BATCH_THREADS))

    counted = threading.Lock()

    def one(pk: str) -> None:
        status = task_run(task_id=pk, dispatch=False, ctx=ctx, finish=False)
        with counted:
            out[status or "skipped"] = out.get(status or "skipped", 0) + 1
        if on_done:
            on_done(status)

    if threads == 1:
        for pk in task_ids:
            one(pk)
    else:
        pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        for pk in task_ids:
            pending.put(pk)

        def worker() -> None:
            try:
                while True:
                    try:
                        pk = pending.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        one(pk)
                    except Exception:  # a database error: the reconcile recovers its claim
                        logger.exception("batch task %s could not run", pk)
            finally:
                connections.close_all()  # this thread's own connections

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    after_task(job_id=job_id, dispatch=dispatch)
    return out


def _failure(task: BatchTask, exc: gateway.GatewayError) -> Outcome:
    fields = {
        "error_code": exc.code,
        "error_message": exc.message[:2000] if hasattr(exc, "message") else str(exc)[:2000],
        "calls": 1,
    }
    if exc.transient and task.attempts < TASK_MAX_ATTEMPTS:
        conf = gateway.settings_effective()
        base, cap = float(conf["backoff_base_s"]), float(conf["backoff_cap_s"])
        delay = random.uniform(0, min(cap, base * 2**task.attempts))
        if exc.retry_after:
            delay = max(delay, float(exc.retry_after))
        return Outcome(
            BatchTask.Status.PENDING,
            {**fields, "not_before": timezone.now() + timedelta(seconds=delay)},
        )
    if exc.transient:
        fields["error_message"] = (
            f"Retries exhausted after {task.attempts} tries: " + fields["error_message"]
        )
    return Outcome(BatchTask.Status.FAILED, fields)


def after_task(*, job_id, dispatch: bool = True) -> None:
    """What a finished task triggers: top up the window (workers; an in-process run claims
    pending tasks itself), finish the job, refresh statistics (throttled)."""
    if dispatch:
        job_dispatch(job_id=job_id)
    if not job_finish_if_done(job_id) and dispatch:
        job_kind(job_id).progress(job_id=job_id, final=False)


# --- Control ------------------------------------------------------------------------------------


def job_get(job_id) -> BatchJob:
    """A framework job (the batch pages and API); other kinds have their own pages."""
    try:
        return BatchJob.objects.frameworks().select_related("corpus", "created_by").get(pk=job_id)
    except (BatchJob.DoesNotExist, ValueError, TypeError) as exc:
        raise NotFound(f"No batch job {job_id}.") from exc


def job_pause(*, job: BatchJob) -> BatchJob:
    if job.status != BatchJob.Status.RUNNING:
        raise Conflict(f"Only a running job can be paused; this one is {job.status}.")
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.RUNNING).update(status="paused")
    # Queued tasks go back to pending; running ones finish (their result is kept).
    job.tasks.filter(status=BatchTask.Status.QUEUED).update(status=BatchTask.Status.PENDING)
    job.refresh_from_db()
    return job


def job_resume(*, job: BatchJob) -> BatchJob:
    """Resume a paused job, or a running one after a crash: stale claims go back to pending
    (nothing finished runs again) and dispatch starts."""
    if job.status not in (BatchJob.Status.PAUSED, BatchJob.Status.RUNNING):
        raise Conflict(f"A {job.status} job cannot be resumed.")
    BatchJob.objects.filter(pk=job.pk).update(status=BatchJob.Status.RUNNING, finished_at=None)
    tasks_recover(job_id=job.pk)
    transaction.on_commit(lambda: enqueue_dispatch(job.pk))
    job.refresh_from_db()
    return job


def job_cancel(*, job: BatchJob) -> BatchJob:
    if not job.is_active:
        raise Conflict(f"A {job.status} job cannot be cancelled.")
    BatchJob.objects.filter(pk=job.pk).update(
        status=BatchJob.Status.CANCELLED, finished_at=timezone.now()
    )
    job.tasks.filter(status__in=(BatchTask.Status.PENDING, BatchTask.Status.QUEUED)).update(
        status=BatchTask.Status.CANCELLED
    )
    job.refresh_from_db()
    return job


def tasks_recover(*, job_id=None, stale_after_s: float | None = None) -> dict:
    """Claimed-but-unfinished tasks whose heartbeat is stale go back to pending; queued tasks
    whose message was lost (queued longer than the stale time) go back to pending too. The
    atomic claim means a message that does arrive later finds nothing to do."""
    stale = stale_after_s if stale_after_s is not None else settings.LONG_TASK_STALE_AFTER_S
    cutoff = timezone.now() - timedelta(seconds=stale)
    qs = BatchTask.objects.all() if job_id is None else BatchTask.objects.filter(job_id=job_id)
    running = qs.filter(status=BatchTask.Status.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )
    lost = list(running.values_list("pk", flat=True))
    given_up: dict[tuple, list[str]] = {}
    for pk, job_pk, kind in running.filter(attempts__gte=TASK_MAX_ATTEMPTS).values_list(
        "pk", "job_id", "job__kind"
    ):
        given_up.setdefault((job_pk, kind), []).append(pk)
    exhausted = running.filter(attempts__gte=TASK_MAX_ATTEMPTS).update(
        status=BatchTask.Status.FAILED,
        claimed_by="",
        error_code="worker_lost",
        error_message="Its worker stopped on every try.",
        finished_at=timezone.now(),
    )
    for (job_pk, kind), ids in given_up.items():
        kind_get(kind).failed(
            job_id=job_pk,
            task_ids=ids,
            code="worker_lost",
            message="Its worker stopped on every try.",
        )
    reclaimed = running.update(status=BatchTask.Status.PENDING, claimed_by="", dispatch_token="")
    if lost:
        # Their worker died mid-call: settle the calls it wrote ahead (the ledger keeps each
        # call that reached the provider, answered from the cache when the answer got there).
        gateway.calls_recover(subject_type=BatchTask, subject_ids=lost)
    requeued = qs.filter(status=BatchTask.Status.QUEUED, queued_at__lt=cutoff).update(
        status=BatchTask.Status.PENDING, dispatch_token=""
    )
    return {"reclaimed": reclaimed, "requeued": requeued, "failed": exhausted}


def batch_reconcile() -> dict:
    """Beat: recover stale tasks of running jobs and kick their dispatch."""
    out = tasks_recover()
    jobs = list(
        BatchJob.objects.filter(status=BatchJob.Status.RUNNING).values_list("pk", flat=True)
    )
    for pk in jobs:
        try:
            enqueue_dispatch(pk)
        except Exception:  # the broker is down: the next reconcile tries again
            logger.exception("could not enqueue the dispatch of batch job %s", pk)
        job_finish_if_done(pk)
    out["jobs"] = len(jobs)
    return out


def job_run_inline(*, job: BatchJob, progress: Callable[[int], object] | None = None) -> dict:
    """Run a job's open tasks in this process (``manage.py run_batch``): stale claims are
    recovered first, then pending and queued tasks are claimed one by one (the same atomic
    claim as the workers, so a worker running beside it never runs a task twice)."""
    BatchJob.objects.filter(pk=job.pk, status=BatchJob.Status.PAUSED).update(status="running")
    tasks_recover(job_id=job.pk)
    while True:
        now = timezone.now()
        ids = list(
            job.tasks.filter(status__in=(BatchTask.Status.PENDING, BatchTask.Status.QUEUED))
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
            .order_by("id")
            .values_list("pk", flat=True)[:500]
        )
        if not ids:
            if job.tasks.filter(status=BatchTask.Status.PENDING).exists():
                time.sleep(0.2)  # a retry waiting for its backoff
                continue
            break
        ctx = job_context(job.pk)
        for pk in ids:
            status = task_run(task_id=pk, dispatch=False, ctx=ctx, finish=False)
            if status in (None, BatchTask.Status.PENDING, BatchTask.Status.CANCELLED) and (
                BatchJob.objects.filter(pk=job.pk).values_list("status", flat=True).first()
                != BatchJob.Status.RUNNING
            ):
                return _summary(job)  # paused or cancelled meanwhile
            if status and status != BatchTask.Status.PENDING and progress:
                progress(1)
    job_finish_if_done(job.pk)
    return _summary(job)


def _summary(job: BatchJob) -> dict:
    counts = dict(job.tasks.values_list("status").annotate(n=Count("pk")))
    job.refresh_from_db()
    return {"job": str(job.pk), "status": job.status, "tasks": counts}


# --- OpenAI Batch JSONL -------------------------------------------------------------------------


def openai_batch_requests(*, job: BatchJob) -> Iterator[str]:
    """The job's requests as an OpenAI Batch input file: one line per task, ``custom_id`` the
    task id, ``body`` the chat body with the model's remote id."""
    remote = {m["key"]: m["remote_id"] for m in job.frozen["models"]}
    decoding = job.frozen["decoding"]
    qs = job.tasks.select_related("framework_version", "chunk", "chunk__document").order_by("id")
    for task in qs.iterator(chunk_size=500):
        body = {"model": remote[task.model_key], **task_request(task, decoding)}
        yield json.dumps(
            {"custom_id": task.id, "method": "POST", "url": "/v1/chat/completions", "body": body},
            sort_keys=True,
            ensure_ascii=False,
        )


def openai_batch_results(*, job: BatchJob) -> Iterator[str]:
    """Finished tasks in the OpenAI Batch output shape (``id``, ``custom_id``, ``response``
    {status_code, request_id, body}, ``error``), ordered by custom_id."""
    qs = job.tasks.filter(status__in=(BatchTask.Status.SUCCEEDED, BatchTask.Status.FAILED))
    for task in qs.order_by("id").iterator(chunk_size=500):
        ok = task.status == BatchTask.Status.SUCCEEDED or task.raw_output
        body = {
            "id": task.response_id,
            "object": "chat.completion",
            "model": task.model_key,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": task.raw_output},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": task.prompt_tokens,
                "completion_tokens": task.completion_tokens,
                "total_tokens": task.prompt_tokens + task.completion_tokens,
            },
        }
        yield json.dumps(
            {
                "id": f"batch_req_{task.id}",
                "custom_id": task.id,
                "response": {"status_code": 200, "request_id": task.response_id, "body": body}
                if ok
                else None,
                "error": None
                if task.status == BatchTask.Status.SUCCEEDED
                else {"code": task.error_code, "message": task.error_message},
            },
            sort_keys=True,
            ensure_ascii=False,
        )


def openai_batch_match(requests_lines: Iterable[str], results_lines: Iterable[str]) -> list:
    """Pair input and output lines by ``custom_id`` (never by line order)."""
    results = {}
    for line in results_lines:
        row = json.loads(line)
        results[row["custom_id"]] = row
    return [
        (json.loads(line), results.get(json.loads(line)["custom_id"])) for line in requests_lines
    ]
