"""Checkpoints are complete or not at all, on local disk and on S3 (moto on loopback)."""

import json
import uuid

import pytest

from gpu.checkpoints import (
    build_manifest,
    checkpoint_steps,
    fetch_latest_complete,
    publish_checkpoint,
)
from gpu.errors import DatasetFormatError
from gpu.storage import LocalStorage, S3Storage, fetch_uri, open_storage, sha256_file


def _trainer_folder(path, step: int):
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights-%d" % step * 100)
    (path / "optimizer.pt").write_bytes(b"adam" * 50)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (path / "sub").mkdir()
    (path / "sub" / "rng.pth").write_bytes(b"rng")
    return path


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = _trainer_folder(tmp_path / "checkpoint-5", 5)
    manifest = build_manifest(folder, 5)
    assert manifest["step"] == 5 and manifest["created_at"]
    paths = [f["path"] for f in manifest["files"]]
    assert paths == [
        "adapter_model.safetensors",
        "optimizer.pt",
        "sub/rng.pth",
        "trainer_state.json",
    ]
    entry = manifest["files"][0]
    assert entry["size"] == (folder / entry["path"]).stat().st_size
    assert entry["sha256"] == sha256_file(folder / entry["path"])


def _exercise(storage, tmp_path):
    """Publish 2, 4 (complete), 6 (no manifest) and 8 (corrupt); resume must pick 4."""
    events = {}
    for step in (2, 4, 6, 8):
        events[step] = publish_checkpoint(
            storage, _trainer_folder(tmp_path / f"c{step}", step), step
        )
    # step 6: the upload died before the manifest
    manifest6 = events[6]["manifest_uri"]
    storage_key = "checkpoints/step-000006/manifest.json"
    if isinstance(storage, LocalStorage):
        (storage.root / storage_key).unlink()
    else:
        storage.client.delete_object(Bucket=storage.bucket, Key=storage._key(storage_key))
    # step 8: a file does not match its manifest
    storage.put_bytes(b"truncated", "checkpoints/step-000008/optimizer.pt")

    assert checkpoint_steps(storage) == [8, 6, 4, 2]
    skipped = []
    found = fetch_latest_complete(
        storage, tmp_path / "resume", on_skip=lambda s, why: skipped.append((s, why))
    )
    assert found is not None
    step, local, manifest = found
    assert step == 4 and manifest["step"] == 4
    assert json.loads((local / "trainer_state.json").read_text())["global_step"] == 4
    assert (local / "sub" / "rng.pth").read_bytes() == b"rng"
    assert [s for s, _ in skipped] == [8, 6]
    assert "optimizer.pt" in skipped[0][1]
    assert "no manifest" in skipped[1][1]
    assert events[4]["uri"].endswith("checkpoints/step-000004")
    assert events[4]["manifest_uri"].endswith("checkpoints/step-000004/manifest.json")
    assert events[4]["size_bytes"] == sum(f["size"] for f in manifest["files"])
    assert manifest6.endswith("manifest.json")


def test_local_checkpoints(tmp_path):
    storage = open_storage((tmp_path / "out").as_uri())
    assert storage.is_local
    _exercise(storage, tmp_path)
    assert fetch_latest_complete(LocalStorage(tmp_path / "empty"), tmp_path / "r2") is None


def test_s3_checkpoints_and_training_file(s3_endpoint, aws_env, tmp_path):
    import boto3

    bucket = f"gpu-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    storage = open_storage(f"s3://{bucket}/prefix/jobs/j1", s3_endpoint, "us-east-1")
    assert isinstance(storage, S3Storage) and not storage.is_local
    assert storage.uri("adapter") == f"s3://{bucket}/prefix/jobs/j1/adapter"
    _exercise(storage, tmp_path)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "prefix/jobs/j1/checkpoints/step-000004/manifest.json" in keys
    assert storage.get_bytes("nothing/here") is None

    # The training file can come from S3 too, checked against its sha256.
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"id": "a"}\n')
    local = fetch_uri(f"s3://{bucket}/data/train.jsonl", tmp_path, None, s3_endpoint, "us-east-1")
    assert local.read_bytes() == b'{"id": "a"}\n'
    with pytest.raises(DatasetFormatError, match="checksum mismatch"):
        fetch_uri(f"s3://{bucket}/data/train.jsonl", tmp_path, "0" * 64, s3_endpoint, "us-east-1")


def test_file_uri_checks(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"x\n")
    assert fetch_uri(path.as_uri(), tmp_path, sha256_file(path)) == path
    with pytest.raises(DatasetFormatError, match="not found"):
        fetch_uri((tmp_path / "missing.jsonl").as_uri(), tmp_path)
