"""Property-based API fuzzing with schemathesis against the OpenAPI documents of /api/v1/ and
of the public, OpenAI-compatible /v1/.

Bounded for CI: a fixed example budget per operation and generation mode, derandomized
(Hypothesis' fixed seed), so the run is reproducible and takes a few minutes on two cores.
schemathesis' checks are all on: no 5xx, responses conform to the documented schema and
status codes, schema-valid requests are accepted and schema-violating ones refused. Requests
run in-process through the WSGI application with an engineer's token.

schemathesis' own pytest plugin (``from_fixture``) does not run under pytest 9 yet
(``'Function' object has no attribute '_nodeid'``), so the test drives its Hypothesis
strategies directly, one operation at a time, and reports every failing operation at once.

On /v1/ the offline model's generation and embedding are stood in for (the same stand-in as
tests/jobs/test_public_api.py's ``fake_model``), so chat, streaming, embeddings, RAG answers
and evaluations run every case through the real gateway (cache, budget, ledger, flags) in
milliseconds instead of running SmolLM2 on the CPU per case.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from config.roles import Role
from tests.factories import TokenFactory, UserFactory

# Examples per operation and mode; CRUCIBLE_FUZZ_EXAMPLES raises it for a deeper local run.
MAX_EXAMPLES = int(os.environ.get("CRUCIBLE_FUZZ_EXAMPLES", "6"))
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)

# Operations whose schema-valid requests may still be refused with a documented 422, because
# validity depends on what JSON Schema cannot state: the contents of an uploaded file, rows
# that must exist (a training file, a job, a corpus), an HMAC over the body. The other checks
# (no 5xx, documented statuses, response schemas, invalid input refused) still apply to them.
CONTENT_VALIDATED = {
    "POST /api/v1/corpora/upload",
    "POST /api/v1/corpora/{corpus_id}/upload",
    "POST /api/v1/training-files",
    "POST /api/v1/training/jobs",
    "POST /api/v1/training/webhook",
    "POST /api/v1/training/templates",
    "GET /api/v1/training/compare",
    "GET /api/v1/training/compare/csv",
    "GET /api/v1/training/cost-estimate",
    "POST /api/v1/validation/runs",
    "POST /api/v1/jobs/estimate",
    "POST /api/v1/jobs",
    "POST /api/v1/rag/indexes",
    # /v1/: a dataset file's lines; rubric names (files under evaluation/rubrics/), the dataset
    # row and the models an evaluation names, and its cross-field rules (an output to score or
    # a model to answer); corpora that must exist.
    "POST /v1/datasets",
    "POST /v1/evaluate",
    "POST /v1/batch-evals",
    "POST /v1/rag/indexes",
    # Only an active batch evaluation can be cancelled (the row's state; 422 otherwise).
    "POST /v1/batch-evals/{batch_id}/cancel",
}


# Response statuses per operation, printed with CRUCIBLE_FUZZ_STATS=1 (how many cases got
# past validation to a 2xx).
STATUSES: dict[str, Counter] = defaultdict(Counter)


def _unknown_query_only(failure: BaseException) -> bool:
    """A request refused by schemathesis' own rule that unknown query parameters are invalid:
    OpenAPI 3 cannot state that rule, and the API ignores unknown parameters (as HTTP APIs
    commonly do), so such a case is not a disagreement between schema and behaviour."""
    text = str(failure)
    components = [line.strip() for line in text.splitlines() if line.strip().startswith("- ")]
    invalid = [c for c in components if "violates" in c]
    return bool(invalid) and all(
        c.startswith("- query: violates `additionalProperties`")
        or c.startswith("- header: violates `required`")
        for c in invalid
    )


def _summary(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " | ".join(lines[:14])[:1500]


def _run_operation(operation, mode, headers, steer=None) -> tuple[int, str | None]:
    count = {"n": 0}
    excluded = [positive_data_acceptance] if operation.label in CONTENT_VALIDATED else []
    strategy = operation.as_strategy(generation_mode=mode)
    if steer is not None and mode is GenerationMode.POSITIVE:
        # Half the schema-valid cases name rows that exist (see ``_steer``), so they get past
        # the lookups to the handlers' real work; the other half stay as generated.
        strategy = st.tuples(strategy, st.booleans()).map(
            lambda pair: steer(pair[0]) if pair[1] else pair[0]
        )

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        count["n"] += 1
        try:
            response = case.call_and_validate(
                headers=headers,
                excluded_checks=excluded,
                # A real server always sets the peer address (the token-guessing limit keys on it).
                environ_base={"REMOTE_ADDR": "127.0.0.1"},
            )
            STATUSES[operation.label][response.status_code] += 1
        except BaseExceptionGroup as failure:
            if mode is GenerationMode.NEGATIVE and _unknown_query_only(failure):
                return
            raise

    try:
        run()
    except Unsatisfiable:  # no invalid request exists (an operation without inputs)
        return count["n"], None
    except (Exception, BaseExceptionGroup) as exc:
        return count["n"], f"{operation.label} [{mode.value}]: {_summary(exc)}"
    return count["n"], None


def _fuzz(
    schema, token: str, skip: frozenset = frozenset(), scheme: str = "Token", steer=None
) -> tuple[int, int, list[str]]:
    headers = {"Authorization": f"{scheme} {token}"}
    # No U+0000 in generated text: PostgreSQL text cannot hold it, so the API refuses it with
    # a 422 (config/api.py), a rule JSON Schema can state only as a pattern on every string.
    schema.config.generation.update(allow_x00=False)
    operations = cases = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in skip:
            continue
        operations += 1
        for mode in MODES:
            n, failure = _run_operation(operation, mode, headers, steer)
            cases += n
            if failure:
                failures.append(failure)
    if os.environ.get("CRUCIBLE_FUZZ_STATS"):
        for label, statuses in sorted(STATUSES.items()):
            print(f"  {label}: {dict(sorted(statuses.items()))}")
    return operations, cases, failures


@pytest.fixture
def engineer_key(transactional_db, settings):
    # Each request commits as it would in production (autocommit), so a value PostgreSQL
    # refuses (a 422) does not abort a test-wide transaction under the requests after it.
    settings.API_RATE_LIMIT = "1000000/m"
    return TokenFactory(user=UserFactory(role=Role.ENGINEER)).key


@pytest.fixture
def wsgi_app():
    """The WSGI application, with the test database kept open across requests (as Django's
    test client does: the request signals would otherwise close the test's connection)."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    from config.wsgi import application

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield application
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def test_api_v1_conforms_to_its_schema(engineer_key, wsgi_app):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", wsgi_app)
    operations, cases, failures = _fuzz(schema, engineer_key)
    print(
        f"schemathesis /api/v1/: {operations} operations, {cases} cases, {len(failures)} failures"
    )
    assert operations > 50
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def stand_in_model(monkeypatch):
    """The offline provider's chat, stream and embeddings stood in for: a short answer, its
    replay as chunks (the base provider's fallback) and deterministic 384-d vectors."""
    import hashlib
    import time
    import uuid

    from jobs.gateway.providers import BaseProvider, OfflineProvider, ProviderResponse

    def chat(self, model, request, *, timeout, request_id):
        text = "A short stand-in answer [1]."
        completion = len(text.split())
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.remote_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": completion,
                "total_tokens": 12 + completion,
            },
        }
        return ProviderResponse(body, 12, completion)

    def embed(self, model, inputs, *, timeout, request_id):
        data = []
        for i, text in enumerate(inputs):
            digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
            vector = [(digest[j % 32] - 127.5) / 127.5 for j in range(384)]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(t.split()) + 1 for t in inputs)
        body = {"object": "list", "data": data, "model": model.remote_id}
        body["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return ProviderResponse(body, tokens, 0)

    monkeypatch.setattr(OfflineProvider, "chat", chat)
    monkeypatch.setattr(OfflineProvider, "chat_stream", BaseProvider.chat_stream)
    monkeypatch.setattr(OfflineProvider, "prompt_tokens", lambda self, model, request: 12)
    monkeypatch.setattr(OfflineProvider, "embed", embed)


@pytest.fixture
def quick_readiness(monkeypatch):
    """GET /v1/metrics runs the readiness checks; under the test's open SQLite transaction the
    cache check waits for the write lock until the 3 s check timeout, every case. The checks
    still run (and report), with a short timeout."""
    import functools

    from config import health

    monkeypatch.setattr(health, "readiness", functools.partial(health.readiness, timeout=0.2))


BASE = "offline/smollm2-135m-instruct"
EMBED = "offline/all-minilm-l6-v2"
# The smallest max_tokens limit of the shipped response profiles (jobs/profiles/concise): a
# limit per profile file, which the schema cannot state (the handler refuses more with 422).
PROFILE_TOKEN_LIMIT = 60


@pytest.fixture
def v1_rows(engineer_key, stand_in_model, django_capture_on_commit_callbacks):
    """One of each row the /v1/ routes look up: a built knowledge base (and one to delete), an
    evaluation dataset, a scored evaluation, a batch evaluation and a chat response."""
    import io
    from pathlib import Path

    from rest_framework.authtoken.models import Token

    from corpora import services as corpus_services
    from corpora.rag import services as rag
    from evaluation.evals import datasets
    from evaluation.evals import services as evals
    from jobs import serving
    from jobs.models import ChatResponse

    user = Token.objects.get(key=engineer_key).user
    samples = Path(__file__).resolve().parents[2] / "samples" / "corpus" / "speeches.jsonl"
    corpus = corpus_services.corpus_create(
        name="Speeches", upload=io.BytesIO(samples.read_bytes()), user=user
    )
    with django_capture_on_commit_callbacks(execute=False):
        kb = rag.knowledge_base_create(name="Speeches", corpus_ids=[corpus.pk], user=user)
        doomed = rag.knowledge_base_create(name="Doomed", corpus_ids=[corpus.pk], user=user)
    rag.knowledge_base_refresh(kb_id=kb.pk)
    rows = b'{"input": "Who spoke?", "reference": "A president.", "contexts": ["A speech."]}\n'
    dataset = datasets.dataset_create(user=user, name="fuzz", stream=io.BytesIO(rows * 3))
    run = evals.evaluation_create(
        user=user,
        rubric="grounded_qa",
        input="Who spoke?",
        reference="A president.",
        contexts=["A speech by a president."],
        output="A president spoke.",
    )
    batch = evals.batch_eval_create(
        user=user, dataset_id=dataset.pk, models=[BASE], rubric="grounded_qa", enqueue=False
    )
    answer = serving.chat_respond(
        user=user,
        model=BASE,
        messages=[{"role": "user", "content": "Hello"}],
        profile=None,
        controls=serving.Controls(),
        source=ChatResponse.Source.CHAT,
        request_id="fuzz",
    )
    return {
        "corpus": str(corpus.pk),
        "kb": str(kb.pk),
        "doomed": str(doomed.pk),
        "dataset": dataset.pk,
        "run": str(run.pk),
        "batch": str(batch.pk),
        "response": answer.response.pk,
    }


def _steerer(rows: dict):
    """Puts existing rows and models into a schema-valid case: the ids in its path, the model,
    index, corpora, dataset, rubric and response it names. Each value keeps the case valid."""

    def steer(case):
        label = case.operation.label
        path = case.path_parameters or {}
        for name, value in (
            ("model_id", BASE),
            ("dataset_id", rows["dataset"]),
            ("run_id", rows["run"]),
            ("batch_id", rows["batch"]),
            ("index_id", rows["doomed"] if label.startswith("DELETE") else rows["kb"]),
        ):
            if name in path:
                path[name] = value
        body = case.body
        if isinstance(body, dict):
            if "model" in body:
                body["model"] = EMBED if label.endswith("/embeddings") else BASE
            for name, value in (
                ("models", [BASE]),
                ("index", rows["kb"]),
                ("corpora", [rows["corpus"]]),
                ("dataset", rows["dataset"]),
                ("response_id", rows["response"]),
                ("rubric", "grounded_qa"),
            ):
                if name in body:
                    body[name] = value
            body.pop("profile", None)  # a random name is a 404; the default profile instead
            controls = body.get("controls") if label.endswith("/v1/chat") else body
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(controls, dict) and isinstance(controls.get(name), int):
                    controls[name] = min(controls[name], PROFILE_TOKEN_LIMIT)
        return case

    return steer


def test_public_v1_conforms_to_its_schema(
    engineer_key, wsgi_app, stand_in_model, quick_readiness, v1_rows
):
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", wsgi_app)
    operations, cases, failures = _fuzz(
        schema, engineer_key, scheme="Bearer", steer=_steerer(v1_rows)
    )
    print(f"schemathesis /v1/: {operations} operations, {cases} cases, {len(failures)} failures")
    assert operations >= 28
    assert not failures, "\n\n".join(failures)
