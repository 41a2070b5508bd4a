"""Keeps the state of a run and saves its checkpoints.

TrainState records how far the run is, and every checkpoint saves it. --resume puts everything
back exactly: the optimizer, the loss scaler, and the random generators of every rank. So a run
that is stopped and resumed ends as one that went straight on."""

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

from config import TinyLLMError
from machinery import checkpoint, devices


@dataclass
class TrainState:
    """How far the run is, where it ends, and what it has seen. Every checkpoint saves it and
    --resume puts it back. A field added since a checkpoint was written takes its default."""

    step: int = 0  # steps taken so far
    max_steps: int = 0  # the step the run ends at: --max_steps, or the plan of a time budget
    lr: float = 0.0  # the learning rate of the latest step
    seconds: float = 0.0  # wall time of the run before this process started (when resumed)
    eval_seconds: float = 0.0  # length of the last evaluation: a budget keeps that much at its end
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)  # figures of each step since the last line

    def elapsed(self, started):
        """Returns the seconds the run has taken, in this process since `started` and before it."""
        return self.seconds + time.perf_counter() - started

    def evaluated(self, val_loss):
        """Records the val loss of an evaluation and returns whether it is a new best.

        The baseline evaluation, before any step, never counts as a best."""
        self.last_eval_step = self.step
        improved = self.step > 0 and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
            self.evals_without_improvement = 0
        elif self.step:
            self.evals_without_improvement += 1
        return improved

    def read_window(self, float16):
        """Returns the figures of the steps since the last line, read as numbers.

        A GPU waits here. A loss or gradient that is not finite stops the run here, before anything
        is saved. With float16 the scaler may skip a step whose gradient overflowed; that is no
        fault."""
        self.window = [{k: float(v) for k, v in row.items()} for row in self.window]
        for n, row in enumerate(self.window, self.step - len(self.window)):
            finite_grad = math.isfinite(row.get("grad_norm", 0.0)) or float16
            if not (math.isfinite(row["loss"]) and finite_grad):
                what = f"step {n}: the loss or the gradient is not finite (loss {row['loss']})"
                fix = "Try a lower --lr, --grad_clip 1, or --dtype float32"
                raise TinyLLMError(f"{what}; nothing non-finite was saved. {fix}")
        return self.window


def start_state(settings, optimizer, process):
    """Returns the state of a fresh run, or of a resumed run as it was saved.

    For a resumed run it also restores the scaler, the optimizer and the random generators. Under
    torchrun, each rank draws its own dropout from here on. The weights and moments of the
    checkpoint are in place now, or unused, so the run drops its copy of them."""
    cfg = settings.cfg
    saved = settings.saved
    state = TrainState(max_steps=cfg.max_steps)
    rngs = []
    if settings.resumed:
        process.scaler.load_state_dict(saved["scaler"])
        checkpoint.load_optimizer(optimizer, saved["optimizer"], settings.path)
        state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        rngs = saved.get("rngs") or [saved["rng"]]
        devices.set_rng_state(rngs[process.rank] if len(rngs) == process.world else rngs[0])
        if not cfg.time_budget:  # a resume may give a new --max_steps
            if state.step >= cfg.max_steps and cfg.max_steps != saved["train_config"]["max_steps"]:
                stop = f"--max_steps {cfg.max_steps} trains no more"
                raise TinyLLMError(f"the run is at step {state.step}: {stop}")
            state.max_steps = cfg.max_steps
    if process.world > 1 and len(rngs) != process.world:  # give each rank its own draws
        devices.seed_everything((cfg.seed + 1000 * process.rank + 7919 * state.step) % 2**32)
    if saved:
        saved.pop("model", None)
        saved.pop("optimizer", None)
    return state


class Checkpoints:
    """Saves the checkpoints of a run into out_dir.

    A checkpoint holds the model and tokenizer, everything --resume needs to go on exactly, and
    where and how the run trained, for its model card (tools.export). Every rank calls save, and
    rank 0 writes. --overfit_batch writes nothing."""

    def __init__(self, settings, process, corpus, stage, optimizer):
        self.settings = settings
        self.process = process
        self.corpus = corpus
        self.stage = stage
        self.optimizer = optimizer
        self.writes = not settings.options.overfit_batch

    def save(self, name, state):
        """Saves out_dir/name.

        Of the periodic checkpoints (ckpt_STEP.pt), only the newest keep_last stay."""
        if not self.writes:
            return
        state.read_window(self.process.scaler.is_enabled())  # nothing non-finite is saved
        rngs = self.process.every_rank(devices.rng_state())
        if self.process.rank:
            return
        cfg = self.settings.cfg
        record = asdict(state) | {"seconds": state.elapsed(self.settings.started)}
        if self.process.world > 1:
            record["rngs"] = rngs
        saved = checkpoint.create(
            self.stage.model,
            self.corpus.tokenizer.to_dict(),
            stage=self.settings.stage,
            optimizer=self.optimizer.state_dict(),
            scaler=self.process.scaler.state_dict(),  # {} unless float16: only its scaler has state
            rng=rngs[0],
            train_config=asdict(cfg),
            preset=self.settings.preset,
            device=devices.name(self.process.device),
            dtype=self.process.dtype,
            chars_per_token=self.corpus.chars_per_token,
            **record,
            **self.stage.entries,  # entries of the stage, e.g. the reference model of dpo.py
        )
        checkpoint.save(os.path.join(cfg.out_dir, name), saved)
        if name.startswith("ckpt_"):
            checkpoint.keep_newest(cfg.out_dir, cfg.keep_last)
