"""What keeps a training run's promises, so that train.py can show the idea alone. train.py's loop
calls a few methods of a Run; this file holds what they do: the state every checkpoint saves, and
--resume putting it back exactly; a time budget, the run's end step planned again before every
step; Ctrl-C and SIGTERM (agreed on by every rank under torchrun), which save, then exit;
--overfit_batch, --compile's first step and --overwrite, each checked before anything is written;
the opening, progress, evaluation and closing lines; the command line."""

import errno
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from config import SamplerConfig, TinyLLMError, parse_duration
from machinery import checkpoint, cli, devices, sources
from utils import bits_per_char

# ------------------------------------------------------------------------------------ the state


@dataclass
class TrainState:
    """How far the run is, where it ends, and what it has seen. Every checkpoint saves it and
    --resume puts it back. A field added since a checkpoint was written takes its default."""

    step: int = 0  # the steps taken
    max_steps: int = 0  # the step the run ends at: --max_steps, or a time budget's plan
    lr: float = 0.0  # the latest step's
    seconds: float = 0.0  # the run's wall time before this process (a resume's)
    eval_seconds: float = 0.0  # the last evaluation's length: a budget keeps that much at its end
    best_val_loss: float = float("inf")
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    history: list = field(default_factory=list)  # a row per progress line and per evaluation
    window: list = field(default_factory=list)  # each step's figures since the last line


def restore(settings, optimizer, process):
    """A resumed run's state as it was saved; its scaler, optimizer and random generators too."""
    saved = settings.saved
    cfg = settings.cfg
    process.scaler.load_state_dict(saved["scaler"])
    checkpoint.load_optimizer(optimizer, saved["optimizer"], settings.path)
    state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
    rngs = saved.get("rngs") or [saved["rng"]]
    checkpoint.set_rng_state(rngs[process.rank] if len(rngs) == process.world else rngs[0])
    if not cfg.time_budget:  # a resume may give a new --max_steps
        if state.step >= cfg.max_steps and cfg.max_steps != saved["train_config"]["max_steps"]:
            stop = f"--max_steps {cfg.max_steps} trains no more"
            raise TinyLLMError(f"the run is at step {state.step}: {stop}")
        state.max_steps = cfg.max_steps
    return state


# ---------------------------------------------------------------------------- setting up a run


def start_process(settings):
    """This process (its rank under torchrun), its precision, its CPU threads, and the seed."""
    process = devices.setup_process(settings.device, settings.cfg.dtype)
    devices.set_threads(settings.cfg.threads)
    devices.seed_everything(settings.cfg.seed)  # the same initial weights on every rank
    return process


def out_of_memory():
    hint = "out of memory: try a smaller --batch_size or model, or --grad_accum_steps 2"
    return devices.out_of_memory_as_error(hint)


def compile_first(model, step_model, next_batch, process):
    """--compile's first forward and backward, now: a missing compiler is one error line before
    anything is written. It leaves no trace: no gradient, each generator as it was, its draw too."""
    rngs = checkpoint.rng_state()
    try:
        with process.autocast:
            process.scaler.scale(step_model(*next_batch())[1]).backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # torch 2.5 raises a missing compiler as a plain RuntimeError
        failed = f"--compile failed on this machine ({cli.first_line(e)})"
        raise TinyLLMError(f"{failed}; run without it") from None
    finally:
        checkpoint.set_rng_state(rngs)
    model.zero_grad(set_to_none=True)


