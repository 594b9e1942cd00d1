"""Budgets: enforcement at start, overrides, approvals, alerts, the hard cap, live cost."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import services
from billing.models import AuditEntry, BudgetAlert, JobCost, LedgerEntry, NotificationLog
from config.roles import Role
from tests.billing.conftest import SlackServer, make_job
from tests.conftest import assert_envelope
from training.models import JobStatus, MetricPoint

S = JobStatus


def spend(training_file, smollm, smoke, *, dollars, name="spent", tags=()):
    """A completed H100 on-demand job that cost ``dollars`` ($7.99/h), accrued."""
    seconds = float(dollars) / 7.99 * 3600
    start = timezone.now() - timedelta(seconds=seconds + 60)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        name=name,
        tags=tags,
        status=S.COMPLETED,
        rate=Decimal("7.99"),
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 1), (S.COMPLETED, seconds)],
        start=start,
        completed_at=start + timedelta(seconds=seconds),
    )
    services.job_finalize(job=job)
    return job


@pytest.fixture
def expensive(training_file, smollm, smoke, db):
    """A pending job whose estimate is about $40 (patched: the estimate is not under test)."""
    return make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        name="big",
        gpu_type="h100-pcie-80gb",
    )


@pytest.fixture
def fixed_estimate(monkeypatch):
    def set_to(dollars):
        real = services.job_estimate

        def fake(*, job):
            est = real(job=job)
            est.cost_on_demand = {"low": dollars * 0.9, "point": dollars, "high": dollars * 1.1}
            return est

        monkeypatch.setattr(services, "job_estimate", fake)

    return set_to


# --- Enforcement ------------------------------------------------------------------------------


def test_over_budget_start_is_refused_with_409_and_the_figures(
    api_as, training_file, smollm, smoke, expensive, fixed_estimate, fake_executor
):
    spend(training_file, smollm, smoke, dollars=480)
    fixed_estimate(40.0)
    engineer = api_as(Role.ENGINEER)
    response = engineer.post(f"training/jobs/{expensive.pk}/start")
    error = assert_envelope(response, 409, "budget_exceeded")
    assert "over its budget" in error["message"] and "$40.00" in error["message"]
    details = error["details"]
    assert Decimal(details["spent"]) == Decimal("480.00")
    assert Decimal(details["estimate"]) == Decimal("40.00")
    assert Decimal(details["budget"]) == Decimal("500")
    assert "reserved" in details
    expensive.refresh_from_db()
    assert expensive.status == S.PENDING and not fake_executor.launched
    assert not AuditEntry.objects.filter(action="override").exists()


def test_non_admin_cannot_override(
    api_as, training_file, smollm, smoke, expensive, fixed_estimate, fake_executor
):
    spend(training_file, smollm, smoke, dollars=480)
    fixed_estimate(40.0)
    response = api_as(Role.ENGINEER).post(
        f"training/jobs/{expensive.pk}/start?override_reason=please"
    )
    assert_envelope(response, 403, "permission_denied")
    expensive.refresh_from_db()
    assert expensive.status == S.PENDING


def test_admin_override_starts_and_is_audited(
    api_as, training_file, smollm, smoke, expensive, fixed_estimate, fake_executor
):
    spend(training_file, smollm, smoke, dollars=480)
    fixed_estimate(40.0)
    admin = api_as(Role.ADMIN)
    response = admin.post(
        f"training/jobs/{expensive.pk}/start?override_reason=client%20deadline%20Friday"
    )
    assert response.status_code == 200, response.content
    expensive.refresh_from_db()
    assert expensive.status != S.PENDING
    audit = AuditEntry.objects.get(action="override", job=expensive)
    assert audit.user == admin.user and audit.reason == "client deadline Friday"
    assert Decimal(audit.details["spent"]) == Decimal("480.00")
    cost = JobCost.objects.get(job=expensive)
    assert cost.override_reason == "client deadline Friday" and cost.reserved == Decimal("40.00")


def test_active_jobs_reserve_their_estimate(
    training_file, smollm, smoke, fixed_estimate, fake_executor
):
    from training.services import training_job_start

    fixed_estimate(100.0)
    jobs = [
        make_job(training_file=training_file, base_model=smollm, preset=smoke, name=f"j{i}")
        for i in range(6)
    ]
    for job in jobs[:5]:
        training_job_start(job=job, user=None)  # 5 x $100 reserved = the whole $500
    from config.errors import Conflict

    with pytest.raises(Conflict) as refused:
        training_job_start(job=jobs[5], user=None)
    assert refused.value.details["reserved"] == Decimal("400.00") or (
        refused.value.details["reserved"] >= Decimal("400")
    )


def test_expensive_job_needs_approval_then_starts(
    api_as, training_file, smollm, smoke, expensive, fixed_estimate, fake_executor
):
    fixed_estimate(200.0)
    engineer = api_as(Role.ENGINEER)
    error = assert_envelope(
        engineer.post(f"training/jobs/{expensive.pk}/start"), 409, "approval_required"
    )
    assert "$150" in error["message"]
    assert_envelope(engineer.post(f"billing/jobs/{expensive.pk}/approve", json={}), 403)
    admin = api_as(Role.ADMIN)
    approved = admin.post(f"billing/jobs/{expensive.pk}/approve", json={"reason": "worth it"})
    assert approved.status_code == 200 and approved.json()["approved"]
    assert AuditEntry.objects.filter(action="approval", job=expensive, reason="worth it").exists()
    assert engineer.post(f"training/jobs/{expensive.pk}/start").status_code == 200


# --- Live cost ----------------------------------------------------------------------------------


def test_accrual_follows_stored_times_recoveries_included_and_survives_restart(
    training_file, smollm, smoke
):
    start = timezone.now() - timedelta(hours=3)
    # Held 0-3600 s, recovering 3600-3900 s (not held), held again 3900 s until now.
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("2.49"),
        spot=True,
        start=start,
        stages=[
            (S.QUEUED, -10),
            (S.PROVISIONING, 0),
            (S.TRAINING, 100),
            (S.RECOVERING, 3600),
            (S.PROVISIONING, 3900),
            (S.TRAINING, 4000),
        ],
        recovery_count=1,
    )
    now = start + timedelta(seconds=7200)
    services.costs_accrue(now=now)
    held = 3600 + (7200 - 3900)
    expected = Decimal(held) * Decimal("2.49") / 3600
    cost = JobCost.objects.get(job=job)
    assert abs(cost.accrued - expected) < Decimal("0.001")
    # A restart: nothing in memory, the same call again, and again later: never counted twice.
    JobCost.objects.filter(job=job).update(accrued=0, held_seconds=0)
    services.costs_accrue(now=now)
    services.costs_accrue(now=now)
    total = sum(e.amount for e in LedgerEntry.objects.filter(object_id=str(job.pk)))
    assert abs(total - expected) < Decimal("0.001")
    job.refresh_from_db()
    assert abs(job.cost_actual - expected) < Decimal("0.001")
    services.costs_accrue(now=now + timedelta(seconds=60))
    later = sum(e.amount for e in LedgerEntry.objects.filter(object_id=str(job.pk)))
    assert abs(later - expected - Decimal(60) * Decimal("2.49") / 3600) < Decimal("0.001")


def test_live_cost_is_refreshed_by_the_scheduler_at_least_every_60_seconds(
    settings, training_file, smollm, smoke, fake_executor
):
    """The beat runs training's reconcile at most 60 s apart, and reconcile accrues live cost."""
    from training.services import training_jobs_reconcile

    schedule = settings.CELERY_BEAT_SCHEDULE["reconcile-training-jobs"]
    assert schedule["task"] == "training.tasks.reconcile_training_jobs"
    assert float(schedule["schedule"]) <= 60
    start = timezone.now() - timedelta(seconds=900)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("7.99"),
        estimate=5,
        start=start,
        executor_ref="fake-1",
        last_event_at=timezone.now(),  # a live worker: its heartbeat just came
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    training_jobs_reconcile()
    cost = JobCost.objects.get(job=job)
    assert cost.accrued_at is not None and timezone.now() - cost.accrued_at < timedelta(seconds=5)
    assert cost.held_seconds >= 900
    assert abs(cost.accrued - Decimal(cost.held_seconds) * Decimal("7.99") / 3600) < Decimal(
        "0.001"
    )


