"""Datasets pages: corpora and training files, their documents and chunks, uploads and
exports. Reads go straight to the models; writes (upload, export) call the services, the
same ones as the API. htmx swaps the partials (tables, upload result, export progress).
"""

from __future__ import annotations

import json

from django import forms
from django.core.paginator import Paginator
from django.db.models import Count, Sum
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from config.errors import CrucibleError, InvalidInput
from config.views import dashboard_view
from corpora import exports, filters, services
from corpora.models import Chunk, Corpus, Document, Export, TrainingFile
from corpora.schemas import CORPUS_VERSIONS, CURRENT_CORPUS_VERSION

PAGE_SIZE = 25
LIVE_REFRESH_S = 2


def _can_write(request: HttpRequest) -> bool:
    return request.user.has_perm("core.run_jobs")


def _page(request: HttpRequest, queryset, size: int = PAGE_SIZE):
    return Paginator(queryset, size).get_page(request.GET.get("page"))


def _query_without_page(request: HttpRequest) -> str:
    params = request.GET.copy()
    params.pop("page", None)
    params.pop("part", None)
    return params.urlencode()


# --- Forms ------------------------------------------------------------------------------------


class UploadForm(forms.Form):
    KINDS = (("corpus", "Corpus (documents)"), ("training_file", "Training file (conversations)"))

    kind = forms.ChoiceField(choices=KINDS, initial="corpus")
    file = forms.FileField()
    name = forms.CharField(max_length=200, required=False)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    schema_version = forms.ChoiceField(
        choices=[
            (v, f"v{v}" + (" (current)" if v == CURRENT_CORPUS_VERSION else ""))
            for v in CORPUS_VERSIONS
        ],
        initial=CURRENT_CORPUS_VERSION,
        required=False,
    )


class ExportForm(forms.Form):
    source = forms.CharField()
    unit = forms.ChoiceField(choices=[("", "Default"), *Export.Unit.choices], required=False)
    formats = forms.MultipleChoiceField(
        choices=[
            ("jsonl", "JSONL"),
            ("json", "JSON"),
            ("csv", "CSV"),
            ("parquet", "Parquet"),
            ("hf", "Hugging Face dataset"),
            ("openai_chat", "OpenAI chat JSONL (training files)"),
        ],
        widget=forms.CheckboxSelectMultiple,
        initial=["jsonl", "hf"],
    )
    train = forms.FloatField(min_value=0, max_value=100, initial=80)
    validation = forms.FloatField(min_value=0, max_value=100, initial=15)
    test = forms.FloatField(min_value=0, max_value=100, initial=5)
    seed = forms.IntegerField(min_value=0, initial=42)
    stratify_by = forms.CharField(required=False, max_length=100)
    csv_delimiter = forms.ChoiceField(
        choices=[(",", "Comma"), (";", "Semicolon"), ("\\t", "Tab"), ("|", "Pipe")],
        initial=",",
        required=False,
    )
    csv_encoding = forms.ChoiceField(
        choices=[(e, e) for e in exports.CSV_ENCODINGS], initial="utf-8", required=False
    )
    escape_formulas = forms.BooleanField(required=False)
    name = forms.CharField(max_length=200, required=False)


def _sources() -> list[tuple[str, str]]:
    corpora = Corpus.objects.ready().only("id", "name", "record_count").order_by("name")
    files = TrainingFile.objects.only("id", "name", "conversation_count").order_by("name")
    return [
        (f"corpus:{c.pk}", f"Corpus · {c.name} ({c.record_count:,} documents)") for c in corpora
    ] + [
        (
            f"training_file:{f.pk}",
            f"Training file · {f.name} ({f.conversation_count:,} conversations)",
        )
        for f in files
    ]


# --- Pages ------------------------------------------------------------------------------------


@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    corpora = Corpus.objects.with_uploader()
    training_files = TrainingFile.objects.with_uploader()
    totals = Corpus.objects.aggregate(
        corpora=Count("pk"), documents=Sum("record_count"), chunks=Sum("chunk_count")
    )
    context = {
        "section": "datasets",
        "corpora": list(corpora[:50]),
        "training_files": list(training_files[:50]),
        "totals": totals,
        "training_file_count": TrainingFile.objects.count(),
        "export_count": Export.objects.count(),
        "form": UploadForm(),
        "can_write": _can_write(request),
    }
    if request.htmx and request.GET.get("part") == "lists":
        return render(request, "corpora/index.html#lists", context)
    return render(request, "corpora/index.html", context)


