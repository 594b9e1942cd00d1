"""Duration and cost estimates of a training configuration, before and while it runs.

The model
---------
* **Tokens.** The training split's tokens: exactly the ``train_tokens`` a previous job on the
  same file reported (same max_seq_length and validation split), else the file's approximate
  token count (``corpora.tokens``; words x ``BILLING_WORDS_TO_TOKENS`` when it has none) x
  (1 - validation split) x ``BILLING_TEMPLATE_TOKEN_FACTOR`` (chat template markers and the
  real tokenizer's difference).
* **Steps.** The worker packs conversations into rows of at most max_seq_length tokens (about
  95% full), so rows = tokens / (0.95 x max_seq_length), steps per epoch =
  ceil(ceil(rows / micro_batch) / gradient_accumulation) and steps = max_steps, or steps per
  epoch x epochs. Tokens processed = steps x tokens per step. Checkpoints (each with an
  evaluation of the validation split) = steps // checkpoint_every_steps.
* **Training time** (the ``training`` status) =
  start + c0 x steps + c1 x tokens processed + checkpoint x checkpoints:
  a fixed start (the first step's warm-up), a per-step overhead, the inverse of the
  throughput and the cost of one checkpoint with its evaluation.
* **Fit.** On completed jobs of the same base model, GPU type and executor (the same
  preset's when there are at least two; jobs without recoveries), from their measured time in
  the ``training`` and ``finalization`` statuses (JobTransition rows); newer jobs weigh more
  (x ``RECENCY_DECAY`` per job), errors are relative. The prior's shape scaled to fit (the
  machine is faster or slower than the prior, the shape holds); with ``FREE_FIT_JOBS`` jobs
  or more also non-negative least squares (scipy.optimize.nnls) on all the coefficients
  (held near the scaled prior by a light pseudo-job each, ``PRIOR_WEIGHT``), and the one
  with the smaller leave-one-out error is used: a few noisy jobs (a busy shared CPU) cannot
  drive a coefficient anywhere, a consistent history teaches its own shape.
* **The prior** (no history), per GPU type (``PRIOR``): throughput in tokens/s for a model of
  1B parameters (divided by the model's size in billions), per-step overhead, start and
  checkpoint seconds.
  - ``cpu-local`` is measured on this project's machine: the worker training the Smoke preset
    (SmolLM2-135M, LoRA r=8, 2 packed rows of 512 tokens a step, 2 quiet CPU cores) runs
    ~7.5 s a step (~127 tokens/s -> 17 tokens/s x 1B); evaluation ~600 tokens/s (-> 81 x 1B;
    ~700 quiet, slower than training under contention);
    each checkpoint ~2.5 s besides its evaluation of the validation split, finalization
    (adapter, metrics, perplexity of the base and the trained model: two evaluations) ~6 s
    besides them; the first step ~2 s more; provisioning (interpreter and library imports)
    ~6 s, preprocessing and model loading ~1 s each. The ratios of checkpoint, finalization
    and step times were checked on six more jobs of different sizes on the shared machine.
  - ``h100-pcie-80gb`` and other GPUs: not measured here (no GPU). LoRA training costs ~4 x
    parameters FLOPs a token (no gradient of the frozen weights); at a third of an H100
    PCIe's ~750 dense bf16 TFLOPs/s that is 60,000 tokens/s for a 1B model. Phases from the
    seed (provisioning 2-5 minutes), the weights' download at ``PRIOR_DOWNLOAD_BYTES_PER_S``.
* **Phases** (provisioning, preprocessing, model loading, finalization): the median measured
  duration of each over the newest ``PHASE_HISTORY`` jobs of the same history, else the
  prior's.
* **Spot.** Expected interruptions = ``BILLING_SPOT_INTERRUPTIONS_PER_HOUR`` x hours; each
  costs a relaunch (provisioning + preprocessing + model loading) plus half a checkpoint
  interval of lost steps. The high end of a spot range allows at least one interruption.
* **Range.** +-spread around the point: the largest relative error of the fitted model on its
  own history plus 2 points (at least 5%), 15% with one job of history, 35% with none.
  The local executor shares its CPU with whatever else runs on the machine (other jobs,
  tests, editors): a run can be slower than a quiet one, so the high end of a local estimate
  is further stretched by ``BILLING_LOCAL_CONTENTION_ALLOWANCE`` x the point (0.5 by
  default: half as long again). A history measured under such load overstates the next
  quiet run by up to the same factor, so a history-based local low end is divided by
  (1 + allowance); so is a prior-based one, since the user's CPU may be that much faster than
  the one the prior was measured on.

While a job trains, ``reestimate_running`` measures the job's own speed: its measured time
in training so far against what the model predicted for the steps it has done; that ratio
scales the model's remaining time (steps, checkpoints, finalization) for the ETA and the
final cost.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from billing import conf

PACK_EFFICIENCY = 0.95
# Per GPU type: training and evaluation throughput in tokens/s x 1B parameters; seconds per
# step, at the start of training, for finalization (besides its evaluations) and per checkpoint
# (besides its evaluation). The module docstring says where the figures come from.
PRIOR = {
    "cpu-local": {
        "throughput": 17.0,
        "eval_throughput": 81.0,
        "step_s": 0.5,
        "start_s": 2.0,
        "final_s": 6.0,
        "checkpoint_s": 2.5,
    },
}
PRIOR_DEFAULT = {
    "throughput": 60_000.0,
    "eval_throughput": 180_000.0,
    "step_s": 0.05,
    "start_s": 30.0,
    "final_s": 600.0,
    "checkpoint_s": 15.0,
}
PRIOR_PHASES = {
    "local": {"provisioning": 6.0, "preprocessing": 1.0, "model_loading": 1.0},
    "runpod": {
        "provisioning": 210.0,  # the seed: RunPod provisions an H100 in 2-5 minutes
        "preprocessing": 60.0,
        "model_loading": None,  # from the weights' size
    },
}
PRIOR_DOWNLOAD_BYTES_PER_S = 200e6
PRIOR_SPREAD = 0.35
ONE_JOB_SPREAD = 0.15
MIN_SPREAD = 0.05
MAX_SPREAD = 0.6
HISTORY_LIMIT = 50
PHASE_HISTORY = 5
RECENCY_DECAY = 0.8
FREE_FIT_JOBS = 5
PRIOR_WEIGHT = 0.002
PHASES = ("provisioning", "preprocessing", "model_loading", "finalization")
LAUNCH_PHASES = PHASES[:3]  # the rest (training, finalization) is the fitted model's
COEFFICIENTS = ("fixed_s", "step_s", "token_s", "checkpoint_s", "eval_token_s")
HELD_STATUSES = frozenset(
    {"provisioning", "preprocessing", "model_loading", "training", "finalization"}
)


# --- Stored times -> GPU time -----------------------------------------------------------------


def held_intervals(transitions, *, now: datetime) -> list[tuple[datetime, datetime]]:
    """Intervals the GPU was held, from a job's transitions (ordered by time).

    Held from entering a launched stage (provisioning ... finalization) until the job leaves
    them (recovering, or a terminal state); an open interval runs to ``now``. Every launch
    and relaunch counts, so recoveries are paid for.
    """
    intervals = []
    start = None
    for t in transitions:
        held = t.to_status in HELD_STATUSES
        if held and start is None:
            start = t.at
        elif not held and start is not None:
            intervals.append((start, max(start, t.at)))
            start = None
    if start is not None:
        intervals.append((start, max(start, now)))
    return intervals


def stage_seconds(transitions, *, now: datetime) -> dict[str, float]:
    """Seconds spent in each status (summed over attempts)."""
    totals: dict[str, float] = {}
    items = list(transitions)
    for current, following in zip(items, [*items[1:], None], strict=True):
        end = following.at if following is not None else now
        totals[current.to_status] = totals.get(current.to_status, 0.0) + max(
            0.0, (end - current.at).total_seconds()
        )
    return totals


# --- Configuration -> work ---------------------------------------------------------------------


@dataclass
class Work:
    train_tokens: int
    token_source: str
    rows: int
    steps_per_epoch: int
    steps: int
    tokens_per_step: float
    tokens_processed: float
    checkpoint_every: int = 100
    val_tokens: float = 0.0

    @property
    def checkpoints(self) -> int:
        return self.steps // self.checkpoint_every

    def features(self) -> tuple[float, ...]:
        """The model's inputs, in the order of COEFFICIENTS."""
        return (
            1.0,
            float(self.steps),
            self.tokens_processed,
            float(self.checkpoints),
            (self.checkpoints + 2) * self.val_tokens,
        )


