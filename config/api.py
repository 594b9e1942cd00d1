"""The one JSON API of Crucible, mounted at /api/v1/ (OpenAPI at /api/v1/openapi.json), and
``CrucibleAPI``, the mechanism it shares with the public /v1/ API (jobs/public_api.py).

Every error, whatever raised it, leaves through the handlers below in the envelope of
``config.errors``. Apps add their routers in ``_register_routers``.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, RequestDataTooBig
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import DataError
from django.http import Http404, HttpRequest, HttpResponse
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser
from ninja.renderers import JSONRenderer
from ninja.responses import NinjaJSONEncoder

from config.auth import ApiTokenAuth, BrowserSessionAuth
from config.decimals import decimal_text
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


class RefusedBody(HttpError):
    """A body that parses but is refused as a whole, with its own status and message
    (django-ninja wraps every parser error in a 400 "Cannot parse request body")."""


class JsonObjectParser(Parser):
    """JSON bodies must be objects (every body schema of the API is one); anything else,
    an array or a bare number, is refused instead of reaching a handler (django-ninja reports
    any parser failure as the documented 400 "Cannot parse request body")."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        data = json.loads(request.body)
        if not isinstance(data, dict):
            raise HttpError(422, "The request body must be a JSON object.")
        if _has_nul(data):
            # PostgreSQL text cannot hold U+0000: refused here with a clear message rather
            # than failing at the database (the 422 the shared DataError handler gives).
            raise RefusedBody(422, "Text in the request must not contain NUL (U+0000) characters.")
        return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class _Encoder(NinjaJSONEncoder):
    """Decimals in fixed-point notation: Django's encoder writes ``str(Decimal)``, so a zero
    read from a column with 8 decimal places came out as ``"0E-8"`` and tiny costs as
    ``"5E-7"``."""

    def default(self, o: Any) -> Any:
        if isinstance(o, Decimal):
            return decimal_text(o)
        return super().default(o)


class CrucibleRenderer(JSONRenderer):
    encoder_class = _Encoder


_RENDERER = CrucibleRenderer()


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, details=None
) -> HttpResponse:
    """The error envelope as a response, the same for every CrucibleAPI instance."""
    body = envelope(
        code=code,
        message=message,
        details=details,
        request_id=getattr(request, "request_id", None),
    )
    return HttpResponse(
        _RENDERER.render(request, body, response_status=status),
        status=status,
        content_type=f"{_RENDERER.media_type}; charset={_RENDERER.charset}",
    )


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


def _crucible_error(request: HttpRequest, exc: CrucibleError) -> HttpResponse:
    response = error_response(
        request, status=exc.status_code, code=exc.code, message=exc.message, details=exc.details
    )
    if getattr(exc, "retry_after", None):
        response["Retry-After"] = str(int(exc.retry_after))
    return response


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


def _throttled(request: HttpRequest, exc: Throttled) -> HttpResponse:
    usage = getattr(request, "rate_limit", {}) or {}
    wait = int(exc.wait or 1)
    response = error_response(
        request,
        status=429,
        code="rate_limited",
        message=f"Rate limit exceeded; retry in {wait} s.",
        details={"limit": usage.get("limit"), "retry_after": wait},
    )
    response["Retry-After"] = str(wait)
    return response


def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if isinstance(exc.__cause__, RefusedBody):
        exc = exc.__cause__
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(request, status=exc.status_code, code=code, message=exc.message)


def _too_big(request: HttpRequest, exc: Exception) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_response(
        request,
        status=413,
        code="payload_too_large",
        message=f"The request body is larger than the limit of {limit} bytes.",
        details={"limit_bytes": limit},
    )