@dashboard_view
@require_POST
def upload(request: HttpRequest) -> HttpResponse:
    """The upload form's target (htmx): a result partial, never a full page."""
    if not _can_write(request):
        return render(
            request,
            "corpora/partials/upload_result.html",
            {"error": "Your role does not allow uploads.", "details": []},
            status=403,
        )
    form = UploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return render(
            request,
            "corpora/partials/upload_result.html",
            {"error": "The form is not complete.", "form_errors": form.errors},
            status=422,
        )
    data, file = form.cleaned_data, form.cleaned_data["file"]
    name = data["name"] or file.name.rsplit(".", 1)[0]
    try:
        if data["kind"] == "corpus":
            created = services.corpus_create(
                name=name,
                upload=file,
                user=request.user,
                filename=file.name,
                description=data["description"],
                schema_version=data["schema_version"] or CURRENT_CORPUS_VERSION,
            )
            url = reverse("corpora:corpus", args=[created.pk])
        else:
            created = services.training_file_create(
                name=name,
                upload=file,
                user=request.user,
                filename=file.name,
                description=data["description"],
            )
            url = reverse("corpora:training_file", args=[created.pk])
    except CrucibleError as exc:
        return render(
            request,
            "corpora/partials/upload_result.html",
            {
                "error": exc.message,
                "errors": (exc.details or {}).get("errors", []),
                "total": (exc.details or {}).get("total", 0),
            },
            status=exc.status_code,
        )
    return render(
        request,
        "corpora/partials/upload_result.html",
        {"created": created, "url": url, "kind": data["kind"]},
        status=201,
    )


@dashboard_view
def corpus_detail(request: HttpRequest, pk) -> HttpResponse:
    corpus = Corpus.objects.with_uploader().filter(pk=pk).first()
    if corpus is None:
        raise Http404("No such corpus")
    tab = request.GET.get("tab", "documents")
    context = {
        "section": "datasets",
        "corpus": corpus,
        "tab": tab,
        "query": _query_without_page(request),
        "can_write": _can_write(request),
    }
    try:
        if tab == "chunks":
            min_tokens = request.GET.get("min_tokens") or None
            context["page"] = _page(
                request,
                filters.chunks(
                    Chunk.objects.filter(corpus=corpus),
                    document=request.GET.get("document", ""),
                    q=request.GET.get("q", ""),
                    min_tokens=int(min_tokens) if min_tokens else None,
                    meta=[m for m in request.GET.getlist("meta") if m],
                ),
            )
        elif tab == "documents":
            context["page"] = _page(
                request,
                filters.documents(
                    Document.objects.filter(corpus=corpus),
                    q=request.GET.get("q", ""),
                    document_type=request.GET.get("document_type", ""),
                    language=request.GET.get("language", ""),
                    meta=[m for m in request.GET.getlist("meta") if m],
                    ext=[e for e in request.GET.getlist("ext") if e],
                ),
            )
    except (InvalidInput, ValueError) as exc:
        context["filter_error"] = getattr(exc, "message", str(exc))
        context["page"] = None
    if tab == "uploads":
        context["ingestions"] = list(corpus.ingestions.select_related("uploaded_by"))
    if tab == "exports":
        context["exports"] = list(corpus.exports.with_source()[:50])
    if request.htmx and request.GET.get("part") == "table":
        return render(request, "corpora/corpus_detail.html#table", context)
    return render(request, "corpora/corpus_detail.html", context)


