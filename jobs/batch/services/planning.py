"""Frameworks (sync from the files, resolve a reference) and job planning: validation, task count,
token and cost estimate, the budget check."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

from django.db.models import Sum

from corpora import filters as corpus_filters
from corpora.models import Chunk, Corpus
from jobs import gateway
from jobs.batch.frameworks import FrameworkError, all_frameworks
from jobs.batch.models import BatchJob, Framework, FrameworkVersion
from jobs.batch.services.common import (
    CHARS_PER_TOKEN,
    DECODING_KEYS,
    DEFAULT_DECODING,
    MAX_TASKS,
    MAX_WINDOW,
    RUNS_MAX,
    RUNS_MIN,
    WINDOW_S,
    _invalid,
    id_slices,
)
from jobs.models import GatewaySettings, RegisteredModel

# --- Frameworks ---------------------------------------------------------------------------------


def framework_sync() -> list[FrameworkVersion]:
    """Load jobs/frameworks/*.json into the database: a new version becomes a row; a known
    version whose content changed is refused (FrameworkError): content never changes under a
    version."""
    out = []
    for name, spec in all_frameworks().items():
        fw, _ = Framework.objects.get_or_create(
            name=name,
            defaults={"title": spec.data["title"], "description": spec.data["description"]},
        )
        row = FrameworkVersion.objects.filter(framework=fw, version=spec.version).first()
        if row is None:
            row = FrameworkVersion.objects.create(
                framework=fw, version=spec.version, sha256=spec.sha256, content=spec.data
            )
            Framework.objects.filter(pk=fw.pk).update(
                title=spec.data["title"], description=spec.data["description"]
            )
        elif row.sha256 != spec.sha256:
            raise FrameworkError(
                f"framework {name!r} {spec.version} was edited without a new version "
                f"(stored sha256 {row.sha256[:12]}, file {spec.sha256[:12]}); raise its version "
                "with `manage.py frameworks_lock --bump patch " + name + "`",
                pointer="/version",
            )
        out.append(row)
    return out


def framework_resolve(ref: str) -> FrameworkVersion:
    """``name`` (the newest version) or ``name@version``."""
    name, _, version = str(ref).partition("@")
    qs = FrameworkVersion.objects.select_related("framework").filter(framework__name=name)
    if version:
        qs = qs.filter(version=version)
    row = qs.order_by("-created_at", "-pk").first()
    if row is None:
        raise _invalid("frameworks", f"Unknown framework {ref!r}.")
    return row


# --- Planning -----------------------------------------------------------------------------------


@dataclass
class Plan:
    corpus: Corpus
    chunk_ids: list[int]
    frameworks: list[FrameworkVersion]
    models: list[RegisteredModel]
    runs: int
    decoding: dict
    selection: dict
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    per_model: list[dict] = field(default_factory=list)
    budget: dict = field(default_factory=dict)

    @property
    def task_count(self) -> int:
        return len(self.chunk_ids) * len(self.frameworks) * len(self.models) * self.runs

    def as_dict(self) -> dict:
        return {
            "corpus": str(self.corpus.pk),
            "chunks": len(self.chunk_ids),
            "frameworks": [f.label for f in self.frameworks],
            "models": [m.key for m in self.models],
            "runs": self.runs,
            "decoding": self.decoding,
            "tasks": self.task_count,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": str(self.cost.quantize(Decimal("0.000001"))),
            "per_model": self.per_model,
            "budget": self.budget,
        }


def _selected_chunks(corpus: Corpus, selection: dict) -> list[int]:
    chunk_ids = selection.get("chunk_ids") or []
    document_ids = selection.get("document_ids") or []
    flt = selection.get("filter") or {}
    qs = Chunk.objects.filter(corpus=corpus)
    if chunk_ids:
        found = sorted(
            pk
            for ids in id_slices(list(chunk_ids))
            for pk in qs.filter(pk__in=ids).values_list("pk", flat=True)
        )
        missing = sorted(set(chunk_ids) - set(found))
        if missing:
            raise _invalid("chunk_ids", f"Chunks not in this corpus: {missing[:10]}.")
        return found
    if document_ids:
        docs = corpus.documents.filter(external_id__in=document_ids)
        known = set(docs.values_list("external_id", flat=True))
        missing = sorted(set(document_ids) - known)
        if missing:
            raise _invalid("document_ids", f"Documents not in this corpus: {missing[:10]}.")
        qs = qs.filter(document__in=docs)
    elif flt:
        allowed = {"document_type", "language", "author", "meta", "q"}
        unknown = sorted(set(flt) - allowed)
        if unknown:
            raise _invalid("filter", f"Unknown filter keys {unknown}; use {sorted(allowed)}.")
        meta = flt.get("meta") or []
        if isinstance(meta, str):
            meta = [meta]
        docs = corpus_filters.documents(
            corpus.documents.all(),
            q=flt.get("q") or "",
            document_type=flt.get("document_type") or "",
            language=flt.get("language") or "",
            author=flt.get("author") or "",
            meta=meta,
        )
        qs = qs.filter(document__in=docs.values("pk"))
    elif not selection.get("all"):
        raise _invalid("selection", "Select texts: chunk_ids, document_ids, a filter or all.")
    return list(qs.order_by("document__position", "position").values_list("pk", flat=True))


def _rate_per_minute(model: RegisteredModel) -> int | None:
    return model.requests_per_minute or model.provider.requests_per_minute


def window_size(model: RegisteredModel) -> int:
    rpm = _rate_per_minute(model)
    if not rpm:
        return MAX_WINDOW
    return max(1, min(MAX_WINDOW, math.ceil(rpm * WINDOW_S / 60)))


def job_plan(
    *,
    corpus_id,
    selection: dict,
    frameworks: list[str],
    models: list[str],
    runs: int | None = None,
    decoding: dict | None = None,
) -> Plan:
    """Validate a job's parameters and estimate it; writes nothing (frameworks are synced)."""
    try:
        corpus = Corpus.objects.get(pk=corpus_id)
    except (Corpus.DoesNotExist, ValueError, TypeError) as exc:
        raise _invalid("corpus", f"Unknown corpus {corpus_id!r}.") from exc
    if runs is None:
        runs = GatewaySettings.load().default_runs
    if not isinstance(runs, int) or not RUNS_MIN <= runs <= RUNS_MAX:
        raise _invalid("runs", f"Runs per model must be {RUNS_MIN} to {RUNS_MAX}, not {runs}.")
    if not frameworks:
        raise _invalid("frameworks", "Choose at least one framework.")
    if not models:
        raise _invalid("models", "Choose at least one model.")
    if len(set(frameworks)) != len(frameworks) or len(set(models)) != len(models):
        raise _invalid("frameworks", "A framework or model is listed twice.")
    decoding = dict(DEFAULT_DECODING | (decoding or {}))
    unknown = sorted(set(decoding) - DECODING_KEYS)
    if unknown:
        raise _invalid("decoding", f"Unknown decoding settings {unknown}.")
    max_tokens = decoding.get("max_tokens")
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
        raise _invalid("decoding", "decoding.max_tokens must be an integer from 1 to 8192.")
    temperature = decoding.get("temperature")
    if temperature is not None and not (
        isinstance(temperature, int | float) and 0 <= temperature <= 2
    ):
        raise _invalid("decoding", "decoding.temperature must be from 0 to 2.")
    framework_sync()
    fws = [framework_resolve(ref) for ref in frameworks]
    chosen = []
    found = {
        m.key: m for m in RegisteredModel.objects.select_related("provider").filter(key__in=models)
    }
    for key in models:
        model = found.get(key)
        if model is None:
            raise _invalid("models", f"Unknown model {key!r}.")
        if not (model.enabled and model.provider.enabled):
            raise _invalid("models", f"Model {key!r} is disabled.")
        if not model.has_capability("chat"):
            raise _invalid("models", f"Model {key!r} cannot chat.")
        if not (model.is_priced or model.allow_unpriced):
            raise _invalid("models", f"Model {key!r} has no price and is not allowed unpriced.")
        chosen.append(model)
    chunk_ids = _selected_chunks(corpus, selection)
    if not chunk_ids:
        raise _invalid("selection", "The selection matches no text.")
    plan = Plan(corpus, chunk_ids, fws, chosen, runs, decoding, selection)
    if plan.task_count > MAX_TASKS:
        raise _invalid("selection", f"{plan.task_count} tasks is over the limit of {MAX_TASKS}.")
    _estimate(plan)
    return plan


def _estimate(plan: Plan) -> None:
    """Prompt tokens from the characters of each chunk plus each framework's template;
    completion tokens at max_tokens (an upper bound); prices from the registry."""
    chunk_chars = sum(
        Chunk.objects.filter(pk__in=ids).aggregate(c=Sum("char_count"))["c"] or 0
        for ids in id_slices(plan.chunk_ids)
    )
    prompt = 0
    for fw in plan.frameworks:
        template = len(fw.content["prompt"]["system"]) + len(fw.content["prompt"]["user"])
        prompt += (chunk_chars + template * len(plan.chunk_ids)) // CHARS_PER_TOKEN
    prompt *= plan.runs
    completion = (
        len(plan.chunk_ids) * len(plan.frameworks) * plan.runs * plan.decoding["max_tokens"]
    )
    total = Decimal(0)
    for model in plan.models:
        cost = gateway.call_cost(model, prompt, completion)
        total += cost
        plan.per_model.append(
            {
                "model": model.key,
                "tasks": plan.task_count // len(plan.models),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost": str(cost.quantize(Decimal("0.000001"))),
                "window": window_size(model),
                "requests_per_minute": _rate_per_minute(model),
            }
        )
    plan.prompt_tokens = prompt * len(plan.models)
    plan.completion_tokens = completion * len(plan.models)
    plan.cost = total
    plan.budget = budget_remaining()
    plan.budget["fits"] = Decimal(plan.budget["remaining"]) >= total


def budget_remaining() -> dict:
    from billing import services as billing

    month = billing.month_start()
    budget = billing.budget_get(month=month)
    spent = billing.month_spent(month=month)
    reserved = billing.llm_reserved(month=month)
    held = sum((j.estimate_cost - _job_spent(j) for j in BatchJob.objects.active()), Decimal(0))
    remaining = Decimal(budget.amount) - Decimal(spent) - Decimal(reserved) - max(held, Decimal(0))
    return {
        "amount": str(budget.amount),
        "spent": str(spent),
        "reserved": str(reserved + max(held, Decimal(0))),
        "remaining": str(remaining.quantize(Decimal("0.000001"))),
    }


def _job_spent(job: BatchJob) -> Decimal:
    return job.tasks.aggregate(s=Sum("cost"))["s"] or Decimal(0)
