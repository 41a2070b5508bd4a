"""dpo.py: a policy tuned on preference pairs against its frozen reference; its loss, its pairs,
its run and resume, the in-character measure before and after, bad input."""

import dataclasses
import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    assert_one_line_error,
    cli,
    interrupt_at,
    same_weights,
    through_the_stage,
    tiny_model,
    tiny_run,
    train_run,
    untrained,
    without_timings,
)

import dpo
import train
from config import ASSISTANT, SPECIAL_TOKENS, RunOptions
from dpo import Preferring, answer_logps, in_character, in_character_shares, pair_batch, pair_split
from machinery import checkpoint, sources
from model import GPT
from tokenizer import CharTokenizer

PAIRS = os.path.join(ROOT, "data", "preferences.jsonl")


def test_a_preference_loss_counts_the_answers_tokens_alone():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 6, 9), torch.randint(0, 9, (4, 6))
    targets[:, :3] = -100  # the prompt: context only
    changed = logits.clone()
    changed[:, :3] += torch.randn(4, 3, 9)  # the logits where the prompt is predicted
    assert torch.equal(answer_logps(logits, targets), answer_logps(changed, targets))
    policy, reference = GPT(tiny_model()), GPT(tiny_model())
    model = Preferring(policy, reference, beta=0.1)
    x = torch.randint(0, 65, (4, 16))
    y = x.roll(-1, 1).masked_fill(torch.arange(16) < 8, -100)  # 2 pairs, answers after 8 tokens
    logits, loss = model(x, y)
    assert torch.equal(logits, policy(x)[0])  # a step's figure of the logits sees the policy's
    margins = model.margins(logits, x, y)
    gains = answer_logps(policy(x)[0], y) - answer_logps(reference(x)[0], y)
    assert torch.allclose(margins, gains[:2] - gains[2:])
    assert loss.item() == pytest.approx(-F.logsigmoid(0.1 * margins).mean().item())
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())