def train_tokens_for(*, training_file, configuration: dict, known: dict | None = None) -> tuple:
    """(train tokens, where the figure comes from, validation tokens)."""
    split = float(configuration.get("validation_split", 0.2))
    if known and known.get("train_tokens"):
        tokens = int(known["train_tokens"])
        val = known.get("val_tokens")
        if val is None:
            val = tokens * split / (1 - split)
        return tokens, "dataset report of an earlier job on this file", float(val)
    if training_file.token_count:
        tokens, source = training_file.token_count, "approximate token count of the file"
    else:
        tokens = training_file.word_count * conf.words_to_tokens()
        source = f"word count x {conf.words_to_tokens()}"
    scaled = tokens * conf.template_token_factor()
    return max(1, round(scaled * (1 - split))), source, scaled * split


def work_for(
    *,
    train_tokens: int,
    configuration: dict,
    token_source: str = "",
    val_tokens: float = 0.0,
    steps: int | None = None,
) -> Work:
    """The work of a configuration (``steps``: the steps a finished job really ran)."""
    hp = configuration["hyperparameters"]
    max_seq = int(hp["max_seq_length"])
    micro = int(hp["micro_batch_size"])
    accum = int(hp["gradient_accumulation_steps"])
    rows = max(1, math.ceil(train_tokens / (max_seq * PACK_EFFICIENCY)))
    per_epoch = max(1, math.ceil(math.ceil(rows / micro) / accum))
    if steps is None:
        steps = int(hp["max_steps"]) if hp.get("max_steps") else per_epoch * int(hp["num_epochs"])
    per_step = train_tokens / per_epoch
    every = max(1, int(configuration.get("checkpoint_every_steps", 100)))
    return Work(
        train_tokens,
        token_source,
        rows,
        per_epoch,
        steps,
        per_step,
        per_step * steps,
        every,
        float(val_tokens),
    )


