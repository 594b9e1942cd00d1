"""Issue 17, datasets and single evaluations on /v1/: line-numbered upload errors with nothing
written, a stored dataset version with its checksum, one sample evaluated and read back, the
history's empty state, the rubric lock, the scorers, and authorization on every new route
and page."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.test import Client

from config.roles import Role
from evaluation.evals import rubrics, scorers
from evaluation.models import EvalDataset, EvalRun, EvalSample
from tests.conftest import assert_envelope
from tests.factories import UserFactory

GOOD = [
    {
        "id": "q1",
        "input": "What is the capital of France?",
        "reference": "Paris is the capital of France.",
        "contexts": ["Paris is the capital and largest city of France."],
        "output": "Paris is the capital of France.",
        "metadata": {"topic": "geo"},
    },
    {"input": "Name a primary colour.", "reference": "Red"},
]


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def upload(api, name: str, body: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return api._client.post(
        "/v1/datasets",
        {"name": name, "file": SimpleUploadedFile("d.jsonl", body)},
        headers=api._headers,
    )


@pytest.fixture
def engineer(api_as):
    return api_as(Role.ENGINEER, scheme="Bearer")


def test_bad_line_gives_line_numbered_errors_and_writes_nothing(engineer):
    body = jsonl(GOOD) + b'{"input": ""}\n' + b'{"reference": "x"}\n' + b"{not json\n"
    error = assert_envelope(upload(engineer, "broken", body), 422, "validation_error")
    lines = [(e["line"], e["pointer"]) for e in error["details"]["errors"]]
    assert lines == [(3, "/input"), (4, ""), (5, "")]
    assert "line 3" in error["message"]
    assert "input" in error["details"]["errors"][1]["message"]
    assert error["details"]["error_total"] == 3
    assert not EvalDataset.objects.exists() and not EvalSample.objects.exists()


def test_unknown_field_and_duplicate_id_are_reported(engineer):
    body = jsonl(
        [{"input": "a", "id": "x"}, {"input": "b", "id": "x"}, {"input": "c", "colour": 1}]
    )
    error = assert_envelope(upload(engineer, "dups", body), 422)
    assert [(e["line"], e["pointer"]) for e in error["details"]["errors"]] == [(2, "/id"), (3, "")]
    assert "colour" in error["details"]["errors"][1]["message"]
    assert not EvalDataset.objects.exists()


def test_good_dataset_is_versioned_with_checksum_and_one_sample_evaluated(engineer):
    body = jsonl(GOOD)
    response = upload(engineer, "geo", body)
    assert response.status_code == 201, response.content
    first = response.json()
    assert first["version"] == 1 and first["sample_count"] == 2
    assert first["sha256"] == hashlib.sha256(body).hexdigest()
    again = upload(engineer, "geo", body).json()
    assert again["version"] == 2 and again["label"] == "geo@v2"
    assert EvalSample.objects.filter(dataset_id=first["id"]).count() == 2

    # Score the sample's recorded answer (no model call): deterministic scores.
    evaluated = engineer.post(
        "/v1/evaluate",
        json={
            "rubric": "grounded_qa",
            "dataset_id": first["id"],
            "sample_index": 0,
            "embed_model": None,
        },
    )
    assert evaluated.status_code == 201, evaluated.content
    run = evaluated.json()
    assert run["status"] == "succeeded" and run["passed"] is True
    assert run["scores"]["correctness"]["measures"] == {"exact_match": 1.0, "token_f1": 1.0}
    assert run["scores"]["faithfulness"]["value"] == 1.0
    assert run["scores"]["hallucination"]["value"] == 0.0
    assert run["rubric"]["version"] == rubrics.rubric_get("grounded_qa").version
    meta = run["metadata"]
    assert meta["rubric"]["sha256"] == rubrics.rubric_get("grounded_qa").sha256
    assert meta["environment"]["code_version"] and meta["parameters"]["decoding"]

    # Read back: the stored run with its metadata, and it is in the history.
    again = engineer.get(f"/v1/evals/{run['id']}")
    assert again.status_code == 200 and again.json()["scores"] == run["scores"]
    listed = engineer.get("/v1/evals").json()
    assert listed["total"] == 1 and listed["data"][0]["id"] == run["id"]


def test_inline_sample_below_threshold_and_hallucination(engineer):
    response = engineer.post(
        "/v1/evaluate",
        json={
            "rubric": "grounded_qa",
            "input": "Where is the Eiffel Tower?",
            "reference": "In Paris.",
            "contexts": ["The Eiffel Tower stands in Paris."],
            "output": "The tower is in Berlin. Giraffes designed the cathedral.",
            "embed_model": None,
        },
    )
    run = response.json()
    assert response.status_code == 201, run
    assert run["passed"] is False and run["failure"] == "below_threshold"
    assert run["scores"]["hallucination"]["value"] == 1.0
    assert run["scores"]["faithfulness"]["passed"] is False


def test_bad_evaluate_inputs_are_clear_and_write_nothing(engineer):
    assert_envelope(
        engineer.post("/v1/evaluate", json={"rubric": "nope", "input": "x", "output": "y"}), 422
    )
    assert_envelope(
        engineer.post("/v1/evaluate", json={"rubric": "grounded_qa", "input": "x"}), 422
    )
    assert_envelope(
        engineer.post(
            "/v1/evaluate", json={"rubric": "grounded_qa", "input": "x", "model": "nowhere/none"}
        ),
        422,
    )
    assert not EvalRun.objects.exists()


def test_history_empty_state_and_result_page_survives_reload(db):
    user = UserFactory(role=Role.ANALYST)
    client = Client()
    client.force_login(user)
    page = client.get("/evals/")
    assert page.status_code == 200
    assert b"No evaluations yet" in page.content
    run = EvalRun.objects.create(
        rubric="grounded_qa",
        rubric_version="1.0.0",
        rubric_sha256="x" * 64,
        input="Q?",
        output="A.",
        status="succeeded",
        passed=True,
        scores={
            "correctness": {
                "title": "Correctness",
                "value": 0.9,
                "passed": True,
                "method": "reference",
                "pass_threshold": 0.5,
                "higher_is_better": True,
            }
        },
    )
    for _ in range(2):  # a reload shows the same stored result
        page = client.get(f"/evals/runs/{run.pk}/")
        assert page.status_code == 200 and b"0.9" in page.content and b"Correctness" in page.content
    assert b"No evaluations yet" not in client.get("/evals/").content


def test_history_page_upload_shows_line_errors(db):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client = Client()
    client.force_login(UserFactory(role=Role.ENGINEER))
    page = client.post(
        "/evals/",
        {"action": "upload", "name": "bad", "file": SimpleUploadedFile("b.jsonl", b'{"x": 1}\n')},
    )
    assert page.status_code == 200
    assert (
        b"The dataset was not stored" in page.content and b'<td class="num">1</td>' in page.content
    )
    assert not EvalDataset.objects.exists()


def test_scorers_are_deterministic():
    assert scorers.exact_match("The Paris!", "paris") == 1.0
    assert scorers.token_f1("red apple", "red pear") == pytest.approx(0.5)
    assert scorers.support("Paris is big.", ["Paris is a big city"]) == 1.0
    assert scorers.claims("One. Two!\nThree?") == ["One.", "Two!", "Three?"]


def test_rubric_lock_is_current():
    assert rubrics.check_lock() == []
    for rubric in rubrics.all_rubrics().values():
        assert {d["key"] for d in rubric.dimensions} == {
            "correctness",
            "faithfulness",
            "hallucination",
        }


def test_rubric_lock_refuses_changed_content_without_new_version(tmp_path):
    from config.versionlock import LockError

    src = rubrics.RUBRICS_DIR / "grounded_qa.json"
    (tmp_path / "grounded_qa.json").write_text(src.read_text())
    rubrics.write_lock(tmp_path)
    data = json.loads(src.read_text())
    data["dimensions"][0]["pass_threshold"] = 0.9
    (tmp_path / "grounded_qa.json").write_text(json.dumps(data))
    assert "changed but its version" in rubrics.check_lock(tmp_path)[0]
    with pytest.raises(LockError):
        rubrics.write_lock(tmp_path)


# --- Authorization ------------------------------------------------------------------------------

READS = [
    "/v1/datasets",
    "/v1/rubrics",
    "/v1/evals",
    "/v1/batch-evals",
    "/v1/metrics",
    "/v1/evals/00000000-0000-0000-0000-000000000000",
]
WRITES = [
    ("/v1/evaluate", {"rubric": "grounded_qa", "input": "x", "output": "y"}),
    ("/v1/batch-evals", {"dataset": 1, "models": ["m"], "rubric": "grounded_qa"}),
]


@pytest.mark.parametrize("path", READS)
def test_anonymous_reads_get_401(anon_api, path):
    assert_envelope(anon_api.get(path), 401, "not_authenticated")


@pytest.mark.parametrize(("path", "body"), WRITES)
def test_anonymous_and_viewer_writes(anon_api, api_as, path, body):
    assert_envelope(anon_api.post(path, json=body), 401)
    assert_envelope(api_as(Role.VIEWER).post(path, json=body), 403, "permission_denied")


def test_viewer_cannot_upload_but_reads(api_as):
    viewer = api_as(Role.VIEWER)
    assert_envelope(upload(viewer, "x", jsonl(GOOD)), 403)
    assert not EvalDataset.objects.exists()
    assert viewer.get("/v1/datasets").status_code == 200
    assert viewer.get("/v1/rubrics").json()["data"]


@pytest.mark.parametrize("path", ["/evals/", "/evals/batches/", "/evals/dashboard/"])
def test_pages_redirect_anonymous_and_refuse_viewer_writes(db, path):
    assert Client().get(path).status_code == 302
    client = Client()
    client.force_login(UserFactory(role=Role.VIEWER))
    assert client.get(path).status_code == 200
    if path != "/evals/dashboard/":
        assert client.post(path, {"action": "evaluate"}).status_code == 403
