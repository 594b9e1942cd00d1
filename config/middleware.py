"""Request ID propagation and the structured access log."""

from __future__ import annotations

import logging
import re
import time
import uuid

from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest, HttpResponse, JsonResponse

from config.addresses import note_served_address
from config.logging import bind_context, bind_user, clear_context

access_log = logging.getLogger("crucible.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _incoming_request_id(request: HttpRequest) -> str:
    value = request.headers.get(REQUEST_ID_HEADER, "")
    # A caller's ID is kept when it is safe to echo and log; otherwise we make one.
    return value if _VALID_REQUEST_ID.match(value) else uuid.uuid4().hex


def _api_envelope_for(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """Safety net: an error answered under /api/ or /v1/ by Django itself (405, CSRF,
    413...) leaves in the API's envelope like every other error."""
    if response.status_code < 400 or not request.path.startswith(("/api/", "/v1/")):
        return response
    if response.get("Content-Type", "").startswith("application/json"):
        return response
    from config.errors import envelope

    phrase = response.reason_phrase or "Error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    wrapped = JsonResponse(
        envelope(code=code, message=f"{phrase}.", request_id=request.request_id),
        status=response.status_code,
    )
    for header in ("Allow", "Retry-After", "WWW-Authenticate"):
        if header in response:
            wrapped[header] = response[header]
    return wrapped


class RequestIDMiddleware:
    """Takes X-Request-ID (or makes one), binds it for logging, and returns it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.request_id = _incoming_request_id(request)
        request.started_at = time.perf_counter()
        bind_context(request_id=request.request_id)
        note_served_address(request.META)  # where workers' webhooks can reach this server
        try:
            response = _api_envelope_for(request, self.get_response(request))
            response[REQUEST_ID_HEADER] = request.request_id
            return response
        finally:
            clear_context()


def _user_label(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return user.get_username()
    return "anonymous"


class AccessLogMiddleware:
    """One log line per request with method, path, status, duration, user and request ID."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        # Token-authenticated API requests set request.user inside the API layer.
        user = _user_label(request)
        bind_user(user)
        started = getattr(request, "started_at", time.perf_counter())
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        level = logging.WARNING if response.status_code >= 500 else logging.INFO
        access_log.log(
            level,
            "%s %s %s %.1fms",
            request.method,
            request.path,
            response.status_code,
            duration_ms,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": duration_ms,
            },
        )
        return response


class MetricsMiddleware:
    """Counts every request and its latency by route pattern (config/metrics.py) and puts
    the request id on the OpenTelemetry span when tracing is on (config/tracing.py)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from config import metrics, tracing

        started = time.perf_counter()
        if tracing.enabled():
            tracing.annotate(getattr(request, "request_id", ""))
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = ("/" + match.route) if match is not None and match.route else "unmatched"
        metrics.observe_request(
            method=request.method or "",
            route=route,
            status=response.status_code,
            seconds=time.perf_counter() - started,
        )
        return response


def format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


class UploadSizeMiddleware:
    """Refuses a file upload over ``settings.UPLOAD_MAX_BYTES`` from its Content-Length,
    before Django reads (and spools to disk) a byte of the body: a 413 in the API's envelope
    under /api/ and /v1/, an error panel for the dashboard's upload forms (htmx swaps it
    into the form's result area), so nothing is stored and nothing is read.

    Django's own limits do not cover this: DATA_UPLOAD_MAX_MEMORY_SIZE leaves out files, and
    FILE_UPLOAD_MAX_MEMORY_SIZE only picks memory or a temporary file. A body sent without
    a Content-Length (chunked) is counted by ``LimitedUploadHandler`` as it arrives.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from django.conf import settings

        limit = settings.UPLOAD_MAX_BYTES
        if request.content_type == "multipart/form-data":
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > limit:
                return upload_too_large(request, length, limit)
        return self.get_response(request)


def upload_too_large(request: HttpRequest, size: int | None, limit: int) -> HttpResponse:
    from django.utils.html import escape

    sent = f"The upload is {format_bytes(size)}; the" if size else "The"
    message = f"{sent} limit is {format_bytes(limit)} per upload. Nothing was stored."
    if request.path.startswith(("/api/", "/v1/")):
        from config.errors import envelope

        body = envelope(
            code="upload_too_large",
            message=message,
            details={"limit_bytes": limit, "size_bytes": size},
            request_id=getattr(request, "request_id", None),
        )
        return JsonResponse(body, status=413)
    if request.headers.get("HX-Request"):  # the form's result area (htmx swaps a 413 in)
        html = (
            '<div class="alert alert-error" role="alert" id="upload-error"><div>'
            f"<strong>Upload refused.</strong> {escape(message)}</div></div>"
        )
        return HttpResponse(html, status=413)
    from django.shortcuts import render

    return render(request, "413.html", {"message": message}, status=413)


class LimitedUploadHandler(FileUploadHandler):
    """First in FILE_UPLOAD_HANDLERS: stops reading an upload once more than UPLOAD_MAX_BYTES
    have arrived, for a body whose length was not announced (chunked), so no oversized file
    is spooled; the form then lacks its file and says so."""

    def __init__(self, request=None):
        super().__init__(request)
        self.seen = 0

    def receive_data_chunk(self, raw_data, start):
        from django.conf import settings

        self.seen += len(raw_data)
        if self.seen > settings.UPLOAD_MAX_BYTES:
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size):
        return None