def test_reestimate_from_measured_speed(training_file, smollm, smoke):
    start = timezone.now() - timedelta(seconds=1000)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("7.99"),
        estimate=1,
        start=start,
        total_steps=100,
        current_step=10,
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 100)],
    )
    point = MetricPoint.objects.create(job=job, step=10)
    MetricPoint.objects.filter(pk=point.pk).update(recorded_at=start + timedelta(seconds=300))
    services.costs_accrue(now=start + timedelta(seconds=300))
    cost = JobCost.objects.get(job=job)
    assert cost.projection["seconds_per_step"] == pytest.approx(20.0)
    assert cost.projection["seconds_left"] == pytest.approx(90 * 20.0)
    expected_final = float(cost.accrued) + 1800 * 7.99 / 3600
    assert cost.projection["final_cost"] == pytest.approx(expected_final, rel=1e-3)


def test_variance_past_20_percent_warns_and_alerts_once(
    api_as, training_file, smollm, smoke, mailoutbox, settings
):
    settings.SLACK_WEBHOOK_URL = ""
    start = timezone.now() - timedelta(hours=1)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("7.99"),
        estimate=5,
        start=start,
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    api_as(Role.ADMIN)  # an admin with an email address receives it
    services.costs_accrue(now=start + timedelta(seconds=3600))  # $7.99 vs $5: +60%
    services.costs_accrue(now=start + timedelta(seconds=3660))
    body = api_as(Role.VIEWER).get(f"billing/jobs/{job.pk}/cost").json()
    assert body["warning"] is True and body["variance_pct"] > 20
    assert len([m for m in mailoutbox if "over its" in m.subject]) == 1


