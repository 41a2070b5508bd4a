"""The tools on a trained tiny model: pictures (the attention drawn is the formula's), compare, the
scaling study (a data-limited run trains on its part only), ablation, decoding; and GPT-2 weights
through Hugging Face."""

import ast
import csv
import json
import math
import os
import re
import shutil
import signal

import pytest
import torch
from conftest import (
    GREEDY,
    ROOT,
    TINY_FLAGS,
    assert_one_line_error,
    cli,
    corpus_head,
    through_the_model,
    tiny_model,
    tiny_run,
    train_run,
)

import finetune
import sampling
import tokenizer as tokenizers
import utils
from machinery import checkpoint
from tokenizer import GPT2_PATTERN, CharTokenizer
from tools import ablation, compare, decoding, pictures, scaling, score
from utils import split_train_val


def opens(*paths):
    import matplotlib.image  # here: its import is slow, and most tests draw nothing

    for path in paths:
        assert matplotlib.image.imread(str(path)).ndim == 3, path


# ----------------------------------------------------------------------------- pictures


def hand_attention(model, x, layer, head):
    """softmax(q k^T / sqrt(hs)) with the future masked, from block `layer`'s weights; x: its
    input (T, C)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p, x = f"blocks.{layer}.", x.double()
    h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = h * sd[p + "ln_1.weight"] + sd[p + "ln_1.bias"]
    qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]  # (T, 3C): q, k, v
    C, T, hs = x.size(-1), x.size(0), x.size(-1) // model.config.n_head
    q = qkv[:, head * hs : (head + 1) * hs]
    k = qkv[:, C + head * hs : C + (head + 1) * hs]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = (q @ k.T / math.sqrt(hs)).masked_fill(future, -math.inf)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 0)])
def test_the_attention_drawn_is_softmax_of_q_k_over_sqrt_hs_with_the_future_masked(
    trained, layer, head
):
    loaded = checkpoint.load_model(trained[0])
    model, tokenizer = loaded.model, loaded.tokenizer
    idx = torch.tensor([tokenizer.encode("ROMEO: I will th")])
    inputs = []
    hook = model.blocks[layer].register_forward_pre_hook(
        lambda module, args: inputs.append(args[0][0])
    )
    maps = pictures.attention_maps(model, idx)
    hook.remove()
    assert len(maps) == 2 and maps[layer].shape == (2, 16, 16)
    expected = hand_attention(model, inputs[0], layer, head)
    assert torch.allclose(maps[layer][head].double(), expected, atol=1e-5)


@pytest.mark.slow  # draws four pictures: seconds
def test_every_picture_opens_says_what_to_look_for_and_surprise_is_the_token_losses(
    trained, tmp_path, capsys
):
    code, out, err = cli(
        capsys,
        pictures.main,
        trained[0],
        "--out_dir",
        tmp_path,
        "--prompt",
        "ROMEO: I will",
        "--passage_chars",
        100,
        "--device",
        "cpu",
    )
    assert code == 0, err
    said = dict(re.match(r"wrote (.*?\.png): (.*)", line).groups() for line in out.splitlines())
    assert sorted(said) == sorted(str(tmp_path / f"{n}.png") for n in pictures.PICTURES)
    opens(*said)
    assert all("Look" in line for line in said.values())
    loaded = checkpoint.load_model(trained[0])
    model, tokenizer = loaded.model, loaded.tokenizer
    with open(trained[1], encoding="utf-8") as f:
        val_text = split_train_val(f.read())[1]
    val = torch.tensor(tokenizer.encode(val_text)[:100])  # the val split's first 100
    surprise = said[str(tmp_path / "surprise.png")]
    drawn = float(re.search(r"([\d.]+) bits per character", surprise).group(1))
    expected = score.token_losses(model, val).mean().item() / math.log(2)
    assert drawn == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow  # draws pictures: seconds
def test_a_bpe_checkpoint_gets_its_pictures_and_a_word_about_embeddings(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(corpus_head(12_000).replace("e", "é"), encoding="utf-8")  # é: two bytes
    run = tiny_run(
        data, tmp_path / "run", tokenizer="bpe", max_steps=4, eval_interval=4, eval_iters=1
    )
    train_run(tiny_model(vocab_size=300), run)
    best = tmp_path / "run" / "best.pt"
    code, out, err = cli(
        capsys,
        pictures.main,
        best,
        "--out_dir",
        tmp_path / "p",
        "--prompt",
        "Roméo",
        "--passage_chars",
        100,
    )
    assert code == 0, err
    assert "skipped embeddings.png" in out and "char model" in out
    drawn = sorted(os.listdir(tmp_path / "p"))
    assert drawn == ["attention.png", "surprise.png", "temperature.png"]
    opens(*(tmp_path / "p").iterdir())
    code, out, err = cli(
        capsys, pictures.main, best, "--out_dir", tmp_path / "e", "--only", "embeddings"
    )
    assert_one_line_error(code, err, "char model")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--only", "attention", "--layer", "2"], "--layer"),
        (["--head", "2"], "--head"),
        (["--only", "attention,bogus"], "--only"),
        (["--prompt", "e" * 17], "--prompt"),
        (["--temperatures", "0,x"], "--temp"),
    ],
)
def test_bad_pictures_input_is_one_error_line_and_nothing_is_drawn(
    trained, tmp_path, capsys, argv, word
):
    code, _, err = cli(
        capsys, pictures.main, trained[0], "--out_dir", tmp_path / "p", "--prompt", "ROMEO", *argv
    )
    assert_one_line_error(code, err, word)
    assert not (tmp_path / "p").exists() or not os.listdir(tmp_path / "p")


# ----------------------------------------------------------------------------- compare


@pytest.mark.slow  # draws
def test_compare_draws_two_runs_histories_in_one_png(trained, tmp_path, capsys, monkeypatch):
    run_dir = os.path.dirname(trained[0])
    os.makedirs(tmp_path / "b")
    shutil.copy(os.path.join(run_dir, "history.csv"), tmp_path / "b")
    with open(tmp_path / "b" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    vals = [float(r["val_loss"]) for r in rows if r["kind"] == "eval"]
    lines, real = {}, compare.save_plot

    def save_and_catch(fig, path, ax):
        lines.update({line.get_label(): list(line.get_ydata()) for line in ax.get_lines()})
        real(fig, path, ax)

    monkeypatch.setattr(compare, "save_plot", save_and_catch)
    code, out, err = cli(
        capsys,
        compare.main,
        run_dir,
        tmp_path / "b",
        "--labels",
        "one,two",
        "--out",
        tmp_path / "c.png",
    )
    assert code == 0, err
    opens(tmp_path / "c.png")
    assert lines[f"two val (best {min(vals):.3f})"] == pytest.approx(vals)
    train_losses = [float(r["loss"]) for r in rows if r["kind"] == "train"]
    assert lines["one train"] == pytest.approx(train_losses)


@pytest.mark.parametrize(
    "case, word", [("out", "--out"), ("labels", "--labels"), ("no history", "history.csv")]
)
def test_bad_compare_input_is_one_error_line(trained, tmp_path, capsys, case, word):
    runs = [os.path.dirname(trained[0])] * 2
    if case == "no history":
        runs[1] = tmp_path
    flags = {"out": ["--out", tmp_path / "c.jpg"], "labels": ["--labels", "one"]}.get(case, [])
    code, _, err = cli(capsys, compare.main, *runs, "--out", tmp_path / "c.png", *flags)
    assert_one_line_error(code, err, word)
    assert not any(name.startswith("c.") for name in os.listdir(tmp_path))


# ----------------------------------------------------------------------------- scaling

TINY = dict(block_size=16, batch_size=4, eval_iters=1, device="cpu", dtype="float32")


@pytest.mark.parametrize("law", [(1.5, 500.0, 0.25), (0.0, 3.0, 0.1)])
def test_fit_power_law_recovers_the_law_its_points_were_made_by(law):
    C = [1e9 * 4**k for k in range(6)]
    fit = scaling.fit_power_law(C, [law[0] + law[1] * c ** -law[2] for c in C])
    assert (fit["l_inf"], fit["a"], fit["alpha"]) == pytest.approx(law, rel=1e-6, abs=1e-9)
    assert fit["rms"] < 1e-9


def test_isoflop_minimum_is_the_parabolas_vertex_or_the_lowest_run():
    params = [1e4, 3e4, 1e5, 3e5, 1e6]
    bowl = [dict(params=p, val=2 + 0.3 * math.log(p / 5e4) ** 2) for p in params]
    assert scaling.isoflop_minimum(bowl) == pytest.approx((5e4, 2.0))
    falling = [dict(params=p, val=3 - math.log(p) / 10) for p in params]  # no vertex: the lowest
    assert scaling.isoflop_minimum(falling) == (1e6, falling[-1]["val"])


@pytest.mark.slow  # draws
def test_a_study_whose_loss_rises_with_compute_is_summarized_without_a_traceback(
    tmp_path, monkeypatch, capsys
):
    rows = []
    for budget, val in ((1e9, 2.0), (2e9, 2.5)):
        for params in (1e4, 3e4, 1e5):
            rows.append(
                dict(
                    kind="iso",
                    budget=budget,
                    flops=budget,
                    params=params,
                    val=val + (params != 3e4) / 10,
                )
            )
    monkeypatch.setattr(scaling, "save_plot", lambda fig, path, *axes: None)  # drawn, not saved
    scaling.summarize(rows, [1e9, 2e9], 1e10, str(tmp_path / "s.png"))
    assert "no power law fits" in capsys.readouterr().out


def test_a_data_limited_run_trains_on_the_first_part_of_the_training_split(
    text_file, tmp_path, monkeypatch
):
    handed, real = [], utils.get_batch

    def get_batch(data, *args, **kwargs):
        handed.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(utils, "get_batch", get_batch)
    scaling.run((1, 16, 2), 3, str(tmp_path / "run"), text_file, data_fraction=0.25, **TINY)
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = (torch.tensor(tokenizer.encode(part)) for part in split_train_val(text))
    trained_on = [d for d in handed if not torch.equal(torch.as_tensor(d), val_ids)]
    assert len(trained_on) >= 3 and len(handed) > len(trained_on)  # every step, and evaluations
    for data in trained_on:
        assert torch.equal(torch.as_tensor(data), train_ids[: int(len(train_ids) * 0.25)])


@pytest.mark.slow  # trains or loads for seconds
def test_a_tiny_scaling_study_writes_its_json_and_png_and_reuse_keeps_its_runs(
    tmp_path, monkeypatch, capsys
):
    """The probe (each size's step time) is given in the JSON: the plan does not depend on this
    machine's speed."""
    data, out = tmp_path / "data.txt", tmp_path / "scaling.json"
    data.write_text(corpus_head(4000), encoding="utf-8")
    monkeypatch.setattr(scaling, "SHAPES", [(1, 8, 2), (1, 16, 2)])
    monkeypatch.setattr(scaling, "DATA_FRACTIONS", [0.5])
    calls, real = [], scaling.run

    def run(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, **TINY})

    monkeypatch.setattr(scaling, "run", run)
    probe = {"seconds": [1, 1], "flops": [1, 1], "budgets": [10, 20], "dtype": "float32"}
    out.write_text(json.dumps({"probe": probe, "runs": []}))  # budgets of 10 and 20 steps
    argv = ["--reuse", "--data", data, "--out", out, "--out_png", tmp_path / "s.png"]
    code, printed, err = cli(capsys, scaling.main, *argv)
    assert code == 0, err
    opens(tmp_path / "s.png")
    saved = json.loads(out.read_text())
    assert saved["probe"] == probe and len(saved["runs"]) == len(calls) == 2 * 2 + 1
    assert [r["steps"] for r in saved["runs"] if r["kind"] == "iso"] == [10, 10, 20, 20]
    assert calls[-1]["data_fraction"] == 0.5 and "fit: L(C) =" in printed
    out.write_text(json.dumps({**saved, "runs": saved["runs"][:-1]}))  # stopped before the last
    calls.clear()
    monkeypatch.setattr(scaling, "summarize", lambda *args: None)  # drawn above
    code, printed, err = cli(capsys, scaling.main, *argv)
    assert code == 0 and len(calls) == 1, err
    again = json.loads(out.read_text())["runs"]
    assert again[:-1] == saved["runs"][:-1] and again[-1]["key"] == saved["runs"][-1]["key"]


