"""The run: what the loop works with (Run), and its set-up in plain functions, in order: the
settings, the corpus and the model (a fine-tune's new tokens, LoRA), the batches, a resumed run's
state, and how far the run is (by steps, or by a time budget's clock)."""

from machinery import checkpoint, cli, ddp, devices, settings, sources
from machinery.checkpoint import TrainState

import functools
import os
from dataclasses import asdict, dataclass, replace

import torch

import lora
from config import MAX_SEED, RunOptions, TinyLLMError, TrainConfig
from model import GPT
from optim import Steps, TimeBudget, get_lr, make_optimizer, progress
from utils import get_batch


@dataclass
class Run:
    """What the loop works with: state is what a checkpoint saves, the rest is this process's."""

    cfg: TrainConfig
    options: RunOptions
    preset: str
    rank: int  # this process, of world (1 without torchrun)
    world: int
    device: torch.device
    corpus: sources.Corpus
    model: GPT
    train_model: torch.nn.Module  # the model as the steps call it: compiled, wrapped in DDP
    optimizer: torch.optim.Optimizer
    precision: devices.Precision
    batches: dict  # "train", "val": () -> (x, y), this process's share of a batch
    state: TrainState
    clock: object  # () -> this process's seconds so far: a time budget counts them
    budget: object  # how far the run is: optim.Steps, or optim.TimeBudget
    stop: cli.StopRequest  # Ctrl-C, SIGTERM or a reader gone, during the loop
    resumed: bool = False  # it goes on from its last.pt
    lora: dict = None  # a LoRA run's base and adapter settings
    line_step: int = 0  # the step and clock the next progress line counts its pace from
    line_time: float = 0.0

    @property
    def master(self):  # rank 0 alone prints and writes
        return self.rank == 0

    @property
    def writes_files(self):  # --overfit_batch writes nothing
        return not self.options.overfit_batch

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.model.config.block_size

    def say(self, text):
        if self.master:
            self.stop.say(text)

    def elapsed(self):  # this process's seconds, set-up included, plus those before a resume
        return self.state.seconds + self.clock()


def set_up(model_cfg, cfg, options, preset, given, clock):
    """The Run, everything before the first step in order, each input checked; nothing written."""
    process = ddp.setup(devices.choose_device(cfg.device))
    rank, world, device = process.rank, process.world, process.device
    say = cli.log if rank == 0 else (lambda text: None)
    start = settings.start(model_cfg, cfg, options, preset, given, world, say)
    cfg = start.cfg
    devices.set_threads(cfg.threads)
    devices.seed_everything(cfg.seed)  # the same initial weights on every rank
    corpus = corpus_for(start, say)
    model, adapter = model_for(start, corpus)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)  # optim.py
    state = restore(start, optimizer, rank, world, say) if start.resumed else TrainState()
    saved_rngs = start.source.get("rngs", []) if start.resumed else []
    if world > 1 and len(saved_rngs) != world:  # each rank draws its own batches
        devices.seed_everything((cfg.seed + 1000 * rank + 7919 * state.step) % (MAX_SEED + 1))
    batches = make_batches(corpus, model.config.block_size, cfg, world, device)
    if options.overfit_batch:  # a sanity check: every step trains on one batch
        fixed = batches["train"]()
        batches["train"] = lambda: fixed
        say("overfit_batch: one fixed batch, writing nothing; the loss should fall towards 0")
    return Run(
        cfg=cfg,
        options=options,
        preset=start.preset,
        rank=rank,
        world=world,
        device=device,
        corpus=corpus,
        model=model,
        train_model=ddp.wrap(torch.compile(model) if cfg.compile else model, world, device),
        optimizer=optimizer,
        precision=devices.precision(cfg.dtype, device, start.source and start.source.get("scaler")),
        batches=batches,
        state=state,
        clock=clock,
        budget=run_length(cfg, clock, world, device),
        stop=cli.StopRequest(announce=rank == 0),
        resumed=start.resumed,
        lora=adapter,
    )


# ---------------------------------------------------------------------- the corpus and the model


def corpus_for(start, say):
    """The text as train and val token ids: by the tokenizer of the model it starts from (grown by
    a fine-tune's new tokens), else by a new one."""
    cfg, tokenizer = start.cfg, None
    if start.source:
        tokenizer = checkpoint.tokenizer_of(start.source, start.path)
    # a fine-tune's new characters and chat tokens grow the vocabulary; a resumed run's cannot
    extend = start.source is not None and not start.resumed
    corpus = sources.load_corpus(cfg, tokenizer, start.model_cfg.vocab_size, extend)
    if corpus.added:
        added = "".join(corpus.added)[:60]
        say(f"added {len(corpus.added)} token(s) {added!r} to the vocabulary of {start.path}")
    block_size = start.model_cfg.block_size
    if start.source:
        block_size = start.source["model_config"]["block_size"]
    sources.check_long_enough(corpus.train, block_size, "train", cfg.data)
    sources.check_long_enough(corpus.val, block_size, "validation", cfg.data)
    return corpus


