"""The settings of training and sampling, each described once, and the presets that set many at once: the scripts
build their flags and --help from these dataclasses (cli.add_config_flags), tools/flags.py builds docs/flags.md."""

import dataclasses
import math
import re
from dataclasses import dataclass, field


class TinyLLMError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


def setting(default, help, choices=None, aliases=(), before=dataclasses.MISSING, changeable=False, example=None):
    """A dataclass field with its --help text; before: what a checkpoint saved without it meant (it loads as it was);
    changeable: a resumed run may take a new value (else --resume refuses the flag: the setting defines the run);
    example: a value the tests run a model setting (a number: tests/conftest.py) or a sampling rule (Sampler) at."""
    extra = {} if before is dataclasses.MISSING else {"before": before}
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                            "changeable": changeable, "example": example, **extra})


def require(ok, message):
    if not ok:
        raise TinyLLMError(message)


MAX_SEED = 2**32 - 1        # NumPy's seeds are 32-bit
BPE_VOCAB_SIZE = 2048       # the vocabulary --tokenizer bpe learns unless --vocab_size says otherwise
EOT = "<|endoftext|>"       # the token between documents; every tokenizer has it
TEMPERATURES = (1e-3, 1e3)  # a sampling temperature's range (and 0, greedy): past it the odds are greedy's or uniform
TRAIN_FRACTION = 0.9        # of a text, the first part trains and the rest validates (utils.py, tools/prepare.py)
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "where the numbers are computed: auto picks cuda, then mps, then cpu"
THREADS_HELP = "CPU threads for torch's kernels; 0 = auto: one per physical core"


# GPTConfig's fields that are the model's size; each other field is a variant of it (norm, mlp, pos, ...)
SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


