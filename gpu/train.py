"""Entry point: ``python -m gpu.train --spec spec.json`` (see gpu/PROTOCOL.md).

Stages: preprocessing (fetch and check the training file, tokenize, pack) -> model_loading ->
training (checkpoints, metrics, resume) -> finalization (adapter, perplexity, metrics files).
Every failure becomes an ``error`` event and an exit code; SIGTERM becomes a checkpoint at the
next step boundary, a ``stopped`` event and exit 143.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from gpu import WORKER_VERSION
from gpu.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_STOPPED,
    SpecError,
    StopRequested,
    WorkerError,
    classify,
    format_traceback,
)
from gpu.spec import JobSpec, load_raw_spec, resolve_spec, webhook_from_raw
from gpu.state import ResumeInfo, RunState
from gpu.storage import open_storage
from gpu.webhooks import Ticker, WebhookEmitter, make_emitter

log = logging.getLogger("crucible.worker")

EVAL_MAX_ROWS = 256  # packed rows evaluated at each checkpoint
FLUSH_TIMEOUT_SECONDS = float(os.environ.get("CRUCIBLE_WEBHOOK_FLUSH_TIMEOUT", "60"))
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "safetensors",
)


def _versions() -> dict:
    versions = {"worker": WORKER_VERSION, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Worker:
    def __init__(self, spec: JobSpec, workdir: str | None = None):
        self.spec = spec
        self.run_state = RunState()
        self.callback = None  # the CrucibleCallback, once training is set up
        self._reporting = False  # set while the outcome is reported: SIGTERM no longer unwinds
        self._own_workdir = workdir is None and not os.environ.get("CRUCIBLE_WORK_DIR")
        base = workdir or os.environ.get("CRUCIBLE_WORK_DIR")
        if base:
            self.workdir = Path(base) / spec.job_id
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"crucible-{spec.job_id[:12]}-"))
        self.storage = open_storage(
            spec.output.uri,
            spec.output.s3_endpoint_url,
            spec.output.s3_region,
            upload=spec.output.upload,
            readable=spec.output.resume_files,
        )
        spool_dir = self.storage.root if self.storage.is_local else self.workdir
        self.emitter = make_emitter(
            spec.job_id,
            spec.webhook.url,
            spec.webhook.secret,
            Path(spool_dir) / "events.spool.jsonl",
        )

    # ------------------------------------------------------------ helpers
    def stage(self, name: str) -> None:
        self.run_state.stage = name
        log.info("stage: %s", name)
        self.emitter.emit("stage", {"stage": name})

    def warn(self, code: str, message: str, details: dict | None = None) -> None:
        log.warning("%s: %s", code, message)
        self.emitter.emit("warning", {"code": code, "message": message, "details": details or {}})

    def _heartbeat(self) -> None:
        self.emitter.emit("heartbeat", {"step": self.run_state.step, "stage": self.run_state.stage})

    def _on_sigterm(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.run_state.stop_requested = name
        if self.run_state.stage != "training" and not self._reporting:
            raise StopRequested(name)  # nothing to checkpoint: unwind now
        log.warning("%s received: stopping at the next step boundary", name)

    def _oom_details(self) -> dict:
        hp = self.spec.hyperparameters
        return {
            "micro_batch_size": hp.micro_batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps,
            "max_seq_length": hp.max_seq_length,
        }

    # ------------------------------------------------------------ run
    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Started by _run right after the `started` event.
        self.heartbeat = heartbeat = Ticker(
            self.spec.heartbeat_seconds, self._heartbeat, "crucible-heartbeat"
        )
        stale = None
        code = EXIT_ERROR
        try:
            stale = Ticker(
                5.0,
                lambda: self.callback and self.callback.maybe_emit_stale_metrics(),
                "crucible-metrics",
            )
            stale.start()
            code = self._run()
        except StopRequested as stop:
            self._reporting = True
            code = self._stopped(stop.reason)
        except BaseException as exc:  # every failure is reported, including KeyboardInterrupt
            self._reporting = True
            error = classify(exc, self._oom_details())
            log.error("%s: %s", error.error_type, error.message)
            log.debug("%s", format_traceback(exc))
            self.emitter.emit(
                "error",
                {
                    "error_type": error.error_type,
                    "message": error.message,
                    "traceback": format_traceback(exc),
                    "details": error.details,
                },
            )
            code = error.exit_code
        finally:
            self._reporting = True
            heartbeat.stop()
            if stale:
                stale.stop()
            signal.signal(signal.SIGTERM, previous)
            if not self.emitter.close(FLUSH_TIMEOUT_SECONDS):
                log.error("some events could not be delivered; they stay in the spool")
        if code == EXIT_OK and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _stopped(self, reason: str) -> int:
        self.emitter.emit(
            "stopped",
            {
                "step": self.run_state.step,
                "checkpoint_uri": self.run_state.last_checkpoint_uri,
                "reason": reason,
            },
        )
        return EXIT_STOPPED

    def _run(self) -> int:
        spec, hp = self.spec, self.spec.hyperparameters
        import torch

        _quiet_libraries()
        from gpu import checkpoints, data, perplexity
        from gpu import model as model_mod

        # Before the trainer's imports (trl or peft import bitsandbytes, at import or at model
        # load): on a CPU this silences bitsandbytes' warning about its 4-bit CPU kernels, which
        # a CPU run never uses.
        device = model_mod.resolve_device(spec.device)
        from gpu import trainer as trainer_mod
        from gpu.callbacks import METRIC_FIELDS, CrucibleCallback
        from gpu.storage import fetch_uri

        self.run_state.stage = "starting"

        # The newest complete checkpoint, when resuming.
        resume_local, resume_step, skipped = None, None, []
        if spec.resume:
            found = checkpoints.fetch_latest_complete(
                self.storage,
                self.workdir / "resume",
                on_skip=lambda step, why: skipped.append((step, why)),
            )
            if found:
                resume_step, resume_local, _ = found
                self.run_state.step = resume_step
                self.run_state.last_checkpoint_uri = self.storage.uri(
                    checkpoints.checkpoint_rel(resume_step)
                )
        gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else None
        self.emitter.emit(
            "started",
            {
                "worker_version": WORKER_VERSION,
                "device": device,
                "gpu_name": gpu_name,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "torch_version": torch.__version__,
                "resumed_from_step": resume_step,
            },
        )
        self.heartbeat.start()
        for message in spec.warnings:
            self.warn("spec_unknown_field", message)
        for step, why in skipped:
            self.warn(
                "incomplete_checkpoint_skipped",
                f"checkpoint at step {step} skipped: {why}",
                {"step": step},
            )

        # ---------------------------------------------------------- preprocessing
        self.stage("preprocessing")
        path = fetch_uri(
            spec.training_file.uri,
            self.workdir,
            spec.training_file.sha256,
            spec.output.s3_endpoint_url,
            spec.output.s3_region,
        )
        conversations = data.read_training_file(path)
        train_convs, val_convs = data.split_conversations(
            conversations, spec.validation_split, hp.seed
        )
        if spec.base_model.source == "offline":
            model_mod.ensure_offline_model(spec.base_model.name)  # converts once, then cached
        tokenizer = self._load_tokenizer(model_mod)
        renderer = data.ChatRenderer(tokenizer)
        examples, stats = data.build_examples(train_convs, renderer, hp.max_seq_length)
        val_encoded = data.encode_all(val_convs, renderer)
        for encoded in val_encoded:
            data.check_end_of_turn(encoded, renderer.eot_id, renderer.eot_token)
        windows = perplexity.make_windows(val_encoded, hp.max_seq_length)
        train_rows = data.pack(examples, hp.max_seq_length)
        eval_examples = data.truncate(val_encoded, hp.max_seq_length)
        eval_rows = data.pack(eval_examples, hp.max_seq_length) if eval_examples else None
        if eval_rows is not None and len(eval_rows) > EVAL_MAX_ROWS:
            # val_loss during training is an estimate on a fixed subset; the final perplexity
            # uses the whole held-out split.
            eval_rows = eval_rows.select(range(EVAL_MAX_ROWS))
        per_epoch = data.steps_per_epoch(
            len(train_rows), hp.micro_batch_size, hp.gradient_accumulation_steps
        )
        total_steps = hp.max_steps or max(math.ceil(hp.num_epochs * per_epoch), 1)
        self.run_state.total_steps = total_steps
        if stats.truncated_examples:
            self.warn(
                "truncated_examples",
                f"{stats.truncated_examples} training example(s) are longer than max_seq_length="
                f"{hp.max_seq_length} tokens and were truncated (their end is not learned)",
                {
                    "count": stats.truncated_examples,
                    "max_seq_length": hp.max_seq_length,
                    "conversation_ids": stats.truncated_ids[:50],
                    "dropped_examples": stats.dropped_examples,
                },
            )
        if not windows:
            self.warn(
                "no_validation_split", "No held-out conversations: perplexity cannot be measured"
            )
        self.emitter.emit(
            "dataset",
            {
                "conversations": len(conversations),
                "train_conversations": len(train_convs),
                "val_conversations": len(val_convs),
                "train_examples": stats.train_examples,
                "train_tokens": stats.train_tokens,
                "val_tokens": sum(len(e.input_ids) for e in val_encoded),
                "truncated_examples": stats.truncated_examples,
                "max_seq_length": hp.max_seq_length,
                "total_steps": total_steps,
            },
        )
        resolved = spec.to_dict()
        resolved["runtime"] = {
            "device": device,
            "gpu_name": gpu_name,
            "total_steps": total_steps,
            "steps_per_epoch": per_epoch,
            "packed_rows": len(train_rows),
            "warmup_steps": trainer_mod.warmup_steps(hp, total_steps),
            "end_of_turn_token": renderer.eot_token,
            "label_tokens": stats.label_tokens,
            "packing": "bfd, one packed row per example, position ids restart per conversation",
            "quantization": "nf4-double-quant" if device == "cuda" else None,
            "precision": (
                f"{model_mod.cuda_compute_dtype()} compute on a 4-bit base"
                if device == "cuda"
                else "float32"
            ),
        }
        resolved["versions"] = _versions()
        self.storage.put_bytes(
            json.dumps(resolved, indent=2).encode(), "config/resolved_config.json"
        )

        # ---------------------------------------------------------- model
        self.stage("model_loading")
        loaded = model_mod.load_base_model(spec.base_model, device)
        resume_info = None
        if resume_local:
            resume_info = self._resume_info(resume_local, resume_step, hp, total_steps, trainer_mod)
        self.callback = CrucibleCallback(self.emitter, self.run_state, self.storage, resume_info)
        has_eval = eval_rows is not None and len(eval_rows) > 0
        config = trainer_mod.build_sft_config(
            output_dir=str(self.workdir / "trainer"),
            hp=hp,
            total_steps=total_steps,
            device=device,
            gradient_checkpointing=loaded.gradient_checkpointing,
            precision=loaded.dtype,
            logging_steps=spec.logging_steps,
            save_steps=spec.checkpoint_every_steps,
            eval_steps=spec.checkpoint_every_steps if has_eval else None,
        )
        trainer = trainer_mod.build_trainer(
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            train_rows=train_rows,
            eval_rows=eval_rows if has_eval else None,
            config=config,
            peft_config=model_mod.lora_config(hp),
            callbacks=[self.callback],
        )
        self.callback.trainer = trainer

        # ---------------------------------------------------------- training
        self.stage("training")
        output = trainer.train(resume_from_checkpoint=str(resume_local) if resume_local else None)
        if self.run_state.stop_requested:
            if self.callback.last_saved_step != trainer.state.global_step:
                # SIGTERM came after the last step boundary: checkpoint where training ended.
                trainer._save_checkpoint(trainer.model, trial=None)
                self.callback.on_save(trainer.args, trainer.state, trainer.control)
            raise StopRequested(self.run_state.stop_requested)
        self.run_state.step = trainer.state.global_step

        # ---------------------------------------------------------- finalization
        self.stage("finalization")
        adapter_dir = self.workdir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        trainer.model.save_pretrained(str(adapter_dir))
        loaded.tokenizer.save_pretrained(str(adapter_dir))
        self.storage.put_tree(adapter_dir, "adapter")

        ppl = {
            "baseline": None,
            "trained": None,
            "improvement_pct": None,
            "eval_tokens": 0,
            "method": perplexity.METHOD,
        }
        # One validation loss everywhere: the trainer's eval on the held-out split, the number
        # the metrics chart plots, with the step it was measured at. The perplexity's own mean
        # NLL (every held-out token, sliding windows) is a different measure, sent apart.
        heldout_mean_nll = None
        if windows:
            result = perplexity.baseline_and_trained(trainer.model, windows, trainer.args.device)
            heldout_mean_nll = result.pop("_trained_mean_nll")
            ppl = result
            log.info("perplexity: baseline %.3f -> trained %.3f", ppl["baseline"], ppl["trained"])

        history = self.callback.state_snapshot()["history"]
        self.storage.put_bytes(json.dumps(history, indent=1).encode(), "metrics/history.json")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(METRIC_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        self.storage.put_bytes(buffer.getvalue().encode(), "metrics/history.csv")

        self.emitter.emit(
            "completed",
            {
                "artifacts": {
                    "adapter_uri": self.storage.uri("adapter"),
                    "metrics_json_uri": self.storage.uri("metrics/history.json"),
                    "metrics_csv_uri": self.storage.uri("metrics/history.csv"),
                    "config_uri": self.storage.uri("config/resolved_config.json"),
                },
                "final_metrics": {
                    "global_step": trainer.state.global_step,
                    "epoch": trainer.state.epoch,
                    "train_loss": self.callback.last_train_loss,
                    "val_loss": self.callback.last_val_loss,
                    "val_loss_step": self.callback.last_val_step,
                    "heldout_mean_nll": heldout_mean_nll,
                    "train_runtime_seconds": round(self.callback.elapsed(), 2),
                    "train_tokens": self.callback.train_tokens(),
                },
                "perplexity": ppl,
            },
        )
        log.info("completed in %s steps (%s)", trainer.state.global_step, output.metrics)
        return EXIT_OK

    def _load_tokenizer(self, model_mod):
        base = self.spec.base_model
        if base.source == "offline":
            return model_mod.load_tokenizer(str(model_mod.ensure_offline_model(base.name)))
        path, kwargs = model_mod._source_and_kwargs(base)
        return model_mod.load_tokenizer(path, **kwargs)

    def _resume_info(self, local: Path, step: int, hp, total_steps: int, trainer_mod) -> ResumeInfo:
        from gpu.checkpoints import CRUCIBLE_STATE

        state = json.loads((local / "trainer_state.json").read_text())
        expected_step = int(state.get("global_step", step))
        losses = [entry for entry in state.get("log_history", []) if "loss" in entry]
        last_loss = float(losses[-1]["loss"]) if losses else None
        expected_lr = None
        if expected_step < total_steps:
            expected_lr = trainer_mod.scheduled_learning_rate(hp, total_steps, expected_step + 1)
            logged = [
                e
                for e in state.get("log_history", [])
                if e.get("step") == expected_step and "learning_rate" in e
            ]
            if logged:
                recomputed = trainer_mod.scheduled_learning_rate(hp, total_steps, expected_step)
                if abs(recomputed - float(logged[-1]["learning_rate"])) > 1e-6 * max(
                    abs(recomputed), 1e-12
                ):
                    self.warn(
                        "resume_schedule_mismatch",
                        f"trainer_state.json logged LR {logged[-1]['learning_rate']} at step "
                        f"{expected_step}, the job's schedule gives {recomputed}: the spec "
                        "changed since the checkpoint",
                    )
        prior_path = local / CRUCIBLE_STATE
        prior = json.loads(prior_path.read_text()) if prior_path.is_file() else {}
        return ResumeInfo(step, expected_step, expected_lr, last_loss, prior)


def _report_early_failure(raw, exc: WorkerError) -> None:
    """The spec could not be used: report with whatever webhook the raw spec names."""
    job_id, url, secret = webhook_from_raw(raw)
    data = {
        "error_type": exc.error_type,
        "message": exc.message,
        "traceback": format_traceback(exc),
        "details": exc.details,
    }
    if url and secret and job_id:
        emitter = WebhookEmitter(job_id, url, secret, None, max_attempts=4)
        emitter.emit("error", data)
        emitter.close(FLUSH_TIMEOUT_SECONDS)
    else:
        print(json.dumps({"type": "error", "job_id": job_id, "data": data}), flush=True)


def _quiet_libraries() -> None:
    """Progress bars and library chatter would bury the worker's own log lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def _setup_logging() -> None:
    level = os.environ.get("CRUCIBLE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpu.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--spec", help="path to the job spec JSON")
    parser.add_argument("--spec-url", help="URL serving the job spec JSON")
    parser.add_argument(
        "--workdir", help="scratch folder (default: CRUCIBLE_WORK_DIR or a temp folder)"
    )
    args = parser.parse_args(argv)
    _setup_logging()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting collapse on a shared CPU (a step measured 8x slower
    # with other processes running); passive waiting costs nothing when the CPU is ours. Must be
    # set before torch is imported, which happens later, in Worker._run.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    raw = None
    try:
        raw = load_raw_spec(args.spec, args.spec_url)
        spec = resolve_spec(raw)
    except SpecError as exc:
        log.error("invalid job spec: %s", exc.message)
        _report_early_failure(raw, exc)
        return exc.exit_code
    if spec.base_model.source != "hub":
        # Nothing to download: keep the Hub client from trying (it is read at import time).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        worker = Worker(spec, args.workdir)
    except Exception as exc:  # e.g. the output location cannot be opened
        error = classify(exc)
        log.error("cannot start: %s", error.message)
        _report_early_failure(raw, error)
        return error.exit_code
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
