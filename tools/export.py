"""A trained model as a Hugging Face model folder, which transformers loads with no code of ours:
config.json, model.safetensors, the tokenizer, generation_config.json and a model card.

    python -m tools.export checkpoints/best.pt hf_model
    hf upload USER/NAME hf_model        # the Hub's own command puts it online

RMSNorm, SwiGLU and RoPE are Llama's architecture; the same with LayerNorm, as the CPU presets
train, is StableLM's; LayerNorm, GELU and a learned position table are GPT-2's. A LoRA adapter is
merged first. GPT-2's names for our weights come from machinery/checkpoint.py, which reads
GPT-2's weights the other way (finetune.py --init_from gpt2).

transformers is imported only inside the functions: the rest of the project runs without it."""

import dataclasses
import json
import math
import os
import shutil
import tempfile

import torch

import lora
from config import ASSISTANT, EOT, GPTConfig, SamplerConfig, TinyLLMError
from machinery import checkpoint, cli, sources
from sampling import sample_text
from tokenizer import GPT2_PATTERN, CharTokenizer
from utils import CHAT_TEMPLATE, bits_per_char

# transformers' architectures, and the settings of ours each one is; any other setting of
# GPTConfig (a new variant) must keep its default, or the export refuses it, naming it
NEEDS = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope"),
    "stablelm": dict(norm="layernorm", mlp="swiglu", pos="rope", bias=False),  # Llama's, LayerNorm
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned"),
}
MAPPED = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}


def llama(model, transformers):
    """Llama's config (StableLM's for LayerNorm), and our weights by their names: RoPE's pairs
    (2i, 2i+1) moved to (i, i + hs/2), where their rotate_half pairs them."""
    c = model.config
    hs = c.n_embd // c.n_head
    shape = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=model.blocks[0].mlp.c_proj.in_features,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        max_position_embeddings=c.block_size,
    )
    if c.norm == "rmsnorm":
        bias = dict(attention_bias=c.bias, mlp_bias=c.bias)
        config = transformers.LlamaConfig(**shape, **bias, rms_norm_eps=1e-5)
    else:  # RoPE on the whole head, as ours
        config = transformers.StableLmConfig(**shape, partial_rotary_factor=1.0)
    order = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    order = (torch.arange(c.n_head)[:, None] * hs + order).flatten()  # each head's, in turn
    names = {
        "wte.": "model.embed_tokens.",
        "ln_f.": "model.norm.",
        "blocks.": "model.layers.",
        "ln_1.": "input_layernorm.",
        "ln_2.": "post_attention_layernorm.",
        "attn.c_proj.": "self_attn.o_proj.",
        "mlp.c_proj.": "mlp.down_proj.",
    }
    out = {}
    for name, t in model.state_dict().items():
        for ours, theirs in names.items():
            name = name.replace(ours, theirs)
        if "c_attn" in name:  # the queries, keys and values side by side
            q, k, v = t.chunk(3)
            for part, weight in (("q_proj", q[order]), ("k_proj", k[order]), ("v_proj", v)):
                out[name.replace("attn.c_attn", f"self_attn.{part}")] = weight
        elif "c_fc" in name:  # SwiGLU's gate and value side by side
            for part, weight in zip(("gate_proj", "up_proj"), t.chunk(2)):
                out[name.replace("c_fc", part)] = weight
        else:
            out[name] = t
    return config, out


def gpt2(model, transformers):
    """GPT-2's config, and our weights by its names."""
    shape = {k: getattr(model.config, k) for k in checkpoint.SHAPE}
    ours = dict(activation_function="gelu_new", layer_norm_epsilon=1e-5)  # the tanh GELU
    config = transformers.GPT2Config(**shape, n_positions=model.config.block_size, **ours)
    return config, {k: v.contiguous() for k, v in checkpoint.hf_names(model).items()}


def hf_tokenizer(tokenizer):
    """Our tokenizer in the tokenizers library: characters as BPE with no merges; byte-level BPE
    (ours, or GPT-2's) as GPT-2's is written, its merges those its ranks imply."""
    import tokenizers  # installed with transformers

    vocab = {ch: i for i, ch in enumerate(getattr(tokenizer, "chars", ()))}
    merges = []
    if not isinstance(tokenizer, CharTokenizer):  # bytes as GPT-2's printable characters
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = iter(range(256, 512))
        char = {b: chr(b if b in keep else next(others)) for b in range(256)}
        ranks = tokenizer.enc._mergeable_ranks  # tiktoken's: a token's bytes -> its id
        vocab = {"".join(map(char.get, t)): rank for t, rank in ranks.items()}
        for token in sorted(ranks, key=ranks.get)[256:]:
            merges.append(tuple("".join(map(char.get, part)) for part in halves(token, ranks)))
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab | tokenizer.special_tokens, merges))
    if merges:  # GPT2_PATTERN's pieces, each as bytes
        split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(GPT2_PATTERN), "isolated")
        as_bytes = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([split, as_bytes])
    hf.decoder = tokenizers.decoders.ByteLevel() if merges else tokenizers.decoders.Fuse()
    hf.add_special_tokens(list(tokenizer.special_tokens))
    return hf