# --- Alerts ---------------------------------------------------------------------------------


def test_alerts_fire_once_at_80_and_once_at_95(
    api_as, training_file, smollm, smoke, mailoutbox, slack
):
    admin = api_as(Role.ADMIN)
    spend(training_file, smollm, smoke, dollars=300, name="a")
    services.costs_accrue()
    assert not mailoutbox and not slack.received

    spend(training_file, smollm, smoke, dollars=105, name="b")  # 405 = 81%
    services.costs_accrue()
    services.costs_accrue()
    assert [m.subject for m in mailoutbox] == [
        mailoutbox[0].subject
    ] and "80% of the" in mailoutbox[0].subject
    assert admin.user.email in mailoutbox[0].to
    body = mailoutbox[0].body
    for text in ("Spent:", "Remaining:", "Forecast:", "Active jobs", "/budgets/"):
        assert text in body
    assert not slack.received  # 80% is email only

    spend(training_file, smollm, smoke, dollars=75, name="c")  # 480 = 96%
    services.costs_accrue()
    services.costs_accrue()
    assert len(mailoutbox) == 2 and "95% of the" in mailoutbox[1].subject
    assert len(slack.received) == 1 and "95%" in slack.received[0]["text"]
    assert list(BudgetAlert.objects.order_by("threshold").values_list("threshold", flat=True)) == [
        80,
        95,
    ]
    assert NotificationLog.objects.filter(kind="budget_alert", ok=True).count() == 3