# ----------------------------------------------------------------------------- ablation, decoding


@pytest.mark.slow  # draws
def test_ablation_prints_a_row_per_variant_and_draws_them(text_file, tmp_path, capsys):
    code, out, err = cli(
        capsys,
        ablation.main,
        "--only",
        "vanilla,rope",
        *TINY_FLAGS,
        "--data",
        text_file,
        "--max_steps",
        4,
        "--eval_interval",
        2,
        "--warmup_steps",
        1,
        "--out",
        tmp_path / "a.png",
    )
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    params = {row[0]: int(row[1].replace(",", "")) for row in cells[1:]}
    assert sorted(params) == ["rope", "vanilla"]
    # the learned position table: the switches reached the model
    assert params["vanilla"] - params["rope"] == 16 * 32
    opens(tmp_path / "a.png")


def test_an_unknown_ablation_variant_is_one_error_line(tmp_path, capsys):
    code, _, err = cli(
        capsys, ablation.main, "--only", "vanilla,bogus", "--out", tmp_path / "a.png"
    )
    assert_one_line_error(code, err, "bogus")


def test_ctrl_c_during_a_runs_last_evaluation_stops_the_ablation(
    text_file, tmp_path, capsys, monkeypatch
):
    def ctrl_c_in_the_last_evaluation(call, out):  # the first variant's: its 2nd, eval_iters 2
        if call == 4:
            signal.raise_signal(signal.SIGINT)
        return out

    through_the_model(monkeypatch, evaluation=ctrl_c_in_the_last_evaluation)
    code, out, _ = cli(
        capsys,
        ablation.main,
        "--only",
        "vanilla,rope",
        *TINY_FLAGS,
        "--data",
        text_file,
        "--max_steps",
        2,
        "--eval_interval",
        2,
        "--warmup_steps",
        1,
        "--out",
        tmp_path / "a.png",
    )
    assert code == 130 and "--- rope" not in out


