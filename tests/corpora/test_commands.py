"""build_corpus, migrate_records and upload_corpus."""

import io
import itertools
import json
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from corpora.building import ChunkPlan, chunk, decode, guess_language, normalize
from corpora.models import Corpus, Document
from corpora.schema_migrations import upgrade_path, v1_to_v2
from corpora.schemas import corpus_validator
from corpora.tokens import count_tokens, token_spans
from tests.corpora.conftest import document, document_v1, jsonl

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "corpus"


def run(*args) -> str:
    out = io.StringIO()
    extra = ["--no-progress"] if args[0] != "upload_corpus" else []
    call_command(*args, *extra, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_normalize_unicode_whitespace_and_control_characters():
    raw = "Cafe\u0301\r\n\r\n\r\n\r\nTabs\there   and\u00a0spaces \x07\u200b\r\nend  "
    assert normalize(raw) == "Café\n\nTabs here and spaces\nend"
    assert normalize("ﬁ ①", "NFKC") == "fi 1"


def test_decode_finds_the_encoding():
    assert decode("déjà".encode()) == ("déjà", "utf-8")
    assert decode(b"\xef\xbb\xbfhi") == ("hi", "utf-8-sig")
    text, encoding = decode(
        "Les hommes naissent libres et égaux en droits, à jamais.".encode("cp1252")
    )
    assert text.startswith("Les hommes naissent libres et égaux") and encoding != "utf-8"


def test_language_guess_is_cheap_and_cautious():
    assert guess_language("We are met on a great battle-field of that war and it is for us") == "en"
    assert (
        guess_language("Les hommes naissent et demeurent libres et égaux en droits dans la nation")
        == "fr"
    )
    assert guess_language("ok") == "und"


def test_chunks_respect_the_size_and_overlap():
    text = " ".join(f"word{i}" for i in range(100))  # "word12" = 1 word + 2 digits = 3 tokens
    spans = token_spans(text)
    chunks = chunk(text, spans, ChunkPlan(chunk_tokens=30, overlap=9))
    assert all(c["token_count"] <= 30 for c in chunks)
    assert chunks[0]["text"].startswith("word0 ") and chunks[-1]["text"].endswith("word99")
    for before, after in itertools.pairwise(chunks):
        shared = text[after["start_char"] : before["end_char"]]
        assert 0 < count_tokens(shared) <= 9
        assert text[after["start_char"] : after["end_char"]] == after["text"]
    with pytest.raises(ValueError):
        ChunkPlan(chunk_tokens=30, overlap=30)


def test_build_corpus_makes_jsonl_that_uploads_cleanly(tmp_path, db):
    output = tmp_path / "corpus.jsonl"
    message = run(
        "build_corpus",
        str(SAMPLES / "texts"),
        str(output),
        "--chunk-tokens",
        "48",
        "--overlap",
        "8",
    )
    assert "Wrote 4 document(s)" in message
    records = [json.loads(line) for line in output.read_text().splitlines()]
    validator = corpus_validator()
    assert all(validator.is_valid(r) for r in records)
    by_id = {r["id"]: r for r in records}
    gettysburg = by_id["speeches/gettysburg-address"]
    assert gettysburg["title"] == "The Gettysburg Address" and gettysburg["language"] == "en"
    assert gettysburg["author"] == "Abraham Lincoln"  # from the sidecar
    assert gettysburg["extensions"]["narrative"]["speaker"] == "Abraham Lincoln"
    assert all(c["token_count"] <= 48 for c in gettysburg["chunks"])
    french = by_id["declarations/droits-de-l-homme-1789"]
    assert french["language"] == "fr" and "égaux" in french["text"]
    assert french["metadata"]["source_encoding"] != "utf-8"
    fdr = by_id["speeches/first-inaugural-1933"]
    assert "\r" not in fdr["text"] and "  " not in fdr["text"] and "\n\n\n" not in fdr["text"]
    assert len(fdr["metadata"]["text_sha256"]) == 64

    upload = run("upload_corpus", str(output), "--name", "samples")
    assert "4 document(s)" in upload
    corpus = Corpus.objects.get(name="samples")
    assert corpus.status == "ready" and corpus.problems == []
    assert corpus.chunk_count == sum(len(r["chunks"]) for r in records)


def test_build_corpus_refuses_bad_sources_and_writes_nothing(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(SAMPLES / "texts", source)
    (source / "empty.txt").write_text("   \n\n")
    (source / "speeches" / "moon-speech.meta.json").write_text('{"colour": "blue"}')
    output = tmp_path / "out.jsonl"
    with pytest.raises(CommandError) as raised:
        run("build_corpus", str(source), str(output))
    message = str(raised.value)
    assert "2 file(s) could not be used; nothing written" in message
    assert "empty.txt: empty after normalisation" in message
    assert "unknown field(s) colour" in message
    assert not output.exists() and not list(tmp_path.glob(".build-*"))


def test_migration_step_and_path():
    upgraded = v1_to_v2(document_v1(1))
    assert corpus_validator("2").is_valid(upgraded)
    assert upgraded["id"] == "old-1" and upgraded["chunks"][0] == {
        "position": 0,
        "text": "We choose to go to the Moon",
        "token_count": 7,
    }
    assert [(a, b) for a, b, _ in upgrade_path("1", "2")] == [("1", "2")]
    assert upgrade_path("2", "2") == []
    with pytest.raises(ValueError, match="no migration path from schema v2 to v1"):
        upgrade_path("2", "1")


def test_migrate_records_upgrades_the_sample_file(tmp_path, db):
    output = tmp_path / "v2.jsonl"
    message = run("migrate_records", str(SAMPLES / "speeches.v1.jsonl"), str(output), "--from", "1")
    assert "3 record(s) upgraded v1 → v2" in message
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["lincoln-1865", "fdr-1941", "jfk-1961"]
    assert records[1]["source"] == {"url": "https://www.fdrlibrary.org/"}
    run("upload_corpus", str(output), "--name", "migrated")
    assert Document.objects.filter(corpus__name="migrated").count() == 3


def test_migrate_records_reports_bad_lines_and_writes_nothing(tmp_path):
    source = tmp_path / "old.jsonl"
    source.write_bytes(jsonl(document_v1(1), document(2), document_v1(3, date="soon")))
    output = tmp_path / "new.jsonl"
    with pytest.raises(CommandError) as raised:
        run("migrate_records", str(source), str(output), "--from", "1")
    message = str(raised.value)
    assert "2 invalid record(s); nothing written" in message
    assert "line 2: (v1) 'text_id' is a required property" in message
    assert "line 3 /date: (v1)" in message
    assert not output.exists()


def test_upload_corpus_reports_errors_by_line(tmp_path, db):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(document(1)) + b"{oops\n")
    with pytest.raises(CommandError, match=r"line 2: invalid JSON"):
        run("upload_corpus", str(bad))
    assert Corpus.objects.count() == 0


def test_upload_corpus_appends(tmp_path, db):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(jsonl(document(1)))
    second.write_bytes(jsonl(document(2)))
    run("upload_corpus", str(first), "--name", "grow")
    corpus = Corpus.objects.get()
    run("upload_corpus", str(second), "--corpus", str(corpus.pk), "--mode", "append")
    corpus.refresh_from_db()
    assert corpus.record_count == 2
