"""OpenAI's GPT-2 weights into our GPT, through Hugging Face transformers (imported only here): our
GPT with biases is GPT-2 exactly, every weight by another name, the four TRANSPOSED ones (in, out).

    python finetune.py --init_from gpt2 --data mytext.txt    # fine-tune GPT-2 on your text
"""

import os

import torch

from config import GPTConfig, TinyLLMError, require
from machinery import checkpoint, cli
from model import GPT

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
