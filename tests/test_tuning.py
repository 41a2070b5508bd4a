"""tuning.py: a student distilled from a frozen teacher, and a policy tuned on preference pairs
against its frozen reference (DPO); their losses, their runs, resumes and bad input."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    StepClock,
    assert_one_line_error,
    cli,
    interrupt_at,
    same_weights,
    tiny_model,
    tiny_run,
    train_run,
    without_timings,
)

import train
import tuning
from config import ASSISTANT, SPECIAL_TOKENS, RunOptions
from machinery import checkpoint, sources
from model import GPT
from tokenizer import CharTokenizer
from tuning import (
    Distilled,
    Preferring,
    answer_logps,
    distill_loss,
    in_character,
    pair_batch,
    pair_split,
    registers,
)

PAIRS = os.path.join(ROOT, "data", "preferences.jsonl")


def test_the_distillation_loss_is_the_softened_kl_times_t_squared_mixed_with_the_targets():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = -100  # context only: no target, no distillation
    keep = targets != -100
    p = F.softmax(teacher[keep] / 4.0, dim=-1)  # the teacher's softened distribution (N, V)
    log_q = F.log_softmax(student[keep] / 4.0, dim=-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    ce = F.cross_entropy(student[keep], targets[keep])
    for alpha in (0.0, 0.5, 1.0):
        loss = distill_loss(student, teacher, targets, 4.0, alpha)
        assert loss.item() == pytest.approx(alpha * 16 * kl.item() + (1 - alpha) * ce.item())


def test_a_distilled_student_learns_the_teacher_stays_frozen_in_eval_mode_without_a_graph():
    torch.manual_seed(0)
    student, teacher = GPT(tiny_model()), GPT(tiny_model(dropout=0.5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.register_forward_hook(lambda m, a, out: seen.append((m.training, out[0].requires_grad)))
    pair = Distilled(student, teacher, 4.0, 0.5).train()
    x = torch.randint(0, 65, (4, 16))
    _, loss = pair(x, x.roll(-1, 1))
    loss.backward()
    assert seen == [(False, False)]  # no dropout, no graph
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert same_weights(before, teacher.state_dict())
    pair.eval()
    assert pair(x, x.roll(-1, 1))[1] == student(x, x.roll(-1, 1))[1]  # eval: the student's own loss


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
    margins, loss = model(x, y)
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
    split = pair_split(pairs, tokenizer)
    assert len(split["val"]) == len(pairs) - int(0.9 * len(pairs)) >= 1
    x, y = pair_batch(split["val"][:2], torch.device("cpu"))  # (4, T)
    with open(PAIRS, encoding="utf-8") as f:
        records = [json.loads(line) for line in f][int(0.9 * len(pairs)) :][:2]
    answers = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    for row, answer in zip(y, answers):
        assert tokenizer.decode([t for t in row.tolist() if t != -100]) == answer + "<|endoftext|>"


@pytest.mark.slow  # trains for seconds
def test_a_distilled_run_resumes_exactly_and_a_teacher_of_another_tokenizer_is_refused(
    trained, tmp_path, monkeypatch, capsys
):
    teacher, data = trained
    cfg = tiny_run(data, tmp_path / "straight", max_steps=12, distill_from=teacher)
    full = train_run(tiny_model(dropout=0.1), cfg)
    cut = tiny_run(data, tmp_path / "cut", max_steps=12, distill_from=teacher)
    with monkeypatch.context() as m:
        interrupt_at(m, 7, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train_run(tiny_model(dropout=0.1), cut)
    resumed = train_run(tiny_model(dropout=0.1), cut, RunOptions(resume=True))
    assert without_timings(resumed["history"]) == without_timings(full["history"])
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())
    other = tmp_path / "other.txt"
    other.write_text("a different text, with other letters: XYZ 0123\n" * 400, encoding="utf-8")
    argv = ["--distill_from", teacher, "--data", other, "--out_dir", tmp_path / "x"]
    code, _, err = cli(capsys, train.main, *argv, "--max_steps", 2, "--device", "cpu")
    assert_one_line_error(code, err, "--distill_from")
    assert not os.path.exists(tmp_path / "x" / "last.pt")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny model fine-tuned on the bundled conversations: it knows the chat template."""
    folder = tmp_path_factory.mktemp("dpo")
    data = os.path.join(ROOT, "data", "chat_example.jsonl")
    cfg = tiny_run(data, folder, max_steps=20, eval_interval=20, lr=1e-2)
    train_run(tiny_model(block_size=128), cfg)
    return str(folder / "best.pt")


