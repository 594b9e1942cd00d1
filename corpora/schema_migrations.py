"""Written migration steps between corpus schema versions.

Each step turns one valid record of version N into a valid record of version N+1, as a
pure function; ``upgrade`` chains them. Uploads declared in an older version are
validated against that version, upgraded record by record, and stored in the current
one (the corpus keeps a note); ``manage.py migrate_records`` rewrites whole files.
Adding a version: write ``schemas/corpus/core.v<N+1>.json``, a step here, and a test.
"""

from __future__ import annotations

from collections.abc import Callable

Record = dict
Step = Callable[[Record], Record]

NARRATIVE_FIELDS_V1 = ("speaker", "audience", "medium")


def v1_to_v2(record: Record) -> Record:
    """Version 1 -> 2.

    * ``text_id`` -> ``id``; ``content`` -> ``text``; ``doc_type`` -> ``document_type``;
      ``lang`` -> ``language``; ``meta`` -> ``metadata``; ``source_url`` -> ``source.url``.
    * The top-level narrative fields (speaker, audience, medium) move into the
      ``narrative`` extension block.
    * Chunks: ``chunk_id`` -> ``position``, ``content`` -> ``text``, ``tokens`` ->
      ``token_count``.
    """
    out: Record = {"schema_version": "2", "id": record["text_id"], "text": record["content"]}
    for old, new in (
        ("title", "title"),
        ("doc_type", "document_type"),
        ("author", "author"),
        ("date", "date"),
        ("lang", "language"),
        ("meta", "metadata"),
    ):
        if old in record:
            out[new] = record[old]
    if "source_url" in record:
        out["source"] = {"url": record["source_url"]}
    narrative = {k: record[k] for k in NARRATIVE_FIELDS_V1 if k in record}
    if narrative:
        out["extensions"] = {"narrative": narrative}
    if "chunks" in record:
        out["chunks"] = [
            {
                "position": chunk["chunk_id"],
                "text": chunk["content"],
                **({"token_count": chunk["tokens"]} if "tokens" in chunk else {}),
            }
            for chunk in record["chunks"]
        ]
    return out


# from-version -> (to-version, step)
STEPS: dict[str, tuple[str, Step]] = {"1": ("2", v1_to_v2)}


def upgrade_path(from_version: str, to_version: str) -> list[tuple[str, str, Step]]:
    """The steps from one version to a later one; ValueError when there is no path."""
    path, version = [], from_version
    while version != to_version:
        if version not in STEPS:
            raise ValueError(f"no migration path from schema v{from_version} to v{to_version}")
        target, step = STEPS[version]
        path.append((version, target, step))
        version = target
    return path


def upgrader(from_version: str, to_version: str) -> Step | None:
    """One function applying every step in order (None when nothing is to be done)."""
    steps = [step for _, _, step in upgrade_path(from_version, to_version)]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def run(record: Record) -> Record:
        for step in steps:
            record = step(record)
        return record

    return run


def describe_path(from_version: str, to_version: str) -> str:
    return " → ".join(
        [f"v{from_version}"] + [f"v{to}" for _, to, _ in upgrade_path(from_version, to_version)]
    )