class Run:
    """One run of fit: train.py's loop reads its pieces and calls its methods, inside `with run:`,
    which catches Ctrl-C and SIGTERM."""

    def __init__(self, settings, process, corpus, stage, optimizer):
        """Set up and check all before anything is written; then print the opening lines."""
        cfg = settings.cfg
        self.settings = settings
        self.cfg = cfg
        self.process = process
        self.corpus = corpus
        self.model = stage.model  # the GPT trained and saved
        self.batches = stage.batches
        self.stage = stage
        self.optimizer = optimizer
        self.master = process.rank == 0  # rank 0 alone prints and writes
        self.writes_files = not settings.options.overfit_batch  # a check that writes nothing
        last = settings.saved if settings.resumed else {}  # the last.pt it resumes
        self.state = TrainState(max_steps=cfg.max_steps)
        if last:
            self.state = restore(settings, optimizer, process)
        if process.world > 1 and len(last.get("rngs", [])) != process.world:  # a rank's own draws
            step = self.state.step
            devices.seed_everything((cfg.seed + 1000 * process.rank + 7919 * step) % 2**32)
        if settings.saved:  # in place now, or unused (--init_from's moments): the run holds no copy
            settings.saved.pop("model", None)
            settings.saved.pop("optimizer", None)
        if settings.options.overfit_batch:  # a sanity check: every step trains on one batch
            fixed = self.batches["train"]()
            self.batches["train"] = lambda: fixed
            cli.log("overfit_batch: one fixed batch, writing nothing; the loss should fall to 0")
        # what a step calls: the stage's wrapper, compiled, and under torchrun wrapped by DDP
        stepped = torch.compile(stage.wrapper) if cfg.compile else stage.wrapper
        self.step_model = process.wrap(stepped)
        if cfg.compile:
            compile_first(stage.model, self.step_model, self.batches["train"], process)
        if settings.options.overwrite and self.writes_files and not last and self.master:
            checkpoint.clear_out_dir(cfg.out_dir)  # the old run's files go now, bad input refused
        if not cfg.time_budget and cfg.max_steps <= cfg.warmup_steps and self.master:
            steps = f"--max_steps {cfg.max_steps} ends within the warmup ({cfg.warmup_steps} steps)"
            cli.warn(f"{steps}: the LR never decays")
        self.eval_iters = math.ceil(cfg.eval_iters / process.world)  # this rank's share
        self.budget = parse_duration(cfg.time_budget)  # seconds, or None: --max_steps
        self.left = None  # the budget's seconds left for steps
        self.stop_reason = None  # an early stop: --patience, --target_loss, --overfit_batch
        self.received = None  # a signal this process received
        self.signum = 0  # the signal every rank stops for
        self.gone = False  # the reader of its lines gone: its last lines go to stderr
        self.active = False  # inside the loop, where a signal stops the run
        self.first_step = self.state.step  # this process's pace counts from here
        self.first_seconds = self.elapsed()
        self.line_step = self.state.step  # a progress line's pace counts from here
        self.line_started = time.perf_counter()
        print_header(self)

    # ------------------------------------------- Ctrl-C, SIGTERM, a reader gone: save, then exit

    # SIGPIPE's number: when the reader of the output goes (`| head`), the run stops as it would
    # for a signal, saves, and exits 141 as a shell expects (Python ignores SIGPIPE itself)
    OUTPUT_GONE = 13

    def __enter__(self):  # the loop: a signal ends the step, then the run saves and exits
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received not in (None, self.OUTPUT_GONE) and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts
        self.received = signum  # a Ctrl-C that also closed a `| tee` still exits 130
        if self.master:  # os.write: the signal may have come while print was writing a line
            name = signal.Signals(signum).name
            line = f"\n{name} received: finishing this step, then saving last.pt\n"
            try:
                os.write(sys.stdout.fileno(), line.encode())
            except BrokenPipeError:  # the same Ctrl-C ended `| tee`
                self.output_gone()
            except (OSError, ValueError):  # no file behind stdout
                pass

    def say(self, text):
        """Print a line (rank 0 alone). Inside the loop, a reader that has gone (`| head`, or a
        `| tee` that the same Ctrl-C ended; EINVAL on Windows) stops the run as a signal would:
        it saves, and its last lines go to stderr. Outside the loop it is an OSError."""
        if self.gone:
            print(text, file=sys.stderr, flush=True)
            return
        try:
            cli.log(text)
        except OSError as e:
            if not self.active or not (isinstance(e, BrokenPipeError) or e.errno == errno.EINVAL):
                raise
            self.output_gone()
            self.received = self.received or self.OUTPUT_GONE

    def output_gone(self):
        cli.silence_stdout()  # no second error at exit
        self.gone = True

    # ------------------------------------------------------------- the loop's end, and its plan

    def elapsed(self):
        """The run's seconds: this process's so far, plus those before a resume."""
        return self.state.seconds + time.perf_counter() - self.settings.started

    def plan(self):
        """Under a time budget, set state.max_steps: the steps that fit in the time left at the
        pace so far. Planned again before every step, a run on a machine that slows down still
        ends on time. The ranks use their mean clock. Time spent within the warmup ends the run,
        its steps saved first."""
        if not self.budget:
            return
        state = self.state
        cfg = self.cfg
        now = self.process.mean([self.elapsed()])[0]
        # 1% of the budget is kept for the closing sample and the exit
        self.left = 0.99 * self.budget - state.eval_seconds - now
        if state.step <= cfg.warmup_steps and self.left <= 0:
            spent = f"--time_budget {cfg.time_budget} is too short here: it was spent before the"
            spent += f" warmup's {cfg.warmup_steps} steps; give more time or fewer --warmup_steps"
            if not state.step or not self.writes_files:
                raise TinyLLMError(spent)
            self.save("last.pt")  # the warmup's steps are kept
            resume = cli.resume_command(self.settings.stage, cfg.out_dir)
            went = f"{spent}. Its {state.step} steps are in {os.path.join(cfg.out_dir, 'last.pt')}"
            raise TinyLLMError(f"{went}; go on: {resume} --time_budget {2 * self.budget:g}s")
        steps = state.step - self.first_step
        pace = (now - self.first_seconds) / steps if steps else 0.0
        # no pace before this process's first step: the plan a resume saved, or the warmup's
        planned = state.step + math.floor(self.left / pace) if pace else state.max_steps
        if planned <= state.step:  # out of time: the step before was the last, or this one is
            planned = min(state.max_steps, state.step + 1)
        state.max_steps = max(cfg.warmup_steps + 1, planned)

    def room_to_evaluate(self):
        """Whether time is left for steps after an evaluation as long as the last one: under a time
        budget, a periodic evaluation needs it (the last one does not)."""
        return self.left is None or self.left > self.state.eval_seconds

    def signalled(self):
        """Whether Ctrl-C or SIGTERM reached any rank: then the run saves and exits. Under DDP
        every rank asks the others, at progress lines and at the run's end."""
        state = self.state
        at_end = state.step >= state.max_steps
        compare = self.process.world == 1 or state.step % self.cfg.log_interval == 0
        if compare or at_end or self.stop_reason:
            self.signum = max(self.process.every_rank(self.received or 0))
        return self.signum != 0

    # ------------------------------------------------------------------------ progress lines

    def read_window(self):
        """The figures of the steps since the last line, read as numbers (a GPU waits here). A
        loss or a gradient that is not finite stops the run here, before anything is saved."""
        state = self.state
        state.window = [{k: float(v) for k, v in row.items()} for row in state.window]
        skips = self.process.scaler.is_enabled()  # float16 skips a step whose gradient overflowed
        for n, row in enumerate(state.window, state.step - len(state.window)):
            finite_grad = math.isfinite(row.get("grad_norm", 0.0)) or skips
            if not (math.isfinite(row["loss"]) and finite_grad):
                what = f"step {n}: the loss or the gradient is not finite (loss {row['loss']})"
                fix = "Try a lower --lr, --grad_clip 1, or --dtype float32"
                raise TinyLLMError(f"{what}; nothing non-finite was saved. {fix}")
        return state.window

    def log_progress(self):
        """A progress line and its history row: each figure's mean since the last line (a resume's
        saved rows may lack a figure added since), the step's time, tokens a second, the ETA."""
        state = self.state
        seconds = (time.perf_counter() - self.line_started) / (state.step - self.line_step)
        rows = self.read_window()
        tokens = sum(row.pop("tokens", 0.0) for row in rows) * self.process.world
        figures = {}
        for name in rows[-1]:
            values = [row[name] for row in rows if name in row]
            figures[name] = sum(values) / len(values)
        tokens_per_s = tokens / len(rows) / seconds if seconds else 0.0
        eta = cli.format_seconds((state.max_steps - state.step) * seconds)
        shown = " | ".join(f"{name} {value:.4g}" for name, value in figures.items())
        pace = f"{1000 * seconds:.1f} ms/step | {tokens_per_s:,.0f} tok/s | ETA {eta}"
        self.say(f"step {state.step:>6}/{state.max_steps} | {shown} | {pace}")
        row = {"kind": "train", "step": state.step, **figures, "ms_per_step": 1000 * seconds}
        state.history.append(row | {"tok_per_s": tokens_per_s, "seconds": self.elapsed()})
        state.window = []
        self.line_step = state.step
        self.line_started = time.perf_counter()
        # --overfit_batch: done when the processes' mean loss is near 0 (each has its own batch)
        if not self.writes_files and self.process.mean([figures["loss"]])[0] < 0.01:
            self.stop_reason = f"overfit_batch: loss below 0.01 at step {state.step}"

    # ---------------------------------------------------------------------- evaluations, saves

    def evaluated(self, train_loss, val_loss, improved):
        """An evaluation's line and history row: every rank's mean losses, a stage's own figures,
        and whether val is the lowest yet."""
        state = self.state
        own = self.stage.figures() if self.stage.figures else {}  # a stage's own figures
        state.last_eval_step = state.step
        row = dict(kind="eval", step=state.step, train_loss=train_loss, val_loss=val_loss, **own)
        state.history.append(row | dict(lr=state.lr, seconds=self.elapsed()))
        baseline = state.step == 0  # before any step: nothing to keep yet
        end = "?" if baseline and self.cfg.time_budget else state.max_steps  # no pace yet
        line = f"eval {state.step:>6}/{end} | train {train_loss:.4f} | val {val_loss:.4f}"
        if own:
            line += "".join(f" | {k} {v:.4g}" for k, v in own.items())
        else:  # a language model's loss: bits per character, and a uniform guess's loss
            line += f" ({bits_per_char(val_loss, self.corpus.chars_per_token):.3f} bits/char)"
            if baseline:
                line += f" | uniform baseline ln(V) = {math.log(self.model.config.vocab_size):.4f}"
        self.say(line + (" | new best" if improved else ""))

    def evaluation_done(self, started):
        """history.csv and loss.png drawn again; the evaluation's seconds, saves included, kept
        aside: a time budget keeps as much for the last one, and the pace counts steps alone."""
        state = self.state
        cfg = self.cfg
        if self.writes_files and self.master and state.step:
            from machinery.plots import write_history  # read once there is a step to draw

            write_history(cfg.out_dir, state.history, cfg.plots, self.model.config.vocab_size)
        state.eval_seconds = self.process.mean([time.perf_counter() - started])[0]
        self.first_seconds += state.eval_seconds
        self.line_started += state.eval_seconds

    def save(self, name):
        """Save out_dir/name: the model and tokenizer; all --resume needs to go on exactly (the
        optimizer, the state, every rank's random generators); and where and how it trained,
        for its model card (tools.export). Every rank calls it; rank 0 writes."""
        if not self.writes_files:
            return
        self.read_window()  # nothing non-finite is saved
        rngs = self.process.every_rank(checkpoint.rng_state())
        if not self.master:
            return
        state = asdict(self.state) | {"seconds": self.elapsed()}
        if self.process.world > 1:
            state["rngs"] = rngs
        saved = checkpoint.create(
            self.model,
            self.corpus.tokenizer.to_dict(),
            stage=self.settings.stage,
            optimizer=self.optimizer.state_dict(),
            scaler=self.process.scaler.state_dict(),  # {}: float16's alone has a state
            rng=rngs[0],
            train_config=asdict(self.cfg),
            preset=self.settings.preset,
            device=devices.name(self.process.device),
            dtype=self.process.dtype,
            chars_per_token=self.corpus.chars_per_token,
            **state,
            **self.stage.entries,  # a stage's own: dpo.py's reference
        )
        checkpoint.save(os.path.join(self.cfg.out_dir, name), saved)
        if name.startswith("ckpt_"):
            checkpoint.keep_newest(self.cfg.out_dir, self.cfg.keep_last)

    def finish(self, schedule_end):
        """last.pt, the closing lines and sample, and the run's summary. Stopped by a signal: the
        command that resumes it, and exit status 128 + the signal (130 for Ctrl-C)."""
        state = self.state
        cfg = self.cfg
        if self.signum or state.last_eval_step != state.step:
            self.save("last.pt")
        if self.signum:
            if self.writes_files:
                last = os.path.join(cfg.out_dir, "last.pt")
                resume = cli.resume_command(self.settings.stage, cfg.out_dir)
                self.say(f"saved {last} at step {state.step}. Resume with: {resume}")
            self.process.leave_together()
            sys.exit(128 + self.signum)
        if self.stop_reason:
            self.say(self.stop_reason)
        files = "best.pt, last.pt, history.csv" + (", loss.png" if cfg.plots else "")
        files = f" | {cfg.out_dir}/: {files}" if self.writes_files else ""
        done = f"done: {state.step} steps | best val loss {state.best_val_loss:.4f}"
        self.say(f"{done} | total time {cli.format_seconds(self.elapsed())}{files}")
        if cfg.time_budget:
            last_lr = f"the last at LR {state.lr:.4g} (the schedule's end: {schedule_end:.4g})"
            used = f"{cli.format_seconds(self.elapsed())} used, {state.step:,} steps"
            self.say(f"time budget {cfg.time_budget}: {used}, {last_lr}")
        if cfg.sample_tokens and self.master:
            self.say("sample:\n" + closing_sample(self, cfg.sample_tokens))
        self.process.leave_together()
        return {
            "step": state.step,
            "best_val_loss": state.best_val_loss,
            "history": state.history,
            "stop_reason": self.stop_reason,
            "seconds": self.elapsed(),
            "model": self.model,
            "corpus": self.corpus,
            "dtype": self.process.dtype,
            "tokens_per_step": cfg.batch_size * self.model.config.block_size,  # tools.scaling's
        }