def test_the_register_rule_takes_every_chosen_answer_and_no_rejected_one():
    with open(PAIRS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert all(in_character(r["chosen"]) and not in_character(r["rejected"]) for r in records)
    for answer in ["The night is young, my lord.", "Aye, good sir! Speak."]:
        assert in_character(answer), answer
    for answer in [
        "the night is young, my lord.",  # a chat message's lower case
        "Aye, my lord",  # no full stop
        "Okay, my lord.",  # today's word
        "I am a small language model.",  # no word of the plays
        "INH$,Fo&,Bez, my lord.",
        "",
    ]:
        assert not in_character(answer), answer


def test_pairs_are_the_chat_template_their_targets_the_answers_and_a_tenth_held_out():
    pairs = sources.preference_pairs(PAIRS)
    tokenizer = CharTokenizer.from_text("".join(a + b for a, b in pairs), SPECIAL_TOKENS)
    split = pair_split(pairs, tokenizer, PAIRS)
    assert len(split["val"]) == len(pairs) - int(0.9 * len(pairs)) >= 1
    x, y = pair_batch(split["val"][:2], torch.device("cpu"))  # (4, T)
    with open(PAIRS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f][int(0.9 * len(pairs)) :][:2]
    answers = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    for row, answer in zip(y, answers):
        assert tokenizer.decode([t for t in row.tolist() if t != -100]) == answer + "<|endoftext|>"


@pytest.fixture
def chat_checkpoint(chat_run):
    """conftest's chat model (dropout 0.1, a context of 128): it knows the chat template, and its
    reference would drop out if it trained. Its best.pt."""
    return chat_run[0]


@pytest.mark.slow  # trains for seconds
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_preference_run_grows_the_held_out_margins_and_resumes_exactly(
    chat_checkpoint, tmp_path, monkeypatch, lora_rank
):
    pairs = tmp_path / "pairs.jsonl"  # half the bundled pairs: 4 held out
    with open(PAIRS, encoding="utf-8") as f:
        pairs.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    # a constant LR: a resume at any step goes on as the straight run did; dropout: the frozen
    # reference must be in eval mode from a resumed run's first step
    settings = dict(lr=3e-3, min_lr=3e-3, dpo_beta=0.5, lora_rank=lora_rank, max_steps=12)
    options = RunOptions(init_from=chat_checkpoint)
    cfg = tiny_run(pairs, tmp_path / "straight", log_interval=6, eval_interval=6, **settings)
    full = train_run(tiny_model(block_size=128), cfg, options, stage="dpo")
    evals = [row for row in full["history"] if row["kind"] == "eval"]
    # the reference's margins are 0: the policy prefers the held-out pairs by the end
    assert evals[0]["margin"] == 0 and evals[0]["held_out_acc"] == 0
    assert evals[0]["train_loss"] == pytest.approx(math.log(2))  # DPO's loss at a margin of 0
    assert all(row["margin"] > 0 and row["held_out_acc"] >= 0.5 for row in evals[1:])
    cut = tiny_run(pairs, tmp_path / "cut", log_interval=6, eval_interval=6, **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, 7, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train_run(tiny_model(block_size=128), cut, options, stage="dpo")
    resumed = train_run(tiny_model(block_size=128), cut, RunOptions(resume=True), stage="dpo")
    assert resumed["model"].config.dropout == 0.1
    assert without_timings(resumed["history"]) == without_timings(full["history"])
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())


def test_a_stages_figures_are_no_step_the_pace_leaves_them_out(
    chat_checkpoint, tmp_path, monkeypatch
):
    def slow_figures(stage, settings):  # the held-out pairs at each evaluation: 0.5 s more
        figures = stage.figures

        def slow():
            time.sleep(0.5)
            return figures()

        return dataclasses.replace(stage, figures=slow)

    through_the_stage(monkeypatch, slow_figures)
    pairs = tmp_path / "pairs.jsonl"  # ten of the bundled pairs: one held out, answered at once
    with open(PAIRS, encoding="utf-8") as f:
        pairs.write_text("".join(f.readlines()[:10]), encoding="utf-8")
    cfg = tiny_run(pairs, tmp_path / "run", max_steps=6, log_interval=2, eval_interval=100)
    options = RunOptions(init_from=chat_checkpoint)
    summary = train_run(tiny_model(block_size=128), cfg, options, stage="dpo")
    paces = [row["ms_per_step"] for row in summary["history"] if row["kind"] == "train"]
    assert len(paces) == 3 and max(paces) < 250  # a tiny model's step: no half second in it


def test_pairs_whose_chosen_answers_are_not_in_character_get_no_in_character_measure(
    chat_checkpoint, tmp_path, monkeypatch
):
    def never(*args):  # no held-out prompt is sampled for a measure that does not apply
        raise AssertionError("the in-character measure was sampled")

    monkeypatch.setattr(dpo, "in_character_shares", never)
    pairs = tmp_path / "pairs.jsonl"  # the bundled prompts; answers of today, polite or not
    with open(PAIRS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:10]
    with open(pairs, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r, chosen="Sure, happy to help.", rejected="no")) + "\n")
    cfg = tiny_run(pairs, tmp_path / "run", max_steps=2)
    summary = train_run(
        tiny_model(block_size=128), cfg, RunOptions(init_from=chat_checkpoint), stage="dpo"
    )
    assert summary["step"] == 2 and "in_character" not in summary


# prompts a model learns to answer in both registers, today's three times as often
REGISTERS = [
    ("Who are you?", "My lord, a poor player.", "just a bot lol"),
    ("Are you well?", "My lord, well, I thank thee.", "im ok i guess"),
    ("Shall we go?", "My lord, aye, let us go.", "nah maybe later"),
    ("Is it late?", "My lord, past midnight.", "idk check your phone"),
    ("Do you sing?", "My lord, a little, good sir.", "no, singing is cringe"),
    ("Are you sad?", "My lord, my heart is heavy.", "nah im fine"),
    ("What news?", "My lord, the king is sick.", "nothing much tbh"),
    ("Will you stay?", "My lord, till the morning.", "no i gotta go"),
]