# --- History --------------------------------------------------------------------------------


@dataclass
class Sample:
    work: Work
    training_s: float  # the training and finalization statuses
    phases: dict
    held_s: float


def _history(*, base_model, gpu_type: str, preset_id, executor: str) -> list[Sample]:
    """Completed jobs like this one, newest first."""
    from training.models import JobStatus, TrainingJob

    jobs = list(
        TrainingJob.objects.filter(
            status=JobStatus.COMPLETED,
            base_model=base_model,
            executor=executor,
            recovery_count=0,
            billing__gpu_type=gpu_type,
        )
        .select_related("training_file")
        .prefetch_related("transitions")
        .order_by("-completed_at")[:HISTORY_LIMIT]
    )
    same_preset = [j for j in jobs if j.preset_id == preset_id]
    if len(same_preset) >= 2:
        jobs = same_preset
    samples = []
    for job in jobs:
        transitions = list(job.transitions.all())
        if not transitions:
            continue
        end = job.completed_at or transitions[-1].at
        stages = stage_seconds(transitions, now=end)
        if not stages.get("training"):
            continue
        tokens, _source, val_tokens = train_tokens_for(
            training_file=job.training_file,
            configuration=job.configuration,
            known=job.dataset_report,
        )
        work = work_for(
            train_tokens=tokens,
            configuration=job.configuration,
            val_tokens=val_tokens,
            steps=job.current_step or job.total_steps or None,
        )
        held = sum((b - a).total_seconds() for a, b in held_intervals(transitions, now=end))
        samples.append(
            Sample(
                work=work,
                training_s=stages["training"] + stages.get("finalization", 0.0),
                phases={p: stages.get(p, 0.0) for p in PHASES},
                held_s=held,
            )
        )
    return samples