def halves(token, ranks):
    """The two tokens BPE merged into token: its bytes merged as tiktoken would, the pair of the
    lowest rank first, with the tokens made before it, down to two."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, len(ranks)) for a, b in zip(parts, parts[1:])]
        pair_ranks = [r if r < ranks[token] else len(ranks) for r in pair_ranks]
        i = pair_ranks.index(min(pair_ranks))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def model_card(saved, model, arch, folder):
    """What the model card says: the run's record in its checkpoint."""
    c = model.config
    cfg = saved.get("train_config", {})
    steps = saved.get("step", 0)
    return {
        "name": os.path.basename(os.path.abspath(folder)),
        "arch": arch,
        "data": os.path.basename(cfg.get("data", "text")),
        "params": model.num_params(),
        "shape": f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, block {c.block_size}",
        "steps": steps,
        "tokens": steps * cfg.get("batch_size", 0) * c.block_size,
        "minutes": saved.get("seconds", 0) / 60,
        "device": saved.get("device", "a machine"),  # (older checkpoints did not record them)
        "dtype": saved.get("dtype", "float32"),
        "val": saved["best_val_loss"],
        "bits": bits_per_char(saved["best_val_loss"], saved.get("chars_per_token", math.nan)),
    }


# ------------------------------------------------------------------------------- the command line


def main(argv=None):
    parser = cli.ArgumentParser(description="Export a checkpoint as a Hugging Face model folder.")
    parser.add_argument("checkpoint", help="a tinyllm checkpoint (a LoRA adapter is merged)")
    parser.add_argument("folder", help="the model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the folder")
    args = parser.parse_args(argv)
    if os.path.exists(args.folder) and not args.overwrite:
        raise TinyLLMError(f"{args.folder} exists: give another folder, or --overwrite")
    try:
        import transformers

        transformers.logging.disable_progress_bar()
    except ImportError:
        raise TinyLLMError("the export needs transformers: pip install transformers") from None
    model, tokenizer, saved = checkpoint.load_model(args.checkpoint)
    model = lora.merge(model)
    c = model.config  # the MLP, then the norm, tell the family
    arch = "gpt2" if c.mlp == "gelu" else {"rmsnorm": "llama", "layernorm": "stablelm"}[c.norm]
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name not in MAPPED}
    needs = defaults | NEEDS[arch]  # the setting the architecture has no place for, and its value
    differ = [k for k, v in needs.items() if getattr(c, k) != v]
    if differ:
        setting = " ".join(f"--{k} {getattr(c, k)}" for k in differ)
        needed = " ".join(f"--{k} {needs[k]}" for k in differ)
        raise TinyLLMError(f"{setting}: transformers has no such model ({arch}'s needs {needed})")
    config, weights = (gpt2 if arch == "gpt2" else llama)(model, transformers)
    config.tie_word_embeddings = True
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eot_id
    start = sources.start_ids(tokenizer)
    sample = start + sample_text(model, start, 300, SamplerConfig(), seed=42)
    card = model_card(saved, model, arch, args.folder) | {"sample": tokenizer.decode(sample)}
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(args.folder)))
    try:  # written beside the folder, then moved in: nothing half-written left behind
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
        theirs = hf_model.named_parameters()  # biases where ours has none: zeros
        zeros = {k: torch.zeros_like(v) for k, v in theirs if k.endswith(".bias")}
        hf_model.load_state_dict(zeros | weights | {"lm_head.weight": model.wte.weight.detach()})
        hf_model.save_pretrained(tmp)
        chat = CHAT_TEMPLATE if ASSISTANT in tokenizer.special_tokens else None
        fast = dict(eos_token=EOT, chat_template=chat, model_max_length=c.block_size)
        bpe = hf_tokenizer(tokenizer)
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **fast).save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer_config.json")  # a class every transformers knows
        settings = json.loads(sources.read_text(path))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings | {"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        template = sources.read_text(os.path.join(os.path.dirname(__file__), "model_card.md"))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(template.format(**card))  # the Hub's format: YAML metadata, then Markdown
        shutil.rmtree(args.folder, ignore_errors=True)
        os.replace(tmp, args.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cli.log(f"wrote {args.folder}: {arch}'s architecture, loaded by transformers' from_pretrained")


if __name__ == "__main__":
    cli.run_cli(main)
