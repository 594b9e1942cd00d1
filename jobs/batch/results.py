"""A batch job's results: raw rows, statistics (recomputed as tasks finish, throttled),
chart-ready JSON, progress and the replication package."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import zipfile
from datetime import timedelta
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from django.db.models import Count, Sum
from django.utils import timezone

from config.decimals import decimal_text
from jobs.batch import stats
from jobs.batch.models import BatchJob, BatchStats, BatchTask, FrameworkVersion

STATS_EVERY_S = 30  # recompute at most this often while a job runs
PACKAGES = ("numpy", "pandas", "scipy", "krippendorff", "pingouin", "jsonschema")
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def frameworks_of(job: BatchJob) -> dict[str, dict]:
    labels = {f"{f['name']}@{f['version']}" for f in job.frozen["frameworks"]}
    rows = FrameworkVersion.objects.select_related("framework").filter(
        framework__name__in=[f["name"] for f in job.frozen["frameworks"]]
    )
    return {r.label: r.content for r in rows if r.label in labels}


def raw_rows(job: BatchJob, *, statuses=None) -> list[dict]:
    qs = job.tasks.select_related("framework_version__framework", "chunk__document").order_by("id")
    if statuses:
        qs = qs.filter(status__in=statuses)
    out = []
    for t in qs.iterator(chunk_size=1000):
        out.append(
            {
                "custom_id": t.id,
                "unit": f"{t.chunk.document.external_id}#{t.chunk.position}",
                "chunk_id": t.chunk_id,
                "framework": t.framework_version.label,
                "model": t.model_key,
                "model_revision": t.model_revision,
                "run": t.run,
                "status": t.status,
                "attempts": t.attempts,
                "calls": t.calls,
                "repairs": t.repairs,
                "raw_output": t.raw_output,
                "parsed_output": t.parsed_output,
                "validation_errors": t.validation_errors,
                "error_code": t.error_code,
                "error_message": t.error_message,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "cost": decimal_text(t.cost),
                "latency_ms": t.latency_ms,
                "started_at": t.started_at.isoformat() if t.started_at else None,
                "finished_at": t.finished_at.isoformat() if t.finished_at else None,
            }
        )
    return out


def stats_compute(job: BatchJob) -> dict:
    rows = raw_rows(job, statuses=[BatchTask.Status.SUCCEEDED])
    _values, per_text, agreement = stats.compute(rows, frameworks_of(job))
    return {
        "tasks_done": len(rows),
        "per_text": json.loads(per_text.to_json(orient="records")),
        "agreement": json.loads(agreement.to_json(orient="records")),
        "icc_form": stats.ICC_NAME,
        "confidence": stats.CONFIDENCE,
    }


def stats_refresh(*, job_id, force: bool = False) -> BatchStats | None:
    """Recompute the job's statistics when tasks finished since the last time (at most every
    STATS_EVERY_S seconds unless ``force``)."""
    job = BatchJob.objects.filter(pk=job_id).first()
    if job is None:
        return None
    current = BatchStats.objects.filter(job=job).first()
    done = job.tasks.filter(status=BatchTask.Status.SUCCEEDED).count()
    if current and current.tasks_done == done:
        return current
    if (
        current
        and not force
        and current.computed_at > timezone.now() - timedelta(seconds=STATS_EVERY_S)
    ):
        return current
    data = stats_compute(job)
    obj, _ = BatchStats.objects.update_or_create(
        job=job, defaults={"tasks_done": data["tasks_done"], "data": data}
    )
    return obj


def stats_schedule(*, job_id, final: bool = False) -> None:
    """Recompute the statistics off the task path: a control-queue task, at most one per job
    every STATS_EVERY_S seconds while it runs (BATCH_LIVE_STATS=0 turns live updates off); the
    final one always. Pages and the API recompute on read when the snapshot is behind."""
    from django.core.cache import cache
    from django.db import transaction

    if not final and (
        os.environ.get("BATCH_LIVE_STATS", "1") == "0"
        or not cache.add(f"batch-stats:{job_id}", 1, timeout=STATS_EVERY_S)
    ):
        return
    from jobs.batch.tasks import batch_stats

    transaction.on_commit(lambda: batch_stats.delay(str(job_id), final))


def progress(job: BatchJob) -> dict:
    by_status = dict(job.tasks.values_list("status").annotate(n=Count("pk")))
    by_model: dict[str, dict] = {}
    for key, status, n in job.tasks.values_list("model_key", "status").annotate(n=Count("pk")):
        by_model.setdefault(key, {})[status] = n
    totals = job.tasks.aggregate(
        cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    errors = dict(
        job.tasks.exclude(error_code="").values_list("error_code").annotate(n=Count("pk"))
    )
    repaired = job.tasks.filter(repairs__gt=0, status=BatchTask.Status.SUCCEEDED).count()
    finished = by_status.get("succeeded", 0) + by_status.get("failed", 0)
    return {
        "status": job.status,
        "total": job.task_count,
        "finished": finished,
        "percent": round(100 * finished / job.task_count, 1) if job.task_count else 0,
        "by_status": by_status,
        "by_model": by_model,
        "cost": decimal_text(totals["cost"] or Decimal(0)),
        "estimate_cost": decimal_text(job.estimate_cost),
        "prompt_tokens": totals["prompt"] or 0,
        "completion_tokens": totals["completion"] or 0,
        "failure_taxonomy": {**errors, "repaired_after_invalid": repaired},
    }


def charts(job: BatchJob, data: dict) -> dict:
    """Chart.js-ready series: per field, the mean and interval of each model per unit; and
    agreement with intervals."""
    series: dict[str, dict] = {}
    for row in data.get("per_text", []):
        if row.get("mean") is None:
            continue
        key = f"{row['framework']} · {row['field']}"
        chart = series.setdefault(key, {"labels": [], "datasets": {}})
        if row["unit"] not in chart["labels"]:
            chart["labels"].append(row["unit"])
        chart["datasets"].setdefault(row["model"], []).append(
            {
                "x": row["unit"],
                "y": row["mean"],
                "low": row["ci_t_low"],
                "high": row["ci_t_high"],
                "n": row["n"],
            }
        )
    agreement = [
        {
            "label": f"{r['framework']} · {r['field']} · {r['statistic']} · "
            + (r["model"] or "between models"),
            "value": r["value"],
            "low": r["ci_low"],
            "high": r["ci_high"],
            "n_units": r["n_units"],
        }
        for r in data.get("agreement", [])
    ]
    return {
        "distribution": [
            {
                "title": k,
                "labels": v["labels"],
                "datasets": [{"label": m, "data": pts} for m, pts in sorted(v["datasets"].items())],
            }
            for k, v in sorted(series.items())
        ],
        "agreement": agreement,
    }


# --- Replication package ------------------------------------------------------------------------

README = """# Replication package: batch job {job_id}