def _prior_coefficients(*, base_model, gpu_type: str) -> tuple[float, ...]:
    """The COEFFICIENTS without history; see the module docstring."""
    prior = PRIOR.get(gpu_type, PRIOR_DEFAULT)
    billions = max(base_model.parameters / 1e9, 0.01)
    return (
        prior["start_s"] + prior["final_s"],
        prior["step_s"],
        billions / prior["throughput"],
        prior["checkpoint_s"],
        billions / prior["eval_throughput"],
    )


def _start_share(gpu_type: str) -> float:
    """The share of the fixed seconds spent when training starts (the rest: finalization)."""
    prior = PRIOR.get(gpu_type, PRIOR_DEFAULT)
    return prior["start_s"] / (prior["start_s"] + prior["final_s"])


def _predict(coefficients, work: Work) -> float:
    return sum(c * x for c, x in zip(coefficients, work.features(), strict=True))


def _scaled_fit(samples: list[Sample], weights: list[float], prior: tuple) -> tuple:
    """The prior's shape x the scale that fits ``samples`` best (relative errors)."""
    ratios = [_predict(prior, s.work) / s.training_s for s in samples]
    scale = sum(w * r for w, r in zip(weights, ratios, strict=True)) / sum(
        w * r * r for w, r in zip(weights, ratios, strict=True)
    )
    return tuple(c * scale for c in prior)


def _free_fit(samples: list[Sample], weights: list[float], scaled: tuple) -> tuple:
    """Every coefficient free (non-negative), held near ``scaled`` by PRIOR_WEIGHT pseudo-jobs."""
    import numpy as np
    from scipy.optimize import nnls

    free = [j for j, c in enumerate(scaled) if c > 0]
    # Unknowns relative to the scaled prior (theta_j = u_j x scaled_j) keep the system
    # well conditioned although tokens and steps differ by orders of magnitude.
    rows, targets = [], []
    for w, s in zip(weights, samples, strict=True):
        x = s.work.features()
        rows.append([math.sqrt(w) * x[j] * scaled[j] / s.training_s for j in free])
        targets.append(math.sqrt(w))
    for k in range(len(free)):
        rows.append([math.sqrt(PRIOR_WEIGHT) * (1.0 if i == k else 0.0) for i in range(len(free))])
        targets.append(math.sqrt(PRIOR_WEIGHT))
    solution, _residual = nnls(np.array(rows), np.array(targets))
    fitted = list(scaled)
    for u, j in zip(solution, free, strict=True):
        fitted[j] = float(u) * scaled[j]
    return tuple(fitted)


