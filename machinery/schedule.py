"""A learning-rate schedule whose end moves: read this when you need to know how a time-budget
run, re-planned as the machine's pace changes, or a resumed run given a new --max_steps, keeps
its LR continuous.

optim.get_lr is the textbook warmup-cosine schedule. When the end of a run moves (calibrate.
move_end), the rest of the cosine, from where the run is on it, is stretched or shrunk to the
new end: TrainState.decay_from = [step, peak, done] records the step where it moved, the
cosine's peak, and the share of the cosine that lay behind. on_the_schedule turns a step into
the point of get_lr's own cosine that gives its LR, so the LR the loop uses is get_lr's.
"""

from optim import get_lr


def cosine_position(step, lr, warmup_steps, max_steps, decay_from=None):
    """(the cosine's peak, how far through it step is: 0 to 1). Without decay_from the cosine
    runs from lr at the end of the warmup to max_steps. decay_from=(s0, peak, done): from step
    s0, where done of it lay behind, the rest of the cosine from peak runs to max_steps."""
    start, peak, done = warmup_steps, lr, 0.0
    if decay_from is not None and step >= decay_from[0]:
        start, peak, done = decay_from
    return peak, min(1.0, done + (1 - done) * (step - start) / max(1, max_steps - start))


def on_the_schedule(step, lr, warmup_steps, max_steps, decay_from=None):
    """(the step, the peak LR) to give get_lr for this step's LR: (step, lr) itself until the
    end has moved; after that, the point of get_lr's cosine (warmup_steps to max_steps) that lies
    as far through it as step lies through the stretched one."""
    if decay_from is None or step < decay_from[0]:
        return step, lr
    peak, progress = cosine_position(step, lr, warmup_steps, max_steps, decay_from)
    return warmup_steps + progress * (max_steps - warmup_steps), peak


def stretched_lr(step, cfg, decay_from):
    """The LR of step once the end of cfg's schedule has moved (train.train_loop asks for it)."""
    return scheduled_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, decay_from)


def scheduled_lr(step, lr, min_lr, warmup_steps, max_steps, decay_from=None):
    """The LR of step under a schedule whose end may have moved (decay_from): get_lr's."""
    at, peak = on_the_schedule(step, lr, warmup_steps, max_steps, decay_from)
    return get_lr(at, peak, min_lr, warmup_steps, max_steps)
