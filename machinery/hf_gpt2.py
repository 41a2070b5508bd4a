"""OpenAI's GPT-2 weights in and out of our GPT through Hugging Face transformers (imported only where used). Our GPT
with GPT2_SWITCHES is GPT-2 exactly: every weight maps one to one, by another name, four of them transposed (CONV1D)."""

import contextlib
import dataclasses
import os

import torch

from config import SHAPE, GPTConfig, TinyLLMError
from model import GPT

from machinery.checkpoint import (load_checkpoint, make_checkpoint, model_from_checkpoint, refused_as_unsafe,
                                  save_checkpoint, unsafe_file)
from machinery.cli import ArgumentParser, check_writable, first_line, log, run_cli

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_VOCAB_SIZE = 50257     # OpenAI's BPE vocabulary; "<|endoftext|>" is the last token
LAYERNORM_EPS = 1e-5        # torch's default, which our nn.LayerNorm uses; GPT-2's too
# GPT-2 is our GPT with biases and every setting beyond its shape at its default (a new variant is off by default)
GPT2_SWITCHES = {"bias": True, **{f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name not in SHAPE}}

# HF's Conv1D stores its weight as (in, out), the transpose of nn.Linear's (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # HF's names for our MLP's tanh GELU (equal to ~1e-7)
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # some transformers versions' constant causal masks: not weights


