"""Decisions measured on the machine the run is on, not on ours: read this when you need to
know how --dtype auto chooses between float32 and bfloat16 on a CPU that has bfloat16
instructions (it times both before training starts), and how --time_budget turns minutes into
max_steps (it times the run's first steps, its first evaluation and a few sampled tokens, then
plans the rest of the run to fit, and re-plans at every progress line at the pace of the latest
steps, stretching or shrinking the rest of the cosine to the new end).

The precision is measured with trial steps that leave nothing behind: the weights, the
optimizer, the loss scale and every random number generator are put back. The time budget is
measured on the run itself: its first steps are warmup steps, whose learning rate does not
depend on max_steps. So a budgeted run and a run given the printed --max_steps, --replans and
--dtype train step for step alike. The plan is saved in the run's checkpoints: --resume keeps it
and goes on re-planning it.
"""

import contextlib
import copy
import os
import shlex
import statistics
import tempfile
import time

import torch

from config import TinyLLMError, parse_duration, parse_replans
import sampling
import machinery

from machinery.checkpoint import save_checkpoint
from machinery.cli import format_seconds
from machinery.device import rng_state, set_rng_state
from machinery.distributed import broadcast_from_master
from machinery.plots import plot_history
from machinery.precision import autocast, make_scaler, measured_on


# bfloat16 must beat float32 by this much before --dtype auto takes it: at equal steps it
# ends about 0.012 higher in val loss (docs/recipe_search.md), which about a quarter more
# steps win back in a five-minute run.
BF16_MARGIN = 1.25
UNTIMED_STEPS = 2        # per candidate precision: the first steps pay for allocations and kernel choices
TIMED_STEPS = 8          # per candidate precision, after those
# A time budget is planned after this many steps (or the whole warmup, if shorter), then
# re-planned at every progress line from the pace of the steps of the latest RECENT_LINES lines:
# machines speed up and slow down as they warm, throttle or get other work.
PLAN_AFTER = 100
RECENT_LINES = 2
MIN_WARMUP = 10          # the warmup must give the plan at least these
SAFETY = 0.01            # of the budget: for the process's exit, and any drift after the last re-plan


def calibrate(run, train_step):
    """Before the first step: measure the precision where --dtype auto leaves it to
    measurement, and leave a --time_budget run unplanned until its first steps have been timed
    (plan_budget). A resumed run keeps what its checkpoint's plan holds."""
    cfg, plan = run.train_cfg, run.state.plan or {}
    if cfg.dtype == "auto" and measured_on(run.device):
        if plan.get("dtype"):  # a resumed run keeps what its first process measured
            choice = plan
        else:
            seconds = time_steps(run, train_step, ["float32", "bfloat16"])  # {dtype: seconds per step}
            choice = broadcast_from_master(choose_dtype(seconds), run.world)  # every rank follows rank 0
            run.state.plan = {**plan, **choice}
        set_precision(run, choice["dtype"], choice.get("dtype_note"))
    if cfg.time_budget and "max_steps" not in plan and not run.options.overfit_batch:
        if cfg.warmup_steps < MIN_WARMUP:
            raise TinyLLMError(f"--time_budget plans the run after timing its first warmup steps: give "
                               f"--warmup_steps {MIN_WARMUP} or more (or --max_steps instead)")
        # plan within the warmup, whose learning rate does not depend on max_steps
        run.plan_at = min(run.state.step + PLAN_AFTER, max(cfg.warmup_steps, run.state.step + 1))
        cfg.max_steps = max(cfg.max_steps, run.plan_at + 1)  # the loop goes on until then


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


def interleaved(calls, untimed, timed):
    """Seconds of each timed call of each function in calls, the functions interleaved call by
    call so that a machine that drifts slows them alike. The first untimed calls of each pay
    one-time costs (allocations, kernel choices, compilation) and are not timed."""
    times = [[] for _ in calls]
    for i in range(untimed + timed):
        for call, seconds in zip(calls, times):
            t0 = time.perf_counter()
            call()
            if i >= untimed:
                seconds.append(time.perf_counter() - t0)
    return times


