"""Corpora, documents, chunks, training files, schemas and exports (mounted at /api/v1/)."""

from datetime import datetime
from uuid import UUID

from django.http import HttpRequest, HttpResponseRedirect, StreamingHttpResponse
from ninja import Field, File, Form, Query, Router, Schema
from ninja.files import UploadedFile
from ninja.pagination import paginate
from ninja.responses import Status

from config.api_routes import ERRORS, PageNumberPagination
from config.auth import requires
from config.errors import Conflict, InvalidInput, NotFound
from config.roles import require_change
from config.storage import storage_is_s3, storage_open, storage_size, storage_url
from corpora import exports, filters, schemas, services
from corpora.models import Chunk, Corpus, CorpusIngestion, Document, Export, TrainingFile

router = Router(tags=["datasets"])

MAX_UPLOAD_BYTES = 2 * 1024**3


# --- Schemas ----------------------------------------------------------------------------------


class TrainingFileOut(Schema):
    id: UUID
    name: str
    description: str
    status: str
    validation_errors: list[dict]
    schema_version: str
    format: str = Field(
        description="Detected from the first record: crucible, openai_chat, sharegpt or alpaca"
    )
    format_label: str = Field(description="The format as people name it, e.g. 'OpenAI chat'")
    conversation_count: int
    pair_count: int
    word_count: int
    token_count: int
    size_bytes: int
    sha256: str
    stats: dict
    uploaded_by: str | None = Field(None, alias="uploaded_by.username")
    created_at: datetime

    @staticmethod
    def resolve_format_label(obj: TrainingFile) -> str:
        return obj.get_format_display()


class IngestionOut(Schema):
    id: int
    mode: str
    original_filename: str
    size_bytes: int
    sha256: str
    schema_version: str
    records: int
    chunks: int
    seconds: float
    errors: int
    metrics: dict
    notes: list[str]
    created_at: datetime


class CorpusListOut(Schema):
    id: UUID
    name: str
    description: str
    status: str
    schema_version: str
    record_count: int
    chunk_count: int
    token_count: int
    size_bytes: int
    checksum: str
    uploaded_by: str | None = Field(None, alias="uploaded_by.username")
    created_at: datetime = Field(..., description="Upload date")


class CorpusOut(CorpusListOut):
    source_schema_version: str
    notes: list[str]
    problems: list[dict]
    stats: dict
    updated_at: datetime
    ingestions: list[IngestionOut] = []

    @staticmethod
    def resolve_ingestions(obj) -> list:
        return list(obj.ingestions.all())


class DocumentListOut(Schema):
    pk: int
    id: str = Field(..., alias="external_id")
    position: int
    title: str
    document_type: str
    author: str
    date: str
    language: str
    metadata: dict
    extensions: dict
    char_count: int
    word_count: int
    token_count: int
    chunk_count: int
    preview: str = ""


class DocumentOut(DocumentListOut):
    text: str
    source: dict
    sha256: str
    line_number: int


class ChunkOut(Schema):
    pk: int
    document_pk: int = Field(..., alias="document_id")
    document_id: str = Field(..., alias="document.external_id")
    position: int
    text: str
    token_count: int
    char_count: int
    start_char: int | None
    end_char: int | None
    metadata: dict


class SchemaEntryOut(Schema):
    name: str
    version: str
    current: bool
    title: str
    id: str
    path: str


class CsvOptionsIn(Schema):
    delimiter: str = Field(",", description=", ; | or \\t")
    encoding: str = Field("utf-8", description="utf-8, utf-8-sig (Excel) or utf-16")
    quoting: str = Field("minimal", description="minimal or all")
    line_terminator: str = Field("crlf", description="crlf (RFC 4180) or lf")
    escape_formulas: bool = Field(
        False, description="Prefix cells starting with = + - @ by ' (spreadsheet safety)"
    )


class ExportIn(Schema):
    formats: list[str] = Field(..., description="Any of json, jsonl, csv, parquet, hf")
    unit: str | None = Field(
        None, description="documents (default) or chunks for a corpus; conversations"
    )
    splits: dict[str, float] | None = Field(
        None, description="Ratios of train, validation, test (default 0.8/0.15/0.05)"
    )
    seed: int = 42
    stratify_by: str | None = Field(
        None, description="A field to stratify the splits by, e.g. document_type, metadata.topic"
    )
    field_mapping: dict[str, str] | None = Field(
        None, description="JSON/JSONL output field -> source field path (select and rename)"
    )
    csv: CsvOptionsIn | None = None
    name: str = Field("", max_length=200, description="Dataset name (default: the source's)")


