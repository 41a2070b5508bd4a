"""Writes and reads checkpoint files, and guards the run folder that holds them.

A checkpoint is written atomically and read without running code; a file that would run code is
refused. Every checkpoint holds the model and the tokenizer, and train.py's save adds the entries
of the run. A fresh run never writes over the folder of another run. load_optimizer puts back
the optimizer of a resumed run. Last, load_gpt2 reads OpenAI's GPT-2 weights into our GPT for
finetune.py --init_from gpt2; it imports transformers only inside the function."""

import contextlib
import dataclasses
import os
import pickle
import time
import warnings
from collections import namedtuple

import torch

from config import GPTConfig, TinyLLMError, require
from machinery.cli import check_writable, first_line
from model import GPT
from tokenizer import from_dict


def save(path, checkpoint):
    """Saves `checkpoint` to a temp file, then renames that over `path`.

    A crash therefore leaves the old file in place. A LoRA adapter names its base by a path
    relative to itself, so the two can move together."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if checkpoint.get("lora"):
        base = os.path.abspath(checkpoint["lora"]["base"])
        with contextlib.suppress(ValueError):  # on Windows, no relative path leads to another drive
            base = os.path.relpath(base, folder)
        checkpoint = checkpoint | {"lora": checkpoint["lora"] | {"base": base}}
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except (OSError, RuntimeError) as e:  # e.g. a full disk: report it with the file name
        error = e if isinstance(e, OSError) else e.__context__  # torch's error wraps it
        if not isinstance(error, OSError):
            raise
        raise OSError(error.errno, error.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def replace_file(src, dst):
    """Calls os.replace, retrying for a few seconds.

    Windows cannot replace a file that another process holds open."""
    for wait in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        try:
            return os.replace(src, dst)
        except PermissionError:
            time.sleep(wait)
    os.replace(src, dst)


def load(path):
    """Reads a checkpoint onto the CPU without running code from it, and checks it is tinyllm's."""
    require(os.path.isfile(path), f"checkpoint {path} not found (train one with: python train.py)")
    try:
        with warnings.catch_warnings():  # torch warns at length about old pickle protocols
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, random bytes, an empty file...
        if isinstance(e, pickle.UnpicklingError) and refused_as_unsafe(e):
            raise unsafe_file(f"checkpoint {path}") from None
        raise TinyLLMError(
            f"checkpoint {path} could not be loaded (truncated or corrupt): {first_line(e)}"
        ) from None
    parts = ("model", "model_config", "tokenizer")
    ours = isinstance(checkpoint, dict) and all(isinstance(checkpoint.get(k), dict) for k in parts)
    weights = checkpoint["model"].items() if ours else ()
    if not ours or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights):
        raise TinyLLMError(f"checkpoint {path} is not a tinyllm checkpoint")
    if "kind" not in checkpoint["tokenizer"]:
        raise TinyLLMError(f"checkpoint {path} was written by another version of tinyllm")
    if checkpoint.get("lora"):  # the base path was saved relative to the checkpoint
        base = os.path.join(os.path.dirname(os.path.abspath(path)), checkpoint["lora"]["base"])
        checkpoint["lora"]["base"] = os.path.normpath(base)
    return checkpoint


def refused_as_unsafe(error):
    """Returns whether weights_only=True refused the file.

    It looks along the whole exception chain, because transformers wraps the error."""
    chain = []
    while error is not None and error not in chain:  # a chain can loop
        chain.append(error)
        error = error.__cause__ or error.__context__
    return any("weights only" in str(e).lower() for e in chain)


def unsafe_file(what):
    return TinyLLMError(f"{what} holds more than tensors and plain data: loading it could run code")