def time_steps(run, train_step, dtypes):
    """Mean seconds of one optimizer step in each dtype (float32 or bfloat16: no loss scaler).
    A run's length is a sum of steps, and step times are skewed: the mean, not the median."""
    cfg = run.train_cfg

    def step_in(dtype):
        ctx = autocast(run.device, dtype)

        def step():
            loss, _ = train_step(run.train_model, run.optimizer, run.next_batch, cfg.lr, cfg.grad_accum_steps,
                                 cfg.grad_clip, ctx)
            loss.item()  # wait for the device to finish the step
        return step

    with trial(run):
        times = interleaved([step_in(dtype) for dtype in dtypes], UNTIMED_STEPS, TIMED_STEPS)
    return {dtype: statistics.mean(t) for dtype, t in zip(dtypes, times)}


# ----------------------------------------------------------------------------- the time budget

def plan_run(run):
    """A --time_budget run's plan, once its first steps are timed (train_loop calls this through
    lifecycle.plan_time_budget): rank 0 plans from this process's mean step time, its first
    evaluation (with the plots it did not draw yet) and 16 sampled tokens; every rank follows,
    and an error on rank 0 is the same one-line error on every rank."""
    meter, cfg, plan = run.meter, run.train_cfg, None
    if run.master:
        try:
            evaluation = meter.eval_seconds + time_plots(run) if meter.eval_seconds else time_evaluation(run)
            spent = budget_spent(run)
            plan = plan_budget(cfg, run.state.step, spent, meter.process_seconds / meter.process_steps, evaluation,
                               time_sample(run))
            if not (run.options.resume and run.source):  # a resumed process's own flags say little
                plan["flags"] = repeat_flags(run)
        except TinyLLMError as e:
            plan = {"error": str(e)}
    plan = broadcast_from_master(plan, run.world)
    if "error" in plan:
        raise TinyLLMError(plan["error"])
    cfg.max_steps, run.plan_at = plan["max_steps"], None
    run.state.plan = {**(run.state.plan or {}), **plan, "replans": []}
    run.say(describe_plan(run))


def replan(run):
    """A planned --time_budget run, at a progress line: the steps that still fit at the pace of
    the latest steps (rank 0 decides, every rank follows). Where that moves the end, the rest
    of the cosine is stretched or shrunk to it from the LR reached now (move_end), and the
    change is kept in the plan, so that --replans can repeat it."""
    state, cfg, meter = run.state, run.train_cfg, run.meter
    if state.step >= cfg.max_steps:
        return  # the last step is taken: what is left is the last evaluation and the sample
    end = None
    if run.master and meter.recent:
        steps, seconds = (sum(column) for column in zip(*meter.recent))
        plan = state.plan
        end = steps_that_fit(cfg, state.step, budget_spent(run), seconds / steps,
                             meter.eval_seconds or plan["eval_seconds"], plan["sample_seconds"])
        end = max(end, state.step + 1)  # past the budget already: one more step, then the last evaluation
        plan["expected_seconds"] = budget_spent(run) + plan["sample_seconds"] + seconds_left(
            cfg, state.step, end, seconds / steps, meter.eval_seconds or plan["eval_seconds"])
    end = broadcast_from_master(end, run.world)
    if end is not None and end != cfg.max_steps:
        move_end(state, cfg, end)
        state.plan.setdefault("replans", []).append([state.step, end])


def replay(run):
    """A run given --replans: at each of its steps, the end moves as the budgeted run's did."""
    for step, end in parse_replans(run.train_cfg.replans):
        if step == run.state.step:
            move_end(run.state, run.train_cfg, end)


def replan_steps(cfg):
    """The steps at which a run given --replans moves its end."""
    return {step for step, _ in parse_replans(cfg.replans)}


def move_end(state, cfg, max_steps):
    """End the run at max_steps instead: the rest of the cosine, from the LR of the next step,
    stretched or shrunk to the new end (optim.get_lr's decay_from), so the LR never jumps. In
    the warmup, whose LR does not depend on max_steps, there is nothing to stretch."""
    if state.step >= cfg.warmup_steps:
        peak, done = cosine_position(state.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, state.decay_from)
        state.decay_from = [state.step, peak, done]
    cfg.max_steps = max_steps