def _fit(samples: list[Sample], prior: tuple) -> tuple[tuple, str]:
    """(coefficients, which fit) of the training time, fitted on ``samples`` (newest first).

    Relative errors, weights RECENCY_DECAY ** age. The prior's shape scaled to fit; with
    FREE_FIT_JOBS jobs or more, also every coefficient free, and the one of the two with the
    smaller leave-one-out error wins: few or noisy jobs (a shared CPU) keep the prior's
    shape, a consistent history of varied sizes teaches its own.
    """
    weights = [RECENCY_DECAY**i for i in range(len(samples))]
    scaled = _scaled_fit(samples, weights, prior)
    if len(samples) < FREE_FIT_JOBS:
        return scaled, "prior shape, scaled"

    def free(rest, w):
        return _free_fit(rest, w, _scaled_fit(rest, w, prior))

    def loo_error(fitter) -> float:
        total = 0.0
        for i, sample in enumerate(samples):
            rest = samples[:i] + samples[i + 1 :]
            coefficients = fitter(rest, weights[:i] + weights[i + 1 :])
            total += weights[i] * abs(_predict(coefficients, sample.work) / sample.training_s - 1)
        return total

    if loo_error(free) < loo_error(lambda rest, w: _scaled_fit(rest, w, prior)):
        return _free_fit(samples, weights, scaled), "free"
    return scaled, "prior shape, scaled"


# --- The estimate -------------------------------------------------------------------------------


@dataclass
class Estimate:
    gpu_type: str
    spot: bool
    rate_spot: float
    rate_on_demand: float
    train_tokens: int
    token_source: str
    steps: int
    tokens_processed: float
    seconds_per_step: float
    training_seconds: float
    phases: dict
    recovery_seconds: dict
    spread: float
    basis: str
    history_jobs: int
    model: dict = field(default_factory=dict)
    duration_seconds: dict = field(default_factory=dict)
    cost_spot: dict = field(default_factory=dict)
    cost_on_demand: dict = field(default_factory=dict)
    text: str = ""

    @property
    def cost(self) -> dict:
        return self.cost_spot if self.spot else self.cost_on_demand

    @property
    def point_cost(self) -> Decimal:
        return money(self.cost["point"])

    def as_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost}


def money(value: float | Decimal) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _duration_text(seconds: float) -> tuple[float, str]:
    if seconds < 120:
        return seconds, "seconds"
    if seconds < 2 * 3600:
        return seconds / 60, "minutes"
    return seconds / 3600, "hours"


def range_text(low_s: float, high_s: float) -> str:
    """'12-15 hours', '3.3-6.7 minutes' (one unit, chosen by the high end)."""
    _, unit = _duration_text(high_s)
    per_unit = {"seconds": 1, "minutes": 60, "hours": 3600}[unit]
    low, high = low_s / per_unit, high_s / per_unit
    if unit != "seconds" and high < 10:
        return f"{low:.1f}-{high:.1f} {unit}"
    return f"{math.floor(low)}-{math.ceil(high)} {unit}"


def money_text(low: float, high: float) -> str:
    if high < 10:
        return f"${low:.2f}-{high:.2f}"
    return f"${math.floor(low)}-{math.ceil(high)}"


