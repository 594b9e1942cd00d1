"""Exports: every format read back by the tools people use, splits, manifest, versions."""

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from config.storage import storage_read
from corpora import exports
from corpora.models import Export
from corpora.services import corpus_create, corpus_upload, export_create, training_file_create
from corpora.tasks import export_run_task
from tests.conftest import assert_envelope
from tests.corpora.conftest import document, jsonl

ALL_FORMATS = ["json", "jsonl", "csv", "parquet", "hf"]


def make_corpus(n=40, **kwargs):
    records = [document(i) for i in range(n)]
    records[3]["text"] = 'Quotes "inside", commas, ; semicolons\nand a new line, =SUM(A1) é ü 中文'
    records[3]["chunks"] = []
    return corpus_create(name="speeches", upload=io.BytesIO(jsonl(*records)), user=None, **kwargs)


def run_export(**kwargs) -> Export:
    export = export_create(user=None, **kwargs)
    export_run_task(str(export.pk))  # what the worker runs; here in-process
    export.refresh_from_db()
    assert export.status == Export.Status.SUCCEEDED, export.error
    return export


def fetch(export: Export, folder: Path) -> Path:
    """The export's files as a user gets them, in ``folder``."""
    for entry in export.files:
        target = folder / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage_read(f"{export.storage_prefix}/{entry['path']}"))
    return folder


def source_rows(corpus) -> dict[str, dict]:
    rows = {}
    for doc in corpus.documents.all():
        rows[doc.external_id] = {
            "id": doc.external_id,
            "title": doc.title,
            "text": doc.text,
            "document_type": doc.document_type,
            "language": doc.language,
            "metadata": doc.metadata,
            "token_count": doc.token_count,
            "chunk_count": doc.chunk_count,
        }
    return rows


@pytest.fixture
def corpus(db):
    return make_corpus()


