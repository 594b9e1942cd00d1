"""The PostgreSQL backend (config/db/postgresql): with server-side binding (prepared
statements) a query takes at most 65,535 bound parameters, and the backend batches for it, so
deleting a batch job with more tasks than that works (it failed before: one DELETE ... IN with
every task id). On SQLite (the embedded mode) the same deletion runs in Django's own batches."""

from __future__ import annotations

import pytest
from django.db import connection

from jobs.batch import services
from jobs.batch.models import BatchJob, BatchTask, FrameworkVersion
from tests.jobs.batch_support import narratives  # noqa: F401 (fixture)


@pytest.mark.django_db
def test_the_backend_declares_and_batches_for_the_bound_parameter_limit():
    if connection.vendor != "postgresql":
        pytest.skip("production mode only: the embedded mode is SQLite")
    assert connection.features.uses_server_side_binding  # DB_PREPARED_STATEMENTS, the default
    assert connection.features.max_query_params == 65_535
    assert connection.ops.bulk_batch_size(["id"], list(range(100_000))) == 65_535
    assert connection.ops.bulk_batch_size(["a", "b", "c"], list(range(100_000))) == 21_845
    assert connection.ops.bulk_batch_size([], [1, 2]) == 2


@pytest.mark.django_db
def test_a_job_with_more_tasks_than_bound_parameters_deletes(narratives):  # noqa: F811
    services.framework_sync()
    version = FrameworkVersion.objects.first()
    chunk = narratives.chunks.first()
    job = BatchJob.objects.create(name="big", corpus=narratives, runs=1, task_count=70_000)
    specs = (
        services.TaskSpec(chunk.pk, version.pk, version.label, f"m/{i // 20}", i % 20 + 1)
        for i in range(70_000)
    )
    assert services.tasks_bulk_insert(job_id=job.pk, specs=specs) == 70_000
    job.delete()
    assert not BatchJob.objects.filter(pk=job.pk).exists()
    assert not BatchTask.objects.filter(job_id=job.pk).exists()
