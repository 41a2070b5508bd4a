"""A run as the training loop sees it (Run, built by machinery/start.py): its state, which every
checkpoint saves (TrainState); the figures of the steps since the last progress line, and their
pace (Meter); when it ends and how far it is (Budget); what a variant plugs in (Variant); what a
checkpoint of the run holds, and how a resume puts it back."""

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields

import torch

from config import TinyLLMError, TrainConfig, parse_duration
from machinery import checkpoint, cli, devices
from model import GPT
from optim import progress
from utils import Corpus


@dataclass
class TrainState:
    """What the steps change: saved in every checkpoint, put back by --resume."""

    step: int = 0
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0  # the latest step's
    progress: float = 0.0  # the latest step's: 0 through the warmup, 1 at the run's end
    seconds: float = 0.0  # the run's wall time before this process (a resume's)
    history: list = field(default_factory=list)  # a row per progress line and per evaluation


class Meter:
    """The figures of the steps since the last progress line and their pace. A step adds its
    figures as it made them (tensors: reading one makes a GPU wait); they are read in one wait
    when a line, an evaluation or a save needs them. An evaluation or a save is no step: the pace's
    clock is paused while one runs."""

    def __init__(self, clock, rows=()):
        self.clock, self.rows = clock, list(rows)  # a resume's rows: as saved, numbers
        self.steps, self.since = 0, clock()

    def add(self, figures):
        self.rows.append(figures)
        self.steps += 1

    def read(self):
        """The rows, every tensor among them read in one wait."""
        tensors = [v for row in self.rows for v in row.values() if torch.is_tensor(v)]
        if tensors:
            numbers = iter(torch.stack([t.float() for t in tensors]).tolist())
            self.rows = [
                {k: next(numbers) if torch.is_tensor(v) else v for k, v in row.items()}
                for row in self.rows
            ]
        return self.rows

    def line(self):
        """(each figure's mean, a step's seconds) since the last line; the next starts here."""
        rows = self.read()
        means = {k: sum(row[k] for row in rows) / len(rows) for k in rows[-1]}
        seconds = (self.clock() - self.since) / max(1, self.steps)
        self.rows, self.steps, self.since = [], 0, self.clock()
        return means, seconds

    @contextlib.contextmanager
    def paused(self):
        start = self.clock()
        yield
        self.since += self.clock() - start


# ------------------------------------------------------------------- when the run ends: its budget


class Budget:
    """When the run ends, and how far it is: after max_steps steps, or when its --time_budget is
    spent. The loop asks it at every step; what a resume needs of it is its state_dict.

    progress is 0 through the warmup, then the share taken of the steps, or of the time, from the
    warmup's end to the run's: the schedule's decay (optim.get_lr) ends as the run does. A time
    budget's steps end at 99% of it less the last evaluation's time (1%: the sample, the exit).
    clock() gives this process's seconds so far; state.seconds are those before it (a resume's)."""

    def __init__(self, cfg, clock):
        self.cfg, self.clock = cfg, clock
        self.seconds = parse_duration(cfg.time_budget)  # None: a run of max_steps
        self.eval_seconds = 0.0  # the latest evaluation's: a time budget keeps as much at its end
        self.decay_start = None  # the seconds at the warmup's end
        self.first = None  # (step, seconds) where this process's pace counts from

    def now(self, state):
        return state.seconds + self.clock()

    def end(self):
        """When a time budget's steps must end."""
        return self.seconds * 0.99 - self.eval_seconds

    def progress(self, state):
        """Of the step about to be taken; under a time budget, counted at that step's end (so the
        step that crosses the end is at 1)."""
        if not self.seconds:
            return progress(state.step, self.cfg)
        seconds = self.now(state)
        if self.first is None:
            self.first = (state.step, seconds)
        if state.step <= self.cfg.warmup_steps or self.decay_start is None:  # None: a resumed run
            if seconds >= self.end():
                raise TinyLLMError(
                    f"--time_budget {self.cfg.time_budget} is too short here: {seconds:.1f}s "
                    f"were gone before the warmup's {self.cfg.warmup_steps} steps; give more "
                    f"time or fewer --warmup_steps"
                )
            self.decay_start = seconds
            return 0.0
        span = max(1e-9, self.end() - self.decay_start)
        return min(1.0, (seconds + self.pace(state, seconds) - self.decay_start) / span)

    def over(self, state):
        return state.progress >= 1.0 if self.seconds else state.step >= self.cfg.max_steps

    def room_for_eval(self, state):
        """Whether an evaluation now still leaves time for steps after it."""
        return not self.seconds or self.now(state) + self.eval_seconds < self.end()

    def pace(self, state, seconds):
        """A step's seconds in this process so far, evaluations included; 0 before its first."""
        steps = state.step - self.first[0] if self.first else 0
        return (seconds - self.first[1]) / steps if steps else 0.0

    def end_step(self, state, step_seconds=None):
        """The step the run will end at; under a time budget at its pace so far (or at
        step_seconds before a step of this process), None before either."""
        if not self.seconds:
            return self.cfg.max_steps
        seconds = self.now(state)
        step_seconds = self.pace(state, seconds) or step_seconds
        if not step_seconds:
            return None
        return state.step + max(0, math.ceil((self.end() - seconds) / step_seconds))

    def state_dict(self):
        return {"eval_seconds": self.eval_seconds, "decay_start": self.decay_start}

    def load_state_dict(self, saved):  # a run of max_steps given a time budget: decays from now
        self.eval_seconds, self.decay_start = saved["eval_seconds"], saved.get("decay_start")


