"""pictures.py: the attention it draws is softmax(q k^T / sqrt(d) + causal mask) recomputed here
from the weights alone, catching it changes nothing and training never pays for it; the
surprise picture's bits per character are --eval_only's; the PNGs open at their sizes; bad
input is one error line; a BPE model works too."""

import dataclasses
import math
import re

import matplotlib.image
import pytest
import torch

from config import SHAPE
from conftest import (ROOT, MODEL_VARIANTS, assert_one_line_error, cli, complex_rope, rope_angles, tiny_model_config,
                      variant_id, write_head)
import model as model_module
from model import GPT

from machinery import records
from tools import pictures
from machinery.checkpoint import load_model

# ----------------------------------------------------------------------------- a GPT written out by hand

def norm(x, sd, name, kind):
    if kind == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * sd[f"{name}.weight"]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd.get(f"{name}.bias", 0)


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd.get(f"{name}.bias", 0)


# the settings' values reference_forward has formulas for; a number's setting names its type (window=int)
REFERENCE_FORMULAS = {"pos": ("learned", "sinusoidal", "rope"), "norm": ("layernorm", "rmsnorm"),
                      "mlp": ("gelu", "swiglu")}


def missing_formula(c):
    """'name=value' of the first model setting reference_forward has no formula for (None: it has them all). A
    setting at its default is GPT-2's own (docs/changing.md), which the function below is: a new setting, off, is
    checked with the rest; on, it needs its formula here."""
    for f in dataclasses.fields(c):
        value, known = getattr(c, f.name), REFERENCE_FORMULAS.get(f.name, ())
        if f.name not in SHAPE and value != f.default and not (
                isinstance(value, known) if isinstance(known, type) else value in known):
            return f"{f.name}={value!r}"
    return None


def reference_mask(c, T):
    """(T, T), or (nh, T, T) for a mask of each head's: added to the scores, -inf above the diagonal (the future). A
    mask variant (a window's cut, ALiBi's biases) is a formula here, and a line of REFERENCE_FORMULAS."""
    return torch.full((T, T), -math.inf).triu(1)