def test_slack_5xx_is_retried(settings, monkeypatch, db):
    from billing.notifications import send_slack

    server = SlackServer(statuses=[503, 500])
    settings.SLACK_WEBHOOK_URL = server.url
    monkeypatch.setattr("billing.notifications.SLACK_RETRY_INITIAL_S", 0.01)
    try:
        assert send_slack(kind="test", text="hello")["ok"] is True
        assert server.received == [{"text": "hello"}]
    finally:
        server.close()


def test_slack_4xx_is_not_retried_and_is_logged(settings, db):
    from billing.notifications import send_slack

    server = SlackServer(statuses=[404, 404])
    settings.SLACK_WEBHOOK_URL = server.url
    try:
        result = send_slack(kind="test", text="hello")
        assert result["ok"] is False and "404" in result["error"]
        assert server.statuses == [404]  # one attempt only
        assert NotificationLog.objects.get(kind="test").ok is False
    finally:
        server.close()


def test_thresholds_are_configurable(api_as, db):
    admin = api_as(Role.ADMIN)
    response = admin.post(
        "billing/budget/alerts",
        json={
            "thresholds": [
                {"percent": 50, "channels": ["email"]},
                {"percent": 90, "channels": ["email", "slack"]},
            ]
        },
    )
    assert response.status_code == 200, response.content
    assert [t["percent"] for t in response.json()["alert_thresholds"]] == [50, 90]
    assert AuditEntry.objects.filter(action="thresholds_set", user=admin.user).exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"thresholds": []},
        {"thresholds": [{"percent": 0}]},
        {"thresholds": [{"percent": 80}, {"percent": 80}]},
        {"thresholds": [{"percent": 80, "channels": ["pager"]}]},
    ],
)
def test_bad_thresholds_write_nothing(api_as, db, payload):
    from billing.models import MonthlyBudget

    response = api_as(Role.ADMIN).post("billing/budget/alerts", json=payload)
    assert_envelope(response, 422)
    assert not MonthlyBudget.objects.exists() and not AuditEntry.objects.exists()


def test_engineer_cannot_set_budget_or_thresholds(api_as, db):
    engineer = api_as(Role.ENGINEER)
    assert_envelope(engineer.post("billing/budget/monthly", json={"amount": 9}), 403)
    assert_envelope(engineer.post("billing/budget/alerts", json={"thresholds": []}), 403)


# --- Hard cap -----------------------------------------------------------------------------------


def test_hard_cap_checkpoints_then_stops_a_running_job(training_file, smollm, smoke, fake_executor):
    spend(training_file, smollm, smoke, dollars=495)
    start = timezone.now() - timedelta(hours=1)
    running = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("7.99"),
        estimate=4,
        start=start,
        executor_ref="fake-1",
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    free = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=0,
        start=start,
        executor_ref="fake-2",
        executor="local",
        gpu_type="",
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    services.costs_accrue()  # 495 + ~8 > 500
    running.refresh_from_db()
    assert running.status == S.CANCELLED and running.cancel_requested_at
    assert fake_executor.cancelled == [("fake-1", False)]  # SIGTERM: checkpoint, then exit
    audit = AuditEntry.objects.get(action="hard_cap_stop", job=running)
    assert audit.reason == "budget hard cap" and audit.user is None
    free.refresh_from_db()
    assert free.status == S.TRAINING  # a free local job costs nothing: not stopped
    services.costs_accrue()
    assert fake_executor.cancelled == [("fake-1", False)]


def test_overridden_job_is_not_stopped_by_the_cap(training_file, smollm, smoke, fake_executor):
    spend(training_file, smollm, smoke, dollars=510)
    job = make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.TRAINING,
        rate=Decimal("7.99"),
        estimate=4,
        executor_ref="fake-1",
        stages=[(S.QUEUED, -1), (S.PROVISIONING, 0), (S.TRAINING, 10)],
    )
    JobCost.objects.filter(job=job).update(overridden_at=timezone.now(), override_reason="ok")
    services.costs_accrue()
    job.refresh_from_db()
    assert job.status == S.TRAINING and not fake_executor.cancelled


