"""Every setting of training and sampling (--help is made from them), and the presets."""

import math
import re
from dataclasses import dataclass, field, fields


class TinyLLMError(Exception):
    """A problem with what the user asked for: one `error:` line, no traceback."""


def setting(default, help, choices=None, aliases=()):
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


def require(ok, message):
    if not ok:
        raise TinyLLMError(message)


def at_least(config, low, names):
    for name in names.split():
        value = getattr(config, name)
        require(value >= low, f"{name} must be at least {low}, got {value}")


MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
BPE_VOCAB_SIZE = 2048  # what --tokenizer bpe learns unless --vocab_size says otherwise
EOT = "<|endoftext|>"  # between documents and after each answer; every tokenizer has it
# the chat template: <|user|>question\n<|assistant|>answer<|endoftext|>
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (EOT, USER, ASSISTANT)  # each one token, after a vocabulary's ordinary ones
TRAIN_FRACTION = 0.9  # the first 90% of a text trains, the rest validates
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POSITIONS, TOKENIZERS = ("learned", "sinusoidal", "rope"), ("char", "bpe", "gpt2")
DEVICE_HELP = "where the numbers are computed: auto picks cuda, then mps, then cpu"
THREADS_HELP = "CPU threads for torch; 0 = one per physical core"


@dataclass
class GPTConfig:
    """The model's shape, saved in every checkpoint."""

    vocab_size: int = setting(0, f"token ids; 0 = the tokenizer's (bpe learns {BPE_VOCAB_SIZE})")
    block_size: int = setting(128, "context length: tokens the model sees at once")
    n_layer: int = setting(4, "Transformer blocks")
    n_head: int = setting(4, "attention heads per block; must divide n_embd")
    n_embd: int = setting(128, "width of the residual stream")
    dropout: float = setting(0.0, "dropout probability while training")
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as in GPT-2")
    norm: str = setting("layernorm", "normalisation layer", ("layernorm", "rmsnorm"))
    mlp: str = setting("gelu", "MLP: GELU 4x wide, or SwiGLU 8/3x wide", ("gelu", "swiglu"))
    pos: str = setting("learned", "positions: a table, sinusoids or RoPE", POSITIONS)

    def __post_init__(self):
        at_least(self, 0, "vocab_size")
        at_least(self, 1, "block_size n_layer n_head n_embd")
        require(self.n_embd % self.n_head == 0, f"n_head {self.n_head} must divide n_embd")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        head_size = self.n_embd // self.n_head
        require(
            self.pos != "rope" or head_size % 2 == 0,
            f"rope needs an even head size, not {head_size}",
        )
        check_choices(self)