# --------------------------------------------------------------------- the opening lines, the end


def print_header(run):
    """The run's opening lines: device and precision, model, batch, loss, and how it ends."""
    cfg = run.cfg
    model = run.model
    m = model.config
    process = run.process
    why = f": {process.why}" if cfg.dtype == "auto" else ""
    threads = f"{torch.get_num_threads()} threads"
    device = f"{devices.name(process.device)} ({process.dtype}{why}, {threads})"
    device += f" x {process.world} processes" if process.world > 1 else ""
    run.say(f"device {device} | preset {run.settings.preset} | data {cfg.data}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    part = f" ({trained:,} trained: {100 * trained / model.num_params():.2f}%)"
    shape = f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}"
    shown = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # the rest: every variant
    parts = ", ".join(f"{k} {v}" for k, v in vars(m).items() if k not in shown)
    params = f"{model.num_params():,} parameters{part if trained < model.num_params() else ''}"
    run.say(f"model {params}: {shape}, vocab {m.vocab_size} | {parts} | optimizer {cfg.optimizer}")
    micro = process.world * cfg.grad_accum_steps
    split = f" ({process.world} processes x {cfg.grad_accum_steps} micro-batches)"
    if run.stage.batch:  # a stage's own batches
        run.say(f"batch {cfg.batch_size} {run.stage.batch}{split if micro > 1 else ''}")
    else:
        tokens = f"train {len(run.corpus.train):,} tokens, val {len(run.corpus.val):,} tokens"
        batch = f"batch {cfg.batch_size} x block {m.block_size}{split if micro > 1 else ''}"
        run.say(f"tokens per step {cfg.batch_size * m.block_size:,} = {batch} | {tokens}")
    run.say(f"loss: {run.stage.loss} | evaluation: {run.stage.evaluation}")
    if cfg.time_budget:
        schedule = f"after the warmup the {cfg.lr_schedule} schedule ends as the time does"
        run.say(f"time budget {cfg.time_budget}: {schedule}")
    elif run.state.step:  # a resumed run: where it is in the schedule of its --max_steps
        schedule = f"{cfg.lr_schedule} schedule to step {run.state.max_steps}"
        run.say(f"from step {run.state.step}: {schedule}, the last step's LR {run.state.lr:.3g}")


def closing_sample(run, tokens):
    """A sample drawn as generate.py draws it, with the run's seed, in float32. A chat model
    answers the validation split's first question, in the chat template."""
    from sampling import sample_text  # the lesson's next chapter, at the run's end

    tokenizer = run.corpus.tokenizer
    question = sources.first_question(run.corpus.val[: 4 * run.model.config.block_size], tokenizer)
    ids = question or sources.start_ids(tokenizer)
    stop = tokenizer.eot_id if question else None
    new = sample_text(run.model, ids, tokens, SamplerConfig(), stop, run.cfg.seed)
    return tokenizer.decode(ids + new)