class ExportFileOut(Schema):
    path: str
    bytes: int
    sha256: str


class ExportOut(Schema):
    id: UUID
    source_kind: str
    source_id: UUID
    source_name: str
    unit: str
    formats: list[str]
    parameters: dict
    status: str
    progress: float
    progress_message: str
    version: str
    changelog: list[dict]
    row_count: int
    files: list[ExportFileOut]
    error: str
    created_by: str | None = Field(None, alias="created_by.username")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @staticmethod
    def resolve_source_kind(obj) -> str:
        return "corpus" if obj.corpus_id else "training_file"

    @staticmethod
    def resolve_source_id(obj) -> UUID:
        return obj.corpus_id or obj.training_file_id


class ExportDetailOut(ExportOut):
    manifest: dict


# --- Helpers ----------------------------------------------------------------------------------


def get_corpus(corpus_id: UUID) -> Corpus:
    found = Corpus.objects.with_uploader().filter(pk=corpus_id).first()
    if found is None:
        raise NotFound(f"No corpus {corpus_id}.", details={"id": str(corpus_id)})
    return found


def get_training_file(file_id: UUID) -> TrainingFile:
    found = TrainingFile.objects.with_uploader().filter(pk=file_id).first()
    if found is None:
        raise NotFound(f"No training file {file_id}.", details={"id": str(file_id)})
    return found


def get_export(export_id: UUID) -> Export:
    found = Export.objects.with_source().filter(pk=export_id).first()
    if found is None:
        raise NotFound(f"No export {export_id}.", details={"id": str(export_id)})
    return found


def _check_size(file: UploadedFile) -> None:
    if file.size > MAX_UPLOAD_BYTES:
        raise InvalidInput(f"The file is over {MAX_UPLOAD_BYTES // 1024**3} GiB.")


def _create_export(request: HttpRequest, payload: ExportIn, **source) -> Export:
    return services.export_create(
        user=request.auth,
        formats=payload.formats,
        unit=payload.unit,
        splits=payload.splits,
        seed=payload.seed,
        stratify_by=payload.stratify_by,
        field_mapping=payload.field_mapping,
        csv_options=payload.csv.dict() if payload.csv else None,
        name=payload.name,
        **source,
    )


# --- Corpora ----------------------------------------------------------------------------------


