"""tools.export: each kind of model the project trains, as a Hugging Face folder that transformers
loads with no code of ours, gives the same logits, greedy text and chat prompt."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, assert_one_line_error, cli, corpus_head, untrained

import distill
import dpo
import finetune
import generate
import train
from config import GPTConfig
from machinery import checkpoint, sources
from tools import export
from utils import question

# every test loads transformers: seconds; they run on one worker (xdist_group), with test_tools.py's
# tests of Hugging Face's GPT-2: runs is trained and transformers imported once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("transformers")]
LLAMA = ["--norm", "rmsnorm", "--mlp", "swiglu", "--pos", "rope"]
KINDS = {  # the train.py flags of each kind of model
    "llama": LLAMA,
    "vanilla": ["--norm", "layernorm", "--mlp", "gelu", "--pos", "learned"],
    "bpe": [*LLAMA, "--tokenizer", "bpe", "--vocab_size", "300"],
    "biases everywhere": ["--norm", "layernorm", "--mlp", "swiglu", "--pos", "rope", "--bias", "1"],
}
# every preset a machine trains without --preset (settings.machine_preset), at a test's size
DEFAULTS = ["mini", "small", "tiny"]
KINDS |= {f"preset {p}": ["--preset", p] for p in DEFAULTS}  # TINY_FLAGS' shape
PROMPT = "ROMEO:\nWhat"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kind: a trained checkpoint}: each kind for a few steps, and a LoRA adapter of the first."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "text.txt").write_text(corpus_head(20_000), encoding="utf-8")
    # the schedule named: the LoRA run (no warmup in 8 steps) merged to logits 1.1e-5 apart under
    # another one, as an engineer measured
    flags = [*TINY_FLAGS, "--block_size", 64, "--max_steps", 8, "--eval_interval", 8]
    flags += ["--lr_schedule", "cosine"]
    paths = {}
    for kind, more in KINDS.items():
        data = [] if "--data" in more else ["--data", folder / "text.txt"]
        argv = [*flags, *data, *more, "--out_dir", folder / kind]
        assert train.main([str(a) for a in argv]) is None
        paths[kind] = str(folder / kind / "best.pt")
    # the later chapters: a chat model, a LoRA adapter, a student of a teacher, DPO
    chats = os.path.join(ROOT, "data", "chat_example.jsonl")
    shape = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=64, norm="rmsnorm", mlp="swiglu")
    start = untrained(folder / "start.pt", chats, dataclasses.replace(shape, pos="rope"))
    chat = ["--data", chats, "--init_from", start, "--out_dir", folder / "chat"]
    finetune.main([str(a) for a in [*flags, *chat]])
    paths["chat"] = str(folder / "chat" / "best.pt")
    lora = ["--init_from", paths["llama"], "--lora_rank", 4, "--out_dir", folder / "lora"]
    finetune.main([str(a) for a in [*flags, "--data", folder / "text.txt", *lora, "--lr", 0.05]])
    student = ["--data", folder / "text.txt", *LLAMA, "--distill_from", paths["llama"]]
    pair = {"prompt": "Who are you?", "chosen": "A friend, sir.", "rejected": "nobody lol"}
    (folder / "pairs.jsonl").write_text(f"{json.dumps(pair)}\n" * 4, encoding="utf-8")
    tuned = ["--data", folder / "pairs.jsonl", "--init_from", paths["chat"]]
    for kind, script, more in (("distilled", distill, student), ("dpo", dpo, tuned)):
        script.main([str(a) for a in [*flags, *more, "--out_dir", folder / kind]])
        paths[kind] = str(folder / kind / "last.pt")
    return paths | {"merged lora": str(folder / "lora" / "last.pt")}


@pytest.mark.parametrize(
    "kind",
    ["llama", "vanilla", "bpe", "chat", "merged lora", "distilled", "dpo"]
    + [f"preset {p}" for p in DEFAULTS],
)
def test_transformers_loads_the_same_model_its_logits_and_greedy_text(runs, tmp_path, capsys, kind):
    import transformers

    code, out, err = cli(capsys, export.main, runs[kind], tmp_path / "hf")
    assert code == 0 and {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(
        os.listdir(tmp_path / "hf")
    ), err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(runs[kind])
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(PROMPT)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours.model(ids)[0], atol=1e-5, rtol=1e-5)
    greedy = model.generate(ids, max_new_tokens=50, do_sample=False)
    argv = ["--temperature", 0, "--prompt", PROMPT, "--max_new_tokens", 50, "--device", "cpu"]
    code, out, _ = cli(capsys, generate.main, runs[kind], *argv)
    assert code == 0 and tokenizer.decode(greedy[0], skip_special_tokens=True) == out[:-1]


def test_a_chat_models_template_gives_the_prompt_chat_py_gives(runs, tmp_path, capsys):
    import transformers

    assert cli(capsys, export.main, runs["chat"], tmp_path / "hf")[0] == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    turns = [("user", " Who are you? "), ("assistant", "A player."), ("user", "And then?")]
    messages = [{"role": role, "content": content} for role, content in turns]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a dict in transformers 5
    ours = checkpoint.load_model(runs["chat"]).tokenizer
    chat = [ours.eot_id] + sources.encode_prompt(ours, question(turns[0][1]))
    chat += ours.encode(turns[1][1]) + [ours.eot_id]  # the model's answer, then its end
    assert list(ids) == chat + sources.encode_prompt(ours, question(turns[2][1]))


def test_the_model_card_says_what_the_model_is_in_the_hubs_format(runs, tmp_path, capsys):
    assert cli(capsys, export.main, runs["llama"], tmp_path / "hf")[0] == 0
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    saved = checkpoint.load(runs["llama"])
    meta = card.split("---\n")[1]
    assert "library_name: transformers" in meta and "pipeline_tag: text-generation" in meta
    assert f"value: {saved['best_val_loss']:.4f}" in meta and "from_pretrained" in card
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    eot = checkpoint.load_model(runs["llama"]).tokenizer.eot_id
    assert config["model_type"] == "llama" and config["eos_token_id"] == eot


@pytest.mark.parametrize(
    "case, word",
    [
        ("biases everywhere", "--bias"),
        ("variant", "--pos"),
        ("exists", "--overwrite"),
        ("not a checkpoint", "checkpoint"),
    ],
)
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(runs, tmp_path, capsys, case, word):
    path, folder = runs.get(case, runs["llama"]), tmp_path / "hf"
    if case == "variant":  # Llama's, but for its positions: no architecture transformers has
        saved = checkpoint.load(path)
        saved["model_config"]["pos"] = "sinusoidal"  # a fixed table: no weights to change
        checkpoint.save(str(tmp_path / "sinusoids.pt"), saved)
        path = str(tmp_path / "sinusoids.pt")
    if case == "exists":
        folder.mkdir()
    if case == "not a checkpoint":
        path = str(tmp_path / "notes.txt")
        (tmp_path / "notes.txt").write_text("hello")
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli(capsys, export.main, path, folder)
    assert_one_line_error(code, err, word)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing half-written
