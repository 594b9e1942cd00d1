"""Share links: public (no sign-in), 30 days, revocable; expired or revoked -> 404."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from config.errors import NotFound
from config.roles import Role
from config.templatetags.crucible import arrows  # pages show one arrow style (→)
from evaluation import services
from evaluation.models import Report, ShareLink
from tests.conftest import fetch_download
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def link(completed_run):
    report = Report.objects.get(run=completed_run)
    return services.share_link_create(report=report, user=UserFactory(role=Role.ANALYST))


def test_a_link_lasts_30_days(link):
    lifetime = link.expires_at - link.created_at
    assert timedelta(days=29, hours=23) < lifetime <= timedelta(days=30, seconds=5)
    assert len(link.token) >= 40 and link.state == "active"


def test_anyone_with_the_link_sees_the_figures_and_downloads_the_pdf(client, link):
    page = client.get(reverse("evaluation:shared", args=[link.token]))
    assert page.status_code == 200
    html = page.content.decode()
    figures = link.report.metrics
    assert escape(arrows(figures["perplexity"]["display"])) in html
    assert link.report.sha256 in html
    download = client.get(reverse("evaluation:shared_download", args=[link.token]))
    assert fetch_download(download).startswith(b"%PDF")
    link.refresh_from_db()
    assert link.download_count == 1 and link.last_used_at is not None
    assert Report.objects.get(pk=link.report_id).download_count == 1


@pytest.mark.parametrize("how", ["expired", "revoked", "unknown"])
def test_expired_revoked_or_unknown_links_are_404(client, link, how):
    token = link.token
    if how == "expired":
        ShareLink.objects.filter(pk=link.pk).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
    elif how == "revoked":
        services.share_link_revoke(link=link, user=None)
    else:
        token = "x" * 43
    assert client.get(reverse("evaluation:shared", args=[token])).status_code == 404
    assert client.get(reverse("evaluation:shared_download", args=[token])).status_code == 404
    with pytest.raises(NotFound):
        services.share_link_resolve(token=token)
    assert ShareLink.objects.get(pk=link.pk).download_count == 0


def test_revoking_is_recorded_once(link):
    user = UserFactory(role=Role.ANALYST)
    services.share_link_revoke(link=link, user=user)
    first = ShareLink.objects.get(pk=link.pk).revoked_at
    services.share_link_revoke(link=link, user=None)
    again = ShareLink.objects.get(pk=link.pk)
    assert again.revoked_at == first and again.revoked_by == user and again.state == "revoked"


def test_analysts_share_and_revoke_from_the_dashboard(client, completed_run):
    analyst = UserFactory(role=Role.ANALYST)
    client.force_login(analyst)
    report = Report.objects.get(run=completed_run)
    response = client.post(
        reverse("evaluation:report_share", args=[report.pk]), headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    link = ShareLink.objects.get()
    assert link.created_by == analyst
    assert reverse("evaluation:shared", args=[link.token]) in response.content.decode()
    response = client.post(
        reverse("evaluation:share_revoke", args=[link.pk]), headers={"HX-Request": "true"}
    )
    assert response.status_code == 200 and 'data-share="revoked"' in response.content.decode()


@pytest.mark.parametrize("role", [Role.VIEWER, Role.ENGINEER])
def test_others_cannot_share_or_revoke(client, link, role):
    client.force_login(UserFactory(role=role))
    report = link.report
    assert client.post(reverse("evaluation:report_share", args=[report.pk])).status_code == 403
    assert client.post(reverse("evaluation:share_revoke", args=[link.pk])).status_code == 403
    assert ShareLink.objects.count() == 1 and ShareLink.objects.get().revoked_at is None