@router.post(
    "/corpora/upload",
    response={201: CorpusOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Upload a JSONL corpus (validated in full; an invalid file writes nothing)",
)
def corpora_upload(
    request: HttpRequest,
    file: File[UploadedFile],
    name: Form[str] = "",
    description: Form[str] = "",
    schema_version: Form[str] = schemas.CURRENT_CORPUS_VERSION,
):
    _check_size(file)
    corpus = services.corpus_create(
        name=name or file.name.rsplit(".", 1)[0],
        upload=file.file,
        filename=file.name,
        description=description,
        schema_version=schema_version,
        user=request.auth,
    )
    return Status(201, get_corpus(corpus.pk))


@router.get(
    "/corpora",
    response={200: list[CorpusListOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Corpora, newest first (name, upload date, record count)",
)
@paginate(PageNumberPagination)
def corpora_list(request: HttpRequest, q: str = "", status: str = ""):
    corpora = Corpus.objects.with_uploader()
    if q:
        corpora = corpora.filter(name__icontains=q)
    if status:
        corpora = corpora.filter(status=status)
    return corpora


@router.get(
    "/corpora/schemas",
    response={200: list[SchemaEntryOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="The versioned JSON Schemas (corpus core, extensions, training file)",
)
def schemas_list(request: HttpRequest):
    return schemas.catalogue()


@router.get(
    "/corpora/schemas/{name}/{version}",
    response={200: dict, **ERRORS},
    auth=requires("view_dashboard"),
    summary="One JSON Schema",
)
def schemas_get(request: HttpRequest, name: str, version: str):
    found = schemas.catalogue_schema(name, version.removeprefix("v"))
    if found is None:
        raise NotFound(f"No schema {name} v{version}.", details={"name": name, "version": version})
    return found


@router.get(
    "/corpora/exports",
    response={200: list[ExportOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Exports of corpora and training files, newest first",
)
@paginate(PageNumberPagination)
def exports_list(
    request: HttpRequest,
    corpus: UUID | None = None,
    training_file: UUID | None = None,
    status: str = "",
):
    found = Export.objects.with_source()
    if corpus:
        found = found.filter(corpus_id=corpus)
    if training_file:
        found = found.filter(training_file_id=training_file)
    if status:
        found = found.filter(status=status)
    return found


@router.get(
    "/corpora/exports/{export_id}",
    response={200: ExportDetailOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="An export's status, progress, manifest and files",
)
def exports_get(request: HttpRequest, export_id: UUID):
    return get_export(export_id)


@router.get(
    "/corpora/exports/{export_id}/download",
    response={200: None, 302: None, **ERRORS},
    url_name="exports_download",
    auth=requires("view_dashboard"),
    summary="Download one file of an export (?file=path), or all of it as a ZIP",
)
def exports_download(request: HttpRequest, export_id: UUID, file: str = ""):
    export = get_export(export_id)
    if export.status != Export.Status.SUCCEEDED:
        raise Conflict(
            f"The export is {export.get_status_display().lower()}; files are offered once it "
            "is ready.",
            details={"status": export.status},
        )
    if not file:
        response = StreamingHttpResponse(exports.zip_stream(export), content_type="application/zip")
        name = f"export-{export.version}-{str(export.pk)[:8]}.zip"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
    if file not in {entry["path"] for entry in export.files}:
        raise NotFound(f"No file '{file}' in this export.", details={"file": file})
    path = f"{export.storage_prefix}/{file}"
    if storage_is_s3():
        return HttpResponseRedirect(storage_url(path, expires=600))
    response = StreamingHttpResponse(_read_blocks(path), content_type=_content_type(file))
    response["Content-Length"] = str(storage_size(path))
    response["Content-Disposition"] = f'attachment; filename="{file.rsplit("/", 1)[-1]}"'
    return response


def _read_blocks(path: str, size: int = 1 << 16):
    with storage_open(path) as handle:
        yield from iter(lambda: handle.read(size), b"")


def _content_type(name: str) -> str:
    return {
        "json": "application/json",
        "jsonl": "application/x-ndjson",
        "csv": "text/csv",
        "md": "text/markdown; charset=utf-8",
    }.get(name.rsplit(".", 1)[-1], "application/octet-stream")


@router.get(
    "/corpora/{corpus_id}",
    response={200: CorpusOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="One corpus: counts, statistics, notes and its uploads",
)
def corpora_get(request: HttpRequest, corpus_id: UUID):
    return get_corpus(corpus_id)


@router.post(
    "/corpora/{corpus_id}/upload",
    response={201: IngestionOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Append documents to a corpus, or replace them (mode=replace); all or nothing",
)
def corpora_upload_more(
    request: HttpRequest,
    corpus_id: UUID,
    file: File[UploadedFile],
    mode: Form[str] = CorpusIngestion.Mode.APPEND,
    schema_version: Form[str] = schemas.CURRENT_CORPUS_VERSION,
):
    _check_size(file)
    corpus = get_corpus(corpus_id)
    require_change(request.auth, corpus, "this corpus")
    ingestion = services.corpus_upload(
        corpus=corpus,
        upload=file.file,
        filename=file.name,
        mode=mode,
        schema_version=schema_version,
        user=request.auth,
    )
    return Status(201, ingestion)


@router.get(
    "/corpora/{corpus_id}/documents",
    response={200: list[DocumentListOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Documents of a corpus, filtered by fields and metadata",
    description=(
        "Filters: `q` (id or title contains), `document_type`, `language`, `author`, "
        "`meta=key:value` on metadata (repeatable; dotted keys reach nested objects; "
        "numbers match numbers), `ext=name` (has that extension block) or "
        "`ext=name.key:value`."
    ),
)
@paginate(PageNumberPagination)
def documents_list(
    request: HttpRequest,
    corpus_id: UUID,
    q: str = "",
    document_type: str = "",
    language: str = "",
    author: str = "",
    meta: Query[list[str] | None] = None,
    ext: Query[list[str] | None] = None,
):
    corpus = get_corpus(corpus_id)
    return filters.documents(
        Document.objects.filter(corpus=corpus),
        q=q,
        document_type=document_type,
        language=language,
        author=author,
        meta=meta or [],
        ext=ext or [],
    )


@router.get(
    "/corpora/{corpus_id}/documents/{document_pk}",
    response={200: DocumentOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="One document with its text, metadata and extension blocks",
)
def documents_get(request: HttpRequest, corpus_id: UUID, document_pk: int):
    found = Document.objects.filter(corpus_id=corpus_id, pk=document_pk).first()
    if found is None:
        raise NotFound(
            f"No document {document_pk} in corpus {corpus_id}.", details={"pk": document_pk}
        )
    return found


@router.get(
    "/corpora/{corpus_id}/chunks",
    response={200: list[ChunkOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Chunks of a corpus, filtered by document, tokens and metadata",
    description=(
        "Filters: `document` (a document's id), `q` (text contains), `min_tokens`, "
        "`max_tokens`, `meta=key:value` on the chunk's metadata (repeatable)."
    ),
)
@paginate(PageNumberPagination)
def chunks_list(
    request: HttpRequest,
    corpus_id: UUID,
    document: str = "",
    q: str = "",
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    meta: Query[list[str] | None] = None,
):
    corpus = get_corpus(corpus_id)
    return filters.chunks(
        Chunk.objects.filter(corpus=corpus),
        document=document,
        q=q,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        meta=meta or [],
    )


@router.post(
    "/corpora/{corpus_id}/exports",
    response={202: ExportOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Export a corpus (several formats in one batch, in the background)",
)
def corpora_export(request: HttpRequest, corpus_id: UUID, payload: ExportIn):
    export = _create_export(request, payload, corpus=get_corpus(corpus_id))
    return Status(202, get_export(export.pk))


@router.get(
    "/corpora/{corpus_id}/exports",
    response={200: list[ExportOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Exports of one corpus, newest first",
)
@paginate(PageNumberPagination)
def corpora_exports_list(request: HttpRequest, corpus_id: UUID):
    return Export.objects.with_source().filter(corpus=get_corpus(corpus_id))


# --- Training files ---------------------------------------------------------------------------


@router.post(
    "/training-files",
    response={201: TrainingFileOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Upload a JSONL training file (validated; an invalid file writes nothing)",
    description="One conversation a line, in Crucible's format, OpenAI chat JSONL "
    '({"messages": [...]}, with per-message weight and tools), ShareGPT '
    '({"conversations": [{"from", "value"}]}) or Alpaca ({"instruction", "input", '
    '"output"}); the format is detected from the first line and returned as `format`. '
    "Records without an id get one from their line number and a content hash.",
)
def training_files_upload(
    request: HttpRequest,
    file: File[UploadedFile],
    name: Form[str] = "",
    description: Form[str] = "",
):
    _check_size(file)
    created = services.training_file_create(
        name=name or file.name,
        upload=file.file,
        filename=file.name,
        description=description,
        user=request.auth,
    )
    return Status(201, get_training_file(created.pk))


@router.get(
    "/training-files",
    response={200: list[TrainingFileOut], **ERRORS},
    auth=requires("view_dashboard"),
    summary="Training files, newest first",
)
@paginate(PageNumberPagination)
def training_files_list(request: HttpRequest):
    return TrainingFile.objects.with_uploader()


@router.get(
    "/training-files/{file_id}",
    response={200: TrainingFileOut, **ERRORS},
    auth=requires("view_dashboard"),
    summary="One training file with its statistics",
)
def training_files_get(request: HttpRequest, file_id: UUID):
    return get_training_file(file_id)


@router.post(
    "/training-files/{file_id}/exports",
    response={202: ExportOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Export a training file's conversations (formats, splits, manifest)",
)
def training_files_export(request: HttpRequest, file_id: UUID, payload: ExportIn):
    export = _create_export(request, payload, training_file=get_training_file(file_id))
    return Status(202, get_export(export.pk))
