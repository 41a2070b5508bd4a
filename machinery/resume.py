"""--resume: continue a run exactly where its last.pt left it. What changes as a run trains is its
TrainState, which every checkpoint saves whole; a resume may change only the settings that do not define the
run, gets back the optimizer, the progress and every random generator, and reads checkpoints of older
versions."""

import dataclasses
import math
import os
from dataclasses import dataclass, field

from config import GPTConfig, TinyLLMError, TrainConfig, from_saved, step_exact

from machinery.budget import resume_at
from machinery.checkpoint import load_checkpoint
from machinery.cli import log
from machinery.device import set_rng_state


@dataclass
class TrainState:
    """The numbers that change as a run trains: saved in every checkpoint, so --resume continues exactly."""
    step: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    lr: float = 0.0                  # of the latest step
    grad_norm: float = None          # of the latest step; None before the first
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)   # the figures of the steps since the last progress row
    progress_from: list = None       # [step, progress] where the run's progress was last aimed (budget.py)
    end_step: float = None           # a --time_budget run's estimated end (budget.py)
    eval_seconds: float = 0.0        # the latest evaluation's, saves and plots included (a time budget keeps room for one)
    seconds: float = 0.0             # training wall time over every process of the run (resumes)
    plan: dict = None                # what --dtype auto measured: {"dtype", "dtype_note"}


# what a checkpoint must hold for --resume (a checkpoint missing one is refused with a hint)
RESUMABLE = ("optimizer", "train_config", "rng", "step", "best_val_loss", "evals_without_improvement",
             "last_eval_step", "lr", "grad_norm", "history")


# Settings a resumed run may change; the rest (model shape, tokenizer, data, batch, optimizer) define the run
CHANGEABLE_ON_RESUME = {"max_steps", "eval_interval", "eval_iters", "log_interval", "save_interval", "keep_last",
                        "patience", "target_loss", "plots", "sample_tokens", "device", "dtype", "compile", "threads",
                        "grad_accum_steps", "out_dir", "tag"}


RETIRED = {"replans"}  # settings older versions saved that no longer exist: a resume drops them


# ----------------------------------------------------------------------------- the checkpoint and its settings

def find_resume(last_path, needed, say=log):
    """The checkpoint --resume continues, or None when last_path is not there yet: the same command then
    starts a run and continues it after every disconnect. needed: the entries it must hold."""
    if not os.path.isfile(last_path):
        say(f"--resume: no {last_path} yet, starting a fresh run")
        return None
    checkpoint = load_checkpoint(last_path)
    missing = [k for k in needed if k not in checkpoint]
    if missing:
        raise TinyLLMError(f"{last_path} lacks the training state --resume needs (missing: {', '.join(missing)}); "
                           f"fine-tune from its weights with --init_from instead")
    say(f"resuming {last_path} at step {checkpoint['step']}")
    return checkpoint


def resume_configs(checkpoint, given, path):
    """The configs of a resumed run: the saved ones, overridden by the flags given this time
    that can safely change mid-run. A flag that would change anything else is refused."""
    saved = {k: v for k, v in checkpoint["train_config"].items() if k not in RETIRED} \
        if isinstance(checkpoint["train_config"], dict) else checkpoint["train_config"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - names:
        unknown = sorted(set(saved) - names) if isinstance(saved, dict) else ["(not a dict)"]
        raise TinyLLMError(f"{path}: unknown train_config setting(s) {', '.join(unknown)} (written by another "
                           f"version of tinyllm?); fine-tune from its weights with --init_from instead")
    try:
        model_cfg, train_cfg = from_saved(GPTConfig, checkpoint["model_config"]), from_saved(TrainConfig, saved)
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable settings ({e})") from None
    current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
    refused = conflicting_flags(given, current, CHANGEABLE_ON_RESUME, "the run has")
    if refused:
        raise TinyLLMError(f"--resume continues the run in {path}, which cannot change " + "; ".join(refused) +
                           ". Drop the flag, or start a new run with another --out_dir (or --tag)")
    changes = step_exact({k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}, given)
    return model_cfg, dataclasses.replace(train_cfg, **changes)


def conflicting_flags(given, saved, changeable, words):
    """The flags given that contradict a checkpoint's saved settings, as '--k v (words saved)'."""
    return [f"--{k} {v} ({words} {saved[k]})" for k, v in given.items()
            if k in saved and k not in changeable and v != saved[k]]


def resumed_preset(checkpoint, options, preset, out_dir):
    """A resumed run keeps the preset it was started with."""
    saved = checkpoint.get("preset", preset)
    if options.preset and options.preset != saved:
        raise TinyLLMError(f"{out_dir}/last.pt is a run of preset '{saved}'; --resume cannot switch it to "
                           f"--preset {options.preset} (drop the flag, or start another --out_dir)")
    return saved


# ----------------------------------------------------------------------------- the state put back

def restore(run, checkpoint):
    """A resumed run's TrainState, optimizer and RNGs exactly as saved; a new --max_steps re-aims progress."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    names = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: checkpoint[k] for k in names if k in checkpoint})
    for row in state.history:  # rows written before progress rows existed were evaluations
        row.setdefault("kind", "eval")
    older_version(state, checkpoint, run.cfg)
    old_end = end_of_saved_run(state, checkpoint["train_config"])
    if not run.cfg.time_budget and run.cfg.max_steps != old_end:  # a new --max_steps
        if state.step >= run.cfg.max_steps:
            raise TinyLLMError(f"the run is already at step {state.step}; --max_steps {run.cfg.max_steps} "
                               f"would not train it further")
        resume_at(state, run.cfg, old_end)
        run.say(f"--max_steps {run.cfg.max_steps}: the LR decays from where it is at step {state.step} "
                f"to {run.cfg.min_lr:g} at step {run.cfg.max_steps}")
    set_rng_state(checkpoint["rng"])
    return state


def end_of_saved_run(state, saved):
    """Where the resumed run was to end: its max_steps, or its time budget's latest estimate."""
    if not saved.get("time_budget"):
        return saved["max_steps"]
    return state.end_step if state.end_step is not None else math.inf


def older_version(state, checkpoint, cfg):
    """Fill in what checkpoints of older versions kept otherwise: a window of (loss, norm) pairs,
    and the moved end of their cosine (decay_from: [step, peak, share done], or [step, lr] for a
    new cosine from lr) with the planned max_steps of a time budget."""
    if state.window and not isinstance(state.window[0], dict):
        state.window = [{"loss": loss, "lr": state.lr, "grad_norm": norm} for loss, norm in state.window]
    moved = checkpoint.get("decay_from")
    if moved and len(moved) == 3:
        state.progress_from = [moved[0], moved[2]]
    elif moved:  # the progress at which the cosine gives lr
        share = 2 * (moved[1] - cfg.min_lr) / max(cfg.lr - cfg.min_lr, 1e-12) - 1
        state.progress_from = [moved[0], math.acos(max(-1.0, min(1.0, share))) / math.pi]
    if checkpoint["train_config"].get("time_budget") and state.end_step is None and (state.plan or {}).get("max_steps"):
        state.end_step = checkpoint["train_config"]["max_steps"]  # the planned end
