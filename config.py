"""Every setting of training and sampling, and the presets. add_flags makes --help from them.

A setting is a field with a default, a meaning, and the values it may take (one of its choices, or
a number within its bounds). check() tests every setting of every config against that, once."""

import argparse
import math
import operator
import re
from dataclasses import dataclass, field, fields


class TinyLLMError(Exception):
    """A problem with what the user asked for. It shows as one `error:` line, with no traceback."""


def setting(default, help, choices=None, resume=False, stages=(), **bounds):
    """Returns a dataclass field that carries its meaning.

    resume says whether --resume may change it. stages names the later stages whose scripts alone
    take it (python dpo.py --help). bounds holds the limits of a number: at_least, above, at_most
    or below. A number may default to None (unset) if its help says what that means; check()
    accepts None, and --help shows "none"."""
    meaning = dict(help=help, choices=choices, resume=resume, stages=stages, bounds=bounds)
    return field(default=default, metadata=meaning)


def require(ok, message):
    if not ok:
        raise TinyLLMError(message)


BOUNDS = dict(at_least=operator.ge, above=operator.gt, at_most=operator.le, below=operator.lt)


def check(config):
    """Checks that each setting is one of its choices, and that each number is within its bounds
    (None means unset)."""
    for f in fields(config):
        value = getattr(config, f.name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise TinyLLMError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if f.type is float and value is not None:
            require(math.isfinite(value), f"--{f.name} must be a number, got {value}")
        for bound, limit in f.metadata["bounds"].items():
            ok = value is None or BOUNDS[bound](value, limit)
            require(ok, f"--{f.name} must be {bound.replace('_', ' ')} {limit}, got {value}")


MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
BPE_VOCAB_SIZE = 2048  # the vocabulary size of --tokenizer bpe, unless --vocab_size is given
EOT = "<|endoftext|>"  # between documents and after each answer; every tokenizer has it
# the chat template: <|user|>question\n<|assistant|>answer<|endoftext|>
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (EOT, USER, ASSISTANT)  # each is one token, after the ordinary ones
NO_TARGET = -100  # a target that the loss ignores, such as a token of a question
TRAIN_FRACTION = 0.9  # the first 90% of a text trains the model; the rest validates it
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POSITIONS = ("learned", "sinusoidal", "rope")
TOKENIZERS = ("char", "bpe", "gpt2")
DEVICE_HELP = "where the numbers are computed: auto picks cuda, then mps, then cpu"
THREADS_HELP = "CPU threads for torch; 0 = one per physical core"
TUNING = ("finetune", "dpo")  # the stages that take LoRA's settings
DISTILL = ("distill",)


@dataclass(frozen=True)
class GPTConfig:
    """The shape of the model, saved in every checkpoint."""

    vocab_size: int = setting(0, f"0: the tokenizer's (bpe {BPE_VOCAB_SIZE})", at_least=0)
    block_size: int = setting(128, "context length: tokens the model sees at once", at_least=1)
    n_layer: int = setting(4, "Transformer blocks", at_least=1)
    n_head: int = setting(4, "attention heads per block; must divide n_embd", at_least=1)
    n_embd: int = setting(128, "width of the residual stream", at_least=1)
    dropout: float = setting(0.0, "dropout probability while training", at_least=0, below=1)
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as in GPT-2")
    norm: str = setting("layernorm", "normalisation layer", ("layernorm", "rmsnorm"))
    mlp: str = setting("gelu", "MLP: GELU 4x wide, or SwiGLU 8/3x wide", ("gelu", "swiglu"))
    pos: str = setting("learned", "positions: a table, sinusoids or RoPE", POSITIONS)

    def __post_init__(self):
        check(self)
        require(self.n_embd % self.n_head == 0, f"n_head {self.n_head} must divide n_embd")
        head_size = self.n_embd // self.n_head
        even = self.pos != "rope" or head_size % 2 == 0
        require(even, f"rope needs an even head size, not {head_size}")


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains, saved in every checkpoint."""

    data: str = setting("data/input.txt", "text: .txt, a folder, .jsonl, Q&A .json, prepared")
    data_ext: str = setting(".txt", "file endings read from a --data folder, e.g. .txt,.md")
    data_fraction: float = setting(1.0, "train on this first share of it", above=0, at_most=1)
    tokenizer: str = setting("char", "characters, BPE learned from the text, GPT-2's", TOKENIZERS)
    loss_on: str = setting("answers", "a chat's loss: on its answers, or all", ("answers", "all"))
    clean: bool = setting(False, "normalise whitespace and drop duplicate documents")
    out_dir: str = setting("checkpoints", "where checkpoints, history and plots go", resume=True)
    tag: str = setting("", "run name: its folder is checkpoints/TAG", resume=True)
    batch_size: int = setting(32, "sequences per optimizer step", at_least=1)
    max_steps: int = setting(2000, "optimizer steps; the LR ends here", at_least=1, resume=True)
    time_budget: str = setting("", "train this long instead: 5m, 300s, 1h30m", resume=True)
    lr: float = setting(2e-3, "peak learning rate", above=0)
    min_lr: float = setting(2e-4, "the decay's floor: cosine and linear end there", at_least=0)
    warmup_steps: int = setting(100, "warmup steps (--init_from, --max_steps N: N/10)", at_least=0)
    lr_schedule: str = setting("cosine", "the decay from lr to min_lr", ("cosine", "linear"))
    weight_decay: float = setting(0.1, "decay of AdamW's matrices (Muon's: none)", at_least=0)
    optimizer: str = setting("adamw", "AdamW, or Muon for the blocks' matrices", ("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate", above=0)
    beta1: float = setting(0.9, "AdamW's first-moment decay", at_least=0, below=1)
    beta2: float = setting(0.95, "AdamW's second-moment decay", at_least=0, below=1)
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = off", at_least=0)
    grad_accum_steps: int = setting(1, "a batch in N micro-batches", at_least=1, resume=True)
    eval_interval: int = setting(250, "evaluate and save every N steps", at_least=1, resume=True)
    eval_iters: int = setting(20, "batches per split in an evaluation", at_least=1, resume=True)
    log_interval: int = setting(50, "a progress line every N steps", at_least=1, resume=True)
    save_interval: int = setting(0, "keep ckpt_STEP.pt every N steps", at_least=0, resume=True)
    keep_last: int = setting(3, "ckpt_STEP.pt files to keep", at_least=1, resume=True)
    patience: int = setting(0, "stop after N evals not better; 0 = off", at_least=0, resume=True)
    target_loss: float = setting(0.0, "stop at this val loss; 0 = off", at_least=0, resume=True)
    seed: int = setting(1337, "seed of every random generator", at_least=0, at_most=MAX_SEED)
    device: str = setting("auto", DEVICE_HELP, DEVICES, resume=True)
    dtype: str = setting("auto", "precision of the forward pass", DTYPES, resume=True)
    compile: bool = setting(False, "torch.compile the model (long GPU runs)", resume=True)
    threads: int = setting(0, THREADS_HELP, at_least=0, at_most=1024, resume=True)
    sample_tokens: int = setting(300, "tokens of the closing sample", at_least=0, resume=True)
    plots: bool = setting(True, "redraw loss.png after every evaluation", resume=True)
    # settings that only the later stages take
    lora_rank: int = setting(0, "LoRA beside attention, rank R; 0 = off", stages=TUNING, at_least=0)
    lora_alpha: float = setting(16.0, "LoRA's scale: times alpha / rank", stages=TUNING, above=0)
    lora_mlp: bool = setting(False, "LoRA beside the MLP's matrices too", stages=TUNING)
    distill_from: str = setting("", "the teacher's checkpoint, its odds to learn", stages=DISTILL)
    distill_temperature: float = setting(4.0, "both odds softened by it", stages=DISTILL, above=0)
    distill_alpha: float = setting(
        0.5, "distillation's share of the loss", stages=DISTILL, at_least=0, at_most=1
    )
    dpo_beta: float = setting(
        0.1, "how far from its reference the policy may go", stages=("dpo",), above=0
    )

    def __post_init__(self):
        check(self)
        require(self.min_lr <= self.lr, f"min_lr must be at most lr ({self.lr}), got {self.min_lr}")
        plain = self.tag not in (".", "..") and not set("/\\") & set(self.tag)
        require(plain, "tag must be a plain name")
        parse_duration(self.time_budget)


RESUME_MAY_CHANGE = [f.name for f in fields(TrainConfig) if f.metadata["resume"]]


@dataclass(frozen=True)
class RunOptions:
    """What the script does with the settings. These options are never saved."""

    preset: str = setting("", "start from a preset; none: this machine's (docs/training.md)")
    resume: bool = setting(False, "continue OUT_DIR/last.pt exactly; starts fresh if there is none")
    overwrite: bool = setting(False, "start afresh though OUT_DIR holds another run")
    init_from: str = setting(
        "", "start from this checkpoint's weights (or gpt2, gpt2-medium...)", stages=TUNING
    )
    overfit_batch: bool = setting(False, "check: fit one batch until its loss is near 0; no files")
    plot_lr: bool = setting(False, "draw the LR schedule to OUT_DIR/lr_schedule.png, then exit")


@dataclass
class SamplerConfig:
    """How each next token is drawn from the logits and the text so far (sampling.filter_logits)."""

    temperature: float = setting(0.8, "divide the logits by this; 0 = greedy (the likeliest token)")
    top_k: int = setting(0, "keep only the k most likely tokens; 0 = off", at_least=0)
    top_p: float = setting(1.0, "keep the fewest tokens whose odds reach p", above=0, at_most=1)

    def __post_init__(self):
        check(self)
        greedy_or_in_range = self.temperature == 0 or 1e-3 <= self.temperature <= 1e3
        require(greedy_or_in_range, "--temperature must be 0 (greedy) or from 0.001 to 1000")


@dataclass
class GenerateConfig:
    """What generate.py writes, and how."""

    prompt: str = setting("", "text to continue; empty starts from a line end")
    prompt_file: str = setting("", "read the prompt from this UTF-8 file instead")
    max_new_tokens: int = setting(500, "tokens to generate per sample", at_least=1)
    seed: int = setting(1337, "sampler seed: same seed, same text", at_least=0, at_most=MAX_SEED)
    num_samples: int = setting(1, "samples, drawn as one batch", at_least=1)
    output_file: str = setting("", "also write the samples here, under a header of every setting")
    device: str = setting("auto", DEVICE_HELP, DEVICES)
    threads: int = setting(0, THREADS_HELP, at_least=0, at_most=1024)
    no_cache: bool = setting(False, "recompute the whole context per token, no KV cache")
    qa: bool = setting(False, "the prompt is a question, in the chat template: stop at its answer")
    no_stop: bool = setting(False, "keep generating past the end-of-text token")
    show_probs: bool = setting(False, "show each new token's probability and the entropy")
    show_top: int = setting(0, "and the K likeliest tokens (up to 20)", at_least=0, at_most=20)
    beam: int = setting(None, "beam search: keep the N likeliest texts", at_least=1)
    length_penalty: float = setting(0.0, "beam search: divide a score by length to this power")

    def __post_init__(self):
        check(self)
        require(not (self.prompt and self.prompt_file), "give --prompt or --prompt_file, not both")
        require(not self.beam or self.num_samples == 1, "beam search finds one: drop --num_samples")
        require(self.beam or self.length_penalty == 0, "--length_penalty applies to --beam only")


def parse_duration(text):
    """Returns the seconds in 5m, 300s, 300, 1h30m or 2.5m, or None if text is empty."""
    if not text:
        return None
    number = r"(\d+(?:\.\d+)?)"
    match = re.fullmatch(f"{number}|(?:{number}h)?(?:{number}m)?(?:{number}s)?", text.strip())
    groups = match.groups() if match else ()
    seconds = sum(float(v) * unit for v, unit in zip(groups, (1, 3600, 60, 1)) if v)
    ok = 0 < seconds < math.inf
    require(ok, f"time_budget must be a duration such as 5m, 300s or 1h30m, got {text!r}")
    return seconds


# The CPU presets share StableLM's parts, so tools.export can publish them, and a five-minute
# budget (docs/experiments.md).
STABLELM = dict(pos="rope", mlp="swiglu", bias=False)
FIVE_MINUTES = dict(STABLELM, block_size=128, batch_size=32, time_budget="5m", eval_interval=500)
FIVE_MINUTES |= dict(lr=3e-3, min_lr=0.0, warmup_steps=200, weight_decay=1.0)
NANOGPT = dict(bias=False, lr=1e-3, min_lr=1e-4, beta2=0.99)  # nanoGPT's optimizer settings
# from nanoGPT's train_shakespeare_char.py; the default on a CUDA GPU
SMALL = dict(NANOGPT, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64)
MEDIUM = dict(SMALL, n_layer=8, n_head=8, n_embd=512, block_size=512, max_steps=10000)
MEDIUM |= dict(lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_interval=500)
# runs in seconds, not minutes, to check that a change runs, learns, resumes and samples
MICRO = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, lr=3e-3, min_lr=3e-4)
MICRO |= dict(max_steps=200, warmup_steps=10, eval_interval=50, eval_iters=5, log_interval=10)
PRESETS = {
    # the defaults on a CPU or a Mac (settings.machine_preset). Of the shapes measured, they
    # learned most in five minutes on 2-core CPUs. mini takes too few steps on 1 thread or float32.
    "tiny": dict(FIVE_MINUTES, n_layer=2, n_head=5, n_embd=160),
    "mini": dict(FIVE_MINUTES, n_layer=3, n_head=6, n_embd=192),
    # nanoGPT's CPU recipe from its README, for like-for-like comparisons
    "reference": dict(NANOGPT, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "small": SMALL,
    "small-modern": dict(SMALL, pos="rope", mlp="swiglu", norm="rmsnorm", max_steps=5000),
    "medium": MEDIUM,
    "micro": MICRO,
}


def from_trained(given):
    """Returns the settings that a run from a trained model (finetune.py, dpo.py) puts over the
    preset, given these flags.

    The LR decays to 0, so that any --lr works on any machine. With --max_steps N, the warmup is
    N / 10 steps, because the warmup of the presets is made for pretraining. The run keeps the shape
    and the dropout of the model."""
    own = dict(min_lr=0.0)
    if "max_steps" in given:
        own["warmup_steps"] = given["max_steps"] // 10
    return own


def add_flags(parser, cls, defaults=None, names=None, title=None):
    """Adds a --flag for each field of cls (or for the fields in names).

    vars(parser.parse_args()) then holds the flags that were given. --help shows the meaning,
    choices and default of each flag. defaults, {name: (value, why)}, replaces the default of a
    field."""
    group = parser.add_argument_group(title or cls.__name__, cls.__doc__)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        default, why = (defaults or {}).get(f.name, (f.default, None))
        shown = "none" if default in ("", None) else default
        shown = f"{shown}, {why}" if why else shown
        choices = f" [{'|'.join(f.metadata['choices'])}]" if f.metadata["choices"] else ""
        # SUPPRESS leaves a flag that was not given out of what parse_args returns
        how = dict(dest=f.name, type=f.type, metavar=f.name.upper(), default=argparse.SUPPRESS)
        if f.type is bool:  # a bare --flag means true; --flag false works too
            how.update(type=yes_or_no, nargs="?", const=True, metavar="BOOL")
        # argparse formats help with %: a written "%" or "%%" both show as one
        help = re.sub("%%?", "%%", f"{f.metadata['help']}{choices} (default: {shown})")
        group.add_argument(f"--{f.name}", *ALIASES.get(f.name, ()), help=help, **how)


# the course's spellings; --warmup is named, so a new setting warmup_... leaves it unambiguous
ALIASES = {"lr": ("--lr-max", "--lr_max"), "warmup_steps": ("--warmup",)}


def yes_or_no(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        where = ": a run's folder is --out_dir" if text.endswith(".pt") else ""  # for --resume PATH
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}{where}")
    return text.lower() in ("1", "true", "yes", "on")


def make_config(cls, values):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
