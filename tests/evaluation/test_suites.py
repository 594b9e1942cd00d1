"""The evaluation suites: schema-valid, the promised sizes and balance, versioned by the lock."""

import json
import re
import shutil
from collections import Counter

import pytest
from django.core.management import CommandError, call_command

from evaluation import suites
from evaluation.suites import SuiteError, check_lock, load_suite, write_lock


@pytest.fixture
def suite_copy(tmp_path):
    """A private copy of the suites folder (never touch the real files)."""
    target = tmp_path / "suites"
    shutil.copytree(suites.SUITES_DIR, target)
    return target


def _edit(directory, name, change):
    path = directory / f"{name}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_all_suites_are_schema_valid_and_locked():
    loaded = suites.all_suites()
    assert set(loaded) == set(suites.SUITE_NAMES)
    for suite in loaded.values():
        assert suite.version.count(".") == 2
        assert len(suite.sha256) == 64
    assert check_lock() == []


def test_knowledge_retention_has_100_balanced_questions():
    suite = load_suite("knowledge_retention")
    assert len(suite.items) == 100
    assert Counter(q["category"] for q in suite.items) == {
        "taxes": 25,
        "retirement": 25,
        "investing": 25,
        "insurance": 25,
    }
    # answer positions: 25 each overall, and no category leans on one position
    assert Counter(q["answer"] for q in suite.items) == {0: 25, 1: 25, 2: 25, 3: 25}
    for category in suite.data["categories"]:
        per = Counter(q["answer"] for q in suite.items if q["category"] == category)
        assert set(per) == {0, 1, 2, 3} and max(per.values()) <= 7
    for q in suite.items:
        assert len(q["options"]) == 4 and len(set(q["options"])) == 4
        assert q["question"].strip() and q["explanation"].strip()
    assert len({q["question"] for q in suite.items}) == 100
    # option length is no cue: the key is the longest option about a quarter of the time
    longest = sum(
        max(range(4), key=lambda i: len(q["options"][i])) == q["answer"] for q in suite.items
    )
    assert 15 <= longest <= 35


def test_emotional_intelligence_has_50_scenarios_and_the_rubric():
    suite = load_suite("emotional_intelligence")
    assert len(suite.items) == 50
    assert len({i["prompt"] for i in suite.items}) == 50
    assert {d["key"] for d in suite.rubric["dimensions"]} == {
        "empathy",
        "clarity",
        "appropriateness",
    }
    for dim in suite.rubric["dimensions"]:
        assert sorted(dim["anchors"]) == ["1", "2", "3", "4", "5"]
    categories = Counter(i["category"] for i in suite.items)
    assert len(categories) >= 6 and min(categories.values()) >= 5
    messages = suites.conversation_for(suite, suite.items[0])
    assert messages[-1] == {"role": "user", "content": suite.items[0]["prompt"]}
    assert all("context" not in m for m in messages)


def test_brand_voice_has_the_ten_elena_morales_characteristics_and_30_prompts():
    suite = load_suite("brand_voice")
    persona = suite.data["persona"]
    assert persona["name"] == "Elena Morales"
    names = [c["name"] for c in persona["characteristics"]]
    assert len(names) == 10
    # the ten the product spec names
    for expected in (
        "Warmth",
        "Directness",
        "Education-first approach",
        "Empathy",
        "Optimism",
        "Pragmatism",
        "Non-judgmental tone",
        "Progress celebration",
        "Values alignment",
        "Financial literacy",
    ):
        assert expected in names
    assert len(suite.items) == 30
    assert suite.rubric["dimensions"] == persona["characteristics"]
    messages = suites.conversation_for(suite, suite.items[0])
    assert messages[0] == {"role": "system", "content": persona["system_prompt"]}