@pytest.mark.slow  # trains for seconds
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_preference_run_grows_the_held_out_margins_and_resumes_exactly(
    chat_checkpoint, tmp_path, monkeypatch, lora_rank
):
    pairs = tmp_path / "pairs.jsonl"  # half the bundled pairs: 4 held out
    with open(PAIRS, encoding="utf-8") as f:
        pairs.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    settings = dict(lr=3e-3, dpo_beta=0.5, lora_rank=lora_rank, batch_size=8, max_steps=12)
    options = RunOptions(init_from=chat_checkpoint)
    cfg = tiny_run(pairs, tmp_path / "straight", log_interval=6, eval_interval=6, **settings)
    full = train_run(tiny_model(block_size=128), cfg, options)
    lines = [row for row in full["history"] if row["kind"] == "train"]
    # the reference's margins are 0: the policy prefers the held-out pairs more, more at the end
    assert 0 < lines[0]["margin"] < lines[-1]["margin"] and lines[-1]["held_out_acc"] > 0.5
    cut = tiny_run(pairs, tmp_path / "cut", log_interval=6, eval_interval=6, **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, 7, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train_run(tiny_model(block_size=128), cut, options)
    resumed = train_run(tiny_model(block_size=128), cut, RunOptions(resume=True))
    assert without_timings(resumed["history"]) == without_timings(full["history"])
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())


def test_a_variants_figures_are_no_step_the_pace_leaves_them_out(
    chat_checkpoint, tmp_path, monkeypatch
):
    clock = StepClock(0.01).install(monkeypatch)  # a step: 10 ms on the run's clock

    def slow_answers(*args):  # the policy's answers on each progress line: 100 s
        clock.now += 100
        return {}

    monkeypatch.setattr(tuning, "registers", slow_answers)
    cfg = tiny_run(PAIRS, tmp_path / "run", max_steps=6, log_interval=2, eval_interval=100)
    options = RunOptions(init_from=chat_checkpoint)
    summary = train_run(tiny_model(block_size=128), cfg, options, clock=clock)
    paces = [row["ms_per_step"] for row in summary["history"] if row["kind"] == "train"]
    assert paces == pytest.approx([10.0] * 3)


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
    train_run(shape, tiny_run(chats, tmp_path / "chat", max_steps=150, lr=1e-2, **steps))
    chat = str(tmp_path / "chat" / "last.pt")
    dpo = tiny_run(pairs, tmp_path / "dpo", max_steps=40, lr=3e-4, dpo_beta=0.5, **steps)
    train_run(shape, dpo, RunOptions(init_from=chat))
    texts = sources.preference_pairs(str(pairs))
    questions = [a[: a.index(ASSISTANT) + len(ASSISTANT)] for a, _ in texts]
    shares = []
    for path in (chat, tmp_path / "dpo" / "last.pt"):
        trained = checkpoint.load_model(str(path))
        prompts = [trained.tokenizer.encode(question) for question in questions]
        shares.append(registers(trained.model, prompts, trained.tokenizer, torch.device("cpu")))
    before, after = shares
    assert after["in_character"] >= before["in_character"] + 0.5, shares  # 4 prompts of 8 or more


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
    code, _, err = cli(capsys, train.main, *argv, "--max_steps", 2, "--device", "cpu")
    assert_one_line_error(code, err, word, "line 2")
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_preference_pairs_where_text_is_expected_are_one_error_line(tmp_path, capsys):
    argv = ["--data", PAIRS, "--out_dir", tmp_path / "run", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, train.main, *argv)[::2], "--init_from")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "some text"}\n' + open(PAIRS, encoding="utf-8").readline())
    argv = ["--data", mixed, "--out_dir", tmp_path / "run", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, train.main, *argv)[::2], "line 2", "chosen")
