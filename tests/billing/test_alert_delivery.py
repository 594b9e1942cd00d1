"""A budget alert whose process died between creating it and sending it (a SIGKILLed worker
mid-reconcile) is sent by the next budget check, once, on the channels it had not reached."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from billing import notifications, services
from billing.models import BudgetAlert, NotificationLog
from config.roles import Role
from tests.billing.test_budgets import spend


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it in the process runs, no except catches it."""


def test_an_alert_cut_midway_is_finished_once_by_the_next_check(
    api_as, training_file, smollm, smoke, mailoutbox, slack, monkeypatch
):
    admin = api_as(Role.ADMIN)
    spend(training_file, smollm, smoke, dollars=480, name="a")  # 96%: the 80% and 95% alerts
    send_slack = notifications.send_slack

    def killed(**kwargs):
        raise Killed

    monkeypatch.setattr(notifications, "send_slack", killed)
    with pytest.raises(Killed):
        services.costs_accrue()  # 80% sent (email only); 95% emailed, then killed
    pending = BudgetAlert.objects.get(threshold=95)
    assert pending.delivered_at is None and set(pending.delivery) == {"email"}
    assert BudgetAlert.objects.get(threshold=80).delivered_at is not None
    assert len(mailoutbox) == 2 and not slack.received

    monkeypatch.setattr(notifications, "send_slack", send_slack)
    # The killed process's claim still holds: another check leaves the alert alone meanwhile.
    services.costs_accrue()
    assert not slack.received
    BudgetAlert.objects.filter(pk=pending.pk).update(
        delivery_claimed_until=timezone.now() - timedelta(seconds=1)
    )
    services.costs_accrue()
    services.costs_accrue()
    pending.refresh_from_db()
    assert pending.delivered_at is not None and set(pending.delivery) == {"email", "slack"}
    assert len(slack.received) == 1 and "95%" in slack.received[0]["text"]
    # Each alert once on each of its channels: no second email.
    assert sorted(m.subject[:14] for m in mailoutbox) == ["[Crucible] 80%", "[Crucible] 95%"]
    assert admin.user.email in mailoutbox[1].to
    assert BudgetAlert.objects.count() == 2
    assert NotificationLog.objects.filter(kind="budget_alert", ok=True).count() == 3


def test_alerts_sent_before_the_delivery_flag_existed_are_not_sent_again(db, mailoutbox):
    from importlib import import_module

    from django.apps import apps

    migration = import_module("billing.migrations.0005_budget_alert_delivery")
    alert = BudgetAlert.objects.create(
        month=services.month_start(), threshold=80, spent=1, budget=1, forecast=1
    )
    migration.existing_alerts_delivered(apps, None)
    alert.refresh_from_db()
    assert alert.delivered_at == alert.sent_at
    services.budget_alerts_check()
    assert not mailoutbox
