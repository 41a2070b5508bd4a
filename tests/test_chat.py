"""Conversations: the chat template, the loss on the answers, the chat in a terminal, LoRA."""

import json
import os
import pty
import re
import select
import signal
import sys
import time
import traceback

import pytest
import torch
from conftest import (
    assert_one_line_error,
    cli,
    interrupt_at,
    tiny_model,
    tiny_run,
    train_run,
    untrained,
    without_timings,
)

import chat
import finetune
import generate
import lora
import tools.merge
import tools.score
import train
import utils
from config import ASSISTANT, EOT, USER, TrainConfig
from machinery import checkpoint, sources
from machinery import cli as machinery_cli
from model import GPT, lm_loss
from utils import get_batch

ADA = [("My name is Ada.", "Nice to meet you, Ada."), ("What is my name?", "Your name is Ada.")]
TOM = [("My name is Tom.", "Nice to meet you, Tom."), ("What is my name?", "Your name is Tom.")]
CONVERSATIONS = [ADA, TOM, [("Hello!", "Hello. What shall we talk about?")]] * 20


def write_chats(path, conversations=CONVERSATIONS):
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations:
            messages = []
            for question, answer in conversation:
                messages.append({"role": "user", "content": question})
                messages.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


# ------------------------------------------------------------------------- conversations as data


def test_conversations_and_qa_records_become_the_chat_template(tmp_path):
    chats = write_chats(tmp_path / "c.jsonl", [CONVERSATIONS[0], CONVERSATIONS[2]])
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "Who?", "answer": "Me."}]), encoding="utf-8")
    assert "".join(sources.iter_documents(chats)) == (
        f"{EOT}{USER}My name is Ada.\n{ASSISTANT}Nice to meet you, Ada.{EOT}"
        f"{USER}What is my name?\n{ASSISTANT}Your name is Ada.{EOT}"
        f"{USER}Hello!\n{ASSISTANT}Hello. What shall we talk about?{EOT}"
    )
    assert "".join(sources.iter_documents(str(qa))) == f"{EOT}{USER}Who?\n{ASSISTANT}Me.{EOT}"


@pytest.mark.parametrize(
    "record, word",
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "end"),
        ({"messages": "hi"}, "list"),
        ({"question": "no answer"}, "content"),
    ],
)
def test_a_bad_record_is_one_error_line_naming_it_before_training(tmp_path, capsys, record, word):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "fine"}), json.dumps(record)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli(
        capsys, train.main, "--data", path, "--out_dir", tmp_path / "run", "--device", "cpu"
    )
    assert_one_line_error(code, err, "line 2", word)
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_every_tokenizer_gets_the_role_tokens_as_single_tokens(tmp_path, kind):
    cfg = TrainConfig(data=write_chats(tmp_path / "c.jsonl"), tokenizer=kind)
    tokenizer = sources.read_corpus(cfg, vocab_size=300).tokenizer
    for token in (EOT, USER, ASSISTANT):
        assert tokenizer.encode(token) == [tokenizer.special_tokens[token]]
    text = f"{USER}hi\n{ASSISTANT}yo{EOT}"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_loss_counts_the_answers_and_their_end_only(tmp_path):
    cfg = TrainConfig(data=write_chats(tmp_path / "c.jsonl", [CONVERSATIONS[0], CONVERSATIONS[2]]))
    corpus = sources.read_corpus(cfg)
    tokenizer, ids = corpus.tokenizer, torch.cat([corpus.train, corpus.val])
    targets = utils.answer_targets(ids, tokenizer)
    answers = tokenizer.decode([t for t, keep in zip(ids.tolist(), targets.tolist()) if keep])
    assert answers == (
        f"Nice to meet you, Ada.{EOT}Your name is Ada.{EOT}Hello. What shall we talk about?{EOT}"
    )
    assert sources.read_corpus(TrainConfig(data=cfg.data, loss_on="all")).train_targets is None
    plain = ids[ids != tokenizer.special_tokens[ASSISTANT]]  # no answer in it: all of it counts
    assert utils.answer_targets(plain, tokenizer) is None


