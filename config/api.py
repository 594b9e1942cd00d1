"""The one JSON API of Crucible, mounted at /api/v1/ (OpenAPI at /api/v1/openapi.json).

Every error, whatever raised it, leaves through the handlers below in the envelope of
``config.errors``. Apps add their routers in ``_register_routers``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser

from config.auth import ApiTokenAuth, BrowserSessionAuth
from config.errors import (
    CrucibleError,
    DependencyUnavailable,
    dependency_errors,
    envelope,
)
from config.ratelimit import TokenRateThrottle

logger = logging.getLogger("crucible.api")

# Statuses any operation can answer, whatever its route declares: a body that does not parse
# (400), a missing or bad token (401), a body over DATA_UPLOAD_MAX_MEMORY_SIZE (413), an
# invalid request (422) and the rate limit (429). The OpenAPI document lists them on every
# operation so the schema and the behaviour agree (checked by tests/config/test_fuzz.py).
COMMON_ERROR_STATUSES = {
    400: "The request body could not be parsed (malformed JSON or multipart).",
    401: "Authentication required.",
    413: "The request body is larger than the limit.",
    422: "The request is not valid.",
    429: "Rate limit exceeded.",
}


class JsonObjectParser(Parser):
    """JSON bodies must be objects (every body schema of the API is one); anything else,
    an array or a bare number, is refused with 422 instead of reaching a handler."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        data = json.loads(request.body)
        if not isinstance(data, dict):
            raise HttpError(422, "The request body must be a JSON object.")
        return data


class CrucibleAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any):
        schema = super().get_openapi_schema(*args, **kwargs)
        error_ref = {"$ref": "#/components/schemas/ErrorOut"}
        if "ErrorOut" not in schema.get("components", {}).get("schemas", {}):
            return schema
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                for status, description in COMMON_ERROR_STATUSES.items():
                    if status not in responses and str(status) not in responses:
                        responses[status] = {
                            "description": description,
                            "content": {"application/json": {"schema": error_ref}},
                        }
        return schema


api = CrucibleAPI(
    title="Crucible API",
    version="1",
    description=(
        "Datasets, LoRA training, validation, batch LLM jobs and cost control. "
        "Authenticate with `Authorization: Token <key>` (or `Bearer <key>`). "
        'Errors: `{"error": {"code", "message", "details", "request_id"}}`.'
    ),
    auth=[ApiTokenAuth(), BrowserSessionAuth()],
    throttle=[TokenRateThrottle()],
    urls_namespace="api",
    parser=JsonObjectParser(),
)


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, details=None
) -> HttpResponse:
    body = envelope(
        code=code,
        message=message,
        details=details,
        request_id=getattr(request, "request_id", None),
    )
    return api.create_response(request, body, status=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
}


@api.exception_handler(CrucibleError)
def _crucible_error(request: HttpRequest, exc: CrucibleError) -> HttpResponse:
    response = error_response(
        request, status=exc.status_code, code=exc.code, message=exc.message, details=exc.details
    )
    if getattr(exc, "retry_after", None):
        response["Retry-After"] = str(int(exc.retry_after))
    return response


@api.exception_handler(NinjaValidationError)
def _validation_error(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    fields = [
        {
            "loc": [str(p) for p in err.get("loc", [])],
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors
    ]
    return error_response(
        request,
        status=422,
        code="validation_error",
        message="The request is not valid: "
        + "; ".join(f"{'.'.join(f['loc'][1:] or f['loc'])}: {f['message']}" for f in fields[:3]),
        details={"fields": fields},
    )


@api.exception_handler(AuthenticationError)
def _authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = error_response(
        request,
        status=401,
        code="not_authenticated",
        message="Authentication required: send 'Authorization: Token <key>' "
        "(or 'Bearer <key>') with a valid API token.",
    )
    response["WWW-Authenticate"] = 'Token realm="api"'
    return response


@api.exception_handler(Throttled)
def _throttled(request: HttpRequest, exc: Throttled) -> HttpResponse:
    usage = getattr(request, "rate_limit", {}) or {}
    wait = int(exc.wait or 1)
    return error_response(
        request,
        status=429,
        code="rate_limited",
        message=f"Rate limit exceeded; retry in {wait} s.",
        details={"limit": usage.get("limit"), "retry_after": wait},
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(request, status=exc.status_code, code=code, message=exc.message)


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: Exception) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_response(
        request,
        status=413,
        code="payload_too_large",
        message=f"The request body is larger than the limit of {limit} bytes.",
        details={"limit_bytes": limit},
    )


@api.exception_handler(MultiPartParserError)
def _bad_multipart(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(
        request,
        status=400,
        code="bad_request",
        message=f"The multipart body could not be parsed: {exc}",
    )


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(request, status=404, code="not_found", message=str(exc) or "Not found.")


@api.exception_handler(ObjectDoesNotExist)
def _does_not_exist(request: HttpRequest, exc: ObjectDoesNotExist) -> HttpResponse:
    return error_response(request, status=404, code="not_found", message="Not found.")


@api.exception_handler(DjangoPermissionDenied)
def _forbidden(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(
        request,
        status=403,
        code="permission_denied",
        message=str(exc) or "Your role does not allow this action.",
    )


def _dependency_unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    # Redis (cache, counters) or the broker unreachable on a path with no degraded mode of its
    # own: a clear 503 with Retry-After, never a 500 traceback (docs/runbook.md, "Redis down").
    logger.warning(
        "Dependency unavailable in %s %s: %s", request.method, request.path, type(exc).__name__
    )
    return _crucible_error(request, DependencyUnavailable())


for _dependency_error in dependency_errors():
    api.add_exception_handler(_dependency_error, _dependency_unavailable)


@api.exception_handler(Exception)
def _server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    # The traceback goes to the log (with the request ID), never to the client.
    logger.exception("Unhandled error in %s %s", request.method, request.path)
    return error_response(
        request,
        status=500,
        code="server_error",
        message="Something went wrong on our side. Quote the request ID when reporting it.",
    )


def _register_routers() -> None:
    from billing.api import router as billing_router
    from config.api_routes import router as core_router
    from corpora.api import router as corpora_router
    from corpora.rag_api import router as rag_router
    from evaluation.api import router as evaluation_router
    from jobs.api import router as gateway_router
    from jobs.batch.api import router as batch_router
    from training.api import router as training_router
    from training.api_tools import router as training_tools_router

    api.add_router("", core_router)
    api.add_router("", corpora_router)
    api.add_router("", training_router)
    api.add_router("", training_tools_router)
    api.add_router("", billing_router)
    api.add_router("", evaluation_router)
    api.add_router("", gateway_router)
    api.add_router("", batch_router)
    api.add_router("", rag_router)


_register_routers()
