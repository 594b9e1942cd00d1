"""Server time of the training dashboard at scale.

1. The job list with 10,000 jobs (default view, a filtered and searched view, and sorted by
   duration), through the Django test client (middleware, view, template). Baseline, in the
   same run: what a Django user would write instead, a plain paginated ``ListView`` over the
   same filtered queryset (database pagination, 25 a page) rendering the same columns in a
   plain table, served through the same middleware.
2. The chart endpoint of a job with 1,000,000 metric points: cold (nothing cached: one
   GROUP BY over every row for the MinMax preselection, then LTTB), cached (the same step
   range again, running or finished), and a live increment (``?after=``, what an open page
   polls). Baseline: the naive endpoint that returns every point (all rows serialised, as
   GET /api/v1/training/jobs/{id}/metrics does).

Subject and baseline alternate request by request (bench/_alternate.py: the order flips every
round), and each figure is the median of the same number of requests on both sides; the IQR
and min-max of both sides are printed under each ratio. The target is under
150 ms each. CRUCIBLE_BENCH_JOBS and CRUCIBLE_BENCH_POINTS shrink the data for a quick run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import statistics
import time
from datetime import timedelta
from decimal import Decimal

from bench._alternate import alternate, spread

JOBS = int(os.environ.get("CRUCIBLE_BENCH_JOBS", "10000"))
POINTS = int(os.environ.get("CRUCIBLE_BENCH_POINTS", "1000000"))
TARGET_MS = 150.0


def _conversations(n: int) -> bytes:
    rows = [
        {
            "id": f"b-{i}",
            "system_prompt": "You are a careful financial advisor.",
            "training_pairs": [{"user_input": f"Goal {i}?", "target_response": "Save " * 20}],
        }
        for i in range(n)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _median_ms(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


PLAIN_LIST_TEMPLATE = """<!doctype html><html><body><h1>Training jobs</h1>
<table><thead><tr><th>Name</th><th>Status</th><th>Preset</th><th>Base model</th>
<th>Created by</th><th>Tags</th><th>Cost</th><th>Created</th></tr></thead><tbody>
{% for job in object_list %}<tr><td><a href="/training/{{ job.pk }}/">{{ job.name }}</a></td>
<td>{{ job.get_status_display }}</td><td>{{ job.preset.name|default:"custom" }}</td>
<td>{{ job.base_model.name }}</td><td>{{ job.created_by.username|default:"-" }}</td>
<td>{{ job.tags|join:", " }}</td><td>{{ job.cost_actual }}</td><td>{{ job.created_at }}</td>
</tr>{% endfor %}</tbody></table>
<p>Page {{ page_obj.number }} of {{ paginator.num_pages }} ({{ paginator.count }} jobs)</p>
</body></html>"""


def _plain_list_urlconf():
    """config.urls plus /bench/plain-list/: a plain paginated ListView (the baseline)."""
    import types

    from django.contrib.auth.mixins import LoginRequiredMixin
    from django.template import engines
    from django.urls import path
    from django.views.generic import ListView

    import config.urls
    from training import views

    template = engines["django"].from_string(PLAIN_LIST_TEMPLATE)

    class PlainJobList(LoginRequiredMixin, ListView):
        paginate_by = views.PAGE_SIZE

        def get_queryset(self):
            parsed = views._list_filters(self.request)
            return views._filtered_jobs(parsed["filters"], parsed["sort"]).select_related(
                "preset", "base_model", "created_by"
            )

        def get_template_names(self):
            return []

        def render_to_response(self, context, **kwargs):
            from django.http import HttpResponse

            return HttpResponse(template.render(context, self.request))

    module = types.ModuleType("bench_plain_list_urls")
    module.urlpatterns = [
        path("bench/plain-list/", PlainJobList.as_view()),
        *config.urls.urlpatterns,
    ]
    return module


def _seed_jobs(user, training_file, smollm, presets) -> None:
    from django.utils import timezone

    from training import services
    from training.models import JobStatus, TrainingJob

    rng = random.Random(11)
    template = services.training_job_create(
        user=user, training_file=training_file, base_model=smollm, preset=presets[0], name="t"
    )
    statuses = [s for s, _ in JobStatus.choices]
    tags = ["experiment", "production", "client:acme", "client:zen", "sweep", "test"]
    now = timezone.now()
    rows = []
    for i in range(JOBS):
        status = rng.choice(statuses)
        created = now - timedelta(minutes=i * 7)
        started = created + timedelta(minutes=2) if status != "pending" else None
        done = status in ("completed", "failed", "cancelled")
        rows.append(
            TrainingJob(
                name=f"Advisor run {i:05d}",
                notes="aggressive learning rate" if i % 17 == 0 else "",
                tags=sorted(rng.sample(tags, rng.randint(0, 3))),
                training_file=training_file,
                base_model=smollm,
                preset=rng.choice(presets),
                configuration=template.configuration,
                status=status,
                progress=100.0 if status == "completed" else rng.uniform(0, 90),
                current_step=rng.randint(0, 500),
                total_steps=500,
                cost_estimate=Decimal(rng.randint(1, 120)),
                cost_actual=Decimal(str(round(rng.uniform(0, 140), 2))),
                created_by=user,
                started_at=started,
                completed_at=started + timedelta(minutes=rng.randint(5, 900)) if done else None,
                perplexity_baseline=24.5 if status == "completed" else None,
                perplexity_trained=16.8 if status == "completed" else None,
            )
        )
    TrainingJob.objects.bulk_create(rows, batch_size=1000)
    # auto_now_add ignores the value given: spread the creation times afterwards.
    ids = list(TrainingJob.objects.order_by("name").values_list("id", flat=True))
    for i in range(0, len(ids), 100):
        TrainingJob.objects.filter(pk__in=ids[i : i + 100]).update(
            created_at=now - timedelta(minutes=i * 7)
        )


def _seed_points(job) -> None:
    from django.db import connection, transaction

    from training.models import MetricPoint

    table = MetricPoint._meta.db_table
    columns = (
        "job_id, step, epoch, train_loss, val_loss, learning_rate, grad_norm, "
        "tokens_per_second, gpu_memory_mb, elapsed_seconds, eta_seconds, recorded_at"
    )
    marks = ", ".join(["%s"] * 12)
    # The table name comes from the model, not from input.
    sql = f"INSERT INTO {table} ({columns}) VALUES ({marks})"  # noqa: S608
    rng = random.Random(3)
    now = job.created_at
    job_id = job.pk.hex if connection.vendor == "sqlite" else job.pk

    def rows(start, stop):
        for step in range(start, stop):
            loss = 1.1 + 2.0 * math.exp(-step / 150_000) + rng.uniform(-0.05, 0.05)
            lr = 2e-4 * 0.5 * (1 + math.cos(math.pi * step / POINTS))
            val = 1.3 + 1.8 * math.exp(-step / 150_000) if step % 1000 == 0 else None
            yield (job_id, step, step / POINTS, loss, val, lr, 0.9, 2100.0, 11264.0,
                   step * 0.1, (POINTS - step) * 0.1, now)  # fmt: skip

    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(1, POINTS + 1, 50_000):
            cursor.executemany(sql, list(rows(start, min(start + 50_000, POINTS + 1))))


def main() -> None:
    from django.core.cache import cache
    from django.http import JsonResponse
    from django.test import Client

    from config.roles import Role
    from corpora.services import training_file_create
    from tests.factories import UserFactory
    from training.models import BaseModel, JobStatus, MetricPoint, Preset, TrainingJob

    logging.getLogger("crucible.access").setLevel(logging.WARNING)
    user = UserFactory(role=Role.ENGINEER)
    client = Client()
    client.force_login(user)
    training_file = training_file_create(
        name="bench", upload=io.BytesIO(_conversations(20)), user=None
    )
    smollm = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    presets = list(Preset.objects.all())
    start = time.perf_counter()
    _seed_jobs(user, training_file, smollm, presets)
    print(f"seeded {TrainingJob.objects.count():,} jobs in {time.perf_counter() - start:.1f} s")

    # --- The list ---------------------------------------------------------------------
    urls = {
        "default": "/training/",
        "filtered": "/training/?q=advisor&tag=production&cost_min=10&cost_max=90&status=completed",
        "by duration": "/training/?sort=-duration&page=7",
    }
    from django.test.utils import override_settings

    rounds = 7
    with override_settings(ROOT_URLCONF=_plain_list_urlconf()):
        for name, url in urls.items():
            plain = url.replace("/training/", "/bench/plain-list/", 1)
            for warm in (url, plain):  # warm up (templates, caches)
                assert client.get(warm).status_code == 200, warm
            ours_ms, baseline_ms = alternate(
                lambda u=url: client.get(u), lambda u=plain: client.get(u), rounds
            )
            ours, baseline = statistics.median(ours_ms), statistics.median(baseline_ms)
            flag = "ok" if ours < TARGET_MS else "OVER TARGET"
            print(
                f"list page, {JOBS:,} jobs, {name}: {ours:.1f} ms ({flag}); baseline (plain "
                f"paginated ListView, same queryset) {baseline:.1f} ms; ratio baseline/ours "
                f"{baseline / ours:.2f}x (median of {rounds} each, alternating)"
            )
            print(
                f"  ours {spread(ours_ms, '.1f', 'ms')}; "
                f"baseline {spread(baseline_ms, '.1f', 'ms')}"
            )

    # --- The chart --------------------------------------------------------------------
    job = TrainingJob.objects.filter(status=JobStatus.TRAINING).first()
    start = time.perf_counter()
    _seed_points(job)
    print(
        f"seeded {MetricPoint.objects.filter(job=job).count():,} metric points in "
        f"{time.perf_counter() - start:.1f} s"
    )
    url = f"/training/{job.pk}/chart/"
    response = client.get(url)
    data = response.json()
    assert response.status_code == 200 and data["downsampled"], data.get("points_logged")
    size_kb = len(response.content) / 1024
    warm_running = _median_ms(lambda: client.get(url), 7)
    increment = _median_ms(lambda: client.get(f"{url}?after={POINTS - 20}"), 7)

    TrainingJob.objects.filter(pk=job.pk).update(
        status=JobStatus.COMPLETED, completed_at=job.created_at
    )
    client.get(url)  # the first request after it finished computes and caches
    warm = _median_ms(lambda: client.get(url), 7)

    def naive_endpoint():
        rows = list(
            MetricPoint.objects.filter(job=job)
            .order_by("step")
            .values("step", "train_loss", "val_loss", "learning_rate")
        )
        return JsonResponse({"points": rows})

    naive_size = len(naive_endpoint().content) / 1024 / 1024
    # Cold (cache cleared before each) against the naive endpoint: 3 runs each, alternating.
    TrainingJob.objects.filter(pk=job.pk).update(status=JobStatus.TRAINING, completed_at=None)
    cold_ms, baseline_ms = alternate(lambda: client.get(url), naive_endpoint, 3, before=cache.clear)
    cold, baseline = statistics.median(cold_ms), statistics.median(baseline_ms)
    for label, ms in (
        ("cold (nothing cached: MinMax range aggregates over every row, then LTTB)", cold),
        ("running job, again before its next step (cached)", warm_running),
        ("finished job (cached)", warm),
        ("live increment (?after=, what an open page polls)", increment),
    ):
        flag = "ok" if ms < TARGET_MS else "OVER TARGET"
        print(
            f"chart endpoint, {POINTS:,} points, {label}: {ms:.1f} ms ({flag}); "
            f"ratio against the naive endpoint {baseline / ms:.1f}x"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"naive endpoint (every point, {naive_size:.1f} MiB of JSON): {baseline:.0f} ms; "
        f"downsampled response: {len(data['train'])} + {len(data['val'])} + {len(data['lr'])} "
        f"points, {size_kb:.0f} KiB"
    )
    print(f"  cold {spread(cold_ms, '.0f', 'ms')}; naive {spread(baseline_ms, '.0f', 'ms')}")