def reference_forward(gpt, idx):
    """(logits (T, V), [attention (nh, T, T) per layer]) for one sequence idx (T,), from the
    state dict alone: none of model.py's code runs."""
    c, sd = gpt.config, {k: v.double() for k, v in gpt.state_dict().items()}
    T, nh, hs = len(idx), c.n_head, c.n_embd // c.n_head
    x = sd["wte.weight"][idx]  # (T, C)
    if c.pos == "learned":
        x = x + sd["wpe.weight"][:T]
    elif c.pos == "sinusoidal":
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freq = 10000.0 ** (-torch.arange(0, c.n_embd, 2, dtype=torch.float64) / c.n_embd)
        x = x + torch.stack((torch.sin(pos * freq), torch.cos(pos * freq)), dim=-1).flatten(-2)  # sin, cos interleaved
    maps = []
    for i in range(c.n_layer):
        h = norm(x, sd, f"blocks.{i}.ln_1", c.norm)
        qkv = linear(h, sd, f"blocks.{i}.attn.c_attn")  # (T, C + 2 * kv): q, then k and v, their widths read off it
        kv = (qkv.size(-1) - c.n_embd) // 2  # C; less where key/value heads are fewer than query heads (GQA, MQA)
        q, k, v = (t.view(T, -1, hs).transpose(0, 1) for t in qkv.split([c.n_embd, kv, kv], dim=-1))  # (heads, T, hs)
        k, v = (t.repeat_interleave(nh // t.size(0), dim=0) for t in (k, v))  # query head j reads key head j // group
        if c.pos == "rope":
            q, k = (complex_rope(t, *rope_angles(T, hs)) for t in (q, k))
        scores = q @ k.transpose(1, 2) / math.sqrt(hs) + reference_mask(c, T)  # (nh, T, T)
        maps.append(torch.softmax(scores, dim=-1))
        y = (maps[-1] @ v).transpose(0, 1).reshape(T, c.n_embd)
        x = x + linear(y, sd, f"blocks.{i}.attn.c_proj")
        h = linear(norm(x, sd, f"blocks.{i}.ln_2", c.norm), sd, f"blocks.{i}.mlp.c_fc")
        if c.mlp == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = gate * torch.sigmoid(gate) * value
        else:
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear(h, sd, f"blocks.{i}.mlp.c_proj")
    return norm(x, sd, "ln_f", c.norm) @ sd["wte.weight"].T, maps


@pytest.mark.parametrize("switches", MODEL_VARIANTS, ids=variant_id)
def test_the_attention_drawn_is_softmax_of_q_k_over_sqrt_d_with_the_future_masked(switches):
    torch.manual_seed(0)
    gpt = GPT(tiny_model_config(block_size=12, n_head=4, **switches)).eval()
    with torch.no_grad():  # norms and biases away from their start (1 and 0), so each of them counts
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(0, 65, (12,))
    logits, maps = pictures.attention_maps(gpt, idx[None])
    assert len(maps) == 2
    for drawn in maps:
        assert drawn.shape == (4, 12, 12)
        assert torch.allclose(drawn.sum(-1), torch.ones(4, 12), atol=1e-6)  # every row is a distribution
        assert (drawn.triu(1) == 0).all()  # the future gets exactly nothing
    if missing := missing_formula(gpt.config):  # a new variant: the checks above hold, the hand-written GPT lacks it
        pytest.skip(f"reference_forward (tests/test_pictures.py) has no formula for {missing}; add it to "
                    f"REFERENCE_FORMULAS and the function (a mask's to reference_mask) to check the drawn maps")
    ref_logits, ref_maps = reference_forward(gpt, idx)
    assert torch.allclose(logits[0].double(), ref_logits, atol=1e-4)  # the hand-written GPT is this GPT
    for drawn, ref in zip(maps, ref_maps):
        assert torch.allclose(drawn.double(), ref, atol=1e-5)


def test_catching_attention_changes_nothing_and_training_keeps_the_fused_kernel(monkeypatch):
    torch.manual_seed(0)
    gpt = GPT(tiny_model_config(pos="rope", mlp="swiglu")).eval()
    idx = torch.randint(0, 65, (1, 16))
    with torch.no_grad():
        plain, _ = gpt(idx)
    caught, maps = pictures.attention_maps(gpt, idx)
    assert torch.allclose(caught, plain, atol=1e-5) and len(maps) == 2  # the formula's forward is the kernel's
    assert all(block.attn.fused for block in gpt.blocks)  # put back
    with torch.no_grad():
        assert torch.equal(gpt(idx)[0], plain)
    for fused in (False, True):  # the formula's path too, where the weights pass attn_dropout: nothing listens now
        for block in gpt.blocks:
            block.attn.fused = fused
        with torch.no_grad():
            gpt(idx)
    assert len(maps) == 2

    fused = []
    real_attend = model_module.fused_attention
    monkeypatch.setattr(model_module, "fused_attention", lambda *a, **k: fused.append(1) or real_attend(*a, **k))
    monkeypatch.setattr(model_module.CausalSelfAttention, "attention_weights",
                        lambda *a, **k: pytest.fail("training built the attention matrix"))
    gpt.train()
    _, loss = gpt(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert len(fused) == 2  # one fused attention per layer


# ----------------------------------------------------------------------------- the script

def png_size(path):
    """(width, height) from the PNG header, and the image must decode."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(path)).ndim == 3
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_picture_opens_at_its_size_and_says_what_to_look_for(trained, tmp_path, capsys):
    code, out, err = cli(capsys, pictures.main, trained[0] / "best.pt", "--out_dir", tmp_path / "docs",
                         "--prompt", "ROMEO: I will", "--passage_chars", 200)
    assert code in (0, None), err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"wrote {tmp_path / 'docs' / n}.png" for n in
                                                      ("attention", "surprise", "temperature", "embeddings")]
    assert all("Look" in line for line in lines)
    assert "200 characters of the val split" in lines[1] and "over 200 tokens" in lines[1]  # --passage_chars
    # the model: 2 layers x 2 heads, so 2.2-inch heatmaps at 90 dpi; plots.new_plot's 7 inches wide
    assert png_size(tmp_path / "docs" / "attention.png") == (450, 468)
    assert png_size(tmp_path / "docs" / "surprise.png")[0] == 810
    assert png_size(tmp_path / "docs" / "temperature.png") == (630, 360)
    assert png_size(tmp_path / "docs" / "embeddings.png") == (630, 450)
    code, out, err = cli(capsys, pictures.main, trained[0] / "best.pt", "--out_dir", tmp_path / "one",
                         "--prompt", "ROMEO: I will", "--only", "attention", "--layer", 1, "--head", 0)
    assert code in (0, None), err
    assert png_size(tmp_path / "one" / "attention.png") == (594, 612)  # one 6-inch heatmap
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["attention.png"]


def test_surprise_scores_the_val_split_as_eval_only_does(trained, tmp_path, capsys):
    path, data = trained[0] / "best.pt", tmp_path / "short.txt"
    write_head(data, 3000)  # the model's own characters; a val split of 300
    code, out, err = cli(capsys, pictures.main, path, "--out_dir", tmp_path, "--only", "surprise",
                         "--data", data, "--passage_chars", 5000)  # more than the whole val split: all of it
    assert code in (0, None), err
    drawn = float(re.search(r"([\d.]+) bits per character over 300 tokens", out).group(1))
    expected = records.evaluate_checkpoint(str(path), str(data), "cpu", 8)
    assert drawn == pytest.approx(expected["bpc"], abs=1e-4)
    printed = float(re.search(r"([\d.]+) bits per character", capsys.readouterr().out).group(1))
    assert f"{drawn:.4f}" == f"{printed:.4f}"

    gpt, tok, _ = load_model(str(path))  # and the losses behind it, position by position, to float precision
    val = torch.tensor(tok.encode(data.read_text()[2700:]))
    losses = records.token_losses(gpt, val)  # one window at a time, where --eval_only took 8
    assert losses.shape == (len(val) - 1,)
    assert losses.mean().item() == pytest.approx(expected["loss"], rel=1e-5)
    chars = pictures.char_surprise(tok, val, losses)
    assert math.isnan(chars[0][1]) and chars[5][1] == pytest.approx(losses[4].item() / math.log(2))


def test_a_bpe_checkpoint_gets_its_pictures_and_a_word_about_embeddings(bpe_trained, tmp_path, capsys):
    code, out, err = cli(capsys, pictures.main, bpe_trained, "--out_dir", tmp_path, "--prompt", "Römeö",
                         "--passage_chars", 5000)
    assert code in (0, None), err
    assert "skipped embeddings.png" in out and "char model" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.png", "surprise.png", "temperature.png"]
    drawn = float(re.search(r"([\d.]+) bits per character over", out).group(1))
    assert drawn == pytest.approx(records.evaluate_checkpoint(str(bpe_trained), None, "cpu", 8)["bpc"], abs=1e-4)


def test_bad_input_is_one_line_error_before_anything_is_drawn(trained, bpe_trained, tmp_path, capsys):
    good = trained[0] / "best.pt"
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        ([good, "--prompt", "e" * 17], "block_size"),
        ([good, "--prompt", "ROMEO", "--layer", 2], "--layer 2"),
        ([good, "--prompt", "ROMEO", "--head", 5], "--head 5"),
        ([good, "--prompt", "ROMEO", "--layer", -3], "--layer"),
        ([foreign], "not a tinyllm checkpoint"),
        ([tmp_path / "missing.pt"], "not found"),
        ([good, "--prompt", "ROMEO", "--out_dir", tmp_path / "a_file"], "--out_dir"),
        ([bpe_trained, "--only", "embeddings"], "char model"),
        ([good, "--only", "attention,colour"], "--only"),
        ([good, "--temperatures", "0.5,hot"], "--temperatures"),
        ([good, "--passage_chars", 0], "--passage_chars"),
        ([good, "--only", "surprise", "--data", tmp_path / "none.txt"], "not found"),
    ]
    for argv, words in cases:
        code, out, err = cli(capsys, pictures.main, *argv, *([] if "--out_dir" in argv else ["--out_dir", tmp_path / "o"]))
        assert_one_line_error(code, err, words)
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_readme_lists_the_pictures_flags():
    from tools import flags
    with open(f"{ROOT}/docs/generation.md", encoding="utf-8") as f:
        assert flags.markdown_flags((pictures.PictureConfig,)) in f.read()
