"""Every hyperparameter of tinyllm lives here: the model shape, the training run,
and the named presets. train.py builds its command-line flags from these
dataclasses, so a new field is one line in one place."""

import argparse
import dataclasses
from dataclasses import dataclass


class TinyLLMError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128       # longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm, as in GPT-2
    norm: str = "layernorm"     # layernorm | rmsnorm
    mlp: str = "gelu"           # gelu (4x wide) | swiglu (8/3 x wide, same parameter count)
    pos: str = "learned"        # learned | sinusoidal | rope

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _require(self.n_embd % self.n_head == 0,
                 f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}")
        _require(self.mlp in ("gelu", "swiglu"), f"mlp must be gelu or swiglu, got {self.mlp!r}")
        _require(self.pos in ("learned", "sinusoidal", "rope"),
                 f"pos must be learned, sinusoidal or rope, got {self.pos!r}")
        if self.pos == "rope":
            _require((self.n_embd // self.n_head) % 2 == 0,
                     f"rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")


@dataclass
class TrainConfig:
    data: str = "data/input.txt"    # a .txt file, a folder of them, .jsonl, Q&A .json, or a prepare.py folder
    tokenizer: str = "char"         # char | bpe (learned here, --vocab_size) | gpt2 (tiktoken's)
    clean: bool = False             # normalise whitespace and drop duplicate documents
    out_dir: str = "checkpoints"
    batch_size: int = 32
    max_steps: int = 2000
    lr: float = 2e-3                # peak learning rate, reached after warmup
    min_lr: float = 2e-4            # cosine decay ends here and stays
    warmup_steps: int = 100
    weight_decay: float = 0.1       # applied to matrices only, never to biases or norms
    optimizer: str = "adamw"        # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02           # Muon's peak learning rate; follows the same schedule as lr
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # max global grad norm; 0 turns clipping off
    grad_accum_steps: int = 1       # micro-batches per optimizer step
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 50          # a progress line every N steps
    save_interval: int = 0          # periodic ckpt_STEP.pt every N steps; 0 = off
    keep_last: int = 3              # how many periodic checkpoints to keep
    patience: int = 0               # stop after N evals without val improvement; 0 = off
    seed: int = 1337
    device: str = "auto"            # auto | cpu | cuda | mps
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16
    compile: bool = False           # torch.compile the model
    sample_tokens: int = 300        # length of the sample printed at the end
    plots: bool = True              # redraw loss.png, lr.png, grad_norm.png after every evaluation

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_interval", "eval_iters", "log_interval",
                     "grad_accum_steps", "keep_last"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_interval", "patience", "sample_tokens"):
            _require(getattr(self, name) >= 0, f"{name} must be 0 or more, got {getattr(self, name)}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be 0 or more, got {self.weight_decay}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                 f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        _require(self.grad_clip >= 0, f"grad_clip must be 0 (off) or positive, got {self.grad_clip}")
        _require(self.batch_size % self.grad_accum_steps == 0,
                 f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps ({self.grad_accum_steps})")
        _require(self.tokenizer in ("char", "bpe", "gpt2"), f"tokenizer must be char, bpe or gpt2, got {self.tokenizer!r}")
        _require(self.optimizer in ("adamw", "muon"), f"optimizer must be adamw or muon, got {self.optimizer!r}")
        _require(self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


def _require(ok, message):
    if not ok:
        raise TinyLLMError(message)


# Named presets: each overrides some fields of GPTConfig and TrainConfig.
# "tiny" is the CPU default, tuned (see README) to finish in under 5 minutes on a 2-core
# laptop CPU: the modern blocks (RoPE, SwiGLU) with Muon, which learn the most per second.
# "small" is the classic 6x6x384 character-level Shakespeare model for a GPU.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, pos="rope", mlp="swiglu",
                 batch_size=64, max_steps=900, lr=3e-3, min_lr=3e-4, warmup_steps=100, optimizer="muon",
                 eval_interval=250, eval_iters=20),
    "speedrun": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, pos="rope", mlp="swiglu",
                     batch_size=32, max_steps=240, lr=5e-3, min_lr=5e-4, muon_lr=0.03, warmup_steps=30,
                     optimizer="muon", eval_interval=20, eval_iters=8, plots=False, sample_tokens=0),
    "reference": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=12, max_steps=2000,
                      lr=1e-3, min_lr=1e-4, warmup_steps=100, eval_interval=250, eval_iters=20),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                  batch_size=64, max_steps=5000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                  eval_interval=250, eval_iters=20),
    "small-modern": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, pos="rope", mlp="swiglu",
                         norm="rmsnorm", batch_size=64, max_steps=5000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                         eval_interval=250, eval_iters=20),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, dropout=0.2,
                   batch_size=64, max_steps=10000, lr=6e-4, min_lr=6e-5, warmup_steps=200,
                   eval_interval=500, eval_iters=20),
}


def default_preset(device_type):
    """The preset `python train.py` uses when none is named."""
    return "small" if device_type == "cuda" else "tiny"


def add_config_flags(parser):
    """Add one --flag per field of GPTConfig and TrainConfig, spelled like the field.
    Every default is None so we can tell what the user set from what the preset sets."""
    for cls in (GPTConfig, TrainConfig):
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            kind = _bool_flag if f.type is bool else f.type
            group.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.name.upper(),
                               help=f"default: {f.default} (or the preset's)")


def build_configs(args, preset, vocab_size=None):
    """GPTConfig and TrainConfig from defaults, then the preset, then explicit flags."""
    if preset not in PRESETS:
        raise TinyLLMError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in vars(args).items() if v is not None})
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return (GPTConfig(**_fields_of(GPTConfig, values)), TrainConfig(**_fields_of(TrainConfig, values)))


def _fields_of(cls, values):
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _bool_flag(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