def test_decoding_prints_a_row_per_method(trained, capsys):
    code, out, err = cli(
        capsys,
        decoding.main,
        trained[0],
        "--prompt",
        "ROMEO:",
        "--new_tokens",
        24,
        "--beams",
        2,
        "--temperatures",
        "0.8,1.2",
        "--seeds",
        2,
    )
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    methods = ["greedy", "beam 2", "sampling, T = 0.8", "sampling, T = 1.2"]
    assert [r[0] for r in rows[1:]] == methods
    assert all(float(r[1]) < 0 and 0 <= float(r[2].rstrip("%")) <= 100 for r in rows[1:])


@pytest.mark.parametrize(
    "text, low, high",
    [
        ("to be or not to be that is the question", 0, 0),
        ("la di da " * 30, 0.95, 1),
        ("two words", 0, 0),
    ],
)
def test_repeated_ngrams_is_0_for_new_text_and_near_1_for_a_loop(text, low, high):
    assert low <= decoding.repeated_ngrams(text) <= high


@pytest.mark.parametrize(
    "flag, value",
    [("--beams", "x"), ("--beams", "0"), ("--temperatures", "hot"), ("--temperatures", "-1")],
)
def test_bad_decoding_input_is_one_error_line(trained, capsys, flag, value):
    code, _, err = cli(capsys, decoding.main, trained[0], flag, value)
    assert_one_line_error(code, err, flag)


