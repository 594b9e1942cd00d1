"""The engine's own task kind: a framework's prompt over a corpus chunk, answered through the
gateway and validated against the framework's schema (repaired once)."""

from __future__ import annotations

import re
from decimal import Decimal

from corpora.models import Chunk
from jobs import gateway
from jobs.batch.frameworks import render_messages, validate_answer
from jobs.batch.kinds import Outcome, TaskKind, kind_register
from jobs.batch.models import BatchJob, BatchTask, FrameworkVersion


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
