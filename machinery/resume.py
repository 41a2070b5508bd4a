"""--resume: a checkpoint that can continue (an older version's upgraded to this one's format), the settings the run
keeps and those it may change, and its state and optimizer put back exactly as saved."""

import dataclasses

from config import GPTConfig, TinyLLMError, TrainConfig, drop_budget_for_max_steps, from_saved
from optim import get_lr, progress

from machinery.checkpoint import load_checkpoint


# what --resume needs: TrainState's fields of every version (a step's figures are in its history rows, any name)
RESUMABLE = ("optimizer", "train_config", "rng", "step", "best_val_loss", "evals_without_improvement",
             "last_eval_step", "lr", "grad_norm", "history")
RETIRED = {"replans"}  # settings that older versions saved and this one lacks: a resume drops them


def load_resumable(path):
    """A checkpoint that --resume can continue, in this version's format (upgrade)."""
    checkpoint = load_checkpoint(path)
    if missing := [k for k in RESUMABLE if k not in checkpoint]:
        raise TinyLLMError(f"{path} lacks the training state --resume needs (missing: {', '.join(missing)}); "
                           f"fine-tune from its weights with --init_from instead")
    return upgrade(checkpoint)


def upgrade(checkpoint):
    """An older version's resumable checkpoint in this format: RETIRED settings dropped, history rows given a kind,
    (loss, norm) windows as dicts, the latest step's progress where it saved none (a lacking setting: `before`)."""
    saved, step = checkpoint["train_config"], checkpoint["step"]
    if not isinstance(saved, dict):
        return checkpoint  # refused by the resume with a reason
    for name in RETIRED & set(saved):
        del saved[name]
    for row in checkpoint["history"]:
        row.setdefault("kind", "eval")
    window = checkpoint.get("window")
    if window and not isinstance(window[0], dict):
        checkpoint["window"] = [{"loss": loss, "lr": checkpoint["lr"], "grad_norm": norm} for loss, norm in window]
    older = {"progress_from", "decay_from"} & set(checkpoint) or "progress" not in checkpoint
    at0, progress0 = checkpoint.pop("progress_from", None) or [saved["warmup_steps"], 0.0]
    # [step, lr, progress]: where a moved decay went on from (the oldest form, [step, lr], resumes by steps)
    if (moved := checkpoint.pop("decay_from", None)) and len(moved) == 3:
        at0, progress0 = moved[0], moved[2]
    if older and not (saved.get("time_budget") and "progress" in checkpoint):
        end = checkpoint.get("end_step") or (checkpoint.get("plan") or {}).get("max_steps") or saved["max_steps"]
        at = step - 1  # the latest step
        checkpoint["progress"] = (1.0 if at >= end else progress0 if at <= at0 else
                                  progress0 + (1 - progress0) * (at - at0) / (end - at0))
    return checkpoint


# settings a resumed run may change; the rest (model shape, tokenizer, data, batch, optimizer) define the run
CHANGEABLE_ON_RESUME = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["changeable"]}


def resume_configs(checkpoint, given, path):
    """The saved configs, overridden by the flags given that may change mid-run; any other flag is refused."""
    saved, names = checkpoint["train_config"], {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - names) if isinstance(saved, dict) else ["(not a dict)"]
    if unknown:
        raise TinyLLMError(f"{path}: unknown train_config setting(s) {', '.join(unknown)} (written by another "
                           f"version of tinyllm?); fine-tune from its weights with --init_from instead")
    try:
        model_cfg, train_cfg = from_saved(GPTConfig, checkpoint["model_config"]), from_saved(TrainConfig, saved)
    except TypeError as e:
        raise TinyLLMError(f"{path}: unreadable settings ({e})") from None
    current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
    if refused := conflicting_flags(given, current, CHANGEABLE_ON_RESUME, "the run has"):
        raise TinyLLMError(f"--resume continues the run in {path}, which cannot change " + "; ".join(refused) +
                           ". Drop the flag, or start a new run with another --out_dir (or --tag)")
    changes = drop_budget_for_max_steps({k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}, given)
    return model_cfg, dataclasses.replace(train_cfg, **changes)


def conflicting_flags(given, saved, changeable, words):
    """The flags given that contradict a checkpoint's saved settings, as '--k v (words saved)'."""
    return [f"--{k} {v} ({words} {saved[k]})" for k, v in given.items()
            if k in saved and k not in changeable and v != saved[k]]


def restore(start, optimizer, state_type):
    """A resumed run's state (a state_type: train.TrainState) and optimizer exactly as saved; a new --max_steps is a
    new schedule."""
    checkpoint, cfg = start.source, start.cfg
    # this machine's kernel (optim.py), not the saver's, given before loading: torch places each saved tensor for it
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    groups = [{**saved, **kernel} for saved, kernel in zip(checkpoint["optimizer"]["param_groups"], kernels)]
    optimizer.load_state_dict({**checkpoint["optimizer"], "param_groups": groups})
    names = {f.name for f in dataclasses.fields(state_type)}
    state = state_type(**{k: checkpoint[k] for k in names if k in checkpoint})
    saved = checkpoint["train_config"]  # the saved run's end: its max_steps, or None for a time budget
    old_end = None if saved.get("time_budget") else saved["max_steps"]
    if not cfg.time_budget and cfg.max_steps != old_end:  # a new --max_steps
        if state.step >= cfg.max_steps:
            raise TinyLLMError(f"the run is already at step {state.step}; --max_steps {cfg.max_steps} "
                               f"would not train it further")
        lr = get_lr(state.step, progress(state.step, cfg), cfg)  # the LR at this step of a run that long
        start.say(f"--max_steps {cfg.max_steps}: the schedule of a run of {cfg.max_steps} steps, whose LR at step "
                  f"{state.step} is {lr:.3g} (the last step's was {state.lr:.3g}), down to {cfg.min_lr:g} at its end")
    return state