def shares_of(path, questions):
    """The in-character shares of a checkpoint's answers to questions."""
    trained = checkpoint.load_model(str(path))
    prompts = [trained.tokenizer.encode(question) for question in questions]
    return in_character_shares(trained.model, prompts, trained.tokenizer)


@pytest.mark.slow  # trains for seconds
def test_a_preference_run_moves_what_a_model_of_both_registers_says(tmp_path):
    chats, pairs = tmp_path / "chats.jsonl", tmp_path / "pairs.jsonl"
    with open(chats, "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in REGISTERS:
            for answer in (rejected, rejected, rejected, chosen):
                turns = [dict(role="user", content=prompt), dict(role="assistant", content=answer)]
                f.write(json.dumps({"messages": turns}) + "\n")
    with open(pairs, "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in REGISTERS:
            f.write(json.dumps(dict(prompt=prompt, chosen=chosen, rejected=rejected)) + "\n")
    shape, steps = tiny_model(block_size=64, n_embd=64, n_head=4), dict(eval_interval=1000)
    start = untrained(tmp_path / "untrained.pt", chats, shape)
    # long enough to learn each answer whole: a preferred first word then leads to a whole line
    chat_cfg = tiny_run(chats, tmp_path / "chat", max_steps=400, lr=1e-2, **steps)
    train_run(shape, chat_cfg, RunOptions(init_from=start), stage="finetune")
    chat = str(tmp_path / "chat" / "last.pt")
    tuned = tiny_run(pairs, tmp_path / "dpo", max_steps=40, lr=3e-4, dpo_beta=0.5, **steps)
    summary = train_run(shape, tuned, RunOptions(init_from=chat), stage="dpo")
    texts = sources.preference_pairs(str(pairs))
    questions = [a[: a.index(ASSISTANT) + len(ASSISTANT)] for a, _ in texts]
    shares = [shares_of(path, questions) for path in (chat, tmp_path / "dpo" / "last.pt")]
    before, after = shares
    # dpo.py's own closing measure: the same, of its held-out prompt
    held_out = shares_of(tmp_path / "dpo" / "last.pt", questions[-1:])
    assert summary["in_character"] == held_out["in_character"]
    # half the prompts or more answered in character, 2 of 8 more than before: on every CPU and
    # seed tried, 5 to 8 after, 0 to 2 before
    assert after["in_character"] >= 0.5, shares
    assert after["in_character"] >= before["in_character"] + 0.25, shares


@pytest.mark.parametrize(
    "record, word",
    [
        ({"prompt": "Hi?", "chosen": "Hail."}, "rejected"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "Yo."}, "chosen"),
    ],
    ids=["no rejected answer", "an empty chosen answer"],
)
def test_a_bad_pair_is_one_error_line_before_anything_is_written(
    chat_checkpoint, tmp_path, capsys, record, word
):
    good = {"prompt": "Who?", "chosen": "A friend.", "rejected": "nobody lol"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, record, good)), encoding="utf-8")
    argv = ["--init_from", chat_checkpoint, "--data", path, "--out_dir", tmp_path / "run"]
    code, _, err = cli(capsys, dpo.main, *argv, "--max_steps", 2, "--device", "cpu")
    assert_one_line_error(code, err, word, "line 2")
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_preference_pairs_where_text_is_expected_are_one_error_line_naming_dpo_py(
    chat_checkpoint, tmp_path, capsys
):
    argv = ["--data", PAIRS, "--out_dir", tmp_path / "run", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, train.main, *argv)[::2], "line 1", "dpo.py")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "some text"}\n' + open(PAIRS, encoding="utf-8").readline())
    argv = ["--data", mixed, "--out_dir", tmp_path / "run", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, train.main, *argv)[::2], "line 2", "dpo.py")
    argv = [*argv, "--init_from", chat_checkpoint]  # text where pairs are expected
    assert_one_line_error(*cli(capsys, dpo.main, *argv)[::2], "line 1", "chosen")
    argv = ["--data", PAIRS, "--out_dir", tmp_path / "run", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, dpo.main, *argv)[::2], "--init_from")
