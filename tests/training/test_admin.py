"""The admin shows what the platform records (webhook events, metric points, checkpoints)
read-only: no add, no change, so nobody edits them into disagreeing with the worker."""

from __future__ import annotations

import uuid

import pytest
from django.contrib import admin
from django.test import RequestFactory

from tests.training.test_pages import make_job
from training.models import Checkpoint, MetricPoint, WebhookEvent

READ_ONLY = (WebhookEvent, MetricPoint, Checkpoint)


@pytest.fixture
def records(training_file, smollm, smoke):
    job = make_job(training_file, smollm, smoke, name="Recorded")
    event = WebhookEvent.objects.create(
        event_id=uuid.uuid4(), job=job, type="progress", sequence=1, payload={"data": {}}
    )
    point = MetricPoint.objects.create(job=job, step=3, train_loss=2.5)
    checkpoint = Checkpoint.objects.create(job=job, step=6, uri="file:///c", manifest_uri="m")
    return {WebhookEvent: event, MetricPoint: point, Checkpoint: checkpoint}


@pytest.mark.django_db
@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_model_admin_offers_neither_add_nor_change(model, admin_user):
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    model_admin = admin.site._registry[model]
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request)
    assert model_admin.has_view_permission(request)


@pytest.mark.django_db
@pytest.mark.parametrize("model", READ_ONLY, ids=lambda m: m.__name__)
def test_admin_pages_are_view_only(model, records, admin_client):
    base = f"/admin/training/{model._meta.model_name}/"
    changelist = admin_client.get(base)
    assert changelist.status_code == 200
    assert f'href="{base}add/"' not in changelist.content.decode()
    assert admin_client.get(f"{base}add/").status_code == 403
    obj = records[model]
    page = admin_client.get(f"{base}{obj.pk}/change/")
    html = page.content.decode()
    assert page.status_code == 200 and 'name="_save"' not in html
    # A forged POST changes nothing.
    response = admin_client.post(f"{base}{obj.pk}/change/", {"step": 99})
    assert response.status_code == 403
    obj.refresh_from_db()
    assert getattr(obj, "step", None) != 99
