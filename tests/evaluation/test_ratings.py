"""Blind human ratings: random server-side assignment, mapping back to the sides, and the EI and
brand-voice figures (and the regenerated report) that change with them."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import pytest

from config.errors import Conflict, InvalidInput, PermissionDenied
from config.roles import Role
from evaluation import services
from evaluation.models import HumanRating, RatingPair, Report, Side

# The real renderer, kept before the fake_pdf fixture replaces it.
from evaluation.report import render_report_pdf as REAL_RENDER
from tests.evaluation.core_fixtures import (  # noqa: F401
    completed_job,
    completed_run,
    fake_pdf,
    fake_scoring,
    fast_settings,
    on_commit_now,
    rate_all,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def analyst(db):
    return UserFactory(role=Role.ANALYST)


def test_left_right_is_random_per_item_and_kept_on_the_server(completed_run, analyst):
    sides = []
    for _ in range(40):
        pair = services.rating_pair_next(run=completed_run, rater=analyst)
        assert services.rating_pair_next(run=completed_run, rater=analyst) == pair  # stable
        view = services.rating_pair_view(pair=pair)
        assert set(view) == {
            "pair_id",
            "suite",
            "suite_name",
            "prompt",
            "context",
            "left",
            "right",
            "dimensions",
        }
        expected_left = pair.run.responses.get(
            suite=pair.suite, item_id=pair.item_id, side=pair.left_side
        )
        assert view["left"] == expected_left.text
        sides.append(pair.left_side)
        keys = [d["key"] for d in view["dimensions"]]
        services.rating_submit(
            pair=pair,
            rater=analyst,
            left_scores=dict.fromkeys(keys, 3),
            right_scores=dict.fromkeys(keys, 3),
        )
    # Both orders occur (40 fair coin flips are all equal with probability 2^-39).
    assert set(sides) == {Side.BASELINE, Side.TRAINED}
    assert services.rating_progress(run=completed_run, rater=analyst) == {
        "done": 40,
        "total": 80,
        "remaining": 40,
    }


def test_every_item_once_then_none(completed_run, analyst):
    assert rate_all(completed_run, analyst, suite="brand_voice", base=3, tuned=4) == 30
    assert services.rating_pair_next(run=completed_run, rater=analyst, suite="brand_voice") is None
    assert HumanRating.objects.filter(suite="brand_voice").count() == 30
    # Another rater gets their own items (and their own random order).
    other = UserFactory(role=Role.ANALYST)
    assert services.rating_pair_next(run=completed_run, rater=other, suite="brand_voice")


def test_submitting_for_another_rater_or_twice_is_refused(completed_run, analyst):
    pair = services.rating_pair_next(
        run=completed_run, rater=analyst, suite="emotional_intelligence"
    )
    scores = {"empathy": 4, "clarity": 4, "appropriateness": 4}
    with pytest.raises(PermissionDenied):
        services.rating_submit(
            pair=pair,
            rater=UserFactory(role=Role.ANALYST),
            left_scores=scores,
            right_scores=scores,
        )
    services.rating_submit(pair=pair, rater=analyst, left_scores=scores, right_scores=scores)
    with pytest.raises(Conflict):
        services.rating_submit(pair=pair, rater=analyst, left_scores=scores, right_scores=scores)
    with pytest.raises(InvalidInput):
        services.rating_submit(
            pair=services.rating_pair_next(run=completed_run, rater=analyst),
            rater=analyst,
            left_scores={**scores, "empathy": "4.5"},
            right_scores=scores,
        )
    assert HumanRating.objects.count() == 1


def test_a_running_validation_cannot_be_rated(completed_run, analyst):
    completed_run.status = "running"
    completed_run.save()
    with pytest.raises(Conflict):
        services.rating_pair_next(run=completed_run, rater=analyst)
    assert not RatingPair.objects.exists()


def test_human_ratings_replace_the_judge_item_by_item(completed_run, analyst):
    before = completed_run.metrics["emotional_intelligence"]
    assert before["source"] == "judge"
    # Ten items rated by a human: those use the human scores, the rest the judge's.
    rate_all(completed_run, analyst, suite="emotional_intelligence", base=1, tuned=5, limit=10)
    metrics = services.validation_metrics_recompute(run=completed_run)
    mixed = metrics["emotional_intelligence"]
    assert mixed["source"] == "human+judge" and mixed["items_human"] == 10
    assert mixed["baseline_mean"] < before["baseline_mean"]
    # Everything rated: the figure is the humans' alone.
    rate_all(completed_run, analyst, suite="emotional_intelligence", base=2, tuned=4)
    ei = services.validation_metrics_recompute(run=completed_run)["emotional_intelligence"]
    assert ei["source"] == "human" and ei["n"] == 50
    assert ei["baseline_mean"] == pytest.approx((10 * 1 + 40 * 2) / 50)
    assert ei["trained_mean"] == pytest.approx((10 * 5 + 40 * 4) / 50)
    assert ei["display"].startswith("Emotional Intelligence: 1.8/5 -> 4.2/5")
    assert ei["passed"] is True
    assert ei["per_dimension"]["empathy"]["trained"] == pytest.approx(4.2)
    # Humans and the judge rated the same units: their agreement is reported with an interval.
    agreement = ei["agreement"]
    assert agreement is not None and agreement["raters"] == {"humans": 1, "judge": True}
    assert agreement["alpha"] is not None


def test_brand_voice_from_human_ratings_flags_low_scores(completed_run, analyst):
    assert completed_run.metrics["brand_voice"]["source"] == "judge"
    rate_all(completed_run, analyst, suite="brand_voice", base=4, tuned=2)
    bv = services.validation_metrics_recompute(run=completed_run)["brand_voice"]
    assert bv["source"] == "human"
    assert bv["consistency_pct"] == pytest.approx(40.0)  # 2/5
    assert bv["passed"] is False
    assert len(bv["flagged"]) == 30 and bv["flagged"][0]["item_id"].startswith("bv-")
    assert bv["baseline"]["consistency_pct"] == pytest.approx(80.0)


def test_a_submitted_rating_updates_the_figures_in_the_background(
    completed_run, analyst, on_commit_now
):
    rate_all(completed_run, analyst, suite="brand_voice", base=4, tuned=5, limit=1)
    completed_run.refresh_from_db()
    assert completed_run.metrics["brand_voice"]["source"] == "human+judge"


def test_the_regenerated_report_carries_the_human_figures(completed_run, analyst, fake_pdf):
    rate_all(completed_run, analyst, suite="emotional_intelligence", base=2, tuned=5)
    rate_all(completed_run, analyst, suite="brand_voice", base=3, tuned=5)
    report = services.validation_report_generate(run=completed_run, user=analyst)
    assert report.version == 2
    context = fake_pdf.contexts[-1]
    ei = context["metrics"]["emotional_intelligence"]
    assert ei["source"] == "human" and ei["baseline_mean"] == 2 and ei["trained_mean"] == 5
    assert ei["improvement_pct"] == pytest.approx(150.0)
    assert context["metrics"]["brand_voice"]["consistency_pct"] == pytest.approx(100.0)
    assert report.metrics["emotional_intelligence"]["source"] == "human"
    # The first report keeps the figures it was made with.
    first = Report.objects.get(run=completed_run, version=1)
    assert first.metrics["emotional_intelligence"]["source"] == "judge"


def _pdf_text(pdf: bytes, tmp_path) -> str:
    import subprocess

    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    return " ".join(out.split())


def test_ratings_entered_on_the_page_change_the_regenerated_pdf(
    client, completed_run, monkeypatch, tmp_path
):
    """End to end: blind ratings through the rating page, "Regenerate" on the dashboard, and
    the new PDF shows the new EI and brand-voice figures (the first report keeps the old)."""
    import re

    from django.urls import reverse

    from tests.conftest import fetch_download

    monkeypatch.setattr("evaluation.report.render_report_pdf", REAL_RENDER)
    analyst = UserFactory(role=Role.ANALYST)
    client.force_login(analyst)
    before = completed_run.metrics
    url = reverse("evaluation:rate", args=[completed_run.pk])
    for suite, low in (("emotional_intelligence", 1), ("brand_voice", 2)):
        for _ in range(5):
            html = client.get(f"{url}?suite={suite}").content.decode()
            pair = RatingPair.objects.get(rater=analyst, rating__isnull=True)
            data = {"item": str(pair.pk), "suite": suite}
            # The rater prefers one side; which one it is, only the server knows.
            for name in set(re.findall(r'type="radio" name="([ab]__[a-z_]+)"', html)):
                side = pair.left_side if name.startswith("a__") else pair.right_side
                data[name] = str(low if side == Side.BASELINE or suite == "brand_voice" else 5)
            assert client.post(url, data).status_code == 302
    assert HumanRating.objects.count() == 10

    response = client.post(reverse("evaluation:report_generate", args=[completed_run.pk]))
    assert response.status_code == 302
    completed_run.refresh_from_db()
    ei, bv = completed_run.metrics["emotional_intelligence"], completed_run.metrics["brand_voice"]
    assert ei["source"] == bv["source"] == "human+judge"
    assert ei["baseline_mean"] < before["emotional_intelligence"]["baseline_mean"]
    assert bv["consistency_pct"] < before["brand_voice"]["consistency_pct"]
    assert len(bv["flagged"]) == 5

    report = completed_run.reports.get(version=2)
    text = _pdf_text(
        fetch_download(client.get(reverse("evaluation:report_download", args=[report.pk]))),
        tmp_path,
    )
    assert f"{ei['baseline_mean']:.1f}/5 → {ei['trained_mean']:.1f}/5" in text, text[:3000]
    assert f"{bv['consistency_pct']:.0f}% consistency" in text
    old = f"{before['emotional_intelligence']['baseline_mean']:.1f}/5 →"
    assert old not in text