def test_every_format_reads_back_equal_to_the_source(
    corpus, tmp_path, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as queued:
        export = export_create(
            user=None,
            corpus=corpus,
            formats=ALL_FORMATS,
            csv_options={"delimiter": ";", "encoding": "utf-8-sig"},
        )
    assert len(queued) == 1 and export.status == Export.Status.QUEUED
    export_run_task(str(export.pk))
    export.refresh_from_db()
    assert export.status == "succeeded", export.error
    assert export.progress == 1.0 and export.version == "1.0.0"
    folder = fetch(export, tmp_path)
    expected = source_rows(corpus)
    counts = export.manifest["splits"]
    assert {s: counts[s]["rows"] for s in counts} == {"train": 32, "validation": 6, "test": 2}

    def check(rows, *, metadata_as_text: bool):
        for row in rows:
            want = expected[row["id"]]
            for key, value in want.items():
                got = row[key]
                if key == "metadata" and metadata_as_text:
                    got = json.loads(got)
                assert got == value, (row["id"], key, got, value)

    seen = {}
    for split in ("train", "validation", "test"):
        jsonl_rows = [
            json.loads(x) for x in (folder / f"jsonl/{split}.jsonl").read_text().splitlines()
        ]
        json_rows = json.loads((folder / f"json/{split}.json").read_text())
        assert jsonl_rows == json_rows
        check(jsonl_rows, metadata_as_text=False)
        frame = pd.read_csv(
            folder / f"csv/{split}.csv", sep=";", encoding="utf-8-sig", keep_default_na=False
        )
        check(frame.to_dict("records"), metadata_as_text=True)
        table = pq.read_table(folder / f"parquet/{split}.parquet")
        check(table.to_pylist(), metadata_as_text=True)
        assert table.schema.field("token_count").type == "int64"
        seen[split] = {r["id"] for r in jsonl_rows}
    # Every document in exactly one split.
    assert set().union(*seen.values()) == set(expected)
    assert sum(len(s) for s in seen.values()) == len(expected)
    # The CSV opens in a spreadsheet: BOM, header, quoted new lines and quotes.
    raw = (folder / "csv/train.csv").read_bytes() + (folder / "csv/validation.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfid;title;text;")
    # Checksums in the manifest match the files.
    import hashlib

    for entry in export.manifest["files"]:
        data = (folder / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        assert len(data) == entry["bytes"]


def test_hugging_face_folder_loads_with_datasets(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = run_export(corpus=corpus, formats=["hf"], stratify_by="metadata.topic")
    folder = fetch(export, tmp_path / "export") / "hf"
    names = sorted(p.name for p in (folder / "data").iterdir())
    assert names == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "configs:" in card and "dataset_info:" in card

    import datasets

    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    splits = export.manifest["splits"]
    assert {name: len(loaded[name]) for name in loaded} == {
        name: splits[name]["rows"] for name in ("train", "validation", "test")
    }
    features = loaded["train"].features
    assert features["token_count"].dtype == "int64"
    assert features["text"].dtype == "string"
    assert list(features) == list(exports.FEATURES["documents"])
    train_ids = set(loaded["train"]["id"])
    assert train_ids <= {d.external_id for d in corpus.documents.all()}


def test_splits_are_seeded_and_stratified(corpus):
    first = run_export(corpus=corpus, formats=["jsonl"], stratify_by="document_type", seed=7)
    again = run_export(corpus=corpus, formats=["jsonl"], stratify_by="document_type", seed=7)
    other = run_export(corpus=corpus, formats=["jsonl"], stratify_by="document_type", seed=8)

    def assignment(export):
        lineage = storage_read(f"{export.storage_prefix}/lineage.jsonl").decode().splitlines()
        return {json.loads(x)["id"]: json.loads(x)["split"] for x in lineage}

    assert assignment(first) == assignment(again) != assignment(other)
    by_split = {"train": [], "validation": [], "test": []}
    for doc in corpus.documents.all():
        by_split[assignment(first)[doc.external_id]].append(doc.document_type)
    # 20 speeches and 20 op-eds: each split holds both in proportion.
    assert by_split["train"].count("speech") == by_split["train"].count("op-ed") == 16
    assert by_split["validation"].count("speech") == by_split["validation"].count("op-ed") == 3
    assert by_split["test"].count("speech") == by_split["test"].count("op-ed") == 1


def test_allocation_keeps_global_ratios_over_small_strata():
    keys = [(f"k{i}", f"stratum-{i % 13}") for i in range(200)]
    assignment = exports._assign_splits(keys, exports.DEFAULT_SPLITS, seed=1)
    counts = {s: list(assignment.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 160, "validation": 30, "test": 10}


def test_same_content_twice_gives_same_checksums_and_version(corpus):
    first = run_export(corpus=corpus, formats=ALL_FORMATS)
    second = run_export(corpus=corpus, formats=ALL_FORMATS)
    assert second.version == first.version == "1.0.0"
    assert {f["path"]: f["sha256"] for f in first.files} == {
        f["path"]: f["sha256"] for f in second.files
    }
    assert second.changelog == first.changelog


def test_changed_corpus_raises_the_version_and_writes_the_changelog(corpus):
    first = run_export(corpus=corpus, formats=["jsonl", "parquet"])
    corpus_upload(corpus=corpus, upload=io.BytesIO(jsonl(document(100), document(101))), user=None)
    added = run_export(corpus=corpus, formats=["jsonl", "parquet"])
    assert added.version == "1.1.0"
    assert added.changelog[0]["changes"][0] == "2 documents added"
    assert added.changelog[1] == first.changelog[0]
    changelog = storage_read(f"{added.storage_prefix}/CHANGELOG.md").decode()
    assert "## 1.1.0" in changelog and "2 documents added" in changelog and "## 1.0.0" in changelog

    changed = [document(i) for i in range(40)]
    changed[5]["title"] = "A corrected title"
    changed += [document(100), document(101)]
    changed[3] = make_corpus.__globals__["document"](3)  # the original record 3 again
    corpus_upload(corpus=corpus, upload=io.BytesIO(jsonl(*changed)), user=None, mode="replace")
    patched = run_export(corpus=corpus, formats=["jsonl", "parquet"])
    assert patched.version == "1.1.1"
    assert patched.changelog[0]["changes"][0] == "2 documents changed"

    corpus_upload(corpus=corpus, upload=io.BytesIO(jsonl(*changed[:30])), user=None, mode="replace")
    removed = run_export(corpus=corpus, formats=["jsonl"])
    assert removed.version == "2.0.0"
    assert removed.changelog[0]["changes"][0] == "12 documents removed"
    assert removed.manifest["lineage"]["previous_version"] == "1.1.1"


def test_field_mapping_shapes_json_and_jsonl(corpus, tmp_path):
    export = run_export(
        corpus=corpus,
        formats=["jsonl", "json"],
        field_mapping={"prompt": "title", "completion": "text", "topic": "metadata.topic"},
    )
    folder = fetch(export, tmp_path)
    row = json.loads((folder / "jsonl/train.jsonl").read_text().splitlines()[0])
    assert list(row) == ["prompt", "completion", "topic"]
    assert row["topic"] in ("space", "economy")


def test_chunk_export_keeps_each_document_in_one_split(corpus, tmp_path):
    export = run_export(corpus=corpus, formats=["parquet"], unit="chunks")
    folder = fetch(export, tmp_path)
    rows = []
    for split in ("train", "validation", "test"):
        for row in pq.read_table(folder / f"parquet/{split}.parquet").to_pylist():
            rows.append((row["document_id"], split, row["id"]))
    assert len(rows) == corpus.chunk_count == export.row_count
    splits_of = {}
    for doc_id, split, _ in rows:
        splits_of.setdefault(doc_id, set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert "doc-1#0" in {r[2] for r in rows}


def test_training_file_export_has_chat_messages(db, tmp_path, monkeypatch):
    lines = [
        {
            "id": f"c-{i}",
            "system_prompt": "You are helpful.",
            "training_pairs": [{"user_input": f"Q{i}?", "target_response": f"A{i}."}],
            "metadata": {"topic": "budget" if i % 2 else "saving", "quality_score": 4.5},
        }
        for i in range(20)
    ]
    training_file = training_file_create(
        name="advisor", upload=io.BytesIO(jsonl(*lines)), user=None
    )
    export = run_export(
        training_file=training_file, formats=["hf", "csv", "jsonl"], stratify_by="metadata.topic"
    )
    folder = fetch(export, tmp_path / "x")
    row = json.loads((folder / "jsonl/train.jsonl").read_text().splitlines()[0])
    assert row["messages"][0] == {"role": "system", "content": "You are helpful."}
    assert row["quality_score"] == 4.5 and row["pair_count"] == 1
    frame = pd.read_csv(folder / "csv/train.csv")
    assert json.loads(frame["messages"][0])[1]["role"] == "user"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset(str(folder / "hf"), cache_dir=str(tmp_path / "cache"))
    assert sum(len(loaded[s]) for s in loaded) == 20
    assert loaded["train"][0]["messages"][1]["role"] == "user"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"formats": []}, "formats"),
        ({"formats": ["xlsx"]}, "formats"),
        ({"formats": ["csv"], "splits": {"train": 0.5, "test": 0.2}}, "splits"),
        ({"formats": ["csv"], "splits": {"train": 0.9, "dev": 0.1}}, "splits"),
        ({"formats": ["csv"], "unit": "conversations"}, "unit"),
        ({"formats": ["csv"], "stratify_by": "nope"}, "stratify_by"),
        ({"formats": ["csv"], "seed": -1}, "seed"),
        ({"formats": ["jsonl"], "field_mapping": {"bad name": "text"}}, "field_mapping"),
        ({"formats": ["jsonl"], "field_mapping": {"x": "unknown"}}, "field_mapping"),
        ({"formats": ["csv"], "csv": {"delimiter": "x"}}, "csv.delimiter"),
        ({"formats": ["csv"], "csv": {"encoding": "latin-1"}}, "csv.encoding"),
    ],
)
def test_bad_export_options_are_refused_and_write_nothing(api_as, corpus, payload, field):
    from config.roles import Role

    client = api_as(Role.ENGINEER)
    response = client.post(f"corpora/{corpus.pk}/exports", json=payload)
    error = assert_envelope(response, 422, "validation_error")
    assert error["message"].startswith(f"{field}:"), error
    assert Export.objects.count() == 0


def test_export_api_round_trip(api_as, corpus, django_capture_on_commit_callbacks):
    from config.roles import Role

    engineer, viewer = api_as(Role.ENGINEER), api_as(Role.VIEWER)
    assert_envelope(viewer.post(f"corpora/{corpus.pk}/exports", json={"formats": ["csv"]}), 403)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = engineer.post(
            f"corpora/{corpus.pk}/exports", json={"formats": ["csv", "jsonl"], "seed": 3}
        )
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "queued" and len(queued) == 1
    export_id = response.json()["id"]
    export_run_task(export_id)  # what the queued task does on a worker
    body = viewer.get(f"corpora/exports/{export_id}").json()
    assert body["status"] == "succeeded" and body["version"] == "1.0.0"
    assert body["source_kind"] == "corpus" and body["source_id"] == str(corpus.pk)
    assert body["manifest"]["parameters"]["seed"] == 3
    listed = viewer.get(f"corpora/{corpus.pk}/exports").json()
    assert [e["id"] for e in listed["items"]] == [export_id]
    assert viewer.get("corpora/exports?status=succeeded").json()["count"] == 1

    download = viewer.get(f"corpora/exports/{export_id}/download?file=csv/train.csv")
    assert download.status_code == 200
    assert b"".join(download.streaming_content).startswith(b"id,title,text")
    archive = viewer.get(f"corpora/exports/{export_id}/download")
    assert archive["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(b"".join(archive.streaming_content))) as zipped:
        names = zipped.namelist()
        assert any(n.endswith("/manifest.json") for n in names)
        manifest = json.loads(zipped.read(next(n for n in names if n.endswith("manifest.json"))))
        assert manifest["dataset"]["version"] == "1.0.0"
    assert_envelope(viewer.get(f"corpora/exports/{export_id}/download?file=../../etc/passwd"), 404)


def test_download_waits_for_the_export(api_as, corpus):
    from config.roles import Role

    export = export_create(user=None, corpus=corpus, formats=["csv"])
    viewer = api_as(Role.VIEWER)
    error = assert_envelope(viewer.get(f"corpora/exports/{export.pk}/download"), 409, "conflict")
    assert "queued" in error["message"]


def test_a_claimed_export_is_not_run_twice(corpus):
    export = export_create(user=None, corpus=corpus, formats=["csv"])
    export_run_task(str(export.pk))
    export.refresh_from_db()
    finished = export.finished_at
    assert export_run_task(str(export.pk)) is None
    export.refresh_from_db()
    assert export.finished_at == finished


def test_a_failing_export_is_marked_failed(corpus, monkeypatch):
    def explode(*args, **kwargs):
        raise exports.ExportCheckFailed("csv/train.csv: 3 rows, expected 4")

    monkeypatch.setattr(exports, "check_file", explode)
    export = export_create(user=None, corpus=corpus, formats=["csv"])
    assert export_run_task(str(export.pk)) == "failed"
    export.refresh_from_db()
    assert export.status == "failed" and "expected 4" in export.error and not export.files