@dataclass
class TrainConfig:
    """How a run trains, saved in every checkpoint."""

    data: str = setting(
        "data/input.txt", "text: .txt, a folder, .jsonl, Q&A .json, tools.prepare's"
    )
    data_ext: str = setting(".txt", "file endings read from a --data folder, e.g. .txt,.md")
    data_fraction: float = setting(1.0, "train on this first share of the training split; 1 = all")
    tokenizer: str = setting("char", "characters, BPE learned from the text, GPT-2's", TOKENIZERS)
    loss_on: str = setting("answers", "a chat's loss: on its answers, or all", ("answers", "all"))
    clean: bool = setting(False, "normalise whitespace and drop duplicate documents")
    out_dir: str = setting("checkpoints", "where checkpoints, history and plots go")
    tag: str = setting("", "run name: its folder is checkpoints/TAG")
    batch_size: int = setting(32, "sequences per optimizer step")
    max_steps: int = setting(2000, "optimizer steps; the LR schedule ends here")
    time_budget: str = setting("", "train for this long instead, e.g. 5m, 300s, 1h30m; empty = off")
    lr: float = setting(2e-3, "peak learning rate, after warmup", aliases=("--lr-max", "--lr_max"))
    min_lr: float = setting(2e-4, "the LR the decay schedules end at")
    warmup_steps: int = setting(100, "steps of linear warmup up to lr", aliases=("--warmup",))
    lr_schedule: str = setting("cosine", "the decay from lr to min_lr", ("cosine", "linear"))
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only")
    optimizer: str = setting("adamw", "AdamW, or Muon for the blocks' matrices", ("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate")
    beta1: float = setting(0.9, "AdamW's first-moment decay")
    beta2: float = setting(0.95, "AdamW's second-moment decay")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = off")
    grad_accum_steps: int = setting(1, "micro-batches per batch (less memory)")
    eval_interval: int = setting(250, "evaluate and save every N steps")
    eval_iters: int = setting(20, "batches per split in an evaluation")
    log_interval: int = setting(50, "a progress line every N steps")
    save_interval: int = setting(0, "also keep ckpt_STEP.pt every N steps; 0 = off")
    keep_last: int = setting(3, "ckpt_STEP.pt files to keep")
    patience: int = setting(0, "stop after N evaluations without a better val loss; 0 = off")
    target_loss: float = setting(0.0, "stop once val loss is at or below this; 0 = off")
    seed: int = setting(1337, f"seed of every random generator, 0 to {MAX_SEED}")
    device: str = setting("auto", DEVICE_HELP, DEVICES)
    dtype: str = setting("auto", "forward pass precision; auto: by what the device is", DTYPES)
    compile: bool = setting(False, "torch.compile the model (pays off on long GPU runs)")
    threads: int = setting(0, THREADS_HELP)
    sample_tokens: int = setting(300, "length of the sample printed at the end; 0 = none")
    plots: bool = setting(True, "redraw loss.png after every evaluation")
    lora_rank: int = setting(0, "with --init_from: rank-R LoRA beside attention; 0 = off")
    lora_alpha: float = setting(16.0, "LoRA's scale: the matrices' product times alpha / rank")
    lora_mlp: bool = setting(False, "LoRA beside the MLP's matrices too")

    def __post_init__(self):
        at_least(self, 1, "batch_size max_steps eval_interval eval_iters log_interval keep_last")
        at_least(self, 1, "grad_accum_steps")
        at_least(self, 0, "warmup_steps save_interval patience sample_tokens lora_rank min_lr")
        at_least(self, 0, "weight_decay grad_clip target_loss")
        for name in ("lr", "muon_lr", "weight_decay", "grad_clip", "target_loss", "lora_alpha"):
            value = getattr(self, name)
            positive = value > 0 or name not in ("lr", "muon_lr", "lora_alpha")
            require(math.isfinite(value) and positive, f"{name} must be a positive number")
        require(self.min_lr <= self.lr, f"min_lr must be at most lr ({self.lr}), got {self.min_lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        require(0 < self.data_fraction <= 1, "data_fraction must be in (0, 1]")
        plain = self.tag not in (".", "..") and not set("/\\") & set(self.tag)
        require(plain, "tag must be a plain name")
        parse_duration(self.time_budget)
        check_choices(self)


# what --resume may change; the rest (shape, data, optimizer, schedule...) is the run
RESUME_MAY_CHANGE = """out_dir tag max_steps time_budget grad_accum_steps eval_interval eval_iters
log_interval save_interval keep_last patience target_loss device dtype compile threads
sample_tokens plots""".split()


@dataclass
class RunOptions:
    """What train.py does with the settings; never saved."""

    preset: str = setting("", "start from a preset; none: this machine's (docs/training.md)")
    resume: bool = setting(False, "continue OUT_DIR/last.pt exactly; starts fresh if there is none")
    overwrite: bool = setting(False, "start afresh though OUT_DIR holds another run")
    init_from: str = setting("", "fine-tune this checkpoint's weights (or gpt2, gpt2-medium...)")
    eval_only: str = setting(None, "score a checkpoint on its whole val split (OUT_DIR/best.pt)")
    overfit_batch: bool = setting(False, "check: fit one batch until its loss is near 0; no files")
    plot_lr: bool = setting(False, "draw the LR schedule to OUT_DIR/lr_schedule.png, then exit")


@dataclass
class SamplerConfig:
    """How each next token is drawn from the logits and the text so far (sampling.filter_logits)."""

    temperature: float = setting(0.8, "divide the logits by this; 0 = greedy (the likeliest token)")
    top_k: int = setting(0, "keep only the k most likely tokens; 0 = off")
    top_p: float = setting(1.0, "keep the fewest tokens whose probability reaches p; 1 = off")

    def __post_init__(self):
        greedy_or_in_range = self.temperature == 0 or 1e-3 <= self.temperature <= 1e3
        require(greedy_or_in_range, "--temperature must be 0 (greedy) or from 0.001 to 1000")
        require(self.top_k >= 0, f"--top_k must be 0 (off) or more, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerateConfig:
    """What generate.py writes, and how."""

    prompt: str = setting("", "text to continue; empty starts from a line end")
    prompt_file: str = setting("", "read the prompt from this UTF-8 file instead")
    max_new_tokens: int = setting(500, "tokens to generate per sample")
    seed: int = setting(1337, f"sampler seed, 0 to {MAX_SEED}: same seed, same machine, same text")
    num_samples: int = setting(1, "samples, drawn as one batch")
    output_file: str = setting("", "also write the samples here, under a header of every setting")
    device: str = setting("auto", DEVICE_HELP, DEVICES)
    threads: int = setting(0, THREADS_HELP)
    no_cache: bool = setting(False, "recompute the whole context per token, no KV cache")
    qa: bool = setting(False, "the prompt is a question, in the chat template: stop at its answer")
    no_stop: bool = setting(False, "keep generating past the end-of-text token")
    show_probs: bool = setting(False, "show each new token's probability and the entropy")
    show_top: int = setting(0, "with --show_probs, also list the K most likely tokens (at most 20)")
    beam: int = setting(None, "beam search: keep the N likeliest continuations, print the best")
    length_penalty: float = setting(0.0, "beam search: divide a score by length to this power")

    def __post_init__(self):
        at_least(self, 1, "num_samples max_new_tokens")
        require(not (self.prompt and self.prompt_file), "give --prompt or --prompt_file, not both")
        require(0 <= self.show_top <= 20, f"--show_top must be 0 (off) to 20, got {self.show_top}")
        self.show_probs = self.show_probs or self.show_top > 0
        require(self.beam is None or self.beam >= 1, f"--beam must be at least 1, got {self.beam}")
        require(not self.beam or self.num_samples == 1, "beam search finds one: drop --num_samples")
        require(math.isfinite(self.length_penalty), "--length_penalty must be a number")
        require(self.beam or self.length_penalty == 0, "--length_penalty applies to --beam only")
        check_choices(self)


def check_choices(config):
    """A setting is one of its choices; seed and threads fit NumPy and OpenMP."""
    require(0 <= getattr(config, "seed", 0) <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}")
    require(0 <= getattr(config, "threads", 0) <= 1024, "threads must be 0 (auto) to 1024")
    for f in fields(config):
        choices, value = f.metadata["choices"], getattr(config, f.name)
        if choices and value not in choices:
            raise TinyLLMError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")


def parse_duration(text):
    """Seconds in 5m, 300s, 300, 1h30m or 2.5m; None for an empty one."""
    if not text:
        return None
    number = r"(\d+(?:\.\d+)?)"
    match = re.fullmatch(f"{number}|(?:{number}h)?(?:{number}m)?(?:{number}s)?", text.strip())
    seconds = 0
    if match:
        seconds = sum(float(v) * unit for v, unit in zip(match.groups(), (1, 3600, 60, 1)) if v)
    require(
        0 < seconds < math.inf,
        f"time_budget must be a duration such as 5m, 300s or 1h30m, got {text!r}",
    )
    return seconds


# what the CPU presets share: their model's parts and five minutes of training
FIVE_MINUTES = dict(block_size=128, pos="rope", mlp="swiglu", batch_size=32, time_budget="5m")
FIVE_MINUTES |= dict(lr=3e-3, min_lr=3e-4, weight_decay=1.0, eval_interval=500)
NANOGPT = dict(bias=False, lr=1e-3, min_lr=1e-4, beta2=0.99)  # nanoGPT's optimizer settings
# nanoGPT's train_shakespeare_char.py: the default on a CUDA GPU
SMALL = dict(NANOGPT, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64)
PRESETS = {
    # the default on a CPU or a Mac (default_preset picks): what learned most in five minutes on
    # the 2-core CPUs measured. mini's best val on the whole val split after 5 minutes, 2 threads,
    # against tiny's: 1.484-1.490 against 1.499-1.503 on an Intel Xeon with AMX, 1.520 against
    # 1.518 on a slower one, 1.512-1.513 against 1.506-1.515 on an AMD EPYC Zen 4. On 1 thread in
    # float32 tiny won, 1.601 against 1.688: a bigger model takes too few steps there.
    "tiny": dict(FIVE_MINUTES, n_layer=2, n_head=5, n_embd=160),
    "mini": dict(FIVE_MINUTES, n_layer=3, n_head=6, n_embd=192),
    # nanoGPT's CPU recipe from its README, for like-for-like comparisons
    "reference": dict(NANOGPT, n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "small": SMALL,
    "small-modern": dict(SMALL, pos="rope", mlp="swiglu", norm="rmsnorm", max_steps=5000),
    "medium": dict(SMALL, n_layer=8, n_head=8, n_embd=512, block_size=512, max_steps=10000),
    # seconds, not minutes: to check that a change runs, learns, resumes and samples
    "micro": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=200),
}
PRESETS["medium"] |= dict(lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_interval=500)
PRESETS["micro"] |= dict(warmup_steps=10, lr=3e-3, min_lr=3e-4, eval_interval=50, eval_iters=5)
PRESETS["micro"]["log_interval"] = 10


def default_preset(device_type, dtype, threads):
    """The preset of a run without --preset, by what the machine is, never by a timing: small on a
    CUDA GPU; mini on a CPU that trains in bfloat16 on 2 threads or more; tiny elsewhere."""
    if device_type == "cuda":
        return "small"
    if device_type == "cpu" and dtype == "bfloat16" and threads >= 2:
        return "mini"
    return "tiny"


def make_config(cls, values):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def from_saved(cls, saved, path):
    """cls from a checkpoint's settings, each of its type: n_head 2.0 would fail in a traceback."""
    names = {f.name for f in fields(cls)}
    unknown = [k for k in saved if k not in names]
    if unknown:
        raise TinyLLMError(
            f"{path} has settings this version of tinyllm does not know "
            f"({', '.join(unknown)}): it was made by another version"
        )
    for f in fields(cls):
        kind = (int, float) if f.type is float else f.type  # an int is a float setting too
        if f.name in saved and not isinstance(saved[f.name], kind):
            raise TinyLLMError(f"{path}: unreadable settings ({f.name} is {saved[f.name]!r})")
    try:
        return cls(**saved)
    except TinyLLMError as e:
        raise TinyLLMError(f"{path}: invalid settings: {e}") from None


def build_configs(given, preset):
    """GPTConfig and TrainConfig: the defaults, then the preset, then the flags given."""
    require(preset in PRESETS, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    require(
        not (given.get("time_budget") and "max_steps" in given),
        "give --time_budget or --max_steps, not both",
    )
    values = {**PRESETS[preset], **given}
    if "max_steps" in given:  # a step count turns a preset's budget off
        values["time_budget"] = ""
    if values.get("tag") and "out_dir" not in given:
        values["out_dir"] = f"checkpoints/{values['tag']}"
    return make_config(GPTConfig, values), make_config(TrainConfig, values)
