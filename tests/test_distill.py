"""distill.py: a student distilled from a frozen teacher; its loss, its run, its resume, a teacher
it cannot learn from."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_one_line_error,
    cli,
    interrupt_at,
    same_weights,
    tiny_model,
    tiny_run,
    train_run,
    without_timings,
)

import distill
from config import RunOptions
from distill import Distilled, distill_loss
from model import GPT


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


def test_a_batch_with_no_target_has_a_distillation_loss_of_0_and_no_gradient():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), -100)  # windows inside questions: context alone
    for alpha in (0.0, 0.5, 1.0):
        loss = distill_loss(student, torch.randn(2, 5, 7), targets, 4.0, alpha)
        loss.backward()
        assert loss.item() == 0 and torch.equal(student.grad, torch.zeros_like(student))


def test_a_distilled_student_learns_the_teacher_stays_frozen_in_eval_mode_without_a_graph():
    torch.manual_seed(0)
    student, teacher = GPT(tiny_model()), GPT(tiny_model(dropout=0.5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.register_forward_hook(lambda m, a, out: seen.append((m.training, out[0].requires_grad)))
    teacher.train()  # as a freshly loaded module is: the pair puts it in eval mode at once
    pair = Distilled(student, teacher, 4.0, 0.5)
    x = torch.randint(0, 65, (4, 16))
    logits, loss = pair(x, x.roll(-1, 1))
    assert torch.equal(logits, student(x)[0])  # a step's figure of the logits sees the student's
    loss.backward()
    assert seen == [(False, False)]  # no dropout, no graph
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert same_weights(before, teacher.state_dict())
    pair.eval()
    assert pair(x, x.roll(-1, 1))[1] == student(x, x.roll(-1, 1))[1]  # eval: the student's own loss


@pytest.mark.slow  # trains for seconds
def test_a_distilled_run_resumes_exactly_and_a_teacher_of_another_tokenizer_is_refused(
    trained, tmp_path, monkeypatch, capsys
):
    teacher, data = trained
    losses = []  # a step's loss is distillation's
    real = distill.distill_loss

    def counted(*args):
        losses.append(real(*args))
        return losses[-1]

    monkeypatch.setattr(distill, "distill_loss", counted)
    cfg = tiny_run(data, tmp_path / "straight", max_steps=12, distill_from=teacher)
    full = train_run(tiny_model(dropout=0.1), cfg, stage="distill")
    assert len(losses) == 12
    cut = tiny_run(data, tmp_path / "cut", max_steps=12, distill_from=teacher)
    with monkeypatch.context() as m:
        interrupt_at(m, 7, signal.SIGTERM)
        with pytest.raises(SystemExit):
            train_run(tiny_model(dropout=0.1), cut, stage="distill")
    resumed = train_run(tiny_model(dropout=0.1), cut, RunOptions(resume=True), stage="distill")
    assert without_timings(resumed["history"]) == without_timings(full["history"])
    assert same_weights(full["model"].state_dict(), resumed["model"].state_dict())
    other = tmp_path / "other.txt"
    other.write_text("a different text, with other letters: XYZ 0123\n" * 400, encoding="utf-8")
    argv = ["--distill_from", teacher, "--data", other, "--out_dir", tmp_path / "x"]
    code, _, err = cli(capsys, distill.main, *argv, "--max_steps", 2, "--device", "cpu")
    assert_one_line_error(code, err, "--distill_from")
    assert not os.path.exists(tmp_path / "x" / "last.pt")


def test_distill_py_needs_a_teacher_and_train_py_takes_no_distillation_flag(
    text_file, tmp_path, capsys
):
    argv = ["--data", text_file, "--out_dir", tmp_path / "x", "--max_steps", 2, "--device", "cpu"]
    assert_one_line_error(*cli(capsys, distill.main, *argv)[::2], "--distill_from")
    import train

    code, _, err = cli(capsys, train.main, *argv, "--distill_from", "teacher.pt")
    assert code == 2 and "--distill_from" in err
    assert not os.path.exists(tmp_path / "x" / "last.pt")