Job "{name}", created {created}. Everything needed to check the statistics:

* `raw_outputs.jsonl` - one line per task (custom_id = the task id, the OpenAI batch custom_id),
  with its unit (document#chunk position), framework@version, model, run, status and the
  model's raw answer.
* `tasks.csv` - the same tasks as a table (status, attempts, tokens, cost, latency, errors).
* `per_text_stats.csv` - per unit x framework x field x model: n, mean, median, sd, variance,
  95% t interval, 95% percentile bootstrap interval ({n_boot_mean} resamples), mode (nominal).
* `agreement.csv` - Krippendorff's alpha (between runs of each model, and between models) at
  each field's level of measurement with a 95% bootstrap interval over units
  ({n_boot_alpha} resamples), and {icc} for interval/ratio fields.
* `frameworks/*.json` - the framework versions used; `corpus_manifest.csv` - the chunks with
  their text sha256; `job.json` - the job's frozen parameters; `versions.json` - packages.
* `crucible_batch_stats.py` - the statistics code, verbatim; `recompute.py` - the script.

Recompute every statistic from the raw outputs and compare with the CSVs:

    pip install numpy pandas scipy krippendorff pingouin jsonschema
    python recompute.py          # prints "OK: ..." or the first difference; exit 1 if any

Load with pandas:

    import pandas as pd
    stats = pd.read_csv("per_text_stats.csv")
    raw = pd.read_json("raw_outputs.jsonl", lines=True)
"""

RECOMPUTE = '''"""Recompute every statistic of this package from raw_outputs.jsonl and compare."""
import json
import pathlib
import sys

import crucible_batch_stats as stats

here = pathlib.Path(__file__).resolve().parent
raw = [json.loads(line) for line in (here / "raw_outputs.jsonl").read_text("utf-8").splitlines()]
frameworks = {}
for path in sorted((here / "frameworks").glob("*.json")):
    data = json.loads(path.read_text("utf-8"))
    frameworks[f"{data['name']}@{data['version']}"] = data
_values, per_text, agreement = stats.compute(raw, frameworks)
problems = 0
for name, frame in (("per_text_stats.csv", per_text), ("agreement.csv", agreement)):
    stored = (here / name).read_text("utf-8")
    again = stats.to_csv(frame)
    if stored != again:
        problems += 1
        for i, (a, b) in enumerate(zip(stored.splitlines(), again.splitlines())):
            if a != b:
                print(f"{name} line {i + 1} differs:\\n  stored: {a}\\n  again:  {b}")
                break
        else:
            print(f"{name}: different number of lines")
    else:
        print(f"{name}: {len(frame)} rows identical")
if problems:
    sys.exit(1)
print(f"OK: {len(per_text)} per-text rows and {len(agreement)} agreement rows recomputed.")
'''

TASK_COLUMNS = [
    "custom_id",
    "unit",
    "chunk_id",
    "framework",
    "model",
    "model_revision",
    "run",
    "status",
    "attempts",
    "calls",
    "repairs",
    "error_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_ms",
    "started_at",
    "finished_at",
]


def _package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def replication_package(job: BatchJob) -> bytes:
    """The job's replication ZIP; the same job gives the same bytes (fixed entry dates, sorted
    entries, sorted keys)."""
    rows = raw_rows(job)
    frameworks = frameworks_of(job)
    _values, per_text, agreement = stats.compute(
        [r for r in rows if r["status"] == "succeeded"], frameworks
    )
    files: dict[str, bytes] = {}
    files["raw_outputs.jsonl"] = "".join(
        json.dumps(
            {
                k: r[k]
                for k in (
                    "custom_id",
                    "unit",
                    "framework",
                    "model",
                    "model_revision",
                    "run",
                    "status",
                    "raw_output",
                    "parsed_output",
                    "validation_errors",
                    "finished_at",
                )
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        + "\n"
        for r in rows
    ).encode()
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=TASK_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    files["tasks.csv"] = buf.getvalue().encode()
    files["per_text_stats.csv"] = stats.to_csv(per_text).encode()
    files["agreement.csv"] = stats.to_csv(agreement).encode()
    for label, content in sorted(frameworks.items()):
        files[f"frameworks/{label.replace('@', '-')}.json"] = (
            json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        ).encode()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["chunk_id", "document", "position", "sha256"])
    for c in job.frozen.get("chunks", []):
        writer.writerow([c["id"], c["document"], c["position"], c["sha256"]])
    files["corpus_manifest.csv"] = buf.getvalue().encode()
    files["job.json"] = (
        json.dumps(
            {
                "id": str(job.pk),
                "name": job.name,
                "created_at": job.created_at.isoformat(),
                "parameters_sha256": job.parameters_sha256,
                "frozen": job.frozen,
            },
            indent=2,
            sort_keys=True,
            ensure_ascii=False,
        )
        + "\n"
    ).encode()
    files["versions.json"] = (
        json.dumps(_package_versions(), indent=2, sort_keys=True) + "\n"
    ).encode()
    files["crucible_batch_stats.py"] = Path(stats.__file__).read_bytes()
    files["recompute.py"] = RECOMPUTE.encode()
    files["README.md"] = README.format(
        job_id=job.pk,
        name=job.name,
        created=job.created_at.isoformat(),
        n_boot_mean=stats.N_BOOT_MEAN,
        n_boot_alpha=stats.N_BOOT_ALPHA,
        icc=stats.ICC_NAME,
    ).encode()
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())
    )
    files["SHA256SUMS"] = manifest.encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"batch-{job.pk}/{name}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
    return out.getvalue()
