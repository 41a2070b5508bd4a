"""A trained model as a Hugging Face model folder, which transformers loads with no code of ours:
config.json, model.safetensors, the tokenizer, generation_config.json and a model card.

    python -m tools.export checkpoints/best.pt hf_model
    hf upload USER/NAME hf_model        # the Hub's own command puts it online

RMSNorm, SwiGLU and RoPE are Llama's architecture; the same with LayerNorm, as the CPU presets
train, is StableLM's; LayerNorm, GELU and a learned position table are GPT-2's. A LoRA adapter is
merged first.

And the other way, OpenAI's GPT-2 weights into our GPT (load_gpt2): our GPT with biases is GPT-2
exactly, every weight by another name, the four TRANSPOSED ones (in, out).

    python finetune.py --init_from gpt2 --data mytext.txt    # fine-tune GPT-2 on your text

Both import transformers only inside their functions: the rest of the project runs without it."""

import dataclasses
import json
import math
import os
import shutil
import tempfile

import torch

import lora
from config import ASSISTANT, EOT, GPTConfig, SamplerConfig, TinyLLMError, require
from machinery import checkpoint, cli, sources
from model import GPT
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
    shape = {k: getattr(model.config, k) for k in SHAPE}
    ours = dict(activation_function="gelu_new", layer_norm_epsilon=1e-5)  # the tanh GELU
    config = transformers.GPT2Config(**shape, n_positions=model.config.block_size, **ours)
    return config, {k: v.contiguous() for k, v in hf_names(model).items()}


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


# ----------------------------------------------------------------------------- GPT-2's weights in


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
        raise TinyLLMError(f"could not load the config of {what}: {cli.first_line(e)}") from None
    config = config_from_hf(hf_config, name)  # refused before gigabytes are downloaded
    try:
        hf_state = transformers.GPT2LMHeadModel.from_pretrained(name, config=hf_config).state_dict()
    except Exception as e:
        if checkpoint.refused_as_unsafe(e):  # a pytorch_model.bin that carries code
            raise checkpoint.unsafe_file(f"the weights of {name}") from None
        raise TinyLLMError(f"could not load the weights of {what}: {cli.first_line(e)}") from None
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
    return checkpoint.create(load_gpt2(name), {"kind": "gpt2"}, step=0)


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
