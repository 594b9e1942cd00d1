"""The PDF report: rendered from a realistic context, turned into page images with pdftoppm,
and its text checked for the numbers of the context."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from evaluation import report
from tests.evaluation.core_fixtures import require_poppler
from tests.evaluation.report_context import realistic_context


@pytest.fixture
def poppler():
    """Only the tests that turn pages into images and text need poppler; the others never
    skip."""
    require_poppler()


SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "screenshots"


def _text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, text=True
    ).stdout
    return re.sub(r"\s+", " ", out)


def _pages(pdf: bytes, tmp_path: Path, prefix: str) -> list[Path]:
    path = tmp_path / f"{prefix}.pdf"
    path.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "60", str(path), str(tmp_path / prefix)], check=True)
    pages = sorted(tmp_path.glob(f"{prefix}-*.png"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for page in pages:
        shutil.copy(page, SCREENSHOTS / page.name)
    return pages


@pytest.fixture(scope="module")
def rated():
    context = realistic_context(ratings=True)
    return context, report.render_report_pdf(context)


def test_report_pages_show_the_numbers_of_the_run(rated, tmp_path, poppler):
    context, pdf = rated
    assert pdf.startswith(b"%PDF")
    pages = _pages(pdf, tmp_path, "report")
    assert len(pages) >= 5  # summary, details, examples, appendix
    for page in pages:
        assert page.stat().st_size > 5_000  # not blank

    text = _text(pdf, tmp_path)
    m = context["metrics"]
    p, r = m["perplexity"], m["retention"]
    ei, bv = m["emotional_intelligence"], m["brand_voice"]
    expected = [
        context["job"]["name"],
        context["run"]["id"],
        "Executive summary",
        "Technical appendix",
        "Before and after",
        f"Perplexity: {p['baseline']:.1f} → {p['trained']:.1f}",
        f"{p['improvement_pct']:.0f}% improvement",
        f"95% CI {p['ci_low']:.1f}% to {p['ci_high']:.1f}%",
        f"{p['improvement_pct']:.2f}%",  # appendix
        f"{r['retention_pct']:.1f}% retained",
        f"{r['ci_low']:.1f}% to {r['ci_high']:.1f}%",
        f"{ei['baseline_mean']:.1f}/5 → {ei['trained_mean']:.1f}/5",
        f"{ei['improvement_pct']:.0f}% improvement",
        f"{ei['agreement']['alpha']:.3f}",
        f"{bv['consistency_pct']:.0f}% consistency",
        f"{bv['mean_score']:.2f}/5",
        f"{m['generation_health']['trained']['stop_rate'] * 100:.0f}%",
        "Approved by maria.chen",
        "Education-first approach",
        *(f"{name} {version}" for name, version in sorted(context["run"]["suites"].items())),
        *(example["id"] for example in context["examples"]),
        *(flag["item_id"] for flag in bv["flagged"]),
        f"Warmth {bv['per_characteristic']['warmth']['baseline_mean']:.2f} "
        f"{bv['per_characteristic']['warmth']['mean']:.2f}",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, missing
    # badges are upper-cased by CSS: pass/fail colours' labels
    assert ("below target" if not ei["passed"] else "target met") in text.lower()
    assert text.lower().count("target met") >= 1
    for category in ("Taxes", "Retirement", "Investing", "Insurance"):
        row = r["by_category"][category.lower()]
        assert f"{category} 25 {row['baseline_accuracy'] * 100:.0f}%" in text
    # the selection rule and methods are stated, not implied
    assert "never by hand" in text and "paired bootstrap" in text.lower()
    # charts: one SVG image per chart is embedded
    html = report.report_html(context)
    assert html.count("data:image/svg+xml;base64,") == 5


def test_same_context_same_report(rated):
    # weasyprint lays out the HTML deterministically, so equal HTML (charts included) means
    # equal PDF content
    context, _ = rated
    first = report.report_html(context)
    assert report.report_html(context) == first
    assert 'name="dcterms.created" content="2026-11-30T15:40:00+00:00"' in first


def test_report_without_ratings_says_what_is_missing(tmp_path, poppler):
    context = realistic_context(ratings=False)
    context["metrics"]["perplexity"] = None
    pdf = report.render_report_pdf(context)
    pages = _pages(pdf, tmp_path, "report-pending")
    assert len(pages) >= 3
    text = _text(pdf, tmp_path)
    assert text.count("Awaiting human ratings") >= 2
    assert "Perplexity was not measured" in text
    assert "Not yet reviewed" in text
    assert "1 of 1 measured targets met; 3 awaiting ratings or data" in text
    assert f"{context['metrics']['retention']['retention_pct']:.1f}% retained" in text


def test_retention_alert_is_explained():
    context = realistic_context(ratings=False)
    retention = context["metrics"]["retention"]
    retention.update(alert=True, retention_pct=88.0, trained_accuracy=0.75)
    view = report.build_view(context)
    card = next(c for c in view["cards"] if c["key"] == "retention")
    assert card["status"] == "alert" and card["headline"] == "88.0% retained"
    assert any("lower learning rate" in s for s in view["summary"])