def model_of(checkpoint, path="checkpoint"):
    """Returns the GPT that a checkpoint holds, with its weights checked.

    For a LoRA run, it loads the base model and adds the adapter to it."""
    lora = checkpoint.get("lora")
    if lora:
        from lora import adapter_state, add_adapters  # only LoRA checkpoints need it

        base = load(lora["base"])  # use the dropout of the LoRA run: a fine-tune may change it
        base["model_config"] |= {"dropout": checkpoint["model_config"]["dropout"]}
        model = model_of(base, lora["base"])
        weights = dict(checkpoint["model"])
        new_rows = weights.pop("new_rows")
        if lora["rows"]:  # base rows and new-token rows, in the order of the run tokenizer
            with_embedding(model, lora["rows"], new_rows)
        add_adapters(model, lora["rank"], lora["alpha"], lora["mlp"])
        vocab_size = checkpoint["model_config"]["vocab_size"]
        if sorted(weights) != sorted(adapter_state(model)) or model.config.vocab_size != vocab_size:
            raise TinyLLMError(f"{path}: its adapter does not fit its base, {lora['base']}")
        model.load_state_dict(weights, strict=False)
        return model
    model = GPT(from_saved(GPTConfig, checkpoint["model_config"], path))
    state = checkpoint["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TinyLLMError(f"{path}: its weights do not fit its config ({first_line(e)})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    require(not bad, f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}")
    return model


def from_saved(cls, saved, path):
    """Builds `cls` from the settings saved in a checkpoint, checking the type of each one.

    Without the check, a wrong type such as n_head 2.0 would fail in a traceback. A setting may be
    None where its default is None (off). A setting the checkpoint lacks takes its default."""
    unknown = ", ".join(k for k in saved if k not in {f.name for f in dataclasses.fields(cls)})
    why = f"{path} has settings this version of tinyllm does not know ({unknown})"
    require(not unknown, f"{why}: it was made by another version")
    for f in dataclasses.fields(cls):
        kind = (int, float) if f.type is float else f.type  # an int is a valid float setting too
        off = f.default is None and saved.get(f.name) is None
        if f.name in saved and not off and not isinstance(saved[f.name], kind):
            raise TinyLLMError(f"{path}: unreadable settings ({f.name} is {saved[f.name]!r})")
    try:
        return cls(**saved)
    except TinyLLMError as e:
        raise TinyLLMError(f"{path}: invalid settings: {e}") from None


def tokenizer_of(checkpoint, path):
    """Returns the tokenizer that a checkpoint holds, checked to fit its model."""
    tokenizer = from_dict(checkpoint["tokenizer"])
    tokens = tokenizer.vocab_size
    vocab = checkpoint["model_config"]["vocab_size"]
    require(tokens <= vocab, f"{path}: its tokenizer has {tokens} tokens, the model {vocab}")
    return tokenizer


# the model of a checkpoint in eval mode, its tokenizer, and the rest of it except the optimizer
Trained = namedtuple("Trained", "model tokenizer checkpoint")


def load_model(path, device="cpu"):
    checkpoint = load(path)
    checkpoint.pop("optimizer", None)
    model = model_of(checkpoint, path).to(device).eval()
    return Trained(model, tokenizer_of(checkpoint, path), checkpoint)


def create(model, tokenizer, **extra):
    """Returns a checkpoint: the weights and settings of the model, the tokenizer, and `extra`.

    For a LoRA model (lora.py), it holds the adapter and the path of the base model, not the
    weights of the base."""
    weights = model.state_dict()
    settings = dataclasses.asdict(model.config)
    if getattr(model, "lora", None):  # only the adapter and the new embedding rows: kilobytes
        from lora import adapter_state

        new = [i for i, r in enumerate(model.lora["rows"] or ()) if r is None]
        weights = adapter_state(model) | {"new_rows": weights["wte.weight"][new]}
        extra = extra | {"lora": model.lora}
    return dict(model=weights, model_config=settings, tokenizer=tokenizer, **extra)


def with_embedding(model, rows, new_rows):
    """Rebuilds the token embedding of `model` and ties the output layer to it.

    `rows` says, for each new embedding row, which old row it came from. Where it says None, the
    row is the next one of `new_rows`."""
    old = model.wte.weight.detach()
    new_rows = iter(new_rows)
    weights = torch.stack([old[i] if i is not None else next(new_rows) for i in rows])  # (V, C)
    model.config = dataclasses.replace(model.config, vocab_size=len(rows))
    model.wte = torch.nn.Embedding.from_pretrained(weights, freeze=False)
    model.lm_head = torch.nn.Linear(model.config.n_embd, len(rows), bias=False)
    model.lm_head.weight = model.wte.weight


def summary(checkpoint):
    """Returns where the run of a checkpoint stood, e.g. 'step 900, best val 1.5123'."""
    val = checkpoint.get("best_val_loss")
    best = f", best val {val:.4f}" if isinstance(val, float) else ""
    return f"step {checkpoint.get('step', '?')}{best}"


# ------------------------------------------------------------------ the run folder that holds them


def run_files(out_dir):
    """Returns the checkpoints in a run folder: best.pt, last.pt, then the periodic ones, oldest
    first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    periodic = sorted(n for n in names if n.startswith("ckpt_") and n.endswith(".pt"))
    return [n for n in ("best.pt", "last.pt") if n in names] + periodic


def claim_out_dir(out_dir, overwrite, keep):
    """Refuses a fresh run over the checkpoints of another run.

    It also checks, before training, that the folder can be written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TinyLLMError(f"--out_dir {out_dir} is a file, not a folder")
    existing = run_files(out_dir)
    if existing and not overwrite:
        last = os.path.join(out_dir, "last.pt" if "last.pt" in existing else existing[-1])
        with contextlib.suppress(TinyLLMError):
            last = f"{last} at {summary(load(last))}"
        raise TinyLLMError(
            f"{out_dir} already holds a run ({last}); continue it with --resume, "
            f"pick another --out_dir (or --tag NAME), or replace it: --overwrite"
        )
    if keep and os.path.realpath(keep) in {os.path.realpath(f"{out_dir}/{n}") for n in existing}:
        raise TinyLLMError(f"--overwrite would delete --init_from's {keep}; use another --out_dir")
    check_writable(os.path.join(out_dir, f".test.{os.getpid()}"), "--out_dir", make_folder=True)


def clear_out_dir(out_dir):
    """Deletes the files of the old run for --overwrite.

    It runs once the new run is set up, so bad input is refused before anything is deleted."""
    for name in run_files(out_dir) + ["history.csv"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def keep_newest(out_dir, keep_last):
    for name in [n for n in run_files(out_dir) if n.startswith("ckpt_")][:-keep_last]:
        os.remove(os.path.join(out_dir, name))


def load_optimizer(optimizer, saved, path):
    """Loads the saved optimizer state into `optimizer`.

    Each saved group is matched to a group of this optimizer by the parameters it holds, or
    refused. Each group keeps the kernel this machine chose (fused, foreach)."""
    by_names = {tuple(group.get("names", ())): group for group in saved["param_groups"]}
    groups = []
    for group in optimizer.param_groups:
        match = by_names.get(tuple(group["names"]))
        if match is None:
            raise TinyLLMError(
                f"{path}: its optimizer groups the parameters otherwise than this code does "
                f"(no group of {', '.join(group['names'][:2])}...): resume it with the code "
                f"that trained it, or fine-tune from it with finetune.py --init_from"
            )
        groups.append(match | {k: group[k] for k in ("fused", "foreach") if k in group})
    optimizer.load_state_dict({**saved, "param_groups": groups})


# ------------------------------------------------- GPT-2's weights, read as a checkpoint

# GPT2LMHeadModel's weights: ours by another name, these four (in, out)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SHAPE = ("vocab_size", "n_layer", "n_head", "n_embd")  # GPT-2's names too; block_size: n_positions
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # some versions' constant masks: not weights
OUR_SWITCHES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


def hf_names(model):
    """Our weights by GPT2LMHeadModel's names, as views in its layout; lm_head is wte: left out."""
    return {
        "transformer." + k.replace("blocks.", "h.", 1): v.t() if k.endswith(TRANSPOSED) else v
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }


def config_from_hf(hf, name):
    """Our GPTConfig of a Hugging Face config, refused where our model cannot be that one."""
    require(hf.model_type == "gpt2", f"{name} is not a GPT-2: its model_type is {hf.model_type!r}")
    problems = []
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        problems.append(f"activation_function {hf.activation_function!r} (ours is the tanh GELU)")
    if hf.n_inner not in (None, 4 * hf.n_embd):
        problems.append(f"n_inner {hf.n_inner} (ours is 4 * n_embd)")
    if abs(hf.layer_norm_epsilon - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf.layer_norm_epsilon} (ours is 1e-05)")
    for switch, ours in OUR_SWITCHES.items():
        if bool(getattr(hf, switch, ours)) != ours:
            problems.append(f"{switch}={not ours}")
    require(not problems, f"{name} is not a GPT-2 our model can represent: {'; '.join(problems)}")
    return GPTConfig(**{k: getattr(hf, k) for k in SHAPE}, block_size=hf.n_positions, bias=True)


def load_gpt2(name):
    """Our GPT (eval mode, float32) with GPT-2's weights from the Hub or a save_pretrained dir."""
    a_path = os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
    require(not a_path or os.path.isdir(name), f"GPT-2 folder {name} not found")  # not a Hub name
    try:
        import transformers
    except ImportError:
        raise TinyLLMError("transformers is not installed: pip install transformers") from None
    what = f"{name!r} (a GPT-2 name such as gpt2 or gpt2-medium, or a save_pretrained folder)"
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name)
    except Exception as e:  # not found, offline, unreadable...
        raise TinyLLMError(f"could not load the config of {what}: {first_line(e)}") from None
    config = config_from_hf(hf_config, name)  # refused before gigabytes are downloaded
    try:
        hf_state = transformers.GPT2LMHeadModel.from_pretrained(name, config=hf_config).state_dict()
    except Exception as e:
        if refused_as_unsafe(e):  # a pytorch_model.bin that carries code
            raise unsafe_file(f"the weights of {name}") from None
        raise TinyLLMError(f"could not load the weights of {what}: {first_line(e)}") from None
    lm_head = hf_state.pop("lm_head.weight", None)  # ours is wte: refused if theirs is not
    if lm_head is not None and not torch.equal(lm_head, hf_state["transformer.wte.weight"]):
        raise TinyLLMError(f"{name}: lm_head differs from the token embedding; ours are tied")
    model = GPT(config)
    with torch.no_grad():
        for key, ours in hf_names(model).items():
            theirs = hf_state.pop(key, None)
            if theirs is None or theirs.shape != ours.shape:
                raise TinyLLMError(f"{name}: weight {key} is missing or of another shape")
            ours.copy_(theirs)  # float16 or bfloat16 weights cast to our float32
    leftover = [k for k in hf_state if not k.endswith(HF_BUFFERS)]
    if leftover:
        raise TinyLLMError(f"{name}: {len(leftover)} weights unknown to our GPT: {leftover[0]}...")
    return model.eval()


def gpt2_checkpoint(name):
    return create(load_gpt2(name), {"kind": "gpt2"}, step=0)