def as_hf(model):
    """Our weights by GPT2LMHeadModel's names (blocks.3.mlp.c_fc.weight -> transformer.h.3.mlp.c_fc.weight) and in its
    layout, as views sharing our storage; lm_head left out: it is wte, on both sides."""
    return {"transformer." + ("h." + k.removeprefix("blocks.") if k.startswith("blocks.") else k):
            v.t() if k.endswith(CONV1D) else v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise TinyLLMError("Hugging Face transformers is not installed: pip install transformers") from None
    return transformers


def config_from_hf(hf, source, dropout=0.0):
    if getattr(hf, "model_type", None) != "gpt2":
        problems = [f"model_type is {getattr(hf, 'model_type', None)!r}, not 'gpt2'"]
    else:  # (reorder_and_upcast_attn changes only mixed-precision rounding, not the function: fine)
        act, eps = hf.activation_function, hf.layer_norm_epsilon
        problems = [why for wrong, why in (
            (act not in TANH_GELUS, f"activation_function {act!r} (ours is the tanh GELU, 'gelu_new')"),
            (hf.n_inner not in (None, 4 * hf.n_embd), f"n_inner {hf.n_inner} (ours is 4 * n_embd = {4 * hf.n_embd})"),
            (abs(eps - LAYERNORM_EPS) > 1e-12, f"layer_norm_epsilon {eps} (ours is {LAYERNORM_EPS})"),
            (not getattr(hf, "scale_attn_weights", True),
             "scale_attn_weights=False (ours divides scores by sqrt(head size))"),
            (getattr(hf, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True"),
            (getattr(hf, "add_cross_attention", False), "add_cross_attention=True"),
            (not getattr(hf, "tie_word_embeddings", True), "tie_word_embeddings=False (our lm_head is always wte)"),
        ) if wrong]
    if problems:
        raise TinyLLMError(f"{source} is not a GPT-2 our model can represent: {'; '.join(problems)}")
    return GPTConfig(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
                     n_embd=hf.n_embd, dropout=dropout, **GPT2_SWITCHES)


def load_gpt2(name_or_path, dropout=0.0):
    """Our GPT (eval mode, float32) with the GPT-2 weights of a Hub id or a save_pretrained folder."""
    name = str(name_or_path)
    # a path that does not exist is a typo, not a Hub id: say so instead of asking the Hub
    if not os.path.isdir(name) and (os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1):
        raise TinyLLMError(f"GPT-2 folder {name} not found")
    transformers = import_transformers()
    what = f"{name!r} (a GPT-2 name such as {', '.join(GPT2_NAMES)}, or a save_pretrained folder)"
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name)
    except Exception as e:  # not found, offline, unreadable config.json, unknown model type...
        raise TinyLLMError(f"could not load the config of {what}: {first_line(e)}") from None
    config = config_from_hf(hf_config, name, dropout)  # refuse before downloading gigabytes
    try:
        hf = transformers.GPT2LMHeadModel.from_pretrained(name, config=hf_config)
    except Exception as e:
        if refused_as_unsafe(e):  # a pytorch_model.bin that carries code
            raise unsafe_file(f"the weights of {name}") from None
        raise TinyLLMError(f"could not load the weights of {what}: {first_line(e)}") from None

    hf_state = hf.state_dict()
    # our lm_head is wte; an untied lm_head would be silently replaced, so check it really is tied
    lm_head = hf_state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, hf_state["transformer.wte.weight"]):
        raise TinyLLMError(f"{name}: lm_head differs from the token embedding; our GPT needs them tied")
    model = GPT(config)
    with torch.no_grad():
        for key, ours in as_hf(model).items():
            theirs = hf_state.pop(key, None)
            if theirs is None:
                raise TinyLLMError(f"{name}: weight {key} is missing")
            if theirs.shape != ours.shape:
                raise TinyLLMError(f"{name}: {key} has shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
            ours.copy_(theirs)  # also casts a float16/bfloat16 checkpoint to our float32
    if leftover := [k for k in hf_state if not k.endswith(HF_BUFFERS)]:
        raise TinyLLMError(f"{name}: {len(leftover)} weights have no place in our GPT, e.g. {leftover[0]}")
    return model.float().eval()


def gpt2_checkpoint(model, tokenizer=None):
    """A checkpoint dict of model; tokenizer: its dict, by default OpenAI's GPT-2 tokenizer's."""
    if tokenizer is None:
        if model.config.vocab_size < GPT2_VOCAB_SIZE:
            raise TinyLLMError(f"the model has a vocabulary of {model.config.vocab_size} tokens, too few for the "
                               f"GPT-2 tokenizer's {GPT2_VOCAB_SIZE}; pass the tokenizer it was trained with")
        tokenizer = {"kind": "gpt2"}
    return make_checkpoint(model, tokenizer, step=0)


def export_hf(source, folder):
    """A GPT-2-like model (a checkpoint dict or a GPT) as a GPT2LMHeadModel folder, without the tokenizer (gpt2's)."""
    model, tokenizer = ((source, None) if isinstance(source, GPT)
                        else (model_from_checkpoint(source), source.get("tokenizer")))
    c = model.config
    if wrong := [f"{k}={getattr(c, k)!r} (GPT-2 has {v!r})" for k, v in GPT2_SWITCHES.items() if getattr(c, k) != v]:
        raise TinyLLMError(f"this model cannot be exported as GPT-2: {'; '.join(wrong)}")
    transformers = import_transformers()
    kind = tokenizer.get("kind") if tokenizer else None  # eot: the end-of-text id for bos/eos, None where none is
    if kind == "gpt2" or (kind is None and c.vocab_size == GPT2_VOCAB_SIZE):  # a bare GPT of GPT-2's size
        eot = GPT2_VOCAB_SIZE - 1  # <|endoftext|>
    else:
        eot = tokenizer.get("special_tokens", {}).get("<|endoftext|>") if kind == "bpe" else None
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=None, activation_function="gelu_new", layer_norm_epsilon=LAYERNORM_EPS,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,  # our one dropout is all three of theirs
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(hf_config)
    hf_state, ours = hf.state_dict(), as_hf(model)
    with torch.no_grad():
        for name, weight in ours.items():
            hf_state[name].copy_(weight)
    unwritten = [k for k in hf_state if k not in ours and k != "lm_head.weight" and not k.endswith(HF_BUFFERS)]
    assert not unwritten, f"HF weights left at their random init: {unwritten}"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "HF lm_head is not tied"
    try:
        hf.save_pretrained(folder)
    except OSError as e:
        raise TinyLLMError(f"could not write the Hugging Face folder {folder}: {e.strerror or first_line(e)}") from None
    return hf_config


def main(argv=None):
    parser = ArgumentParser(prog="python -m machinery.hf_gpt2",
                            description="OpenAI GPT-2 weights in and out of tinyllm via Hugging Face.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("import", help="a Hugging Face GPT-2 -> a tinyllm checkpoint")
    p.add_argument("name", help=f"{', '.join(GPT2_NAMES)}, or a save_pretrained folder")
    p.add_argument("--out", default="checkpoints/gpt2.pt", metavar="PATH.pt")
    p.add_argument("--dropout", type=float, default=0.0, help="stored for fine-tuning with train.py --init_from")
    p = commands.add_parser("export", help="a tinyllm checkpoint -> a Hugging Face GPT-2 folder")
    p.add_argument("--checkpoint", default="checkpoints/best.pt", metavar="PATH.pt")
    p.add_argument("--out", default="hf_model", metavar="FOLDER")
    args = parser.parse_args(argv)
    # Hub retries and loading reports are logged as warnings; here a failure is one error line instead
    with contextlib.suppress(ImportError):
        import huggingface_hub
        import transformers
        transformers.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()

    if args.command == "import":
        if os.path.exists(args.out):  # it may be a trained run's checkpoint
            raise TinyLLMError(f"--out {args.out} already exists; give a new path, or delete it first")
        check_writable(args.out, "--out", make_folder=True)
        log(f"loading {args.name} through transformers (a Hub name is downloaded once, then cached)")
        model = load_gpt2(args.name, dropout=args.dropout)
        save_checkpoint(args.out, gpt2_checkpoint(model))
        c = model.config
        log(f"wrote {args.out}: {model.num_params():,} parameters, {c.n_layer} layers, {c.n_embd} wide, "
            f"context {c.block_size}")
        log(f"sample: python generate.py --checkpoint {args.out} | fine-tune: python train.py --init_from {args.out}")
    else:
        export_hf(load_checkpoint(args.checkpoint), args.out)
        log(f"wrote {args.out}/ (load with transformers.GPT2LMHeadModel.from_pretrained({args.out!r}))")


if __name__ == "__main__":
    run_cli(main)
