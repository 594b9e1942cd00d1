"""Frameworks: files valid against schemas/framework/v1.json, locked by version, synced into
the database; content never changes under a version."""

from __future__ import annotations

import json
import shutil

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from jobs.batch import frameworks, services
from jobs.batch.frameworks import FRAMEWORKS_DIR, FrameworkError
from jobs.batch.models import FrameworkVersion


def test_the_shipped_frameworks_are_valid_and_locked():
    specs = frameworks.all_frameworks()
    assert set(specs) == {"narrative_salience", "moral_foundations"}
    for spec in specs.values():
        assert 3 <= len(spec.fields) <= 6
        assert {f["level"] for f in spec.fields} <= set(frameworks.LEVELS)
    assert frameworks.check_lock() == []
    call_command("frameworks_lock", "--check")


@pytest.fixture
def fw_dir(tmp_path):
    folder = tmp_path / "frameworks"
    shutil.copytree(FRAMEWORKS_DIR, folder)
    return folder


def _edit(folder, name, change):
    path = folder / f"{name}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_content_changed_without_a_new_version_is_refused_by_the_lock(fw_dir):
    _edit(fw_dir, "moral_foundations", lambda d: d["prompt"].update(system="Be brief."))
    problems = frameworks.check_lock(fw_dir)
    assert len(problems) == 1 and "changed but its version is still 1.0.0" in problems[0]
    with pytest.raises(FrameworkError, match="changed but its version"):
        frameworks.write_lock(fw_dir)
    done = frameworks.write_lock(fw_dir, bump={"moral_foundations": "minor"})
    assert "moral_foundations: version 1.0.0 -> 1.1.0" in done
    assert frameworks.check_lock(fw_dir) == []
    assert json.loads((fw_dir / "moral_foundations.json").read_text())["version"] == "1.1.0"


@pytest.mark.parametrize(
    ("change", "pointer", "message"),
    [
        (lambda d: d["fields"][0].update(level="fuzzy"), "/fields/0/level", "is not one of"),
        (lambda d: d["fields"][0].pop("range"), "/fields/0", "'range' is a required property"),
        (lambda d: d["prompt"].update(user="no placeholder"), "/prompt/user", "does not match"),
        (lambda d: d["fields"][0].update(range=[0, 7]), "/fields/0/range", "minimum and maximum"),
        (lambda d: d["fields"].append(dict(d["fields"][0])), "/fields/6/key", "duplicate field"),
        (lambda d: d["answer_schema"]["required"].remove("care"), "/fields/0/key", "required"),
    ],
)
def test_invalid_framework_files_name_the_pointer(fw_dir, change, pointer, message):
    _edit(fw_dir, "moral_foundations", change)
    with pytest.raises(FrameworkError) as info:
        frameworks.load_framework_file(fw_dir / "moral_foundations.json")
    assert info.value.pointer == pointer and message in str(info.value)


def test_sync_creates_versions_once_and_refuses_edited_content(db, fw_dir, monkeypatch):
    rows = services.framework_sync()
    assert {r.label for r in rows} == {"narrative_salience@1.0.0", "moral_foundations@1.0.0"}
    services.framework_sync()
    assert FrameworkVersion.objects.count() == 2
    _edit(fw_dir, "narrative_salience", lambda d: d.update(description="Edited."))
    monkeypatch.setattr(frameworks, "FRAMEWORKS_DIR", fw_dir)
    with pytest.raises(FrameworkError, match="edited without a new version"):
        services.framework_sync()
    _edit(fw_dir, "narrative_salience", lambda d: d.update(version="1.0.1"))
    services.framework_sync()
    assert services.framework_resolve("narrative_salience").version == "1.0.1"
    assert services.framework_resolve("narrative_salience@1.0.0").version == "1.0.0"


def test_answers_are_parsed_and_validated():
    spec = frameworks.all_frameworks()["moral_foundations"].data
    good = '{"care": 1, "fairness": 9, "loyalty": 0, "authority": 2, "sanctity": 0, "dominant": "fairness"}'
    assert frameworks.validate_answer(spec, "Sure! ```json\n" + good + "\n```")[2] == ""
    _parsed, errors, kind = frameworks.validate_answer(spec, good.replace("9", "12"))
    assert kind == "schema_violation" and errors[0].startswith("/fairness:")
    assert frameworks.validate_answer(spec, "I think care.")[2] == "invalid_json"
    assert frameworks.validate_answer(spec, "")[1] == ["empty answer"]


def test_frameworks_lock_command_rejects_unknown_names():
    with pytest.raises(CommandError, match="unknown framework"):
        call_command("frameworks_lock", "--bump", "patch", "nope")
