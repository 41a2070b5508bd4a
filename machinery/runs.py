"""A run as the training loop sees it (Run, built by machinery/start.py): its state, which every
checkpoint saves (TrainState); the figures of the steps since the last progress line, and their
pace (Meter); what a checkpoint of the run holds. Then the run folder's rules."""

import contextlib
import os
from dataclasses import asdict, dataclass, field

import torch

from config import TinyLLMError, TrainConfig
from machinery import checkpoint, cli, ddp, devices
from machinery.budget import Steps
from model import GPT
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


@dataclass
class Variant:
    """What a variant of training plugs into a run (lora.py, tuning.py; docs/changing.md): what the
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
    process: ddp.Process  # this process's rank of world (1 without torchrun), and its device
    corpus: Corpus
    model: GPT
    train_model: torch.nn.Module  # the model as the steps call it: compiled, wrapped in DDP
    optimizer: torch.optim.Optimizer
    precision: devices.Precision
    batches: dict  # "train", "val": () -> (x, y), this process's share of a batch
    state: TrainState
    meter: Meter
    clock: object  # () -> this process's seconds so far: a time budget counts them
    budget: Steps  # when the run ends: after max_steps, or a TimeBudget (machinery/budget.py)
    stop: cli.StopRequest  # Ctrl-C, SIGTERM or a reader gone, during the loop
    variant: Variant = None  # what the step trains, and what a variant adds to the run
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

    def say(self, text):
        if self.master:
            self.stop.say(text)

    def elapsed(self):  # this process's seconds, set-up included, plus those before a resume
        return self.state.seconds + self.clock()


def state_of(run, rngs):
    """A run's checkpoint: its model and tokenizer; all --resume needs to go on exactly (the
    optimizer, the state, the meter's rows, every rank's random state rngs); and where and how it
    trained, for its model card (tools.export)."""
    scaler = run.precision.scaler.state_dict() if run.precision.scaler else None
    state = asdict(run.state) | {"seconds": run.elapsed(), "window": run.meter.read()}
    state["budget"] = run.budget.state_dict()
    if run.process.world > 1:
        state["rngs"] = rngs
    return (
        checkpoint.contents(
            run.model,
            run.corpus.tokenizer.to_dict(),
            optimizer=run.optimizer.state_dict(),
            scaler=scaler,
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


def restore(settings, optimizer, process):
    """(state, meter rows) of a resumed run as saved, its optimizer and random numbers put back."""
    saved, cfg = settings.saved, settings.cfg
    load_optimizer(optimizer, saved["optimizer"], settings.path)
    state = TrainState(**{k: saved[k] for k in asdict(TrainState())})
    rngs = saved.get("rngs") or [saved["rng"]]
    devices.set_rng_state(rngs[process.rank] if len(rngs) == process.world else rngs[0])
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


# ------------------------------------------------------------------------------- the run folder


def run_files(out_dir):
    """The checkpoints of a run folder, the periodic ones oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


def claim_out_dir(out_dir, overwrite, keep):
    """Refuse a fresh run over another run's checkpoints; check it can write before training."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLLMError(f"--out_dir {out_dir} is a file, not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        last = os.path.join(out_dir, "last.pt" if "last.pt" in existing else existing[-1])
        with contextlib.suppress(TinyLLMError):
            last = f"{last} at {checkpoint.where(checkpoint.load(last))}"
        raise TinyLLMError(
            f"{out_dir} already holds a run ({last}); continue it with --resume, "
            f"pick another --out_dir (or --tag NAME), or replace it: --overwrite"
        )
    if keep and os.path.realpath(keep) in {os.path.realpath(f"{out_dir}/{n}") for n in existing}:
        raise TinyLLMError(f"--overwrite would delete --init_from's {keep}; use another --out_dir")
    test_file = os.path.join(out_dir, f".test.{os.getpid()}")
    cli.check_writable(test_file, "--out_dir", make_folder=True)


def clear_out_dir(out_dir):
    """--overwrite: the old run's files go once the new one is set up (bad input refused first)."""
    for name in run_files(out_dir) + ["history.csv", "history.json"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))
