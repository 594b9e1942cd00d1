"""Prepare the demo: a signed-in-able demo user with the admin role and an API token, the
sample corpus (samples/corpus/speeches.jsonl) so the Datasets page has something in it, and
sample work for the newer features (``demo_samples_ensure``), all on the offline models:

- the 22-text narrative corpus (samples/corpus/narratives.jsonl) for batch LLM jobs;
- a knowledge base over both sample corpora (its build is enqueued on the ``long`` queue), so
  the RAG explorer answers with citations;
- a small batch LLM job over two narratives with both shipped frameworks, two runs each (8
  tasks), queued on the ``long`` queue so the results page has its figures (SmolLM2-135M
  often fails the frameworks' JSON: the failure taxonomy shows it);
- the evaluation dataset samples/evaluation/grounded_qa.jsonl and a batch evaluation over it
  (deterministic ``grounded_qa`` rubric, 6 items).

The workers that `make demo` starts after training run the queued work (a few minutes of CPU).

Idempotent: running it again keeps the user, the token, the corpora and the samples (found by
their names; nothing is created twice). `make demo` calls it.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token

from config.addresses import public_base_url
from config.errors import CrucibleError
from config.roles import Role
from config.services import user_create, user_update

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "crucible-demo"  # noqa: S105 - a published demo credential, local only
SAMPLE_CORPUS = "samples/corpus/speeches.jsonl"
SAMPLE_CORPUS_NAME = "Sample: speeches and declarations"

# The newer features' samples (demo_samples_ensure); each is found again by its name.
CHAT_MODEL = "offline/smollm2-135m-instruct"
EMBEDDING_MODEL = "offline/all-minilm-l6-v2"
NARRATIVES_CORPUS = "samples/corpus/narratives.jsonl"
NARRATIVES_CORPUS_NAME = "Sample: narratives"
KNOWLEDGE_BASE_NAME = "Sample: speeches and narratives"
KNOWLEDGE_BASE_QUESTION = "What is the only thing we have to fear?"
BATCH_JOB_NAME = "Demo: narrative salience and moral foundations"
BATCH_JOB_TEXTS = ["constitution-preamble", "henry-liberty-or-death"]  # the shortest prompts
BATCH_JOB_FRAMEWORKS = ["narrative_salience", "moral_foundations"]
BATCH_JOB_RUNS = 2
# A framework's JSON answer is 40-60 tokens; every call of the offline model costs CPU time.
BATCH_JOB_DECODING = {"max_tokens": 64}
EVAL_DATASET = "samples/evaluation/grounded_qa.jsonl"
EVAL_DATASET_NAME = "demo-grounded-qa"
EVAL_RUBRIC = "grounded_qa"  # deterministic measures only: no judge call
EVAL_BATCH_NAME = "Demo: grounded QA on the offline model"
EVAL_DECODING = {"max_tokens": 48}


def _corpus_ensure(*, user, relative_path: str, name: str, description: str):
    """A sample corpus, uploaded through the corpus service once; (corpus, created)."""
    # The demo commands are the one place that wires the apps together; import lazily so
    # config's modules import no app at import time.
    from corpora.models import Corpus
    from corpora.services import corpus_create

    existing = Corpus.objects.filter(name=name).first()
    if existing is not None:
        return existing, False
    path = Path(settings.BASE_DIR) / relative_path
    with path.open("rb") as upload:
        corpus = corpus_create(
            name=name, upload=upload, user=user, filename=path.name, description=description
        )
    return corpus, True


def sample_corpus_ensure(*, user) -> tuple[object, bool]:
    """The demo's sample corpus, uploaded through the corpus service once; (corpus, created)."""
    return _corpus_ensure(
        user=user,
        relative_path=SAMPLE_CORPUS,
        name=SAMPLE_CORPUS_NAME,
        description="Four public-domain texts (speeches and a declaration), loaded by "
        "the demo from samples/corpus/.",
    )


def narratives_corpus_ensure(*, user) -> tuple[object, bool]:
    """The 22-text narrative corpus that the batch LLM jobs are shown on; (corpus, created)."""
    return _corpus_ensure(
        user=user,
        relative_path=NARRATIVES_CORPUS,
        name=NARRATIVES_CORPUS_NAME,
        description="22 public-domain speeches and declarations (most of them excerpts), "
        "loaded by the demo from samples/corpus/narratives.jsonl for batch LLM jobs.",
    )


