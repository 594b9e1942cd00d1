"""Batch requests ask for OpenAI structured outputs: every task's chat body carries
``response_format`` with its framework's answer schema, on the wire (loopback server) and in
the OpenAI Batch JSONL export."""

# ruff: noqa: F811  (fixtures imported from other modules are redefined as arguments)
from __future__ import annotations

import json

from jobs.batch import services
from jobs.batch.frameworks import all_frameworks
from jobs.batch.models import BatchTask
from tests.jobs.batch_support import json_model, narratives  # noqa: F401
from tests.jobs.openai_server import (  # noqa: F401
    fast_gateway,
    loopback_model,
    openai_server,
)

FRAMEWORKS = ["narrative_salience", "moral_foundations"]


def _job(corpus, model_key):
    ids = list(corpus.chunks.order_by("pk").values_list("pk", flat=True)[:1])
    return services.job_create(
        user=None,
        corpus_id=corpus.pk,
        selection={"chunk_ids": ids},
        frameworks=FRAMEWORKS,
        models=[model_key],
        runs=1,
        decoding={"max_tokens": 64},
    )


def _expected(task: BatchTask) -> dict:
    content = task.framework_version.content
    return {
        "type": "json_schema",
        "json_schema": {
            "name": content["name"],
            "schema": content["answer_schema"],
            "strict": False,
        },
    }


def test_framework_response_format_is_the_openai_json_schema_shape():
    spec = all_frameworks()["moral_foundations"]
    fmt = services.framework_response_format(content=spec.data)
    assert fmt == {
        "type": "json_schema",
        "json_schema": {
            "name": "moral_foundations",
            "schema": spec.answer_schema,
            "strict": False,
        },
    }
    # OpenAI's name rule: a-z, A-Z, 0-9, underscores and dashes, at most 64 characters.
    odd = services.framework_response_format(
        content={"name": "moral foundations/v2 " + "x" * 80, "answer_schema": {}}
    )
    name = odd["json_schema"]["name"]
    assert len(name) == 64 and name.startswith("moral_foundations_v2_")


def test_batch_requests_and_export_carry_response_format(
    narratives, json_model, openai_server, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        job = _job(narratives, json_model.key)
    services.job_run_inline(job=job)
    tasks = list(job.tasks.select_related("framework_version").order_by("id"))
    assert len(tasks) == 2 and all(t.status == BatchTask.Status.SUCCEEDED for t in tasks)

    sent = [call.body for call in openai_server.calls()]
    assert len(sent) == 2
    by_schema = {json.dumps(b["response_format"], sort_keys=True) for b in sent}
    assert by_schema == {json.dumps(_expected(t), sort_keys=True) for t in tasks}

    lines = [json.loads(line) for line in services.openai_batch_requests(job=job)]
    for line, task in zip(lines, tasks, strict=True):
        assert line["custom_id"] == task.id
        assert line["body"]["response_format"] == _expected(task)
        assert line["body"]["max_tokens"] == 64 and line["body"]["messages"]