def cosine_position(step, lr, warmup_steps, max_steps, decay_from=None):
    """(the cosine's peak, how far through it step is: 0 to 1), as optim.get_lr reckons them for
    step: from the end of the warmup to max_steps, or, after a move (decay_from = [step0, peak,
    done]), from done at step0 to 1 at max_steps."""
    start, peak, done = warmup_steps, lr, 0.0
    if decay_from is not None and step >= decay_from[0]:
        start, peak, done = decay_from
    return peak, min(1.0, done + (1 - done) * (step - start) / max(1, max_steps - start))


def budget_spent(run):
    """Seconds of the time budget spent so far: this process's, from its start, and the training
    time of the run's earlier processes (a resumed run)."""
    return run.earlier_seconds + machinery.clock() - run.started


def plan_budget(cfg, done, spent, step_seconds, eval_seconds, sample_seconds):
    """The plan of a run at step done, spent seconds into its time budget: the most steps that
    fit (steps_that_fit). The cosine then decays to min_lr at the last step: never cut off
    mid-schedule. A budget that leaves no step after the warmup is an error saying what would do."""
    steps = steps_that_fit(cfg, done, spent, step_seconds, eval_seconds, sample_seconds)
    if steps <= cfg.warmup_steps:
        need = spent + sample_seconds + seconds_left(cfg, done, max(2 * cfg.warmup_steps, done + 1), step_seconds,
                                                     eval_seconds)
        raise TinyLLMError(
            f"--time_budget {cfg.time_budget} is too short here: {spent:.1f}s are gone, a step takes "
            f"{1000 * step_seconds:.0f}ms, an evaluation {eval_seconds:.1f}s and the closing sample "
            f"{sample_seconds:.1f}s, which leaves no time after the warmup ({cfg.warmup_steps} steps); give "
            f"at least {format_seconds(need / (1 - SAFETY))}")
    return {"time_budget": cfg.time_budget, "max_steps": steps, "planned_at": done, "ms_per_step": 1000 * step_seconds,
            "eval_seconds": eval_seconds, "sample_seconds": sample_seconds,
            "expected_seconds": spent + sample_seconds + seconds_left(cfg, done, steps, step_seconds, eval_seconds)}


def steps_that_fit(cfg, done, spent, step_seconds, eval_seconds, sample_seconds):
    """The most steps such that what is left of the budget (less SAFETY) holds the steps after
    step done, an evaluation every eval_interval steps and at the end (each with its checkpoints
    and plots), and the closing sample."""
    available = parse_duration(cfg.time_budget) * (1 - SAFETY) - spent - sample_seconds
    per_step = step_seconds + eval_seconds / cfg.eval_interval  # a step and its share of the evaluations
    steps = done + max(0, min(int(available / step_seconds), int(available / per_step) + cfg.eval_interval))
    while steps > done and seconds_left(cfg, done, steps, step_seconds, eval_seconds) > available:
        steps -= 1
    return steps


def seconds_left(cfg, done, steps, step_seconds, eval_seconds):
    """Seconds from step done to the end of a run of steps steps: its steps and evaluations."""
    return (steps - done) * step_seconds + evaluations(done, steps, cfg.eval_interval) * eval_seconds


def evaluations(done, steps, eval_interval):
    """How many evaluations a run makes after step done, up to steps: every eval_interval steps,
    and at the end."""
    return steps // eval_interval - done // eval_interval + (steps % eval_interval > 0)


def time_evaluation(run):
    """Seconds of one evaluation: its forward passes (one batch, timed after an untimed pass),
    last.pt and best.pt (the same bytes as the weights and the two AdamW moments, timed on this
    disk) and the plots. Rank 0 only: it alone plans."""
    model, rng = run.model, rng_state()
    with torch.no_grad():
        model.eval()
        x, y = run.val_batch()
        with run.ctx:
            model(x, y)[1].item()  # once untimed
            t0 = machinery.clock()
            model(x, y)[1].item()
            forward = machinery.clock() - t0
        model.train()
    set_rng_state(rng)  # the run draws the batches it would have drawn without this
    path = os.path.join(run.out_dir, f".calibration.{os.getpid()}.pt")
    weights = model.state_dict()
    t0 = machinery.clock()
    save_checkpoint(path, {"model": weights, "m": {k: v.clone() for k, v in weights.items()},
                           "v": {k: v.clone() for k, v in weights.items()}})
    os.remove(path)
    save = machinery.clock() - t0
    return 2 * run.eval_iters * forward + 2 * save + time_plots(run)


