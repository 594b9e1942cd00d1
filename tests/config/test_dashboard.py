"""The dashboard shell: sign-in, Overview, sections, roles, htmx partials, error pages."""

import pytest
from django.test import Client

from config.roles import Role
from tests.factories import PASSWORD, UserFactory

SECTIONS = ["/", "/datasets/", "/training/", "/evaluations/", "/budgets/"]


def signed_in(role=Role.VIEWER) -> tuple[Client, object]:
    user = UserFactory(role=role)
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client, user


@pytest.mark.django_db
@pytest.mark.parametrize("url", SECTIONS)
def test_anonymous_is_sent_to_login(url):
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


@pytest.mark.django_db
def test_login_page_and_sign_in_flow():
    user = UserFactory(role=Role.ENGINEER)
    client = Client()
    page = client.get("/login/")
    assert page.status_code == 200 and b'name="username"' in page.content
    bad = client.post("/login/", {"username": user.username, "password": "wrong"})
    assert bad.status_code == 200
    assert b"correct username and password" in bad.content
    good = client.post("/login/", {"username": user.username, "password": PASSWORD})
    assert good.status_code == 302 and good["Location"] == "/"
    overview = client.get("/")
    assert overview.status_code == 200
    html = overview.content.decode()
    for text in ("Overview", "System status", "Active jobs", "Recent results", "Engineer"):
        assert text in html
    assert 'hx-headers=\'{"X-CSRFToken": "' in html
    assert "/static/vendor/htmx/htmx.min.js" in html and "cdn" not in html.lower()


@pytest.mark.django_db
def test_logout_is_a_post():
    client, _ = signed_in()
    response = client.post("/logout/")
    assert response.status_code == 302 and response["Location"] == "/login/"
    assert client.get("/").status_code == 302


@pytest.mark.django_db
@pytest.mark.parametrize("url", SECTIONS)
def test_every_section_renders_for_a_viewer(url):
    client, _ = signed_in(Role.VIEWER)
    response = client.get(url)
    assert response.status_code == 200
    assert b'aria-current="page"' in response.content


@pytest.mark.django_db
def test_admin_link_only_for_admins():
    admin_client, _ = signed_in(Role.ADMIN)
    viewer_client, _ = signed_in(Role.VIEWER)
    assert b'href="/admin/"' in admin_client.get("/").content
    assert b'href="/admin/"' not in viewer_client.get("/").content
    assert admin_client.get("/admin/").status_code == 200
    assert viewer_client.get("/admin/").status_code == 302


@pytest.mark.django_db
def test_a_user_without_a_role_is_told_so():
    client, _ = signed_in(role=None)
    response = client.get("/")
    assert response.status_code == 403
    assert b"no role" in response.content.lower()


@pytest.mark.django_db(transaction=True)
def test_overview_status_partial_for_htmx():
    client, _ = signed_in()
    response = client.get("/?part=status", headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="system-status"')
    assert "<html" not in html
    for name in ("Database", "Broker", "Cache", "Storage", "Background worker"):
        assert name in html


def _training_jobs(count: int, **fields) -> list:
    """``count`` training jobs with the given fields (status, perplexity, error...)."""
    import io

    from corpora.services import training_file_create
    from tests.training.conftest import conversations
    from training.models import BaseModel, Preset, TrainingJob
    from training.services import training_job_create

    training_file = training_file_create(
        name=f"file-{TrainingJob.objects.count()}", upload=io.BytesIO(conversations()), user=None
    )
    base_model = BaseModel.objects.get(name="SmolLM2-135M-Instruct")
    preset = Preset.objects.get(key="smoke")
    jobs = []
    for i in range(count):
        job = training_job_create(
            user=UserFactory(role=Role.ENGINEER),
            training_file=training_file,
            base_model=base_model,
            preset=preset,
            name=f"{fields.get('status', 'pending')} job {i}",
        )
        TrainingJob.objects.filter(pk=job.pk).update(**fields)
        jobs.append(job)
    return jobs


@pytest.mark.django_db
def test_overview_lists_active_and_recent_training_jobs_with_bounded_queries(
    django_assert_max_num_queries,
):
    from django.utils import timezone

    client, _ = signed_in()
    _training_jobs(12, status="training", progress=40.0, current_step=8, total_steps=20)
    _training_jobs(
        12,
        status="completed",
        completed_at=timezone.now(),
        perplexity_baseline=24.5,
        perplexity_trained=16.8,
    )
    _training_jobs(
        1,
        status="failed",
        completed_at=timezone.now(),
        error_type="OutOfMemoryError",
        error_details={"title": "Out of GPU memory"},
    )
    _training_jobs(3, status="pending")  # neither running nor finished: on neither list
    with django_assert_max_num_queries(12):
        response = client.get("/")
    html = response.content.decode()
    assert html.count("badge-training") == 10  # the ten newest active jobs
    assert html.count("badge-completed") + html.count("badge-failed") == 10
    assert "OutOfMemoryError" in html and "Out of GPU memory" in html
    assert "Perplexity 24.5 → 16.8" in html and "(31% better)" in html
    assert 'href="/training/' in html and "pending job" not in html


@pytest.mark.django_db
def test_overview_without_jobs_shows_empty_states():
    client, _ = signed_in()
    html = client.get("/").content.decode()
    assert "Nothing running" in html and "No results yet" in html


@pytest.mark.django_db
def test_error_pages_are_html_for_pages_and_json_for_the_api():
    client, _ = signed_in()
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and b"Page not found" in page.content
    api = client.get("/api/v1/no-such-route")
    assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"


@pytest.mark.django_db
def test_security_headers_on_pages():
    client, _ = signed_in()
    response = client.get("/")
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Request-ID"]
