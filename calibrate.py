"""Decisions measured on the machine the run is on, not on ours: read this when you need to
know how --dtype auto chooses between float32 and bfloat16 on a CPU that has bfloat16
instructions (it times both), and how --time_budget turns minutes into max_steps (it times a
few steps, an evaluation's forward passes, a checkpoint, the plots and a few sampled tokens,
then plans the run to fit).

Every measurement runs the run's own model on its own batches before training starts, and
leaves nothing behind: the weights, the optimizer, the loss scale and every random number
generator are put back. So a budgeted run and a run given the printed --max_steps and --dtype
train step for step alike. The plan is saved in the run's checkpoints: --resume keeps it.
"""

import contextlib
import copy
import os
import shlex
import statistics
import tempfile
import time

import torch

from checkpoint import save_checkpoint
from cli import format_seconds
from config import TinyLLMError, parse_duration
from device import rng_state, set_rng_state
from distributed import broadcast_from_master
from plots import plot_history
from precision import autocast, make_scaler, measured_on

# bfloat16 must beat float32 by this much before --dtype auto takes it: at equal steps it
# ends about 0.012 higher in val loss (docs/recipe_search.md), which about a quarter more
# steps win back in a five-minute run.
BF16_MARGIN = 1.25
UNTIMED_STEPS = 2        # per candidate precision: the first steps pay for allocations and kernel choices
TIMED_STEPS = 12         # per candidate precision, after those; steps vary by 10-15% one to the next
SAFETY = 0.05            # the plan leaves this share of the budget unused: shared machines drift by 10-25%


def calibrate(run, train_step):
    """Measure what the run's settings leave to measurement, decide, and say what was found:
    the precision (--dtype auto on a CPU with native bfloat16) and the length of a
    --time_budget run. A resumed run keeps the plan its checkpoint holds."""
    cfg, plan = run.train_cfg, run.state.plan
    if plan:
        if cfg.dtype == "auto" and plan.get("dtype"):
            set_precision(run, plan["dtype"], plan.get("dtype_note"))
        return
    candidates = ["float32", "bfloat16"] if measure_dtype(run) else [run.dtype]
    budget = parse_duration(cfg.time_budget) if not run.options.overfit_batch else None
    if len(candidates) == 1 and not budget:
        return
    seconds = time_steps(run, train_step, candidates)  # {dtype: seconds per step}
    plan = {}
    if len(candidates) > 1:
        plan.update(choose_dtype(seconds))
    if budget:
        plan.update(plan_budget(run, budget, seconds[plan.get("dtype", run.dtype)]))
    plan = broadcast_from_master(plan, run.world)  # every rank follows rank 0's measurements
    if "dtype" in plan:
        set_precision(run, plan["dtype"], plan["dtype_note"])
    if budget:
        cfg.max_steps, cfg.warmup_steps = plan["max_steps"], plan["warmup_steps"]
        run.budget_seconds = budget
    run.state.plan = plan


def measure_dtype(run):
    return run.train_cfg.dtype == "auto" and measured_on(run.device)


def set_precision(run, dtype, note=None):
    run.dtype, run.dtype_note = dtype, note
    run.ctx, run.scaler = autocast(run.device, dtype), make_scaler(run.device, dtype)


def choose_dtype(seconds):
    """bfloat16 only if it is clearly faster than float32 here."""
    ratio = seconds["float32"] / seconds["bfloat16"]  # bfloat16's speed, in float32's
    if ratio >= BF16_MARGIN:
        return {"dtype": "bfloat16", "dtype_note": f"bfloat16: {ratio:.2f}x float32 here, measured"}
    return {"dtype": "float32", "dtype_note": f"float32: bfloat16 was {ratio:.2f}x here, measured"}


# ----------------------------------------------------------------------------- timing without a trace