def test_changing_content_without_a_version_bump_fails_with_how_to_bump(suite_copy):
    assert check_lock(suites_dir=suite_copy) == []
    _edit(
        suite_copy,
        "brand_voice",
        lambda d: d["items"][0].update(prompt=d["items"][0]["prompt"] + " Thanks!"),
    )
    problems = check_lock(suites_dir=suite_copy)
    assert len(problems) == 1
    assert "brand_voice" in problems[0] and "still 1.0.0" in problems[0]
    assert "manage.py suites_lock --bump patch brand_voice" in problems[0]
    with pytest.raises(SuiteError, match="changed but its version is still"):
        write_lock(suites_dir=suite_copy)

    # bumping records the new version and keeps the old one's hash in the history
    old_sha = load_suite("brand_voice").sha256
    write_lock(suites_dir=suite_copy, bump={"brand_voice": "patch"})
    assert check_lock(suites_dir=suite_copy) == []
    bumped = load_suite("brand_voice", suites_dir=suite_copy)
    assert bumped.version == "1.0.1" and bumped.sha256 != old_sha
    assert suites.locked_sha256("brand_voice", "1.0.0", suites_dir=suite_copy) == old_sha
    assert suites.locked_sha256("brand_voice", "1.0.1", suites_dir=suite_copy) == bumped.sha256


def test_reformatting_is_not_a_change(suite_copy):
    path = suite_copy / "knowledge_retention.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None))
    assert check_lock(suites_dir=suite_copy) == []


def test_version_bumped_but_not_locked_and_going_down(suite_copy):
    _edit(suite_copy, "emotional_intelligence", lambda d: d.update(version="1.1.0"))
    assert "not recorded in the lock" in check_lock(suites_dir=suite_copy)[0]
    _edit(suite_copy, "emotional_intelligence", lambda d: d.update(version="0.9.0"))
    assert "versions only go up" in check_lock(suites_dir=suite_copy)[0]


@pytest.mark.parametrize(
    ("change", "pointer", "text"),
    [
        (lambda d: d["items"][3].update(answer=4), "/items/3/answer", "4 is greater"),
        (lambda d: d["items"][7]["options"].pop(), "/items/7/options", "too short"),
        (lambda d: d["items"][2].update(category="crypto"), "/items/2/category", "crypto"),
        (lambda d: d["items"][5].update(id=d["items"][4]["id"]), "/items/5/id", "duplicate id"),
        (lambda d: d.update(version="1.0"), "/version", "does not match"),
        (lambda d: d["items"][1].pop("question"), "/items/1", "'question' is a required"),
    ],
)
def test_bad_suite_file_raises_with_the_json_pointer(suite_copy, change, pointer, text):
    _edit(suite_copy, "knowledge_retention", change)
    with pytest.raises(SuiteError) as caught:
        load_suite("knowledge_retention", suites_dir=suite_copy)
    assert caught.value.pointer == pointer
    assert f"at {pointer}:" in str(caught.value) and text in str(caught.value)
    assert str(caught.value).startswith("knowledge_retention.json")


def test_invalid_json_and_unknown_suite(suite_copy):
    (suite_copy / "brand_voice.json").write_text('{"suite": "brand_voice",')
    with pytest.raises(SuiteError, match="invalid JSON"):
        load_suite("brand_voice", suites_dir=suite_copy)
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("trivia")


def test_rubric_anchor_missing_points_at_the_dimension(suite_copy):
    _edit(
        suite_copy,
        "emotional_intelligence",
        lambda d: d["rubric"]["dimensions"][1]["anchors"].pop("3"),
    )
    with pytest.raises(SuiteError) as caught:
        load_suite("emotional_intelligence", suites_dir=suite_copy)
    assert caught.value.pointer == "/rubric/dimensions/1/anchors"


def test_suites_lock_command_check(monkeypatch, suite_copy, capsys):
    monkeypatch.setattr(suites, "SUITES_DIR", suite_copy)
    version = load_suite("knowledge_retention").version
    bumped = suites.bump_version(version, "minor")
    call_command("suites_lock", "--check")
    assert "All suites valid and locked" in capsys.readouterr().out
    _edit(
        suite_copy,
        "knowledge_retention",
        lambda d: d["items"][0].update(question="Changed question text?"),
    )
    with pytest.raises(CommandError, match="1 suite lock problem"):
        call_command("suites_lock", "--check")
    with pytest.raises(CommandError, match=f"still {re.escape(version)}"):
        call_command("suites_lock")
    call_command("suites_lock", "--bump", "minor", "knowledge_retention")
    assert f"knowledge_retention: version {version} -> {bumped}" in capsys.readouterr().out
    call_command("suites_lock", "--check")