def knowledge_base_ensure(*, user, corpora: list) -> tuple[object, bool]:
    """A knowledge base over the sample corpora; its build goes to the ``long`` queue."""
    from corpora.models import KnowledgeBase
    from corpora.rag.services import knowledge_base_create

    existing = KnowledgeBase.objects.filter(name=KNOWLEDGE_BASE_NAME).first()
    if existing is not None:
        return existing, False
    kb = knowledge_base_create(
        name=KNOWLEDGE_BASE_NAME,
        corpus_ids=[c.pk for c in corpora],
        user=user,
        embedding_model=EMBEDDING_MODEL,
        description="The demo's sample corpora, embedded with the offline MiniLM model. "
        f"Ask, for example: {KNOWLEDGE_BASE_QUESTION}",
    )
    return kb, True


def batch_job_ensure(*, user, corpus) -> tuple[object, bool]:
    """A small batch LLM job over two narratives (both frameworks, the offline chat model,
    two runs each: 8 tasks). Its first window is queued on the ``long`` queue at once, so it
    runs before the validation of a demo job trained meanwhile."""
    from django.db import transaction

    from jobs.batch.models import BatchJob
    from jobs.batch.services import job_create, job_dispatch

    existing = BatchJob.objects.filter(name=BATCH_JOB_NAME).first()
    if existing is not None:
        return existing, False
    with transaction.atomic():
        job = job_create(
            user=user,
            corpus_id=corpus.pk,
            selection={"document_ids": BATCH_JOB_TEXTS},
            frameworks=BATCH_JOB_FRAMEWORKS,
            models=[CHAT_MODEL],
            runs=BATCH_JOB_RUNS,
            decoding=BATCH_JOB_DECODING,
            name=BATCH_JOB_NAME,
        )
        transaction.on_commit(lambda: job_dispatch(job_id=job.pk))
    return job, True


def eval_dataset_ensure(*, user) -> tuple[object, bool]:
    """The sample evaluation dataset (the JSONL POST /v1/datasets accepts); (dataset, created)."""
    from evaluation.evals.datasets import dataset_create
    from evaluation.models import EvalDataset

    existing = EvalDataset.objects.filter(name=EVAL_DATASET_NAME).order_by("-version").first()
    if existing is not None:
        return existing, False
    path = Path(settings.BASE_DIR) / EVAL_DATASET
    with path.open("rb") as stream:
        dataset = dataset_create(
            user=user,
            name=EVAL_DATASET_NAME,
            stream=stream,
            description="Six grounded questions on the sample speeches, with references and "
            "contexts; loaded by the demo from samples/evaluation/.",
        )
    return dataset, True


def batch_eval_ensure(*, user, dataset) -> tuple[object, bool]:
    """A batch evaluation of the offline chat model on the sample dataset (one run, the
    deterministic rubric); its items go to the ``long`` queue."""
    from evaluation.evals.services import batch_eval_create
    from evaluation.models import BatchEval

    existing = BatchEval.objects.filter(name=EVAL_BATCH_NAME).first()
    if existing is not None:
        return existing, False
    batch = batch_eval_create(
        user=user,
        dataset_id=dataset.pk,
        models=[CHAT_MODEL],
        rubric=EVAL_RUBRIC,
        runs=1,
        name=EVAL_BATCH_NAME,
        decoding=EVAL_DECODING,
        embed_model=EMBEDDING_MODEL,
    )
    return batch, True


