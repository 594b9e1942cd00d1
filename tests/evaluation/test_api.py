"""Validation API: runs, responses, judge scores, blind rating items, ratings, reports, share
links, approvals, and the job's validation-report download."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import pytest

from config.roles import Role
from evaluation.models import Approval, HumanRating, RatingPair, Report, ShareLink, ValidationRun
from tests.conftest import assert_envelope, fetch_download
from tests.evaluation.core_fixtures import (  # noqa: F401
    REVEALING,
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
    on_commit_now,
)

pytestmark = pytest.mark.django_db


def test_engineer_starts_a_run_and_it_completes(
    api_as, completed_job, fake_pdf, on_commit_now, fake_scoring
):
    engineer = api_as(Role.ENGINEER)
    response = engineer.post("validation/runs", json={"job_id": str(completed_job.pk)})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["job_id"] == str(completed_job.pk) and body["trigger"] == "manual"
    run = ValidationRun.objects.get(pk=body["id"])
    assert run.status == "completed" and run.created_by == engineer.user
    detail = engineer.get(f"validation/runs/{run.pk}").json()
    assert detail["metrics"]["perplexity"]["display"].startswith("Perplexity:")
    assert detail["suites"]["knowledge_retention"]["version"]


@pytest.mark.parametrize("role", [Role.ANALYST, Role.VIEWER])
def test_only_engineers_start_runs(api_as, completed_job, role):
    response = api_as(role).post("validation/runs", json={"job_id": str(completed_job.pk)})
    assert_envelope(response, 403, "permission_denied")
    assert not ValidationRun.objects.exists()


def test_starting_a_run_for_an_unknown_or_unfinished_job_is_refused(api_as, completed_job):
    engineer = api_as(Role.ENGINEER)
    error = assert_envelope(
        engineer.post("validation/runs", json={"job_id": "00000000-0000-0000-0000-000000000001"}),
        422,
    )
    assert "No training job" in error["message"]
    assert_envelope(engineer.post("validation/runs", json={"job_id": "nope"}), 422)
    completed_job.status = "training"
    completed_job.save()
    error = assert_envelope(
        engineer.post("validation/runs", json={"job_id": str(completed_job.pk)}), 409
    )
    assert "completed job" in error["message"]
    assert not ValidationRun.objects.exists()


def test_runs_list_filters_and_stays_flat(api_as, completed_run, django_assert_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.evaluation.core_fixtures import make_completed_job

    viewer = api_as(Role.VIEWER)
    body = viewer.get("validation/runs?status=completed").json()
    assert [r["id"] for r in body["items"]] == [str(completed_run.pk)]
    assert viewer.get("validation/runs?status=failed").json()["items"] == []
    assert viewer.get("validation/runs?q=advisor").json()["count"] == 1
    assert viewer.get("validation/runs?q=zzz").json()["count"] == 0
    with CaptureQueriesContext(connection) as one:
        viewer.get("validation/runs")
    for n in range(3):
        ValidationRun.objects.create(job=make_completed_job(name=f"Other {n}"))
    with django_assert_num_queries(len(one.captured_queries)):
        assert viewer.get("validation/runs").json()["count"] == 4


def test_responses_and_judge_scores(api_as, completed_run):
    viewer = api_as(Role.VIEWER)
    responses = viewer.get(f"validation/runs/{completed_run.pk}/responses?suite=brand_voice").json()
    assert responses["count"] == 60
    assert {r["side"] for r in responses["items"]} == {"baseline", "trained"}
    scores = viewer.get(f"validation/runs/{completed_run.pk}/judge-scores").json()
    assert scores["count"] == 160
    assert scores["items"][0]["judge"].startswith("offline:")


def test_blind_rating_through_the_api(api_as, completed_run):
    analyst = api_as(Role.ANALYST)
    item = analyst.get(f"validation/runs/{completed_run.pk}/rating-items/next")
    assert item.status_code == 200
    body = item.json()
    assert set(body) == {
        "pair_id",
        "suite",
        "suite_name",
        "prompt",
        "context",
        "left",
        "right",
        "dimensions",
        "progress",
    }
    raw = item.content.decode().lower()
    assert not any(word in raw for word in REVEALING), raw[:500]
    # Asking again gives the same item and the same order (not re-randomized).
    again = analyst.get(f"validation/runs/{completed_run.pk}/rating-items/next").json()
    assert (again["pair_id"], again["left"]) == (body["pair_id"], body["left"])

    keys = [d["key"] for d in body["dimensions"]]
    post = analyst.post(
        f"validation/rating-items/{body['pair_id']}/rating",
        json={
            "left_scores": dict.fromkeys(keys, 2),
            "right_scores": dict.fromkeys(keys, 5),
            "comment": "B is warmer",
        },
    )
    assert post.status_code == 201, post.content
    assert post.json()["progress"]["done"] == 1
    rating = HumanRating.objects.get()
    pair = RatingPair.objects.get(pk=body["pair_id"])
    expected_tuned = 5 if pair.left_side == "baseline" else 2
    assert set(rating.trained_scores.values()) == {expected_tuned}
    # Rated twice: refused, nothing written.
    twice = analyst.post(
        f"validation/rating-items/{body['pair_id']}/rating",
        json={"left_scores": dict.fromkeys(keys, 3), "right_scores": dict.fromkeys(keys, 3)},
    )
    assert_envelope(twice, 409)
    assert HumanRating.objects.count() == 1
    # The ratings list (after rating) does say which side is which.
    listed = analyst.get(f"validation/runs/{completed_run.pk}/ratings").json()
    assert listed["items"][0]["trained_scores"] == rating.trained_scores


@pytest.mark.parametrize(
    ("left", "right", "message"),
    [
        ({"empathy": 9}, {}, "1 to 5"),
        ({}, {}, "missing"),
        ({"empathy": 3, "clarity": 3, "appropriateness": 3, "humour": 2}, {}, "unknown"),
    ],
)
def test_bad_scores_are_refused_and_write_nothing(api_as, completed_run, left, right, message):
    analyst = api_as(Role.ANALYST)
    item = analyst.get(
        f"validation/runs/{completed_run.pk}/rating-items/next?suite=emotional_intelligence"
    ).json()
    ok = {"empathy": 3, "clarity": 3, "appropriateness": 3}
    response = analyst.post(
        f"validation/rating-items/{item['pair_id']}/rating",
        json={
            "left_scores": left or ok if message != "missing" else {},
            "right_scores": right or ok,
        },
    )
    error = assert_envelope(response, 422)
    assert message in error["message"] or message in str(error["details"])
    assert not HumanRating.objects.exists()


def test_a_rater_cannot_submit_anothers_item(api_as, completed_run):
    first, second = api_as(Role.ANALYST), api_as(Role.ANALYST)
    item = first.get(f"validation/runs/{completed_run.pk}/rating-items/next").json()
    keys = [d["key"] for d in item["dimensions"]]
    response = second.post(
        f"validation/rating-items/{item['pair_id']}/rating",
        json={"left_scores": dict.fromkeys(keys, 3), "right_scores": dict.fromkeys(keys, 3)},
    )
    assert_envelope(response, 404)
    assert not HumanRating.objects.exists()


@pytest.mark.parametrize("role", [Role.VIEWER, Role.ENGINEER])
def test_only_analysts_rate(api_as, completed_run, role):
    client = api_as(role)
    assert_envelope(client.get(f"validation/runs/{completed_run.pk}/rating-items/next"), 403)
    assert not RatingPair.objects.exists()


def test_reports_regenerate_download_and_job_route(api_as, completed_run):
    analyst = api_as(Role.ANALYST)
    created = analyst.post(f"validation/runs/{completed_run.pk}/reports")
    assert created.status_code == 201, created.content
    assert created.json()["version"] == 2
    listed = api_as(Role.VIEWER).get(f"validation/runs/{completed_run.pk}/reports").json()
    assert [r["version"] for r in listed] == [2, 1]
    report = Report.objects.get(run=completed_run, version=2)
    pdf = fetch_download(api_as(Role.VIEWER).get(f"validation/reports/{report.pk}/download"))
    assert pdf.startswith(b"%PDF") and b"fake report 2" in pdf
    via_job = api_as(Role.VIEWER).get(
        f"training/jobs/{completed_run.job_id}/download/validation-report"
    )
    assert fetch_download(via_job) == pdf  # the newest version


def test_job_download_without_a_report_is_404(api_as, completed_job):
    response = api_as(Role.VIEWER).get(
        f"training/jobs/{completed_job.pk}/download/validation-report"
    )
    error = assert_envelope(response, 404)
    assert "no validation report" in error["message"]


def test_viewers_cannot_regenerate_or_share(api_as, completed_run):
    viewer = api_as(Role.VIEWER)
    report = Report.objects.get(run=completed_run)
    assert_envelope(viewer.post(f"validation/runs/{completed_run.pk}/reports"), 403)
    assert_envelope(viewer.post(f"validation/reports/{report.pk}/share-links"), 403)
    assert Report.objects.count() == 1 and not ShareLink.objects.exists()


def test_share_links_through_the_api(api_as, completed_run, client):
    analyst = api_as(Role.ANALYST)
    report = Report.objects.get(run=completed_run)
    link = analyst.post(f"validation/reports/{report.pk}/share-links").json()
    assert link["state"] == "active" and link["url"].endswith(f"/{link['token']}/")
    assert client.get(link["url"]).status_code == 200
    revoked = analyst.post(f"validation/share-links/{link['id']}/revoke").json()
    assert revoked["state"] == "revoked"
    assert client.get(link["url"]).status_code == 404
    listed = analyst.get(f"validation/reports/{report.pk}/share-links").json()
    assert [x["state"] for x in listed] == ["revoked"]


def test_approvals_through_the_api(api_as, completed_run):
    analyst = api_as(Role.ANALYST)
    url = f"validation/runs/{completed_run.pk}/approvals"
    first = analyst.post(url, json={"decision": "rejected", "reason": "EI below target"})
    assert first.status_code == 201 and first.json()["decided_by"] == analyst.user.username
    second = analyst.post(url, json={"decision": "approved", "reason": "Re-rated: meets targets"})
    assert second.status_code == 201
    history = api_as(Role.VIEWER).get(url).json()
    assert [a["decision"] for a in history] == ["approved", "rejected"]


@pytest.mark.parametrize(
    "payload",
    [
        {"decision": "approved", "reason": "   "},
        {"decision": "maybe", "reason": "why not"},
        {"decision": "approved"},
    ],
)
def test_an_approval_needs_a_decision_and_a_reason(api_as, completed_run, payload):
    response = api_as(Role.ANALYST).post(
        f"validation/runs/{completed_run.pk}/approvals", json=payload
    )
    assert_envelope(response, 422)
    assert not Approval.objects.exists()


@pytest.mark.parametrize("role", [Role.VIEWER, Role.ENGINEER])
def test_viewers_and_engineers_cannot_approve(api_as, completed_run, role):
    response = api_as(role).post(
        f"validation/runs/{completed_run.pk}/approvals",
        json={"decision": "approved", "reason": "looks fine"},
    )
    assert_envelope(response, 403, "permission_denied")
    assert not Approval.objects.exists()


def test_anonymous_gets_401(anon_api, completed_run):
    assert_envelope(anon_api.get("validation/runs"), 401)
    assert_envelope(anon_api.get(f"validation/runs/{completed_run.pk}"), 401)