@contextlib.contextmanager
def trial(run):
    """Train for measurement only: afterwards the weights, the optimizer's state, the loss
    scale and every random number generator are exactly as they were."""
    weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    optimizer = copy.deepcopy(run.optimizer.state_dict())
    scaler = copy.deepcopy(run.scaler.state_dict()) if run.scaler else None
    rng = rng_state()
    try:
        yield
    finally:
        run.model.load_state_dict(weights)
        run.optimizer.load_state_dict(optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler:
            run.scaler.load_state_dict(scaler)
        set_rng_state(rng)


def time_steps(run, train_step, dtypes):
    """Mean seconds of one optimizer step in each dtype (a run's length is a sum of steps, and
    step times are skewed: the mean, not the median), the dtypes interleaved step by step so
    that a machine that drifts affects them alike."""
    cfg = run.train_cfg
    times = {dtype: [] for dtype in dtypes}
    with trial(run):
        for i in range(UNTIMED_STEPS + TIMED_STEPS):
            for dtype in dtypes:
                ctx = autocast(run.device, dtype)
                scaler = run.scaler if dtype == run.dtype else make_scaler(run.device, dtype)
                t0 = time.perf_counter()
                loss, _ = train_step(run.train_model, run.optimizer, run.next_batch, cfg.lr, cfg.grad_accum_steps,
                                     cfg.grad_clip, ctx, scaler)
                loss.item()  # wait for the device to finish the step
                if i >= UNTIMED_STEPS:
                    times[dtype].append(time.perf_counter() - t0)
    return {dtype: statistics.mean(t) for dtype, t in times.items()}


# ----------------------------------------------------------------------------- the time budget

def plan_budget(run, budget, step_seconds):
    """The most steps that fit: the time spent so far, then max_steps steps, an evaluation
    every eval_interval steps and at the end (each with its checkpoints and plots), and the
    closing sample, all within the budget less a safety share."""
    cfg = run.train_cfg
    eval_seconds = time_evaluation(run)
    sample_seconds = time_sample(run)
    spent = time.perf_counter() - run.started
    available = budget * (1 - SAFETY) - spent - sample_seconds
    steps = int(available / step_seconds)
    while steps > 0 and steps * step_seconds + evaluations(steps, cfg.eval_interval) * eval_seconds > available:
        steps -= 1
    if steps < 1:
        raise TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: set-up took {spent:.1f}s, an evaluation takes "
            f"{eval_seconds:.1f}s, a step {1000 * step_seconds:.0f}ms and the closing sample {sample_seconds:.1f}s; "
            f"give at least {format_seconds(1.5 * (spent + 3 * eval_seconds + sample_seconds + 10 * step_seconds))}")
    warmup = min(cfg.warmup_steps, max(1, steps // 10))  # the LR peaks early and decays fully by the end
    expected = spent + sample_seconds + steps * step_seconds + evaluations(steps, cfg.eval_interval) * eval_seconds
    return {"time_budget": cfg.time_budget, "max_steps": steps, "warmup_steps": warmup,
            "ms_per_step": 1000 * step_seconds, "eval_seconds": eval_seconds, "sample_seconds": sample_seconds,
            "expected_seconds": expected}


def evaluations(steps, eval_interval):
    """How many evaluations a run of this many steps makes: at 0, every eval_interval, at the end."""
    return steps // eval_interval + 1 + (steps % eval_interval > 0)


def time_evaluation(run):
    """Seconds of one evaluation: its forward passes (timed on two batches), last.pt and best.pt
    (the same bytes as the weights and the two AdamW moments, timed on this disk) and the plots."""
    model = run.model
    with trial(run), torch.no_grad():
        model.eval()
        x, y = run.val_batch()
        with run.ctx:
            model(x, y)[1].item()  # once untimed
            t0 = time.perf_counter()
            model(x, y)[1].item()
            forward = time.perf_counter() - t0
        model.train()
    path = os.path.join(run.out_dir, f".calibration.{os.getpid()}.pt")
    weights = model.state_dict()
    t0 = time.perf_counter()
    if run.master and not run.options.overfit_batch:
        save_checkpoint(path, {"model": weights, "m": {k: v.clone() for k, v in weights.items()},
                               "v": {k: v.clone() for k, v in weights.items()}})
        os.remove(path)
    save = time.perf_counter() - t0
    return 2 * run.eval_iters * forward * run.train_cfg.grad_accum_steps + 2 * save + time_plots(run)


def time_plots(run):
    """Seconds to redraw loss.png, lr.png and grad_norm.png (0 without --plots)."""
    if not (run.train_cfg.plots and run.master):
        return 0.0
    rows = [{"kind": "eval", "step": s, "train_loss": 1.0, "val_loss": 1.0, "lr": 0.0, "grad_norm": None,
             "ms_per_step": None, "seconds": 0.0} for s in (0, 1)]
    with tempfile.TemporaryDirectory(prefix="tinyllm-calibration-") as folder:
        t0 = time.perf_counter()
        plot_history(rows, folder, run.model_cfg.vocab_size, run.train_cfg)
        return time.perf_counter() - t0


def time_sample(run):
    """Seconds for the closing sample of sample_tokens tokens, from 16 timed tokens."""
    n = run.train_cfg.sample_tokens
    if not n or not run.master:
        return 0.0
    start = torch.zeros((1, 1), dtype=torch.long, device=run.device)
    model = run.model.eval()
    with run.ctx:
        model.generate(start, 2, temperature=0)  # once untimed
        t0 = time.perf_counter()
        model.generate(start, 16, temperature=0)
    model.train()
    return (time.perf_counter() - t0) / 16 * n * 1.2  # longer contexts cost a little more per token


# ----------------------------------------------------------------------------- what to tell the user

def describe_plan(run):
    """The start-up lines about what was measured and planned (none when nothing was)."""
    plan, lines = run.state.plan or {}, []
    if "max_steps" in plan and run.state.step > 0:
        lines.append(f"time budget {plan['time_budget']}: continuing the planned {plan['max_steps']:,} steps")
    elif "max_steps" in plan:
        lines.append(f"time budget {plan['time_budget']}: {plan['max_steps']:,} steps planned, warmup "
                     f"{plan['warmup_steps']}, cosine decay to the end (measured here: {plan['ms_per_step']:.0f} "
                     f"ms/step, an evaluation {plan['eval_seconds']:.1f}s, the closing sample "
                     f"{plan['sample_seconds']:.1f}s); the run should take {format_seconds(plan['expected_seconds'])}")
        lines.append(f"the same run, step for step, without measuring: {repeat_command(run)}")
    return lines


def repeat_command(run):
    """The command line that repeats a planned run exactly: the flags given, with the plan's
    --max_steps, --warmup_steps and --dtype in place of --time_budget."""
    plan = run.state.plan
    flags = {k: v for k, v in run.given.items() if k not in ("time_budget", "resume", "overwrite")}
    flags.update(max_steps=plan["max_steps"], warmup_steps=plan["warmup_steps"], dtype=run.dtype)
    return "python train.py " + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())