@dataclass
class DemoSamples:
    """What demo_samples_ensure found or made: ``objects[key] = (object, created)``; a sample
    that could not be made has its reason in ``skipped[key]``."""

    objects: dict[str, tuple[object, bool]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def get(self, key: str):
        return self.objects.get(key, (None, False))[0]

    @property
    def created(self) -> list[str]:
        return [key for key, (_, made) in self.objects.items() if made]


def demo_samples_ensure(*, user, sample_corpus=None) -> DemoSamples:
    """The newer features' sample data, each made once through its own service. A sample
    whose service refuses (a model disabled by an admin, a full queue) is skipped with the
    reason; the rest still go ahead."""
    out = DemoSamples()

    def step(key: str, make) -> object:
        try:
            out.objects[key] = make()
        except CrucibleError as exc:
            out.skipped[key] = exc.message
        return out.get(key)

    if sample_corpus is None:
        sample_corpus, _ = sample_corpus_ensure(user=user)
    narratives = step("narratives", lambda: narratives_corpus_ensure(user=user))
    corpora = [c for c in (sample_corpus, narratives) if c is not None]
    step("knowledge_base", lambda: knowledge_base_ensure(user=user, corpora=corpora))
    if narratives is not None:
        step("batch_job", lambda: batch_job_ensure(user=user, corpus=narratives))
    dataset = step("eval_dataset", lambda: eval_dataset_ensure(user=user))
    if dataset is not None:
        step("batch_eval", lambda: batch_eval_ensure(user=user, dataset=dataset))
    return out


def demo_samples_lines(url: str) -> list[str]:
    """Where the demo's sample work is, as lines for the banners (only what exists)."""
    from corpora.models import KnowledgeBase
    from evaluation.models import BatchEval
    from jobs.batch.models import BatchJob

    lines = []
    job = BatchJob.objects.filter(name=BATCH_JOB_NAME).first()
    if job is not None:
        lines.append(
            f"  Batch job:  {url}/batch/{job.pk}/results/  ({job.task_count} tasks, {job.status})"
        )
    else:
        lines.append(f"  Batch jobs: {url}/batch/")
    kb = KnowledgeBase.objects.filter(name=KNOWLEDGE_BASE_NAME).first()
    lines.append(
        f"  RAG:        {url}/datasets/rag/"
        + (f"?kb={kb.pk}  (ask: “{KNOWLEDGE_BASE_QUESTION}”; {kb.status})" if kb else "")
    )
    batch = BatchEval.objects.filter(name=EVAL_BATCH_NAME).first()
    if batch is not None:
        lines.append(
            f"  Batch eval: {url}/evals/batches/{batch.pk}/  ({batch.item_count} items, "
            f"{batch.status})"
        )
    else:
        lines.append(f"  Batch evals: {url}/evals/batches/")
    lines.append(f"  Chat:       {url}/chat/  (model {CHAT_MODEL})")
    return lines


def chat_curl(url: str, token: str) -> str:
    """A curl call of the OpenAI-compatible chat endpoint with the demo token."""
    body = (
        f'{{"model": "{CHAT_MODEL}", "max_tokens": 32, '
        '"messages": [{"role": "user", "content": "Say hello in five words."}]}'
    )
    return (
        f"curl {url}/v1/chat/completions -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )


class Command(BaseCommand):
    help = (
        "Create the demo user (demo / crucible-demo, admin role), its API token and the "
        "sample corpus."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--url",
            default=None,
            help="The address the dashboard is served on (default: CRUCIBLE_PUBLIC_URL)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Create the demo admin (published password) on a non-SQLite database too",
        )

    def handle(self, *args, url=None, **options):
        engine = settings.DATABASES["default"]["ENGINE"]
        if "sqlite" not in engine and not options.get("force"):
            raise CommandError(
                f"Refusing to create the demo admin '{DEMO_USERNAME}' with its published "
                f"password on this database ({engine.rsplit('.', 1)[-1]}, from DATABASE_URL): "
                "anyone who reads the README could sign in. Use the embedded SQLite demo, or "
                "pass --force on a throwaway database."
            )
        # The same base address as every other link the product prints (config/addresses.py).
        url = (url or os.environ.get("CRUCIBLE_PUBLIC_URL") or public_base_url()).rstrip("/")
        user = get_user_model().objects.filter(username=DEMO_USERNAME).first()
        if user is None:
            user = user_create(
                username=DEMO_USERNAME,
                role=Role.ADMIN,
                actor=None,
                email="demo@localhost",
                password=DEMO_PASSWORD,
                first_name="Demo",
                last_name="User",
            )
        else:
            user_update(user=user, role=Role.ADMIN, actor=None)
        token, _ = Token.objects.get_or_create(user=user)
        corpus, created = sample_corpus_ensure(user=user)
        self.stdout.write(
            self.style.SUCCESS("Demo user ready.")
            + f"\n  Sign in:   {DEMO_USERNAME} / {DEMO_PASSWORD}  at {url}/"
            + f"\n  API token: {token.key}"
            + f"\n  Try:       curl -H 'Authorization: Token {token.key}' {url}/api/v1/me"
            + f"\n  Corpus:    “{corpus.name}” ({corpus.record_count} documents"
            + (", loaded now)" if created else ", already loaded)")
        )
        samples = demo_samples_ensure(user=user, sample_corpus=corpus)
        made = ", ".join(samples.created)
        self.stdout.write(
            "Demo samples "
            + (f"created ({made}; queued for the workers)" if made else "already there")
            + ", on the offline models:\n"
            + "\n".join(demo_samples_lines(url))
        )
        for key, reason in samples.skipped.items():
            self.stdout.write(self.style.WARNING(f"  Skipped the sample {key}: {reason}"))
