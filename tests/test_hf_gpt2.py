"""GPT-2 weights in and out through Hugging Face transformers, offline: a tiny random
GPT2LMHeadModel stands in for OpenAI's, since the mapping does not depend on the size."""

import ast
import dataclasses
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from config import GREEDY, GPTConfig, TinyLLMError  # noqa: E402
from conftest import MODEL_VARIANTS, ROOT, Payload, assert_one_line_error, cli, tiny_model_config, variant_id  # noqa: E402
from model import GPT  # noqa: E402
import sampling  # noqa: E402

from machinery.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from machinery.hf_gpt2 import export_hf, gpt2_checkpoint, load_gpt2  # noqa: E402

VOCAB, CONTEXT = 101, 32
TOKENIZER = {"kind": "char", "chars": [chr(33 + i) for i in range(VOCAB)]}  # any tokenizer of VOCAB tokens


def hf_config(**overrides):
    values = dict(n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, vocab_size=VOCAB, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    return transformers.GPT2Config(**values)


def jitter_vectors(model):
    """Init leaves biases at 0 and norm gains at 1, which would hide a swapped or dropped vector."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = jitter_vectors(transformers.GPT2LMHeadModel(hf_config()))
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(folder)
    return str(folder), hf.eval()


def test_loaded_model_gives_hf_logits(hf_folder):
    folder, hf = hf_folder
    model = load_gpt2(folder)
    assert isinstance(model, GPT) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (VOCAB, CONTEXT, 2, 2, 32)
    assert (c.pos, c.norm, c.mlp, c.bias) == ("learned", "layernorm", "gelu", True)
    assert model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert max_diff(ours, theirs) < 1e-5


def test_greedy_continuations_are_identical(hf_folder):
    folder, hf = hf_folder
    model = load_gpt2(folder)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    new = CONTEXT - prompt.size(1)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    assert len(theirs[:, prompt.size(1):].unique()) > 5  # varied text: a wrong position would show
    assert torch.equal(sampling.generate(model, prompt, new, GREEDY), theirs)                   # with our KV cache
    assert torch.equal(sampling.generate(model, prompt, new, GREEDY, use_cache=False), theirs)  # and without


@pytest.mark.parametrize("as_checkpoint", [False, True])
def test_export_round_trip(tmp_path, as_checkpoint):
    torch.manual_seed(3)
    model = jitter_vectors(GPT(tiny_model_config(vocab_size=VOCAB, block_size=CONTEXT))).eval()
    source = model
    if as_checkpoint:
        source = gpt2_checkpoint(model, tokenizer=TOKENIZER)
        source["model"] = {"_orig_mod." + k: v for k, v in source["model"].items()}  # as torch.compile saves them
    export_hf(source, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.n_positions, hf.config.vocab_size, hf.config.n_embd) == (CONTEXT, VOCAB, 32)
    ids = torch.randint(0, VOCAB, (2, CONTEXT))
    with torch.no_grad():
        assert max_diff(model(ids)[0], hf(ids).logits) < 1e-5


GPT2_LIKE = GPTConfig(bias=True)  # every setting beyond the shape at its default: GPT-2's


@pytest.mark.parametrize("overrides", [v for v in MODEL_VARIANTS if any(getattr(GPT2_LIKE, k) != x for k, x in v.items())],
                         ids=variant_id)
def test_export_refuses_what_gpt2_cannot_hold(tmp_path, overrides):
    """Every model variant the tests run that is not GPT-2 (a new setting's included) is refused, naming the setting."""
    model = GPT(tiny_model_config(**overrides))
    field = next(k for k, x in overrides.items() if getattr(GPT2_LIKE, k) != x)
    with pytest.raises(TinyLLMError, match=f"{field}="):
        export_hf(gpt2_checkpoint(model, tokenizer=TOKENIZER), tmp_path / "hf")
    with pytest.raises(TinyLLMError, match=f"{field}="):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_checkpoint_round_trip(hf_folder, tmp_path):
    model = load_gpt2(hf_folder[0])
    path = str(tmp_path / "gpt2.pt")
    save_checkpoint(path, gpt2_checkpoint(model, tokenizer=TOKENIZER))
    checkpoint = load_checkpoint(path)  # weights_only: only tensors and plain data inside
    assert checkpoint["step"] == 0 and checkpoint["model_config"] == dataclasses.asdict(model.config)
    loaded = model_from_checkpoint(checkpoint, path).eval()
    ids = torch.randint(0, VOCAB, (2, CONTEXT))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_checkpoint_names_the_gpt2_tokenizer(tmp_path):
    checkpoint = gpt2_checkpoint(GPT(tiny_model_config(vocab_size=50257, n_embd=16)))
    assert checkpoint["tokenizer"] == {"kind": "gpt2"}
    hf_cfg = export_hf(checkpoint, tmp_path / "hf")
    assert hf_cfg.eos_token_id == hf_cfg.bos_token_id == 50256  # "<|endoftext|>", so HF generate stops there
    with pytest.raises(TinyLLMError, match="50257"):  # GPT-2's tokenizer would emit ids past a small vocab
        gpt2_checkpoint(GPT(tiny_model_config(vocab_size=VOCAB)))


@pytest.mark.parametrize("overrides, words", [
    (dict(activation_function="relu"), ["activation_function", "relu"]),
    (dict(scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx"]),
    (dict(n_inner=64), ["n_inner 64"]),
    (dict(layer_norm_epsilon=1e-6), ["layer_norm_epsilon"]),
])
def test_load_refuses_configs_we_cannot_represent(tmp_path, overrides, words):
    hf_config(**overrides).save_pretrained(tmp_path)  # the config is checked before any weight is read
    with pytest.raises(TinyLLMError) as err:
        load_gpt2(str(tmp_path))
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(TinyLLMError, match="not found"):
        load_gpt2(str(tmp_path / "no-such-folder"))
    with pytest.raises(TinyLLMError, match="could not load the config") as err:
        load_gpt2(str(tmp_path))  # a folder without config.json
    assert "\n" not in str(err.value)
    hf_config().save_pretrained(tmp_path)
    with pytest.raises(TinyLLMError, match="could not load the weights") as err:
        load_gpt2(str(tmp_path))  # config.json but no weights
    assert "\n" not in str(err.value)


def test_importing_it_needs_no_transformers_and_its_cli_errors_are_one_line(tmp_path, capsys):
    from machinery import hf_gpt2
    for name in sorted(os.listdir(ROOT)) + sorted(f"machinery/{n}" for n in os.listdir(f"{ROOT}/machinery")):
        if name.endswith(".py"):  # hf_gpt2.py and every module it could import
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                top = ast.parse(f.read()).body
            imported = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in top if isinstance(n, ast.ImportFrom)}
            assert "transformers" not in imported, name  # imported inside the functions that need it: optional
    torch.manual_seed(4)
    path = str(tmp_path / "tiny.pt")
    save_checkpoint(path, gpt2_checkpoint(GPT(tiny_model_config(vocab_size=VOCAB, norm="rmsnorm")), TOKENIZER))
    code, out, err = cli(capsys, hf_gpt2.main, "export", "--checkpoint", path, "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "norm='rmsnorm'")  # a model GPT-2 cannot hold
    assert not (tmp_path / "hf").exists()


def test_a_hugging_face_folder_whose_weights_carry_code_is_refused_without_unsafe_advice(tmp_path, capsys):
    import train

    from machinery import hf_gpt2
    folder = tmp_path / "evil-gpt2"
    hf_config().save_pretrained(folder)
    marker = tmp_path / "pwned"
    state = transformers.GPT2LMHeadModel(hf_config()).state_dict()
    torch.save({**state, "extra": Payload(str(marker))}, folder / "pytorch_model.bin")
    for main, argv in ((hf_gpt2.main, ["import", folder, "--out", tmp_path / "out.pt"]),
                       (train.main, ["--init_from", folder, "--out_dir", tmp_path / "run", "--device", "cpu"])):
        code, _, err = cli(capsys, main, *argv)
        assert_one_line_error(code, err, "contains objects other than tensors and plain data")
        assert "weights_only" not in err and "trust" not in err  # never the advice to load it unsafely
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_an_import_never_writes_over_an_existing_file(tmp_path, capsys):
    from machinery import hf_gpt2
    folder, out = tmp_path / "hf", tmp_path / "last.pt"
    transformers.GPT2LMHeadModel(hf_config(n_embd=8, vocab_size=50257)).save_pretrained(folder)  # importable
    capsys.readouterr()  # (transformers' progress bar)
    out.write_bytes(b"a trained run")
    code, _, err = cli(capsys, hf_gpt2.main, "import", folder, "--out", out)
    assert_one_line_error(code, err, "already exists")
    assert out.read_bytes() == b"a trained run"
