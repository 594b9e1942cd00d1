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
  epoch x epochs. Tokens processed = steps x tokens per step.
* **Training time** = c0 x steps + c1 x tokens processed (a per-step overhead and the inverse
  of the throughput). Fitted on completed jobs of the same base model and GPU type (the same
  preset's when there are at least two, and without recoveries), from their measured time in
  the ``training`` status (JobTransition rows): least squares on both coefficients with three
  or more jobs of different sizes, else the prior's shape scaled to fit. Without history, the
  prior: ``PRIOR_THROUGHPUT`` tokens/s for a 1B-parameter model on that GPU type, divided by
  the model's size in billions, and ``PRIOR_STEP_OVERHEAD_S``.
* **Phases** (provisioning, preprocessing, model loading, finalization): the median measured
  duration of each in the same history, else ``PRIOR_PHASES`` (model loading on RunPod from
  the weights' size at ``PRIOR_DOWNLOAD_BYTES_PER_S``).
* **Spot.** Expected interruptions = ``BILLING_SPOT_INTERRUPTIONS_PER_HOUR`` x hours; each
  costs a relaunch (provisioning + preprocessing + model loading) plus half a checkpoint
  interval of lost steps. The high end of a spot range allows at least one interruption.
* **Range.** +-spread around the point: the largest relative error of the fitted model on its
  own history plus 2 points (at least 5%), 15% with one job of history, 35% with none.

While a job trains, ``reestimate_running`` replaces the model by the job's own measured
seconds per step (from its metric timestamps) for the ETA and the final cost.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from billing import conf

PACK_EFFICIENCY = 0.95
PRIOR_THROUGHPUT = {"h100-pcie-80gb": 60_000.0, "cpu-local": 40.0}  # tokens/s x 1B params
PRIOR_THROUGHPUT_DEFAULT = 30_000.0
PRIOR_STEP_OVERHEAD_S = {"cpu-local": 0.5}
PRIOR_STEP_OVERHEAD_DEFAULT_S = 0.05
PRIOR_PHASES = {
    "local": {
        "provisioning": 3.0,
        "preprocessing": 10.0,
        "model_loading": 20.0,
        "finalization": 60.0,
    },
    "runpod": {
        "provisioning": 210.0,  # the seed: RunPod provisions an H100 in 2-5 minutes
        "preprocessing": 60.0,
        "model_loading": None,  # from the weights' size
        "finalization": 600.0,
    },
}
PRIOR_DOWNLOAD_BYTES_PER_S = 200e6
PRIOR_SPREAD = 0.35
ONE_JOB_SPREAD = 0.15
MIN_SPREAD = 0.05
MAX_SPREAD = 0.6
HISTORY_LIMIT = 50
PHASES = ("provisioning", "preprocessing", "model_loading", "finalization")
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


def train_tokens_for(*, training_file, configuration: dict, known: dict | None = None) -> tuple:
    """(train tokens, where the figure comes from)."""
    if known and known.get("train_tokens"):
        return int(known["train_tokens"]), "dataset report of an earlier job on this file"
    split = float(configuration.get("validation_split", 0.2))
    if training_file.token_count:
        tokens, source = training_file.token_count, "approximate token count of the file"
    else:
        tokens = training_file.word_count * conf.words_to_tokens()
        source = f"word count x {conf.words_to_tokens()}"
    return max(1, round(tokens * (1 - split) * conf.template_token_factor())), source


def work_for(*, train_tokens: int, configuration: dict, token_source: str = "") -> Work:
    hp = configuration["hyperparameters"]
    max_seq = int(hp["max_seq_length"])
    micro = int(hp["micro_batch_size"])
    accum = int(hp["gradient_accumulation_steps"])
    rows = max(1, math.ceil(train_tokens / (max_seq * PACK_EFFICIENCY)))
    per_epoch = max(1, math.ceil(math.ceil(rows / micro) / accum))
    steps = int(hp["max_steps"]) if hp.get("max_steps") else per_epoch * int(hp["num_epochs"])
    per_step = train_tokens / per_epoch
    return Work(train_tokens, token_source, rows, per_epoch, steps, per_step, per_step * steps)


# --- History --------------------------------------------------------------------------------


@dataclass
class Sample:
    steps: int
    tokens: float
    training_s: float
    phases: dict
    held_s: float
    checkpoint_every: int


def _history(*, base_model, gpu_type: str, preset_id, executor: str) -> list[Sample]:
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
        tokens, _source = train_tokens_for(
            training_file=job.training_file,
            configuration=job.configuration,
            known=job.dataset_report,
        )
        work = work_for(train_tokens=tokens, configuration=job.configuration)
        steps = job.current_step or job.total_steps or work.steps
        held = sum((b - a).total_seconds() for a, b in held_intervals(transitions, now=end))
        samples.append(
            Sample(
                steps=steps,
                tokens=work.tokens_per_step * steps,
                training_s=stages["training"],
                phases={p: stages.get(p, 0.0) for p in PHASES},
                held_s=held,
                checkpoint_every=int(job.configuration.get("checkpoint_every_steps", 100)),
            )
        )
    return samples


def _prior_coefficients(*, base_model, gpu_type: str) -> tuple[float, float]:
    billions = max(base_model.parameters / 1e9, 0.01)
    throughput = PRIOR_THROUGHPUT.get(gpu_type, PRIOR_THROUGHPUT_DEFAULT) / billions
    overhead = PRIOR_STEP_OVERHEAD_S.get(gpu_type, PRIOR_STEP_OVERHEAD_DEFAULT_S)
    return overhead, 1.0 / throughput


def _fit(samples: list[Sample], prior: tuple[float, float]) -> tuple[float, float]:
    """(c0, c1) of training seconds = c0 x steps + c1 x tokens."""
    if len(samples) >= 3:
        sss = sum(s.steps * s.steps for s in samples)
        sst = sum(s.steps * s.tokens for s in samples)
        stt = sum(s.tokens * s.tokens for s in samples)
        sy = sum(s.steps * s.training_s for s in samples)
        ty = sum(s.tokens * s.training_s for s in samples)
        det = sss * stt - sst * sst
        if det > 1e-9 * sss * stt:
            c0 = (sy * stt - ty * sst) / det
            c1 = (sss * ty - sst * sy) / det
            if c0 >= 0 and c1 > 0:
                return c0, c1
    shape = [prior[0] * s.steps + prior[1] * s.tokens for s in samples]
    scale = sum(p * s.training_s for p, s in zip(shape, samples, strict=True)) / sum(
        p * p for p in shape
    )
    return prior[0] * scale, prior[1] * scale


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
    value_low, unit = _duration_text(low_s)
    value_high = high_s / {"seconds": 1, "minutes": 60, "hours": 3600}[unit]
    if unit == "hours" and value_high < 10:
        return f"{value_low:.1f}-{value_high:.1f} hours"
    return f"{math.floor(value_low)}-{math.ceil(value_high)} {unit}"


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
    tokens, token_source = train_tokens_for(
        training_file=training_file, configuration=configuration, known=known
    )
    work = work_for(train_tokens=tokens, configuration=configuration, token_source=token_source)
    gpu_type = price.gpu_type
    samples = _history(
        base_model=base_model, gpu_type=gpu_type, preset_id=preset_id, executor=executor
    )
    prior = _prior_coefficients(base_model=base_model, gpu_type=gpu_type)
    phase_prior = dict(PRIOR_PHASES.get(executor, PRIOR_PHASES["runpod"]))
    if phase_prior.get("model_loading") is None:
        phase_prior["model_loading"] = 60 + base_model.size_bytes / PRIOR_DOWNLOAD_BYTES_PER_S

    if samples:
        c0, c1 = _fit(samples, prior)
        phases = {p: statistics.median(s.phases[p] for s in samples) for p in PHASES}
        errors = [
            abs((sum(phases.values()) + c0 * s.steps + c1 * s.tokens) / s.held_s - 1)
            for s in samples
            if s.held_s > 0
        ]
        if len(samples) == 1:
            spread = ONE_JOB_SPREAD
        else:
            spread = min(MAX_SPREAD, max(MIN_SPREAD, max(errors, default=0) + 0.02))
        basis = "history"
    else:
        c0, c1 = prior
        phases = phase_prior
        spread = PRIOR_SPREAD
        basis = "prior"

    training_s = c0 * work.steps + c1 * work.tokens_processed
    seconds_per_step = training_s / work.steps
    base_s = training_s + sum(phases.values())
    relaunch = phases["provisioning"] + phases["preprocessing"] + phases["model_loading"]
    lost = seconds_per_step * int(configuration.get("checkpoint_every_steps", 100)) / 2
    per_interruption = relaunch + lost
    expected = conf.spot_interruptions_per_hour() * base_s / 3600
    recovery = {
        "expected_interruptions": round(expected, 3),
        "seconds_per_interruption": round(per_interruption, 1),
        "point": expected * per_interruption,
        "high": max(1, math.ceil(2 * expected)) * per_interruption,
    }

    def durations(with_spot: bool) -> dict:
        extra_point = recovery["point"] if with_spot else 0.0
        extra_high = recovery["high"] if with_spot else 0.0
        return {
            "low": base_s * (1 - spread),
            "point": base_s + extra_point,
            "high": base_s * (1 + spread) + extra_high,
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
    *, job, transitions, last_point, rate_per_hour: float, accrued: float, now: datetime, phases
) -> dict | None:
    """ETA and final cost of a training job from its own measured speed.

    Seconds per step = (time of the newest metric point - when this attempt entered
    ``training``) / steps since then (resumed attempts start at their recovery's step).
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
    per_step = elapsed / done
    left_steps = max(0, job.total_steps - last_point.step)
    finalization = float((phases or {}).get("finalization", 0.0))
    since_point = max(0.0, (now - last_point.recorded_at).total_seconds())
    seconds_left = max(0.0, left_steps * per_step - since_point) + finalization
    final_cost = accrued + seconds_left * rate_per_hour / 3600
    return {
        "seconds_per_step": round(per_step, 4),
        "measured_steps": done,
        "seconds_left": round(seconds_left, 1),
        "eta": (now + timedelta(seconds=seconds_left)).isoformat(),
        "final_cost": round(final_cost, 4),
        "at_step": last_point.step,
        "total_steps": job.total_steps,
        "at": now.isoformat(),
    }