@dataclass
class GPTConfig:
    """The model's shape. Saved in every checkpoint, so a checkpoint rebuilds its own model."""
    vocab_size: int = setting(0, "token ids the model knows; 0 = from the tokenizer (char: the text's characters "
                                 f"+ <|endoftext|>; bpe: {BPE_VOCAB_SIZE} to learn; gpt2: 50257)")
    block_size: int = setting(128, "context length: the most tokens the model sees at once")
    n_layer: int = setting(4, "Transformer blocks")
    n_head: int = setting(4, "attention heads per block; must divide n_embd")
    n_embd: int = setting(128, "width of the residual stream (embedding size)")
    dropout: float = setting(0.0, "dropout probability while training, in [0, 1)")
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as in GPT-2")
    norm: str = setting("layernorm", "normalisation layer", ("layernorm", "rmsnorm"))
    mlp: str = setting("gelu", "MLP: GELU 4x wide, or SwiGLU 8/3x wide (about the same parameters)", ("gelu", "swiglu"))
    pos: str = setting("learned", "position information: a learned table, fixed sinusoids, or rotary (RoPE)",
                       ("learned", "sinusoidal", "rope"))

    def __post_init__(self):
        require(self.vocab_size >= 0, f"vocab_size must be 0 (from the tokenizer) or more, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check_settings(self)
        require(self.pos != "rope" or (self.n_embd // self.n_head) % 2 == 0,
                f"rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")


@dataclass
class TrainConfig:
    """How a run trains. Saved in every checkpoint; --resume continues with the saved values."""
    data: str = setting("data/input.txt", "training text: a .txt file, a folder (searched recursively), a .jsonl "
                                          "file with a \"text\" field, a Q&A .json list, or a tools.prepare folder")
    data_ext: str = setting(".txt", "file endings read from a --data folder, comma-separated, e.g. .txt,.md,.py")
    tokenizer: str = setting("char", "characters; byte-level BPE learned from the training split; or GPT-2's "
                                     "(tiktoken's files, needs network once)", ("char", "bpe", "gpt2"))
    clean: bool = setting(False, "normalise whitespace and drop exact duplicate documents")
    out_dir: str = setting("checkpoints", "where checkpoints, history and plots go (checkpoints/TAG with --tag)",
                           changeable=True)
    tag: str = setting("", "a name for the run: it labels its curves in tools.compare and, without --out_dir, "
                           "its folder is checkpoints/TAG", changeable=True)
    batch_size: int = setting(32, "sequences per optimizer step (over all processes and micro-batches)")
    max_steps: int = setting(2000, "optimizer steps; the LR schedule (optim.get_lr) ends here", changeable=True)
    time_budget: str = setting("", "train for this long instead, e.g. 5m, 300s, 1h30m: after the warmup the LR "
                                   "decays over the time left, to its floor as the time runs out; empty = off. "
                                   "The tiny preset uses 5m; an explicit --max_steps turns it off")
    lr: float = setting(2e-3, "peak learning rate, reached at the end of warmup", aliases=("--lr-max", "--lr_max"))
    min_lr: float = setting(2e-4, "the LR's floor: where the schedule ends at max_steps, and stays")
    warmup_steps: int = setting(100, "steps of linear LR warmup from lr/warmup_steps to lr", aliases=("--warmup",))
    lr_schedule: str = setting("cosine", "the LR's decay from lr to min_lr after warmup: a cosine or a straight line",
                               ("cosine", "linear"), before="cosine")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (never biases or norm gains)")
    optimizer: str = setting("adamw", "AdamW for every weight, or Muon for the blocks' matrices and AdamW "
                                      "for the rest", ("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate; follows the same schedule as lr")
    beta1: float = setting(0.9, "AdamW's first-moment decay")
    beta2: float = setting(0.95, "AdamW's second-moment decay")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 = off")
    grad_accum_steps: int = setting(1, "split each batch into this many micro-batches: the same step, less memory",
                                    changeable=True)
    eval_interval: int = setting(250, "evaluate, save last.pt (and best.pt when val improves) every N steps",
                                 changeable=True)
    eval_iters: int = setting(20, "batches per split an evaluation averages", changeable=True)
    log_interval: int = setting(50, "a progress line and a history row every N steps", changeable=True)
    save_interval: int = setting(0, "also keep ckpt_STEP.pt every N steps; 0 = off", changeable=True)
    keep_last: int = setting(3, "how many ckpt_STEP.pt files to keep", changeable=True)
    patience: int = setting(0, "stop after N evaluations without a better val loss; 0 = off", changeable=True)
    target_loss: float = setting(0.0, "stop as soon as an evaluation's val loss is at or below this; 0 = off",
                                 changeable=True)
    seed: int = setting(1337, f"seed of every random number generator, 0 to {MAX_SEED}")
    device: str = setting("auto", DEVICE_HELP, DEVICES, changeable=True)
    dtype: str = setting("auto", "precision of the forward pass (autocast); auto: on a CPU with bfloat16 "
                                 "instructions (AVX512-BF16, AMX) both are timed at start-up and bfloat16 is taken "
                                 "only if clearly faster; bfloat16 on GPUs from A100/L4/RTX 30xx; float16 + loss "
                                 "scaling on older GPUs; else float32", ("auto", "float32", "bfloat16", "float16"),
                         changeable=True)
    compile: bool = setting(False, "torch.compile the model (pays off on long GPU runs; compiling takes a minute)",
                            changeable=True)
    threads: int = setting(0, THREADS_HELP, changeable=True)
    sample_tokens: int = setting(300, "length of the sample printed at the end; 0 = none", changeable=True)
    plots: bool = setting(True, "redraw loss.png, lr.png and grad_norm.png after every evaluation", changeable=True)

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_interval", "eval_iters", "log_interval",
                     "grad_accum_steps", "keep_last"):
            require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "muon_lr", "grad_clip", "target_loss"):
            require(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_interval", "patience", "sample_tokens", "weight_decay", "grad_clip",
                     "target_loss"):  # (0: none, or off)
            require(getattr(self, name) >= 0, f"{name} must be 0 (off) or more, got {getattr(self, name)}")
        for name in ("lr", "muon_lr"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(0 <= self.min_lr <= self.lr, f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        require(all(e.strip() for e in self.data_ext.split(",")), f"data_ext needs file endings, got {self.data_ext!r}")
        require("/" not in self.tag and "\\" not in self.tag and self.tag not in (".", ".."),
                f"tag must be a plain name (it becomes a folder name), got {self.tag!r}")
        parse_duration(self.time_budget)
        check_settings(self)


@dataclass
class RunOptions:
    """What this command does with the settings. Never saved: a checkpoint holds settings, not actions."""
    preset: str = setting("", "start from a named preset (see below); default: tiny on a CPU or Mac, small on CUDA")
    resume: bool = setting(False, "continue OUT_DIR/last.pt exactly (weights, optimizer, step, RNGs); "
                                  "starts fresh when there is none, so one command survives disconnects")
    overwrite: bool = setting(False, "start a fresh run even though OUT_DIR holds another run's checkpoints")
    init_from: str = setting("", "start from this checkpoint's weights (or gpt2, gpt2-medium, ...) with a fresh "
                                 "optimizer: fine-tuning; new characters in --data extend a char vocabulary")
    eval_only: str = setting(None, "evaluate a checkpoint (default OUT_DIR/best.pt) on every position of the "
                                   "val split, then exit; writes nothing")
    overfit_batch: bool = setting(False, "sanity check: fit one fixed batch until the loss is near 0; writes nothing")
    plot_lr: bool = setting(False, "draw the LR schedule of these settings to OUT_DIR/lr_schedule.png and print it "
                                   "at every tenth of the run, then exit")


@dataclass
class Sampler:
    """How each next token is drawn from the model's logits (sampling.py); --beam draws none, so refuses these."""
    temperature: float = setting(0.8, "divide the logits by this before sampling; 0 = greedy (always the most "
                                      "likely token); otherwise at least 0.001", example=0.5)
    top_k: int = setting(0, "keep only the k most likely tokens (and any tied with the k-th); 0 = off", example=3)
    top_p: float = setting(1.0, "keep the smallest set of tokens whose probability reaches p, in (0, 1]; 1 = off",
                           example=0.5)

    def __post_init__(self):
        require(self.temperature == 0 or TEMPERATURES[0] <= self.temperature <= TEMPERATURES[1], "--temperature must "
                f"be 0 (greedy) or between {TEMPERATURES[0]:g} and {TEMPERATURES[1]:g}, got {self.temperature}")
        require(self.top_k >= 0, f"--top_k must be 0 (off) or positive, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampler(temperature=0)


@dataclass
class SampleConfig:
    """What generate.py writes, and how, besides how each token is drawn (Sampler)."""
    prompt: str = setting("", "text to continue; empty starts from a line end")
    prompt_file: str = setting("", "read the prompt from this UTF-8 file instead")
    max_new_tokens: int = setting(500, "tokens to generate per sample; may exceed the model's block_size")
    seed: int = setting(1337, f"seed of the sampler, 0 to {MAX_SEED}: same seed, same machine, same text")
    num_samples: int = setting(1, "samples drawn together as one batch")
    output_file: str = setting("", "also write the samples here, under a header with every setting")
    device: str = setting("auto", DEVICE_HELP, DEVICES)
    threads: int = setting(0, THREADS_HELP)
    no_cache: bool = setting(False, "recompute the whole context for every token instead of using the KV cache")
    qa: bool = setting(False, "the prompt is a question: frame it as in Q&A training and stop after the answer")
    no_stop: bool = setting(False, "keep generating past the end-of-text token")
    show_probs: bool = setting(False, "annotate each new token with its probability under the distribution it "
                                      "was drawn from (after the sampling settings; greedy: temperature 1's) "
                                      "and that distribution's entropy; a terminal gets colours, a file or pipe "
                                      "one row per token; each sample ends with its perplexity")
    show_top: int = setting(0, "with the annotations, also list the K most likely tokens at each step "
                               "(implies --show_probs); 0 = off, at most 20")
    beam: int = setting(None, "beam search instead of sampling: keep the N most probable continuations at each "
                              "step and print the most probable one at the end (deterministic: no seed, none "
                              "of the sampling settings; one sample); 1 = greedy")
    length_penalty: float = setting(0.0, "beam search: a continuation's score is its total log-probability divided "
                                         "by its length to this power; 0 = the plain sum (lengths differ only when "
                                         "a continuation stops at <|endoftext|>)")

    def __post_init__(self):
        require(self.num_samples >= 1, f"--num_samples must be at least 1, got {self.num_samples}")
        require(self.max_new_tokens >= 1, f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        require(not (self.prompt and self.prompt_file), "give --prompt or --prompt_file, not both")
        require(0 <= self.show_top <= 20, f"--show_top must be between 0 (off) and 20, got {self.show_top}")
        self.show_probs = self.show_probs or self.show_top > 0
        require(self.beam is None or self.beam >= 1, f"--beam must be at least 1 (continuations kept), got {self.beam}")
        require(not self.beam or self.num_samples == 1, "beam search finds one continuation: drop --num_samples")
        require(math.isfinite(self.length_penalty), f"--length_penalty must be a number, got {self.length_penalty}")
        require(self.beam or self.length_penalty == 0, "--length_penalty applies to --beam only")
        check_settings(self, "--")


def check_beam(cfg, flags):
    """--beam with a flag of the sampler (flags: those given, {name: value}), even at its default: one error line."""
    given = [f"--{f.name}" for f in dataclasses.fields(Sampler) if f.name in flags]
    require(not (cfg.beam and given), f"beam search draws nothing, so {', '.join(given)} cannot apply: drop it")


def check_settings(config, flag=""):
    seed, threads = getattr(config, "seed", 0), getattr(config, "threads", 0)
    require(0 <= seed <= MAX_SEED, f"{flag}seed must be between 0 and {MAX_SEED}, got {seed}")
    require(0 <= threads <= 1024, f"{flag}threads must be 0 (auto) to 1024, got {threads}")  # (100,000 crashed OpenMP)
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value not in choices:
            raise TinyLLMError(f"{f.name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def parse_duration(text):
    """Seconds in a duration such as 5m, 300s, 300, 1h30m or 2.5m; None for an empty string."""
    if not text:
        return None
    text, number = text.strip(), r"(\d+(?:\.\d+)?)"
    # a number alone (seconds), or hours, minutes and seconds each with its unit ("1h30" is not a duration)
    match = re.fullmatch(f"{number}|(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
    seconds = sum(float(v) * unit for v, unit in zip(match.groups(), (1, 3600, 60, 1)) if v) if match else 0
    require(seconds > 0 and math.isfinite(seconds),
            f"time_budget must be a positive duration such as 5m, 300s or 1h30m, got {text!r}")
    return seconds


def check_batch_split(batch_size, grad_accum_steps, processes=1):
    if batch_size % (processes * grad_accum_steps):
        over = f"the number of processes ({processes}) times " if processes > 1 else ""
        raise TinyLLMError(f"batch_size ({batch_size}) is not divisible by {over}grad_accum_steps ({grad_accum_steps})")


# ----------------------------------------------------------------------------- presets

# Each preset overrides some fields of GPTConfig and TrainConfig (measured in docs/recipe_search.md, docs/platforms.md)
PRESETS = {
    # the default on a CPU or a Mac: the shape that learned most in five minutes on the 2-core CPUs measured
    "tiny": dict(n_layer=2, n_head=5, n_embd=160, block_size=128, dropout=0.0, pos="rope", mlp="swiglu",
                 batch_size=32, time_budget="5m", max_steps=2000, lr=3e-3, min_lr=3e-4, warmup_steps=100,
                 weight_decay=1.0, eval_interval=500, eval_iters=20),
    # the fastest route found to val 1.886 (bench.py time_to_target)
    "speedrun": dict(n_layer=2, n_head=4, n_embd=128, block_size=64, dropout=0.0, pos="rope", mlp="swiglu",
                     batch_size=32, max_steps=400, lr=5e-3, min_lr=0.0, warmup_steps=30, weight_decay=0.0,
                     eval_interval=20, eval_iters=8, plots=False, sample_tokens=0, lr_schedule="cosine"),
    # nanoGPT's two shakespeare_char recipes, for like-for-like comparisons: its README's CPU run, and
    # train_shakespeare_char.py (the CUDA default) with its cosine over 2,000 steps, where val bottoms out, not 5,000
    "reference": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, batch_size=12,
                      max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, lr_schedule="cosine",
                      eval_interval=250, eval_iters=20),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False,
                  batch_size=64, max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99,
                  eval_interval=250, eval_iters=20),
    "small-modern": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, pos="rope", mlp="swiglu",
                         norm="rmsnorm", bias=False, batch_size=64, max_steps=5000, lr=1e-3, min_lr=1e-4,
                         warmup_steps=100, beta2=0.99, eval_interval=250, eval_iters=20),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, dropout=0.2, bias=False,
                   batch_size=64, max_steps=10000, lr=6e-4, min_lr=6e-5, warmup_steps=200, beta2=0.99,
                   eval_interval=500, eval_iters=20),
}


def default_preset(device_type):
    """A GPU gets the classic model, a CPU or a Mac the one that trains in minutes."""
    return "small" if device_type == "cuda" else "tiny"


# ----------------------------------------------------------------------------- settings from flags

def make_config(cls, values):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def from_saved(cls, saved):
    """cls from the settings a checkpoint saved; a setting it predates takes its `before` value."""
    older = {f.name: f.metadata["before"] for f in dataclasses.fields(cls) if "before" in f.metadata}
    for f in dataclasses.fields(cls):  # a value of another type (n_head 2.0) would fail only later, in a traceback
        if f.name in saved and not isinstance(saved[f.name], (int, float) if f.type is float else f.type):
            raise TypeError(f"{f.name} is {saved[f.name]!r}, not {f.type.__name__}")
    return cls(**{**older, **saved})


def drop_budget_for_max_steps(values, given):
    """values without a time budget when --max_steps was given: a step count overrides a preset's or a resumed run's."""
    return {**values, "time_budget": ""} if "max_steps" in given else values


def build_configs(given, preset):
    """GPTConfig and TrainConfig from the defaults, then the preset, then the flags given ({name: value})."""
    if preset not in PRESETS:
        raise TinyLLMError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if given.get("time_budget") and "max_steps" in given:
        raise TinyLLMError("give --time_budget or --max_steps, not both")
    values = drop_budget_for_max_steps({**PRESETS[preset], **given}, given)
    if values.get("tag") and "out_dir" not in given:
        values["out_dir"] = f"{TrainConfig.out_dir}/{values['tag']}"  # f"{field default}/TAG"
    return make_config(GPTConfig, values), make_config(TrainConfig, values)