def model_for(start, corpus):
    """(the GPT to train, a LoRA run's adapter settings or None): fresh weights, or those of the
    model it starts from, with rows for new tokens, and LoRA's matrices beside them."""
    cfg = start.cfg
    if start.source is None:  # a fresh GPT, random weights
        return GPT(replace(start.model_cfg, vocab_size=corpus.tokenizer.vocab_size)), None
    model = checkpoint.model_of(start.source, start.path)
    rows = None  # per embedding row, its row in the source model (None: a new token)
    if corpus.added:
        rows = grow_vocabulary(model, corpus.old_ids)
    if not cfg.lora_rank:  # an adapter's model fine-tuned in full is merged first
        return lora.merge(model), None
    adapter = start.source.get("lora")
    if adapter and rows:  # an adapter trained on with new tokens: its rows mapped onto the base's
        mapped = adapter["rows"]
        return model, adapter | {
            "rows": [i if i is None or not mapped else mapped[i] for i in rows]
        }
    if adapter:
        return model, adapter
    lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp)  # the model frozen
    base = os.path.abspath(start.path)  # its checkpoints name it, relative to themselves
    return model, dict(
        base=base, rows=rows, rank=cfg.lora_rank, alpha=cfg.lora_alpha, mlp=cfg.lora_mlp
    )


def grow_vocabulary(model, old_ids):
    """New tokens' embedding rows, each the old rows' mean plus a little noise (under LoRA, no two
    new rows alike). old_ids: per token, its old row or None. Returns every row's source."""
    old, old_size = model.wte.weight.detach(), sum(i is not None for i in old_ids)
    rows = old_ids + list(range(old_size, len(old)))  # the old model's rows past its tokens stay
    mean = old[[i for i in rows if i is not None]].mean(0)
    new = [old[i] if i is not None else mean + 0.02 * torch.randn_like(mean) for i in rows]
    checkpoint.with_embedding(model, torch.stack(new))
    return rows


# ------------------------------------------------------------------------- batches, resume, length


def make_batches(corpus, block_size, cfg, world, device):
    """{split: () -> (x, y)}: random windows of block_size tokens, this process's share of a
    batch, in micro-batches; the train split cut to its first --data_fraction. A conversation's
    targets are its answers."""
    micro_batch = cfg.batch_size // world // cfg.grad_accum_steps
    n = max(block_size + 1, int(len(corpus.train) * cfg.data_fraction))
    splits = {
        "train": (corpus.train[:n], corpus.train_targets),
        "val": (corpus.val, corpus.val_targets),
    }
    return {
        split: functools.partial(get_batch, ids, micro_batch, block_size, device, targets=targets)
        for split, (ids, targets) in splits.items()
    }


def restore(start, optimizer, rank, world, say):
    """A resumed run's state, optimizer and random numbers as saved; a new --max_steps is a new
    schedule."""
    source, cfg = start.source, start.cfg
    # keep this machine's optimizer kernel (fused, foreach): torch places the saved step tensors
    groups = []
    for saved, group in zip(source["optimizer"]["param_groups"], optimizer.param_groups):
        groups.append(saved | {k: group[k] for k in ("fused", "foreach") if k in group})
    optimizer.load_state_dict({**source["optimizer"], "param_groups": groups})
    state = TrainState(**{k: source[k] for k in asdict(TrainState())})
    rngs = source.get("rngs") or [source["rng"]]
    devices.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    saved = source["train_config"]
    if not cfg.time_budget and (saved["time_budget"] or cfg.max_steps != saved["max_steps"]):
        if state.step >= cfg.max_steps:
            raise TinyLLMError(
                f"the run is at step {state.step}: --max_steps {cfg.max_steps} trains no more"
            )
        now = get_lr(state.step, progress(state.step, cfg), cfg)
        end = get_lr(cfg.max_steps, 1.0, cfg)
        say(
            f"--max_steps {cfg.max_steps}: the schedule of a run of {cfg.max_steps} steps from "
            f"here, LR {now:.3g} now, {end:.3g} at its end"
        )
    return state


def run_length(cfg, clock, world, device):
    """How far the run is: by its steps, or by a time budget's clock, the ranks' mean (their clocks
    differ, and all must decide alike)."""
    if not cfg.time_budget:
        return Steps(cfg)
    return TimeBudget(cfg, lambda: ddp.mean([clock()], world, device)[0])
