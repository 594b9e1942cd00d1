"""Training files API (corpora get their routes with the corpora issue)."""

from datetime import datetime
from uuid import UUID

from django.http import HttpRequest
from ninja import Field, File, Form, Router, Schema
from ninja.files import UploadedFile
from ninja.pagination import PageNumberPagination, paginate
from ninja.responses import Status

from config.api_routes import ERRORS
from config.auth import requires
from config.errors import InvalidInput, NotFound
from corpora import services
from corpora.models import TrainingFile

router = Router(tags=["training files"])

MAX_UPLOAD_BYTES = 2 * 1024**3


class TrainingFileOut(Schema):
    id: UUID
    name: str
    description: str
    status: str
    validation_errors: list[dict]
    schema_version: str
    conversation_count: int
    pair_count: int
    word_count: int
    size_bytes: int
    sha256: str
    stats: dict
    uploaded_by: str | None = Field(None, alias="uploaded_by.username")
    created_at: datetime


def get_training_file(file_id: UUID) -> TrainingFile:
    found = TrainingFile.objects.with_uploader().filter(pk=file_id).first()
    if found is None:
        raise NotFound(f"No training file {file_id}.", details={"id": str(file_id)})
    return found


@router.post(
    "/training-files",
    response={201: TrainingFileOut, **ERRORS},
    auth=requires("run_jobs"),
    summary="Upload a JSONL training file (validated; an invalid file writes nothing)",
)
def training_files_upload(
    request: HttpRequest,
    file: File[UploadedFile],
    name: Form[str] = "",
    description: Form[str] = "",
):
    if file.size > MAX_UPLOAD_BYTES:
        raise InvalidInput(f"The file is over {MAX_UPLOAD_BYTES // 1024**3} GiB.")
    created = services.training_file_create(
        name=name or file.name,
        upload=file.file,
        filename=file.name,
        description=description,
        user=request.auth,
    )
    return Status(201, created)


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