def estimate(
    *,
    training_file,
    base_model,
    configuration: dict,
    price,
    spot: bool,
    executor: str,
    preset_id=None,
) -> Estimate:
    """The estimate of one configuration on one GPU type (``price``: a GpuPrice)."""
    from training.models import TrainingJob

    previous = (
        TrainingJob.objects.filter(training_file=training_file)
        .exclude(dataset_report={})
        .order_by("-created_at")
        .values_list("dataset_report", "configuration")[:20]
    )
    hp = configuration["hyperparameters"]
    known = next(
        (
            report
            for report, config in previous
            if report.get("max_seq_length", config["hyperparameters"]["max_seq_length"])
            == hp["max_seq_length"]
            and config.get("validation_split") == configuration.get("validation_split")
        ),
        None,
    )
    tokens, token_source, val_tokens = train_tokens_for(
        training_file=training_file, configuration=configuration, known=known
    )
    work = work_for(
        train_tokens=tokens,
        configuration=configuration,
        token_source=token_source,
        val_tokens=val_tokens,
    )
    gpu_type = price.gpu_type
    samples = _history(
        base_model=base_model, gpu_type=gpu_type, preset_id=preset_id, executor=executor
    )
    prior = _prior_coefficients(base_model=base_model, gpu_type=gpu_type)
    phase_prior = dict(PRIOR_PHASES.get(executor, PRIOR_PHASES["runpod"]))
    if phase_prior.get("model_loading") is None:
        phase_prior["model_loading"] = 60 + base_model.size_bytes / PRIOR_DOWNLOAD_BYTES_PER_S

    if samples:
        coefficients, fit = _fit(samples, prior)
        recent = samples[:PHASE_HISTORY]
        launch = {p: statistics.median(s.phases[p] for s in recent) for p in LAUNCH_PHASES}
        errors = [
            abs((sum(launch.values()) + _predict(coefficients, s.work)) / s.held_s - 1)
            for s in samples
            if s.held_s > 0
        ]
        if len(samples) == 1:
            spread = ONE_JOB_SPREAD
        else:
            spread = min(MAX_SPREAD, max(MIN_SPREAD, max(errors, default=0) + 0.02))
        basis = "history"
    else:
        coefficients, fit = prior, "prior"
        launch = phase_prior
        spread = PRIOR_SPREAD
        basis = "prior"

    c = dict(zip(COEFFICIENTS, coefficients, strict=True))
    start_share = _start_share(gpu_type)
    model_s = _predict(coefficients, work)  # training + finalization
    finalization_s = c["fixed_s"] * (1 - start_share) + 2 * work.val_tokens * c["eval_token_s"]
    training_s = model_s - finalization_s
    phases = {**launch, "finalization": finalization_s}
    seconds_per_step = training_s / work.steps
    base_s = model_s + sum(launch.values())
    relaunch = sum(launch.values())
    lost = seconds_per_step * work.checkpoint_every / 2
    per_interruption = relaunch + lost
    expected = conf.spot_interruptions_per_hour() * base_s / 3600
    recovery = {
        "expected_interruptions": round(expected, 3),
        "seconds_per_interruption": round(per_interruption, 1),
        "point": expected * per_interruption,
        "high": max(1, math.ceil(2 * expected)) * per_interruption,
    }
    # The local executor shares its CPU: a run can be slower than a quiet one, so the high end
    # gets the allowance. A history measured under such load can make the next (quieter) run
    # faster than its history by the same factor, so a history-based low end is divided by it.
    # The prior was calibrated on one quiet 2-core machine; the user's CPU can be that much
    # faster (CI's ran a prior-estimated Smoke job in 0.58x the prior's point), so a prior-based
    # local low end is divided by it too.
    contention = conf.local_contention_allowance() if executor == "local" else 0.0
    low_divisor = 1 + contention

    def durations(with_spot: bool) -> dict:
        extra_point = recovery["point"] if with_spot else 0.0
        extra_high = recovery["high"] if with_spot else 0.0
        return {
            "low": base_s * (1 - spread) / low_divisor,
            "point": base_s + extra_point,
            "high": base_s * (1 + spread + contention) + extra_high,
        }

    spot_rate = float(price.spot_per_hour)
    demand_rate = float(price.on_demand_per_hour)
    spot_d, demand_d = durations(True), durations(False)
    result = Estimate(
        gpu_type=gpu_type,
        spot=spot,
        rate_spot=spot_rate,
        rate_on_demand=demand_rate,
        train_tokens=work.train_tokens,
        token_source=work.token_source,
        steps=work.steps,
        tokens_processed=round(work.tokens_processed),
        seconds_per_step=seconds_per_step,
        training_seconds=training_s,
        phases=phases,
        recovery_seconds=recovery,
        spread=round(spread, 4),
        basis=basis,
        history_jobs=len(samples),
        model={
            "fit": fit,
            "coefficients": c,
            "start_share": start_share,
            "tokens_per_step": work.tokens_per_step,
            "checkpoint_every": work.checkpoint_every,
            "val_tokens": work.val_tokens,
            "contention_allowance": contention,
        },
        duration_seconds=spot_d if spot else demand_d,
        cost_spot={k: v * spot_rate / 3600 for k, v in spot_d.items()},
        cost_on_demand={k: v * demand_rate / 3600 for k, v in demand_d.items()},
    )
    d = result.duration_seconds
    result.text = (
        f"Estimated duration: {range_text(d['low'], d['high'])}, estimated cost: "
        f"{money_text(result.cost_spot['low'], result.cost_spot['high'])} (spot) or "
        f"{money_text(result.cost_on_demand['low'], result.cost_on_demand['high'])} (on-demand)"
    )
    return result


