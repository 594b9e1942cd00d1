"""Job creation: the frozen audit record, deterministic task ids and bulk task creation (framework
jobs and kinds' item jobs)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction

from config.backpressure import check_backpressure
from corpora.models import Chunk
from jobs import gateway
from jobs.batch.kinds import kind_get
from jobs.batch.models import BatchJob, BatchTask
from jobs.batch.services.common import BULK_BATCH, BULK_MEMO, id_slices
from jobs.batch.services.engine import enqueue_dispatch
from jobs.batch.services.planning import Plan, job_plan
from jobs.models import RegisteredModel

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
    chunks = sorted(
        (
            chunk
            for ids in id_slices(plan.chunk_ids)
            for chunk in Chunk.objects.filter(pk__in=ids)
            .select_related("document")
            .only("pk", "text", "document__external_id", "position")
        ),
        key=lambda c: c.pk,
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
            for c in chunks
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
