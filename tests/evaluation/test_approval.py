"""Approval: analysts approve or reject with a reason; the history is kept; the latest wins;
viewers cannot approve."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import pytest
from django.urls import reverse

from config.errors import Conflict, InvalidInput
from config.roles import Role
from evaluation import services
from evaluation.models import Approval
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_history_is_kept_and_the_latest_decision_wins(completed_run, fake_pdf):
    first_analyst, second_analyst = UserFactory(role=Role.ANALYST), UserFactory(role=Role.ANALYST)
    services.approval_decide(
        run=completed_run, user=first_analyst, decision="approved", reason="Targets met"
    )
    services.approval_decide(
        run=completed_run, user=second_analyst, decision="rejected", reason="Retention too low"
    )
    assert Approval.objects.filter(job=completed_run.job).count() == 2
    latest = services.latest_approval(completed_run)
    assert (latest.decision, latest.decided_by, latest.reason) == (
        "rejected",
        second_analyst,
        "Retention too low",
    )
    # The next report states the decision in force.
    services.validation_report_generate(run=completed_run, user=first_analyst)
    assert fake_pdf.contexts[-1]["approval"]["status"] == "rejected"
    assert fake_pdf.contexts[-1]["approval"]["reason"] == "Retention too low"


@pytest.mark.parametrize(
    ("decision", "reason", "error"),
    [("approved", "", "reason"), ("approved", "  \n ", "reason"), ("ship it", "ok", "decision")],
)
def test_a_decision_needs_a_valid_choice_and_a_reason(completed_run, decision, reason, error):
    with pytest.raises(InvalidInput, match=error):
        services.approval_decide(
            run=completed_run,
            user=UserFactory(role=Role.ANALYST),
            decision=decision,
            reason=reason,
        )
    assert not Approval.objects.exists()


def test_an_unfinished_validation_cannot_be_decided(completed_run):
    completed_run.status = "running"
    completed_run.save()
    with pytest.raises(Conflict):
        services.approval_decide(
            run=completed_run,
            user=UserFactory(role=Role.ANALYST),
            decision="approved",
            reason="early",
        )


def test_an_analyst_approves_on_the_dashboard(client, completed_run):
    analyst = UserFactory(role=Role.ANALYST)
    client.force_login(analyst)
    response = client.post(
        reverse("evaluation:approve", args=[completed_run.pk]),
        {"decision": "approved", "reason": "Meets every target"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-current-decision="approved"' in html and "Meets every target" in html
    assert Approval.objects.get().decided_by == analyst


def test_a_missing_reason_is_shown_on_the_dashboard(client, completed_run):
    client.force_login(UserFactory(role=Role.ANALYST))
    response = client.post(
        reverse("evaluation:approve", args=[completed_run.pk]),
        {"decision": "rejected", "reason": ""},
        headers={"HX-Request": "true"},
    )
    assert "A reason is required" in response.content.decode()
    assert not Approval.objects.exists()


@pytest.mark.parametrize("role", [Role.VIEWER, Role.ENGINEER])
def test_a_viewer_cannot_approve(client, completed_run, role):
    client.force_login(UserFactory(role=role))
    page = client.get(reverse("evaluation:run", args=[completed_run.pk])).content.decode()
    assert 'data-action="approve"' not in page and 'data-action="reject"' not in page
    response = client.post(
        reverse("evaluation:approve", args=[completed_run.pk]),
        {"decision": "approved", "reason": "I like it"},
    )
    assert response.status_code == 403
    assert not Approval.objects.exists()