def test_a_masked_position_takes_no_gradient():
    torch.manual_seed(0)
    model = GPT(tiny_model())
    x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
    logits = model(x)[0].detach().requires_grad_()
    y[:, :8] = -100  # what get_batch makes of the questions' positions
    lm_loss(logits, y).backward()
    assert logits.grad[:, :8].abs().sum() == 0 and logits.grad[:, 8:].abs().sum() > 0
    full = lm_loss(logits.detach()[:, 8:], y[:, 8:])
    assert lm_loss(logits.detach(), y) == pytest.approx(full.item())  # the answers' mean alone
    logits.grad = None
    lm_loss(logits, torch.full_like(y, -100)).backward()  # a batch of questions alone
    assert lm_loss(logits, torch.full_like(y, -100)).item() == 0 and logits.grad.abs().sum() == 0
    data, keep = torch.arange(40), torch.arange(40) % 2 == 0
    torch.manual_seed(1)
    bx, by = get_batch(data, 4, 8, torch.device("cpu"), targets=keep)
    assert ((by == -100) == (bx % 2 == 0)).all()  # y is x + 1: kept where y is even


# ----------------------------------------------------------------------------- a chat model


# its tests run on one worker (xdist_group): it is trained once
CHAT_MODEL = pytest.mark.xdist_group("chat_model")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model trained from scratch by train.py on the conversations until it answers them
    (no --init_from): its best.pt."""
    folder = tmp_path_factory.mktemp("chat")
    cfg = tiny_run(
        write_chats(folder / "c.jsonl"),
        folder / "run",
        max_steps=200,
        lr=1e-2,
        eval_interval=200,
        warmup_steps=10,
        batch_size=16,
        weight_decay=0.0,
    )
    train_run(tiny_model(block_size=64, n_embd=48), cfg)  # train.py's, from scratch
    return str(folder / "run" / "best.pt")


@pytest.mark.slow  # trains or loads for seconds
@CHAT_MODEL
def test_qa_asks_a_question_as_the_chat_template_does(chat_model, tmp_path, capsys):
    code, out, _ = cli(
        capsys,
        generate.main,
        chat_model,
        "--qa",
        "--prompt",
        "Hello!",
        "--temperature",
        "0",
        "--max_new_tokens",
        "60",
    )
    answer = "Hello. What shall we talk about?"
    assert code == 0 and out.endswith(f"<|assistant|>{answer}\n"), out  # stopped at its end


def read_until(fd, marker, timeout=30):
    text, end = b"", time.time() + timeout
    while marker.encode() not in text and time.time() < end:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                text += os.read(fd, 4096)
            except OSError:
                break
    return text.decode()


@pytest.mark.slow
@CHAT_MODEL
@pytest.mark.skipif(not hasattr(os, "fork"), reason="a pseudo-terminal needs a Unix")
def test_a_chat_in_a_terminal_keeps_the_conversation(chat_model):
    """Typed at a real terminal: the same question gets the answer each conversation's first turn
    asks for. chat.py's command line runs in a process forked from this one, which has imported
    torch (no start-up to pay), at the other end of a pseudo-terminal, its controlling terminal."""
    argv = [chat_model, "--temperature", "0", "--max_new_tokens", "40"]
    pid, master = pty.fork()
    if pid == 0:  # the terminal's own process: stdin, stdout and stderr
        code = 99
        try:
            torch.set_num_threads(1)  # OpenMP's threads are the parent's: using them would hang
            sys.stdin = open(0, encoding="utf-8", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            machinery_cli.run_cli(chat.main, argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    status = None
    try:
        said = [read_until(master, "you> ")]
        typed = (
            "My name is Tom.",
            "What is my name?",
            "/reset",
            "My name is Ada.",
            "What is my name?",
            "/quit",
        )
        for line in typed:
            os.write(master, line.encode() + b"\n")
            said.append(read_until(master, "you> ") if line != "/quit" else "")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # it ends at /quit
            done, waited = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(waited)
                break
            time.sleep(0.05)
        assert status == 0, said
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)
    assert "Your name is Tom." in said[2] and "Your name is Ada." in said[5], said


@pytest.mark.slow  # trains or loads for seconds
@CHAT_MODEL
def test_the_chat_carries_its_cache_over_and_ctrl_c_stops_only_the_answer(
    chat_model, monkeypatch, capsys
):
    typed = iter(["My name is Ada.", "What is my name?", "Hello!", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    fed, real_logits = [], chat.Context.next_logits

    def counting(context, idx):  # the tokens each call hands the model
        cached = context.cache.pos if context.cache else 0
        fed.append(idx.size(1) - (context.start or 0) - cached)
        return real_logits(context, idx)

    real_tokens, calls = chat.token_stream, []

    def ctrl_c_in_the_third_answer(*args, **kwargs):
        calls.append(0)
        for step in real_tokens(*args, **kwargs):
            calls[-1] += 1
            if len(calls) == 3 and calls[-1] == 3:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(chat.Context, "next_logits", counting)
    monkeypatch.setattr(chat, "token_stream", ctrl_c_in_the_third_answer)
    chat.main([chat_model, "--temperature", "0", "--max_new_tokens", "40"])
    out = capsys.readouterr().out
    assert "Your name is Ada." in out and "[stopped]" in out and out.count("model> ") == 3
    assert max(fed[1:]) <= 25  # a turn hands the model its new tokens, not the conversation again


@pytest.mark.slow  # trains or answers for a second
def test_a_chat_answers_in_as_many_tokens_as_its_help_says(tmp_path, monkeypatch, capsys):
    data = write_chats(tmp_path / "c.jsonl")
    path = untrained(tmp_path / "m.pt", data, tiny_model())
    saved = checkpoint.load(path)
    saved["model"]["wte.weight"].zero_()  # every logit 0: greedy takes token 0, never EOT
    checkpoint.save(path, saved)
    helped = cli(capsys, chat.main, "--help")[1]
    default = int(
        re.search(r"--max_new_tokens MAX_NEW_TOKENS\s+[^(]*\(default: (\d+)", helped).group(1)
    )

    def answered(*flags):
        typed = iter(["Hello", "/quit"])
        monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
        code, out, err = cli(capsys, chat.main, path, "--temperature", "0", *flags)
        assert code == 0, err
        return out.split("model> ")[1]

    assert answered() == answered("--max_new_tokens", default)
    assert answered() != answered("--max_new_tokens", default + 1)


# ----------------------------------------------------------------------------- LoRA


def test_lora_trains_rank_r_matrices_and_starts_as_the_base():
    torch.manual_seed(0)
    base = GPT(tiny_model())
    x = torch.randint(0, 65, (2, 16))
    before = base(x)[0]
    model = lora.add_adapters(base, rank=4, alpha=8, mlp=True)
    C, L = 32, 2
    per_block = 4 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # r (in + out) a layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * per_block
    assert torch.equal(model(x)[0], before)  # B starts at 0


def lora_adapter(trained, tmp_path, capsys):
    """A LoRA adapter of rank 4 and alpha 8, trained 1 step on conversations: (its last.pt, the
    flags that trained it but --init_from's and LoRA's)."""
    data = write_chats(tmp_path / "c.jsonl")
    common = ["--data", data, "--max_steps", "1", "--device", "cpu", "--dtype", "float32"]
    common += ["--sample_tokens", "0", "--eval_iters", "1", "--plots", "false"]
    first = ["--init_from", trained[0], "--lora_rank", "4", "--lora_alpha", "8"]
    assert cli(capsys, finetune.main, *common, *first, "--out_dir", tmp_path / "a")[0] == 0
    return str(tmp_path / "a" / "last.pt"), common


@pytest.mark.slow  # trains or answers for a second
def test_lora_flags_that_contradict_the_adapter_it_continues_are_one_error_line(
    trained, tmp_path, capsys
):
    adapter, common = lora_adapter(trained, tmp_path, capsys)
    for flags in (["--lora_rank", "16"], ["--lora_rank", "4", "--lora_alpha", "32"]):
        refused = ["--init_from", adapter, *flags, "--out_dir", tmp_path / "c"]
        code, _, err = cli(capsys, finetune.main, *common, *refused)
        assert_one_line_error(code, err, f"--{flags[-2][2:]} {flags[-1]}")
        assert not os.path.exists(tmp_path / "c")
    again = ["--init_from", adapter, "--lora_rank", "4", "--out_dir", tmp_path / "b"]
    assert cli(capsys, finetune.main, *common, *again)[0] == 0
    saved = checkpoint.load(str(tmp_path / "b" / "last.pt"))
    settings = saved["train_config"]
    assert (settings["lora_rank"], settings["lora_alpha"]) == (4, 8) == (saved["lora"]["rank"], 8)


@pytest.mark.slow  # trains or answers for a second
def test_a_merged_adapter_keeps_its_runs_record_and_scores_its_own_val_split(
    trained, tmp_path, capsys
):
    adapter, _ = lora_adapter(trained, tmp_path, capsys)
    merged = tmp_path / "merged.pt"
    assert cli(capsys, tools.merge.main, adapter, "--out", merged)[0] == 0
    scores = [cli(capsys, tools.score.main, path, "--device", "cpu") for path in (adapter, merged)]
    assert [code for code, _, _ in scores] == [0, 0]
    lines = [out.splitlines()[-2:] for _, out, _ in scores]
    assert lines[0][0].replace(adapter, str(merged)) == lines[1][0]  # the same split: c.jsonl's
    assert "c.jsonl" in lines[1][0] and lines[0][1] == lines[1][1]  # the same loss


@pytest.mark.slow  # trains or loads for seconds
def test_a_lora_run_saves_kilobytes_leaves_the_base_alone_merges_and_resumes(
    trained, tmp_path, monkeypatch, capsys
):
    base_path = trained[0]
    base = checkpoint.load(base_path)
    common = [
        "--init_from",
        base_path,
        "--data",
        write_chats(tmp_path / "c.jsonl"),
        "--lora_rank",
        "4",
        "--max_steps",
        "20",
        "--eval_interval",
        "10",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--sample_tokens",
        "0",
        "--eval_iters",
        "2",
        "--plots",
        "false",
        "--lr",
        "1e-2",
        "--dropout",  # a resume draws the dropout masks the straight run drew
        "0.1",
    ]
    assert cli(capsys, finetune.main, *common, "--out_dir", tmp_path / "full")[0] == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 15, signal.SIGTERM)
        assert cli(capsys, finetune.main, *common, "--out_dir", tmp_path / "cut")[0] == 143
    resume = [*common[2:], "--resume", "--out_dir", tmp_path / "cut"]
    code, out, _ = cli(capsys, finetune.main, *resume)
    assert code == 0 and " trained: " in out  # the header: only the adapter trains
    full, cut = (checkpoint.load(str(tmp_path / d / "last.pt")) for d in ("full", "cut"))
    for name, weights in full["model"].items():  # the resume was exact
        assert torch.equal(weights, cut["model"][name])
    assert without_timings(full["history"]) == without_timings(cut["history"])
    assert os.path.getsize(tmp_path / "full" / "last.pt") < os.path.getsize(base_path) / 5
    for name, weights in checkpoint.load(base_path)["model"].items():
        assert torch.equal(base["model"][name], weights)
    adapted = checkpoint.model_of(full).eval()  # the base, and the adapter beside it
    for name, weights in adapted.state_dict().items():
        if ".lora_" not in name and "wte" not in name and "lm_head" not in name:  # frozen
            assert torch.equal(weights, base["model"][name.replace(".base", "")])
    last = str(tmp_path / "full" / "last.pt")
    assert cli(capsys, tools.merge.main, last, "--out", tmp_path / "m.pt")[0] == 0
    merged = checkpoint.load_model(str(tmp_path / "m.pt")).model
    x = torch.tensor([[0, 5, 9, 3] * 4])
    assert torch.allclose(merged(x)[0], adapted(x)[0], atol=1e-5)
    code, out, _ = cli(capsys, generate.main, last, "--max_new_tokens", "10")
    assert code == 0 and out.strip()