# --- While running ------------------------------------------------------------------------------


def reestimate_running(
    *,
    job,
    transitions,
    last_point,
    rate_per_hour: float,
    accrued: float,
    now: datetime,
    estimate: dict | None = None,
) -> dict | None:
    """ETA and final cost of a training job from its own measured speed.

    Measured: the time from when this attempt entered ``training`` to its newest metric
    point, over the steps since then (resumed attempts start at their recovery's step).
    With the model of the job's estimate (``estimate``: JobCost.estimate), the ratio of that
    time to what the model predicts for the same steps (warm-up and checkpoints included)
    scales the model's remaining time: steps, checkpoints and finalization. Without one, the
    measured seconds per step times the steps left, plus the estimate's finalization.
    Needs at least one measured step; returns None before.
    """
    if job.status != "training" or not job.total_steps or last_point is None:
        return None
    entered = [t for t in transitions if t.to_status == "training"]
    if not entered:
        return None
    started = entered[-1].at
    from_step = 0
    if len(entered) > 1 or job.recovery_count:
        recovery = job.recoveries.order_by("-detected_at").first()
        from_step = (recovery.from_step or 0) if recovery else 0
    done = last_point.step - from_step
    elapsed = (last_point.recorded_at - started).total_seconds()
    if done < 1 or elapsed <= 0:
        return None
    left_steps = max(0, job.total_steps - last_point.step)
    since_point = max(0.0, (now - last_point.recorded_at).total_seconds())
    estimate = estimate or {}
    model = estimate.get("model") or {}
    c = model.get("coefficients")
    if c:
        every = max(1, int(model["checkpoint_every"]))
        val_tokens = float(model["val_tokens"])
        share = float(model["start_share"])
        model_per_step = c["step_s"] + c["token_s"] * float(model["tokens_per_step"])
        per_checkpoint = c["checkpoint_s"] + c["eval_token_s"] * val_tokens
        # A step's checkpoint is saved after its metric point is recorded.
        checkpoints_done = (last_point.step - 1) // every - from_step // every
        predicted = c["fixed_s"] * share + model_per_step * done + per_checkpoint * checkpoints_done
        ratio = min(20.0, max(0.05, elapsed / predicted)) if predicted > 0 else 1.0
        checkpoints_left = job.total_steps // every - (last_point.step - 1) // every
        finalization = c["fixed_s"] * (1 - share) + 2 * val_tokens * c["eval_token_s"]
        left = model_per_step * left_steps + per_checkpoint * checkpoints_left + finalization
        seconds_left = max(0.0, ratio * left - since_point)
        per_step = ratio * model_per_step
    else:
        per_step = elapsed / done
        finalization = float((estimate.get("phases") or {}).get("finalization", 0.0))
        seconds_left = max(0.0, left_steps * per_step - since_point) + finalization
        ratio = None
    final_cost = accrued + seconds_left * rate_per_hour / 3600
    return {
        "seconds_per_step": round(per_step, 4),
        "speed_vs_estimate": round(ratio, 3) if ratio is not None else None,
        "measured_steps": done,
        "seconds_left": round(seconds_left, 1),
        "eta": (now + timedelta(seconds=seconds_left)).isoformat(),
        "final_cost": round(final_cost, 4),
        "at_step": last_point.step,
        "total_steps": job.total_steps,
        "at": now.isoformat(),
    }