# ---------------------------------------------------------------------------------------- the run


def gpt_of(model):
    """The GPT inside what a step trains: under DDP (.module), torch.compile (._orig_mod), or a
    variant's wrapper (.gpt). A LoRA model is a GPT, its adapters inside its layers."""
    while not isinstance(model, GPT):
        if hasattr(model, "module"):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            model = model.gpt
    return model


@dataclass
class Variant:
    """What a variant of training plugs into a run (tuning.py; docs/changing.md): what the
    step trains, called as model(x, y) -> (out, loss); its batches (None: the corpus's); what its
    checkpoint adds; its figures on each progress line. Plain pretraining is Variant(model)."""

    model: torch.nn.Module
    batches: object = None  # (micro_batch, device) -> {"train", "val": () -> (x, y)}
    saved: object = dict  # () -> checkpoint entries, beside (or instead of) the model's own
    figures: object = None  # (the model the step trains, its device) -> {name: number}


@dataclass
class Run:
    """What the loop reads: state and the meter's rows are what a checkpoint saves."""

    cfg: TrainConfig
    preset: str
    process: devices.Process  # this process's rank of world (1 without torchrun), and its device
    corpus: Corpus
    model: GPT
    train_model: torch.nn.Module  # the model as the steps call it: compiled, wrapped in DDP
    optimizer: torch.optim.Optimizer
    precision: devices.Precision
    batches: dict  # "train", "val": () -> (x, y), this process's share of a batch
    state: TrainState
    meter: Meter
    clock: object  # () -> this process's seconds so far: a time budget counts them
    budget: Budget  # when the run ends: after max_steps, or its time budget
    stop: cli.StopRequest  # Ctrl-C, SIGTERM or a reader gone, during the loop
    variant: Variant  # what the step trains, and what a variant adds to the run
    overfit_batch: bool = False  # a check that fits one batch and writes nothing

    @property
    def master(self):  # rank 0 alone prints and writes
        return self.process.rank == 0

    @property
    def writes_files(self):
        return not self.overfit_batch

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.model.config.block_size

    def say(self, text):  # a line from rank 0 (cli.log); its reader gone stops the run
        self.stop.say(text)

    def elapsed(self):  # this process's seconds, set-up included, plus those before a resume
        return self.state.seconds + self.clock()


def checkpoint_of(run, rngs):
    """A run's checkpoint: its model and tokenizer; all --resume needs to go on exactly (the
    optimizer, the state, the meter's rows, every rank's random state rngs); and where and how it
    trained, for its model card (tools.export)."""
    state = asdict(run.state) | {"seconds": run.elapsed(), "window": run.meter.read()}
    state["budget"] = run.budget.state_dict()
    if run.process.world > 1:
        state["rngs"] = rngs
    return (
        checkpoint.create(
            run.model,
            run.corpus.tokenizer.to_dict(),
            optimizer=run.optimizer.state_dict(),
            scaler=run.precision.scaler.state_dict(),  # {}: float16's alone has a state
            rng=rngs[0],
            train_config=asdict(run.cfg),
            preset=run.preset,
            device=devices.name(run.process.device),
            dtype=run.precision.dtype,
            chars_per_token=run.corpus.chars_per_token,
            **state,
        )
        | run.variant.saved()
    )


# ------------------------------------------------------------------------ a resume puts it back


def resumable(saved):
    """Whether --resume can go on from a checkpoint exactly: it holds all checkpoint_of writes, and
    settings this version knows. A setting added since takes its default, which keeps what the
    code did before it (docs/changing.md)."""
    required = ["optimizer", "rng", "window", "budget", *asdict(TrainState())]
    settings = {f.name for f in fields(TrainConfig)}
    return all(k in saved for k in required) and set(saved.get("train_config", ())) <= settings


def restore(settings, optimizer, process):
    """(state, meter rows) of a resumed run as saved, its optimizer and random numbers put back."""
    saved, cfg = settings.saved, settings.cfg
    load_optimizer(optimizer, saved["optimizer"], settings.path)
    state = TrainState(**{k: saved[k] for k in asdict(TrainState())})
    rngs = saved.get("rngs") or [saved["rng"]]
    checkpoint.set_rng_state(rngs[process.rank] if len(rngs) == process.world else rngs[0])
    new_end = not cfg.time_budget and cfg.max_steps != saved["train_config"]["max_steps"]
    if new_end and state.step >= cfg.max_steps:
        stop = f"--max_steps {cfg.max_steps} trains no more"
        raise TinyLLMError(f"the run is at step {state.step}: {stop}")
    return state, saved["window"]


def load_optimizer(optimizer, saved, path):
    """The saved optimizer state, each group matched to this optimizer's by the parameters it
    holds (or refused), keeping this machine's kernel (fused, foreach)."""
    by_names = {tuple(group.get("names", ())): group for group in saved["param_groups"]}
    groups = []
    for group in optimizer.param_groups:
        match = by_names.get(tuple(group["names"]))
        if match is None:
            raise TinyLLMError(
                f"{path}: its optimizer groups the parameters otherwise than this code does "
                f"(no group of {', '.join(group['names'][:2])}...): resume it with the code "
                f"that trained it, or fine-tune from it with --init_from"
            )
        groups.append(match | {k: group[k] for k in ("fused", "foreach") if k in group})
    optimizer.load_state_dict({**saved, "param_groups": groups})