@dashboard_view
def document_detail(request: HttpRequest, pk, document_pk: int) -> HttpResponse:
    document = (
        Document.objects.select_related("corpus").filter(corpus_id=pk, pk=document_pk).first()
    )
    if document is None:
        raise Http404("No such document")
    chunks = list(Chunk.objects.filter(corpus_id=pk, document=document).order_by("position"))
    metadata = [
        (
            key,
            value if isinstance(value, str) else json.dumps(value, ensure_ascii=False),
            # Scalars link to the documents sharing the value (the meta filter).
            f"{key}:{value if isinstance(value, str) else json.dumps(value)}"
            if isinstance(value, str | int | float | bool) and "." not in key
            else None,
        )
        for key, value in document.metadata.items()
    ]
    extensions = {
        name: [
            (key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
            for key, value in block.items()
        ]
        for name, block in document.extensions.items()
    }
    return render(
        request,
        "corpora/document_detail.html",
        {
            "section": "datasets",
            "document": document,
            "corpus": document.corpus,
            "chunks": chunks,
            "metadata": metadata,
            "extensions": extensions,
        },
    )


@dashboard_view
def training_file_detail(request: HttpRequest, pk) -> HttpResponse:
    training_file = TrainingFile.objects.with_uploader().filter(pk=pk).first()
    if training_file is None:
        raise Http404("No such training file")
    histogram = training_file.stats.get("length_histogram") or []
    peak = max((b["count"] for b in histogram), default=0)
    return render(
        request,
        "corpora/training_file_detail.html",
        {
            "section": "datasets",
            "training_file": training_file,
            "histogram": [
                {**b, "percent": round(100 * b["count"] / peak) if peak else 0} for b in histogram
            ],
            "exports": list(training_file.exports.with_source()[:20]),
            "can_write": _can_write(request),
        },
    )


@dashboard_view
def exports_page(request: HttpRequest) -> HttpResponse:
    exports_list = Export.objects.with_source()
    source = request.GET.get("source", "")
    form = ExportForm(initial={"source": source})
    form.fields["source"].widget = forms.Select(choices=_sources())
    context = {
        "section": "datasets",
        "page": _page(request, exports_list),
        "form": form,
        "can_write": _can_write(request),
        "refresh": LIVE_REFRESH_S,
    }
    context["live"] = any(not e.is_finished for e in context["page"])
    if request.htmx and request.GET.get("part") == "list":
        return render(request, "corpora/exports.html#list", context)
    return render(request, "corpora/exports.html", context)


@dashboard_view
@require_POST
def export_new(request: HttpRequest) -> HttpResponse:
    if not _can_write(request):
        return render(request, "403.html", status=403)
    form = ExportForm(request.POST)
    form.fields["source"].widget = forms.Select(choices=_sources())
    error = None
    if form.is_valid():
        data = form.cleaned_data
        kind, _, source_id = data["source"].partition(":")
        source = {}
        if kind == "corpus":
            source["corpus"] = Corpus.objects.filter(pk=source_id).first()
        elif kind == "training_file":
            source["training_file"] = TrainingFile.objects.filter(pk=source_id).first()
        if not source or not next(iter(source.values())):
            error = "Choose a corpus or training file to export."
        else:
            try:
                export = services.export_create(
                    user=request.user,
                    formats=data["formats"],
                    unit=data["unit"] or None,
                    splits={s: data[s] / 100 for s in ("train", "validation", "test")},
                    seed=data["seed"],
                    stratify_by=data["stratify_by"] or None,
                    csv_options={
                        "delimiter": data["csv_delimiter"] or ",",
                        "encoding": data["csv_encoding"] or "utf-8",
                        "escape_formulas": data["escape_formulas"],
                    },
                    name=data["name"],
                    **source,
                )
            except CrucibleError as exc:
                error = exc.message
            else:
                return redirect("corpora:export", pk=export.pk)
    else:
        error = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
    context = {
        "section": "datasets",
        "page": _page(request, Export.objects.with_source()),
        "form": form,
        "form_error": error,
        "can_write": True,
        "refresh": LIVE_REFRESH_S,
        "live": False,
    }
    return render(request, "corpora/exports.html", context, status=422)


@dashboard_view
def export_detail(request: HttpRequest, pk) -> HttpResponse:
    export = Export.objects.with_source().filter(pk=pk).first()
    if export is None:
        raise Http404("No such export")
    context = {
        "section": "datasets",
        "export": export,
        "refresh": LIVE_REFRESH_S,
        "download": reverse("api:exports_download", kwargs={"export_id": export.pk}),
        "splits": [
            (name, (export.manifest.get("splits") or {}).get(name, {}).get("rows", 0))
            for name in exports.SPLITS
        ],
        "lineage": json.dumps(export.manifest.get("lineage", {}), indent=2, ensure_ascii=False),
    }
    if request.htmx and request.GET.get("part") == "status":
        return render(request, "corpora/export_detail.html#status", context)
    return render(request, "corpora/export_detail.html", context)