# ----------------------------------------------------------------------------- GPT-2, Hugging Face

# on the worker that runs test_export.py (xdist_group): transformers is imported once
TRANSFORMERS = pytest.mark.xdist_group("transformers")


def hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    settings = dict(
        n_layer=2,
        n_head=2,
        n_embd=16,
        n_positions=16,
        vocab_size=50257,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.3,
    )
    return transformers.GPT2Config(**{**settings, **overrides})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random GPT2LMHeadModel as save_pretrained writes it (GPT-2's vocabulary), its
    biases and gains moved."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p) * (p.dim() == 1))
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.slow  # trains or loads for seconds
@TRANSFORMERS
def test_a_hugging_face_gpt2_loads_with_its_logits_and_greedy_continuation(hf_folder):
    folder, hf = hf_folder
    model = checkpoint.load_gpt2(str(folder))
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    theirs = ids[:, :4]
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() < 1e-4
        for _ in range(12):  # Hugging Face's model, greedy
            next_id = hf(theirs).logits[:, -1].argmax(-1, keepdim=True)
            theirs = torch.cat((theirs, next_id), dim=1)
    assert len(theirs[:, 4:].unique()) > 4  # varied text: a wrong position would show
    assert torch.equal(sampling.generate(model, ids[:, :4], 12, GREEDY), theirs)


@pytest.mark.slow  # imports transformers: seconds
@TRANSFORMERS
@pytest.mark.parametrize(
    "change, word",
    [
        (dict(activation_function="relu"), "activation_function"),
        ("bert", "model_type"),
        (dict(n_inner=48), "n_inner"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ],
)
def test_a_config_our_model_cannot_be_is_refused_naming_the_setting(tmp_path, capsys, change, word):
    if change == "bert":
        config = pytest.importorskip("transformers").BertConfig()
    else:
        config = hf_config(**change)
    config.save_pretrained(tmp_path / "hf")  # the config is checked before any weight is read
    code, _, err = cli(
        capsys, finetune.main, "--init_from", tmp_path / "hf", "--out_dir", tmp_path / "run"
    )
    assert_one_line_error(code, err, word)


class Payload:
    """Unpickling it runs code: open(target, "w") creates the file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


@pytest.mark.slow  # imports transformers: seconds
@TRANSFORMERS
def test_weights_that_carry_code_are_refused_without_running_it(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = hf_config(n_layer=1, vocab_size=64, bos_token_id=0, eos_token_id=0)
    folder, marker = tmp_path / "evil", tmp_path / "ran"
    config.save_pretrained(folder)
    weights = {**transformers.GPT2LMHeadModel(config).state_dict(), "x": Payload(str(marker))}
    torch.save(weights, folder / "pytorch_model.bin")
    argv = ["--init_from", folder, "--out_dir", tmp_path / "run", "--device", "cpu"]
    code, _, err = cli(capsys, finetune.main, *argv)
    assert_one_line_error(code, err, "tensors")
    assert not marker.exists()


@pytest.mark.slow  # imports transformers: seconds
@TRANSFORMERS
def test_train_init_from_the_folder_fine_tunes_it(
    hf_folder, text_file, tmp_path, capsys, monkeypatch
):
    # GPT-2's own tokenizer files are downloaded: offline, a byte-level one of its size stands in
    import tiktoken

    real = tiktoken.get_encoding
    offline = tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_PATTERN,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={"<|endoftext|>": 50256},
    )

    def get_encoding(name):
        return offline if name == "gpt2" else real(name)

    monkeypatch.setattr(tokenizers.tiktoken, "get_encoding", get_encoding)
    code, out, err = cli(
        capsys,
        finetune.main,
        "--init_from",
        hf_folder[0],
        "--data",
        text_file,
        "--out_dir",
        tmp_path / "run",
        "--max_steps",
        3,
        "--eval_interval",
        3,
        "--eval_iters",
        1,
        "--batch_size",
        4,
        "--warmup_steps",
        1,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sample_tokens",
        0,
        "--plots",
        "false",
    )
    assert code == 0 and "done: 3 steps" in out, err
    saved = checkpoint.load(str(tmp_path / "run" / "last.pt"))
    assert saved["tokenizer"]["kind"] == "gpt2" and saved["model_config"]["n_embd"] == 16
    moved = (saved["model"]["wpe.weight"] - hf_folder[1].transformer.wpe.weight).abs().max()
    assert 0 < moved < 0.05  # from GPT-2's weights, a few steps on


@pytest.mark.parametrize("path", ["tools/export.py", "machinery/checkpoint.py"])
def test_hugging_face_code_imports_transformers_only_inside_its_functions(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def imported(nodes):
        names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module for n in nodes if isinstance(n, ast.ImportFrom)}

    assert "transformers" not in imported(tree.body) and "transformers" in imported(ast.walk(tree))