# --- Monthly view ------------------------------------------------------------------------------


def test_monthly_budget_breakdown_attribution_and_constant_queries(
    api_as, training_file, smollm, smoke
):
    viewer = api_as(Role.VIEWER)
    spend(training_file, smollm, smoke, dollars=50, name="acme-1", tags=["client:acme"])
    viewer.get("billing/budget/monthly")
    with CaptureQueriesContext(connection) as few:
        viewer.get("billing/budget/monthly")
    for i in range(4):
        spend(training_file, smollm, smoke, dollars=10 + i, name=f"x{i}", tags=["project:x"])
    with CaptureQueriesContext(connection) as many:
        response = viewer.get("billing/budget/monthly")
    assert len(many) == len(few)
    body = response.json()
    assert Decimal(body["spent"]) == Decimal("96.00")
    assert Decimal(body["remaining"]) == Decimal("404.00")
    assert body["jobs"][0]["name"] == "acme-1"
    attribution = {a["attribution"]: Decimal(a["spent"]) for a in body["attribution"]}
    assert attribution == {"client:acme": Decimal("50.00"), "project:x": Decimal("46.00")}
    assert body["daily"]


def test_forecast_counts_active_jobs(api_as, training_file, smollm, smoke):
    spend(training_file, smollm, smoke, dollars=100)
    make_job(
        training_file=training_file,
        base_model=smollm,
        preset=smoke,
        status=S.QUEUED,
        rate=Decimal("7.99"),
        estimate=30,
    )
    body = api_as(Role.VIEWER).get("billing/budget/monthly").json()
    assert Decimal(body["forecast"]) == Decimal("130.00")
    assert len(body["active_jobs"]) == 1


def test_admin_sets_the_budget(api_as, db):
    admin = api_as(Role.ADMIN)
    response = admin.post(
        "billing/budget/monthly", json={"amount": "750", "approval_threshold": 200}
    )
    assert response.status_code == 200, response.content
    assert Decimal(response.json()["budget"]) == Decimal("750")
    assert AuditEntry.objects.filter(action="budget_set", user=admin.user).exists()
    assert_envelope(admin.post("billing/budget/monthly", json={"amount": -1}), 422)
    assert_envelope(admin.get("billing/budget/monthly?month=nope"), 422)


def test_csv_export(api_as, training_file, smollm, smoke):
    spend(training_file, smollm, smoke, dollars=12, name="for-accounting", tags=["client:acme"])
    services.llm_usage_record(amount=Decimal("0.5"), tokens=100_000, model="judge")
    response = api_as(Role.VIEWER).get("billing/budget/monthly.csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    lines = response.content.decode().strip().splitlines()
    assert lines[0].startswith("date,month,kind")
    assert any("gpu_time" in line and "client:acme" in line for line in lines)
    assert any("llm_tokens" in line for line in lines)
    assert float(lines[-1].rsplit(",", 1)[1]) == pytest.approx(12.5, abs=1e-4)


# --- Job notifications ------------------------------------------------------------------------


def test_completion_and_failure_notifications_follow_preferences(
    api_as, training_file, smollm, smoke, mailoutbox
):
    from billing.tasks import notify_job_finished

    engineer = api_as(Role.ENGINEER)
    done = spend(training_file, smollm, smoke, dollars=1, name="done")
    type(done).objects.filter(pk=done.pk).update(created_by=engineer.user)
    notify_job_finished(str(done.pk))
    assert len(mailoutbox) == 1 and "completed" in mailoutbox[0].subject
    assert mailoutbox[0].to == [engineer.user.email]
    response = engineer.post("billing/notifications", json={"job_completed_email": False})
    assert response.status_code == 200 and response.json()["job_completed_email"] is False
    notify_job_finished(str(done.pk))
    assert len(mailoutbox) == 1
