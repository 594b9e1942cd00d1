"""Blind human ratings: random server-side assignment, mapping back to the sides, and the EI and
brand-voice figures (and the regenerated report) that change with them."""
# ruff: noqa: F811  (fixtures imported from core_fixtures are redefined as arguments)

import pytest

from config.errors import Conflict, InvalidInput, PermissionDenied
from config.roles import Role
from evaluation import services
from evaluation.models import HumanRating, RatingPair, Report, Side
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