def _bad_multipart(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(
        request,
        status=400,
        code="bad_request",
        message=f"The multipart body could not be parsed: {exc}",
    )


def _not_found(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(request, status=404, code="not_found", message=str(exc) or "Not found.")


def _does_not_exist(request: HttpRequest, exc: ObjectDoesNotExist) -> HttpResponse:
    return error_response(request, status=404, code="not_found", message="Not found.")


def _forbidden(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(
        request,
        status=403,
        code="permission_denied",
        message=str(exc) or "Your role does not allow this action.",
    )


def _data_error(request: HttpRequest, exc: DataError) -> HttpResponse:
    # The database refused a value the request carried (a NUL character in text, a number or a
    # time zone offset out of its range, text longer than the column): the request is not
    # valid, not a server fault. Logged without a traceback, so a client cannot fill the log.
    logger.warning("Database refused a value in %s %s: %s", request.method, request.path, exc)
    return error_response(
        request,
        status=422,
        code="validation_error",
        message="A value in the request cannot be stored or compared by the database "
        "(a NUL character, or a number, date or time zone out of range).",
    )


def _dependency_unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    # Redis (cache, counters) or the broker unreachable on a path with no degraded mode of its
    # own: a clear 503 with Retry-After, never a 500 traceback (docs/runbook.md, "Redis down").
    logger.warning(
        "Dependency unavailable in %s %s: %s", request.method, request.path, type(exc).__name__
    )
    return _crucible_error(request, DependencyUnavailable())


def _server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    # The traceback goes to the log (with the request ID), never to the client.
    logger.exception("Unhandled error in %s %s", request.method, request.path)
    return error_response(
        request,
        status=500,
        code="server_error",
        message="Something went wrong on our side. Quote the request ID when reporting it.",
    )


def error_handlers() -> list[tuple[type[BaseException], Any]]:
    """Every exception class a CrucibleAPI maps to the envelope, with its handler. django-ninja
    picks a handler by the exception's MRO, so the order here does not matter."""
    return [
        (CrucibleError, _crucible_error),
        (NinjaValidationError, _validation_error),
        (AuthenticationError, _authentication_error),
        (Throttled, _throttled),
        (HttpError, _http_error),
        (RequestDataTooBig, _too_big),
        (MultiPartParserError, _bad_multipart),
        (Http404, _not_found),
        (ObjectDoesNotExist, _does_not_exist),
        (DjangoPermissionDenied, _forbidden),
        (DataError, _data_error),
        *((exc_class, _dependency_unavailable) for exc_class in dependency_errors()),
        (Exception, _server_error),
    ]


def _error_ref() -> dict:
    return {"$ref": "#/components/schemas/ErrorOut"}


def documented_errors(*statuses: int) -> dict:
    """``openapi_extra`` for an operation that answers these statuses (besides the common ones)
    with the error envelope, for routes whose success body has no response schema."""
    return {
        "responses": {
            status: {
                "description": ERROR_DESCRIPTIONS.get(status, "Error."),
                "content": {"application/json": {"schema": _error_ref()}},
            }
            for status in statuses
        }
    }


ERROR_DESCRIPTIONS = {
    **COMMON_ERROR_STATUSES,
    403: "The role does not allow this action.",
    404: "Not found.",
    409: "The request conflicts with the current state (a budget, a lock).",
    502: "An upstream model provider failed.",
    503: "A dependency or model runtime is unavailable; retry after Retry-After.",
    504: "An upstream model provider timed out.",
}


class CrucibleAPI(NinjaAPI):
    """A django-ninja API with Crucible's shared mechanism: token (``Token``/``Bearer``) or
    browser-session auth, the per-token rate limit, request bodies that must be JSON objects,
    every error in the envelope of ``config.errors`` and the common error statuses documented
    on every operation. /api/v1/ (below) and the public /v1/ (jobs/public_api.py) are both one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auth", [ApiTokenAuth(), BrowserSessionAuth()])
        kwargs.setdefault("throttle", [TokenRateThrottle()])
        kwargs.setdefault("parser", JsonObjectParser())
        kwargs.setdefault("renderer", CrucibleRenderer())
        super().__init__(*args, **kwargs)
        for exc_class, handler in error_handlers():
            self.add_exception_handler(exc_class, handler)

    def get_openapi_schema(self, *args: Any, **kwargs: Any):
        schema = super().get_openapi_schema(*args, **kwargs)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorOut" not in components:
            from config.api_routes import ErrorOut

            error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(error_schema.pop("$defs", {}))
            components["ErrorOut"] = error_schema
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                for status, description in COMMON_ERROR_STATUSES.items():
                    if status not in responses and str(status) not in responses:
                        responses[status] = {
                            "description": description,
                            "content": {"application/json": {"schema": _error_ref()}},
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
    urls_namespace="api",
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