def time_plots(run):
    """Seconds to redraw loss.png, lr.png and grad_norm.png (0 without --plots)."""
    if not run.train_cfg.plots:
        return 0.0
    rows = [{"kind": "eval", "step": s, "train_loss": 1.0, "val_loss": 1.0, "lr": 0.0, "grad_norm": None,
             "ms_per_step": None, "seconds": 0.0} for s in (0, 1)]
    with tempfile.TemporaryDirectory(prefix="tinyllm-calibration-") as folder:
        t0 = machinery.clock()
        plot_history(rows, folder, run.model_cfg.vocab_size, run.train_cfg)
        return machinery.clock() - t0


def time_sample(run):
    """Seconds for the closing sample of sample_tokens tokens, from 16 timed tokens."""
    n = run.train_cfg.sample_tokens
    if not n:
        return 0.0
    start = torch.zeros((1, 1), dtype=torch.long, device=run.device)
    model = run.model.eval()  # in float32, as the closing sample decodes (lifecycle.closing_sample)
    sampling.generate(model, start, 2, temperature=0).tolist()  # once untimed
    t0 = machinery.clock()
    sampling.generate(model, start, 16, temperature=0).tolist()  # (.tolist(): a GPU has finished only now)
    model.train()
    return (machinery.clock() - t0) / 16 * n * 1.2  # longer contexts cost a little more per token


# ----------------------------------------------------------------------------- what to tell the user

def describe_start(run):
    """The start-up line about a time budget: continued, or to be planned."""
    plan, cfg = run.state.plan or {}, run.train_cfg
    if "max_steps" in plan and cfg.time_budget:
        return [f"time budget {plan['time_budget']}: continuing the planned run, now {cfg.max_steps:,} steps, "
                f"re-planned at every progress line"]
    if run.plan_at is not None:
        return [f"time budget {run.train_cfg.time_budget}: the first {run.plan_at - run.state.step} steps are "
                f"timed, then the rest of the run is planned to fit"]
    return []


def describe_plan(run):
    """The line that announces a plan just made."""
    plan = run.state.plan
    return (f"time budget {plan['time_budget']}: {plan['max_steps']:,} steps planned, the cosine decaying to the "
            f"last (measured here: {plan['ms_per_step']:.0f} ms/step, an evaluation {plan['eval_seconds']:.1f}s, "
            f"the closing sample {plan['sample_seconds']:.1f}s); the run should end "
            f"{format_seconds(plan['expected_seconds'])} after it started, re-planned at every progress line "
            f"as the pace changes")


def describe_end(run):
    """The lines that close a budgeted run: how it went, and the command that repeats it."""
    plan = run.state.plan
    moved = f", re-planned {len(plan['replans'])} times" if plan.get("replans") else ""
    return [f"time budget {plan['time_budget']}: {format_seconds(budget_spent(run))} used{moved}; "
            f"{plan['max_steps']:,} steps planned first, {run.state.step:,} taken",
            f"the same run, step for step, without measuring (into another --out_dir): {repeat_command(run)}"]


def repeat_flags(run):
    """The flags of the command that started a budgeted run, less those that a repeat replaces."""
    drop = ("time_budget", "resume", "overwrite", "out_dir", "tag", "max_steps", "replans", "dtype")
    return {k: v for k, v in run.given.items() if k not in drop}


def repeat_command(run):
    """The command line that repeats a planned run exactly: its first command's flags, with
    the first plan's --max_steps, the re-plans as --replans, and the run's --dtype in place of
    --time_budget."""
    plan = run.state.plan
    if "flags" not in plan:  # planned by an older version, which did not keep them
        return f"the first command's flags, then --max_steps {plan['max_steps']} --dtype {run.dtype}"
    flags = {**plan["flags"], "max_steps": plan["max_steps"], "dtype": run.dtype}
    if plan.get("replans"):
        flags["replans"] = ",".join(f"{step}:{end}" for step, end in plan["replans"])
    launcher = f"torchrun --nproc_per_node={run.world} train.py" if run.world > 1 else "python train.py"
    return f"{launcher} " + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())
