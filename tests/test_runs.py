"""The learner's second hour: never lose a trained model, resume and extend runs, fine-tune
on text with new characters, compare runs, and a command line that tells the truth."""

import dataclasses
import json
import math
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from config import GREEDY, GPTConfig, RunOptions, Sampler, TrainConfig, from_saved, setting
from conftest import (TINY_FLAGS, assert_one_line_error, cli, corpus_head, no_tokens, snapshot, tiny_model_config,
                      tiny_train_config)
import generate
from model import GPT
from sampling import filter_logits
import train

from machinery import device
from tools import compare, prepare
from machinery.checkpoint import load_checkpoint, load_model, save_checkpoint
from machinery.checkpoint import restore, resume_configs
from machinery.sources import load_prepared
from optim import get_lr, make_optimizer, progress

RUN = [*TINY_FLAGS, "--eval_interval", "10", "--log_interval", "5"]
TUNE = RUN[:RUN.index("--n_layer")] + RUN[RUN.index("--n_layer") + 2:]  # fine-tuning keeps the checkpoint's 2 layers


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run, to be (mis)treated."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run", trained[1]


# ----------------------------------------------------------------------------- never lose work

def test_a_setting_newer_than_a_checkpoint_means_there_what_it_meant_before(trained, monkeypatch):
    """A new setting whose default changes behaviour (a new default schedule, say) is given its
    `before` value in config.py: a run saved before it existed resumes as it was."""
    @dataclasses.dataclass
    class Settings:
        schedule: str = setting("wsd", "the LR's shape", ("wsd", "cosine"), before="cosine")
        steps: int = setting(10, "steps")
    assert from_saved(Settings, {"steps": 5}) == Settings(schedule="cosine", steps=5)
    assert from_saved(Settings, {"steps": 5, "schedule": "wsd"}).schedule == "wsd"
    assert from_saved(Settings, {}).steps == 10  # no `before`: a missing setting takes its default
    # as a resume reads last.pt: warmup_steps given a `before` of 7, a checkpoint without it resumes with 7
    warmup = {f.name: f for f in dataclasses.fields(TrainConfig)}["warmup_steps"]
    monkeypatch.setattr(warmup, "metadata", {**warmup.metadata, "before": 7})
    checkpoint = load_checkpoint(str(trained[0] / "last.pt"))
    del checkpoint["train_config"]["warmup_steps"]
    _, train_cfg = resume_configs(checkpoint, {}, "last.pt")
    assert train_cfg.warmup_steps == 7



def test_a_second_run_into_a_trained_folder_is_refused_and_leaves_it_untouched(run_copy, capsys):
    folder, data = run_copy
    before = snapshot(folder)
    code, _, err = cli(capsys, train.main, *RUN, "--data", data, "--out_dir", folder, "--max_steps", "5")
    assert_one_line_error(code, err, "already holds a run", "--resume", "--out_dir", "--overwrite", "step 60")
    for flags in (["--overfit_batch", "--max_steps", "30"], ["--plot_lr"], ["--eval_only"]):
        code, out, err = cli(capsys, train.main, *RUN, "--data", data, "--out_dir", folder, *flags)
        assert code == 0, err
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k != "lr_schedule.png"} == before  # best.pt byte for byte
    # --overwrite removes the run only once the new one's input is checked: a typo leaves it
    code, _, err = cli(capsys, train.main, *RUN, "--data", folder / "typo.txt", "--out_dir", folder, "--overwrite")
    assert_one_line_error(code, err, "typo.txt")
    assert snapshot(folder) == after
    code, out, err = cli(capsys, train.main, *RUN, "--data", data, "--out_dir", folder, "--max_steps", "5",
                         "--overwrite")
    assert code == 0 and "removing the previous run" in out
    assert load_checkpoint(str(folder / "last.pt"))["step"] == 5


def test_what_a_run_cannot_honour_is_refused_and_the_source_is_kept(run_copy, tmp_path, capsys):
    folder, data = run_copy
    before, best = snapshot(folder), folder / "best.pt"
    cases = [([*RUN, "--init_from", best, "--out_dir", folder, "--overwrite"], ["--overwrite would delete", "best.pt"]),
             ([*RUN, "--init_from", best, "--out_dir", tmp_path / "t", "--n_layer", "3"], ["--n_layer 3 (it has 2)"]),
             ([*TUNE, "--init_from", best, "--out_dir", tmp_path / "t", "--tokenizer", "bpe", "--vocab_size", "400"],
              ["shape and tokenizer", "--tokenizer bpe (it has char)", "--vocab_size 400"]),
             (["--out_dir", folder, "--resume", "--preset", "small"], ["preset 'custom'", "--preset small"])]
    for flags, words in cases:
        code, _, err = cli(capsys, train.main, "--data", data, "--max_steps", "65", *flags)
        assert_one_line_error(code, err, *words)
    assert snapshot(folder) == before


def test_fine_tuning_records_the_tokenizer_it_trains_with(bpe_trained, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, *TINY_FLAGS[TINY_FLAGS.index("--batch_size"):], "--init_from", bpe_trained,
                       "--data", bpe_trained.parent.parent / "data.txt", "--out_dir", tmp_path, "--max_steps", "2")
    assert code == 0, err  # the preset's tokenizer is char; the checkpoint's, and so the run's, BPE
    assert load_checkpoint(str(tmp_path / "last.pt"))["train_config"]["tokenizer"] == "bpe"


def test_fine_tuning_takes_the_checkpoints_shape_and_a_new_dropout(run_copy, tmp_path, capsys):
    folder, data = run_copy
    short = tmp_path / "short.txt"  # long enough for the checkpoint's block of 16, not for the preset's
    short.write_text(open(data, encoding="utf-8").read(400), encoding="utf-8")
    code, out, err = cli(capsys, train.main, "--device", "cpu", "--dtype", "float32", "--data", short, "--init_from",
                         folder / "best.pt", "--out_dir", tmp_path / "tuned", "--max_steps", "3", "--dropout", "0.1",
                         "--eval_iters", "1", "--sample_tokens", "0", "--plots", "false")
    assert code == 0, err
    tuned = load_checkpoint(str(tmp_path / "tuned" / "best.pt"))["model_config"]
    assert tuned["block_size"] == 16 and tuned["n_layer"] == 2 and tuned["dropout"] == 0.1
    shorter = tmp_path / "shorter.txt"  # a val split of 10 tokens, shorter than one window of 16
    shorter.write_text(open(data, encoding="utf-8").read(100), encoding="utf-8")
    code, out, err = cli(capsys, train.main, "--eval_only", tmp_path / "tuned" / "best.pt", "--data", shorter)
    assert code == 0 and "(10 tokens, every position once)" in out, err


def test_one_resume_command_starts_a_run_then_continues_it(trained, tmp_path, capsys):
    folder, argv = tmp_path / "colab", [*RUN, "--data", trained[1], "--max_steps", "10", "--resume"]
    code, out, err = cli(capsys, train.main, *argv, "--out_dir", folder)
    assert code == 0 and "starting a fresh run" in out
    code, out, err = cli(capsys, train.main, *argv, "--out_dir", folder, "--max_steps", "20")  # after a "disconnect"
    assert code == 0 and "resuming" in out and load_checkpoint(str(folder / "last.pt"))["step"] == 20


def test_extending_a_finished_run_follows_the_schedule_of_its_new_length_and_honours_the_new_settings(run_copy,
                                                                                                        capsys):
    folder, data = run_copy  # a run of 60 steps, its warmup 5
    code, out, err = cli(capsys, train.main, "--resume", "--out_dir", folder, "--max_steps", "100",
                         "--eval_interval", "20", "--log_interval", "20", "--patience", "9", "--plots", "false")
    assert code == 0, err
    last = load_checkpoint(str(folder / "last.pt"))
    assert last["step"] == 100 and last["train_config"]["max_steps"] == 100
    assert last["train_config"]["eval_interval"] == 20 and last["train_config"]["patience"] == 9  # honoured
    rows = [h for h in last["history"] if h["kind"] == "train" and h["step"] > 60]
    assert [h["step"] for h in rows] == [80, 100]  # the new log_interval
    cfg = TrainConfig(**last["train_config"])
    planned = [get_lr(s, progress(s, cfg), cfg) for s in range(60, 100)]  # a run of 100 steps' schedule, from 60 on
    assert [h["lr"] for h in rows] == pytest.approx([sum(planned[:20]) / 20, sum(planned[20:]) / 20])  # their means
    assert last["progress"] == 94 / 95 and f"LR at step 60 is {planned[0]:.3g}" in out  # and it says where it is


def test_a_checkpoint_of_the_previous_version_resumes(run_copy, capsys):
    """The previous version saved --replans' setting, the moved end of its cosine as decay_from =
    [step, peak, share done] and the window as (loss, grad norm) pairs; an older one, history rows
    without a kind: such a run resumes on the schedule of its settings."""
    folder, _ = run_copy
    checkpoint = load_checkpoint(str(folder / "last.pt"))
    for name in ("progress", "eval_seconds"):
        checkpoint.pop(name)
    checkpoint["train_config"] = {**checkpoint["train_config"], "replans": "", "max_steps": 80}
    checkpoint["decay_from"], checkpoint["window"] = [50, checkpoint["train_config"]["lr"], 0.5], [(2.0, 1.0)]
    evals = [{k: v for k, v in row.items() if k != "kind"} for row in checkpoint["history"] if row["kind"] == "eval"]
    checkpoint["history"] = evals  # its history: evaluations alone, without a kind
    save_checkpoint(str(folder / "last.pt"), checkpoint)
    code, out, err = cli(capsys, train.main, "--resume", "--out_dir", folder, "--max_steps", "70", "--plots", "false")
    assert code == 0, err
    last = load_checkpoint(str(folder / "last.pt"))
    assert last["step"] == 70 and last["progress"] == 64 / 65  # the last step's of a run of 70, its warmup 5
    assert [row["kind"] for row in last["history"][:len(evals)]] == ["eval"] * len(evals)


def test_a_resumed_optimizer_keeps_its_machines_kernels_and_takes_the_saved_state(trained):
    # a run saved where AdamW is fused (a CPU, a GPU) and resumed on a Mac, where optim.py chooses the plain kernel
    checkpoint = load_checkpoint(str(trained[0] / "last.pt"))
    assert {group["fused"] for group in checkpoint["optimizer"]["param_groups"]} == {True}
    model_cfg, cfg = resume_configs(checkpoint, {}, "last.pt")
    optimizer = make_optimizer(GPT(model_cfg), cfg, torch.device("mps"))  # (only its choice of kernel: no Mac asked)
    start = types.SimpleNamespace(source=checkpoint, cfg=cfg, say=print)
    state = restore(start, optimizer, train.TrainState)
    assert state.step == checkpoint["step"] and optimizer.state_dict()["state"]  # the moments, as saved
    assert [group["fused"] for group in optimizer.param_groups] == [False, False]


def test_a_new_max_steps_gives_the_schedule_of_a_run_that_long_from_the_step_it_is_at(run_copy, capsys):
    folder, _ = run_copy  # the run of 60 steps put back to step 30
    checkpoint = load_checkpoint(str(folder / "last.pt"))
    checkpoint["step"], checkpoint["progress"], checkpoint["lr"] = 30, 0.5, 0.000123
    save_checkpoint(str(folder / "last.pt"), checkpoint)
    code, out, err = cli(capsys, train.main, "--resume", "--out_dir", folder, "--max_steps", "100",
                         "--log_interval", "1", "--eval_interval", "1000", "--plots", "false")
    cfg = TrainConfig(**load_checkpoint(str(folder / "last.pt"))["train_config"])
    planned = [get_lr(s, progress(s, cfg), cfg) for s in range(30, 100)]  # steps 30..99 of a run of 100
    assert code == 0 and f"LR at step 30 is {planned[0]:.3g} (the last step's was 0.000123)" in out, err
    lrs = [h["lr"] for h in load_checkpoint(str(folder / "last.pt"))["history"] if h["kind"] == "train"][-70:]
    assert lrs == pytest.approx(planned) and lrs[-1] > cfg.min_lr == get_lr(100, progress(100, cfg), cfg)


def test_grad_accum_steps_must_split_the_batch_of_the_run_itself_fresh_or_resumed(run_copy, tmp_path, capsys):
    folder, data = run_copy
    checkpoint = load_checkpoint(str(folder / "last.pt"))
    checkpoint["train_config"]["batch_size"] = 12  # a run of batch 12 (the preset's is 32), which 3 splits
    save_checkpoint(str(folder / "last.pt"), checkpoint)
    code, out, err = cli(capsys, train.main, "--resume", "--out_dir", folder, "--max_steps", "61",
                         "--grad_accum_steps", "3")
    assert code == 0 and "done: 61 steps" in out, err
    code, _, err = cli(capsys, train.main, *RUN, "--data", data, "--out_dir", tmp_path / "new", "--batch_size", "8",
                       "--grad_accum_steps", "3")
    assert_one_line_error(code, err, "batch_size (8) is not divisible by grad_accum_steps (3)")


def test_resume_refuses_settings_that_define_the_run(run_copy, capsys):
    folder, _ = run_copy
    for flags, words in ((["--n_embd", "80"], "--n_embd 80"), (["--batch_size", "4"], "--batch_size 4"),
                         (["--tokenizer", "bpe"], "--tokenizer bpe"), (["--max_steps", "30"], "step 60"),
                         (["--time_budget", "5m"], "--time_budget 5m (the run has none)")):
        code, _, err = cli(capsys, train.main, "--resume", "--out_dir", folder, *flags)
        assert_one_line_error(code, err, words)


# ----------------------------------------------------------------------------- your own text

def test_new_characters_start_at_the_mean_row_and_every_other_weight_is_kept(run_copy, tmp_path):
    folder, _ = run_copy
    notes = tmp_path / "notes.txt"
    notes.write_text("Café “naïve” notes: é and + are new.\n" * 200, encoding="utf-8")
    base = load_checkpoint(str(folder / "best.pt"))
    cfg = tiny_train_config(str(notes), tmp_path / "tuned")
    run = train.setup_run(tiny_model_config(), cfg, RunOptions(init_from=str(folder / "best.pt")))  # not trained yet
    old_chars, chars = base["tokenizer"]["chars"], run.corpus.tokenizer.chars
    old_wte, wte = base["model"]["wte.weight"], run.model.wte.weight.detach()
    added = [c for c in chars if c not in old_chars]
    assert chars[:len(old_chars)] == old_chars and set(added) == set("éï“”+") - set(old_chars)
    assert torch.equal(wte[:len(old_chars)], old_wte[:len(old_chars)])  # every known character keeps its row
    for c in added:  # a new character starts from the mean of the rows the model has
        assert torch.allclose(wte[chars.index(c)], old_wte.mean(dim=0), atol=1e-7)
    eot_old, eot = base["tokenizer"].get("special_tokens", []), run.corpus.tokenizer.eot_id
    assert eot_old == ["<|endoftext|>"] and torch.equal(wte[eot], old_wte[len(old_chars)])  # <|endoftext|> too
    assert run.model.lm_head.weight is run.model.wte.weight and wte.shape[0] == len(chars) + 1  # the head grew along
    for name, weight in run.model.state_dict().items():
        if name not in ("wte.weight", "lm_head.weight"):
            assert torch.equal(weight, base["model"][name]), name  # every other weight is kept



def test_fine_tuning_on_text_with_new_characters_grows_the_vocabulary(run_copy, tmp_path, capsys):
    folder, _ = run_copy
    notes = tmp_path / "notes.txt"
    notes.write_text("Café “naïve” notes + more notes: é, “ and + are new.\n" * 300, encoding="utf-8")
    base = load_checkpoint(str(folder / "best.pt"))
    # 300 steps: the notes nearly learned by heart (val loss about 0.2, where 150 steps left 0.9),
    # so greedy decoding's answer does not hang on the last digits of a half-trained model
    code, out, err = cli(capsys, train.main, *TUNE, "--init_from", folder / "best.pt", "--data", notes,
                         "--out_dir", tmp_path / "tuned", "--max_steps", "300", "--lr", "1e-2", "--warmup_steps", "5")
    assert code == 0, err
    added = "".join(sorted(set("éï“”+") - set(base["tokenizer"]["chars"])))
    assert f"added {len(added)} character(s)" in out
    tuned = load_checkpoint(str(tmp_path / "tuned" / "best.pt"))
    chars = tuned["tokenizer"]["chars"]
    assert chars[:len(base["tokenizer"]["chars"])] == base["tokenizer"]["chars"] and set(added) <= set(chars)
    n_old, wte = len(base["tokenizer"]["chars"]), "wte.weight"
    assert tuned["model"][wte].shape[0] == len(chars) + 1  # plus <|endoftext|>, which kept its row
    assert tuned["model_config"]["vocab_size"] == len(chars) + 1
    code, out, err = cli(capsys, generate.main, tmp_path / "tuned" / "best.pt", "--prompt", "Caf", "--temperature",
                         "0", "--max_new_tokens", "3")
    assert code == 0 and out.startswith("Café"), out + err  # it learned the new character, and uses it
    assert n_old < len(chars)


def test_prepare_searches_folders_recursively_for_the_endings_asked(tmp_path):
    (tmp_path / "notes" / "deep" / ".git").mkdir(parents=True)
    (tmp_path / "notes" / "a.md").write_text("# markdown " * 300)
    (tmp_path / "notes" / "deep" / "b.py").write_text("print('python') " * 300)
    (tmp_path / "notes" / "deep" / "skip.txt").write_text("ZZZ")  # an ending not asked for
    (tmp_path / "notes" / "deep" / ".git" / "c.md").write_text("QQQ")  # a hidden folder
    meta = prepare.prepare(TrainConfig(data=str(tmp_path / "notes"), data_ext=".md,.py"), str(tmp_path / "out"))
    chars = set(meta["tokenizer"]["chars"])
    assert set("#markdownpython()'") <= chars and not {"Z", "Q"} & chars
    assert meta["tokenizer"]["kind"] == TrainConfig.tokenizer  # the same default as train.py


def test_prepare_splits_a_single_small_file_by_characters(tmp_path, capsys):
    text = corpus_head(50_000)
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare.prepare(TrainConfig(data=str(tmp_path / "one.txt")), str(tmp_path / "out"))
    _, train_ids, val_ids = load_prepared(str(tmp_path / "out"))
    assert len(val_ids) == pytest.approx(0.1 * len(text), abs=2) and meta["val_chars"] == len(val_ids)
    assert "prepare " not in capsys.readouterr().out  # no progress line before there is a rate to show


# ----------------------------------------------------------------------------- a CLI that tells the truth

def test_mocked_cpu_host_help_shows_meanings_and_the_defaults_actually_used(capsys, fake_machine):
    fake_machine(cuda=False, mps=False)  # a CUDA host would default to 'small'
    code, out, _ = cli(capsys, train.main, "--help")
    assert code == 0 and "None" not in out
    text = " ".join(out.split())
    assert "peak learning rate" in text and "(default: 0.003, preset tiny)" in text  # the preset's, not 2e-3
    assert "--lr-max" in text and "--warmup" in text and "--tag" in text and "--threads" in text
    assert "[auto|float32|bfloat16|float16]" in text and "here)" in text
    code, out, _ = cli(capsys, generate.main, "--help")
    assert code == 0 and "None" not in out and "CHECKPOINT.pt" in out and "greedy" in out


def test_mocked_gpu_host_help_never_asks_the_gpu(monkeypatch):
    """Asking the GPU for its compute capability would start CUDA in every process that prints --help."""
    monkeypatch.setattr(device, "gpu", lambda *a: pytest.fail("asked the GPU"))
    help_text = " ".join(train.build_parser(torch.device("cuda")).format_help().split())
    assert "bfloat16 from compute capability 8.0, else float16" in help_text


def test_bool_flags_are_bare_switches_and_still_take_values(tmp_path):
    parser = train.build_parser(torch.device("cpu"))
    args = parser.parse_args(["--compile", "--clean", "--plots", "false", "--overwrite"])
    assert args.compile is True and args.clean is True and args.plots is False and args.overwrite is True


def test_tag_names_the_run_folder_and_course_spellings_work(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, train.main, *RUN, "--data", trained[1], "--max_steps", "10", "--lr-max", "3e-3",
                         "--warmup", "2", "--tag", "lr_test")
    assert code == 0, err
    saved = load_checkpoint(str(tmp_path / "checkpoints" / "lr_test" / "last.pt"))["train_config"]
    assert (saved["lr"], saved["warmup_steps"], saved["tag"]) == (3e-3, 2, "lr_test")


def test_the_history_has_progress_rows_and_plots_compare_runs(trained, tmp_path, capsys):
    history = json.loads((trained[0] / "history.json").read_text())
    rows = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    assert [h["step"] for h in rows] == list(range(10, 61, 10)) and [h["step"] for h in evals] == [0, 30, 60]
    assert evals[0]["grad_norm"] is None and all(h["grad_norm"] > 0 for h in rows)  # no fake 0 at step 0
    assert all(h["seconds"] >= 0 for h in history) and all(h["ms_per_step"] > 0 for h in rows)
    saved = load_checkpoint(str(trained[0] / "last.pt"))
    tokens = saved["train_config"]["batch_size"] * saved["model_config"]["block_size"]  # per step
    assert all(h["tok_per_s"] == pytest.approx(tokens / h["ms_per_step"] * 1000) for h in rows)
    code, out, err = cli(capsys, compare.main, trained[0], trained[0], "--labels", "a,b", "--out", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_shorter_than_its_warmup_warns(trained, tmp_path, capsys):
    code, _, err = cli(capsys, train.main, *RUN, "--data", trained[1], "--out_dir", tmp_path / "r", "--max_steps", "5",
                       "--warmup_steps", "10")
    assert code == 0 and "never" in err and "--warmup_steps" in err


def test_output_files_record_every_setting_and_early_stops(trained, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:")
    out_file = tmp_path / "out.txt"
    code, out, err = cli(capsys, generate.main, "--checkpoint", trained[0] / "best.pt", "--prompt_file", prompt,
                         "--no_stop", "--num_samples", "2", "--max_new_tokens", "5", "--output_file", out_file)
    assert code == 0, err
    head = out_file.read_text().splitlines()[:3]
    assert "no_stop=True" in head[1] and "qa=False" in head[1] and head[2] == f"# prompt (from {prompt}): 'ROMEO:'"
    model, tokenizer, checkpoint = load_model(str(trained[0] / "best.pt"))
    cfg = generate.SampleConfig(max_new_tokens=5)
    model.lm_head.weight.data[tokenizer.eot_id] += 100  # make end-of-text certain
    (_, n_new, stopped), = generate.sample(model, tokenizer, tokenizer.encode("A"), cfg, GREEDY, torch.device("cpu"))
    assert stopped and n_new == 0
    assert "stopped at <|endoftext|> after 0 tokens" in generate.sample_label(0, cfg, n_new, stopped)


def test_every_sampler_setting_is_in_the_header_and_refused_by_beam_search(trained, tmp_path, capsys):
    """The sampler's settings travel as one object (config.Sampler): a field added there is written
    in the output's header and refused with --beam, with no list of names to keep up to date."""
    out_file = tmp_path / "out.txt"
    code, _, err = cli(capsys, generate.main, trained[0] / "best.pt", "--max_new_tokens", "3", "--output_file", out_file)
    assert code == 0, err
    header = out_file.read_text().splitlines()[1]
    for f in dataclasses.fields(Sampler):
        assert f"{f.name}={getattr(Sampler(), f.name)}" in header
        other = 0.5 if isinstance(f.default, float) and f.default != 0.5 else f.default + 1  # not the default
        for value in (other, f.default):  # given at its default, it is refused all the same
            code, _, err = cli(capsys, generate.main, trained[0] / "best.pt", "--beam", "2", f"--{f.name}", str(value))
            assert_one_line_error(code, err, f"--{f.name}", "beam search draws nothing")


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    kept = torch.isfinite(filter_logits(logits, Sampler(temperature=1.0, top_k=2), no_tokens(logits)))
    assert kept.tolist() == [[True, True, True, True, False]]
    assert math.isinf(filter_logits(logits, Sampler(temperature=1.0, top_k=1), no_tokens(logits))[0, 1])
    assert np.isfinite(filter_logits(logits, Sampler(temperature=1.0, top_k=5), no_tokens(logits)).numpy()).all()


def test_several_checkpoints_are_sampled_alike_and_a_single_sample_is_streamed(trained, tmp_path, capsys,
                                                                               monkeypatch):
    best, last = trained[0] / "best.pt", trained[0] / "last.pt"
    flags = ["--prompt", "ROMEO:", "--max_new_tokens", "30", "--seed", "7", "--no_stop"]
    code, both, err = cli(capsys, generate.main, best, last, *flags)
    assert code == 0, err
    blocks = both.split("=" * 20 + " ")[1:]  # "PATH (step ...) ====...\nTEXT" for each checkpoint
    assert [b.split(" ")[0] for b in blocks] == [str(best), str(last)]  # a header for each, in order
    alone = {}
    for path, block in zip((best, last), blocks):
        code, alone[path], err = cli(capsys, generate.main, path, *flags)
        assert block.split("=" * 20 + "\n", 1)[1].strip() == alone[path].strip()  # as when sampled alone

    writes = []  # one checkpoint, one sample: the text reaches the terminal as it is sampled
    monkeypatch.setattr(sys, "stdout", type("Terminal", (), {"write": lambda self, t: writes.append(t),
                                                             "flush": lambda self: None})())
    generate.main([str(best), *flags])
    monkeypatch.undo()
    assert len(writes) >= 30 and "".join(writes).strip() == alone[best].strip()


def test_the_start_up_line_shows_every_setting_of_the_model_beyond_its_shape_but_those_off(shakespeare_head, tmp_path,
                                                                                          capsys, monkeypatch):
    from machinery import setup
    monkeypatch.setattr(setup, "SHAPE", tuple(n for n in setup.SHAPE if n != "bias"))  # bias as a variant, say
    model_cfg = tiny_model_config(pos="rope", bias=False)  # a switch off (or a number's 0) is left unsaid
    train.train(model_cfg, tiny_train_config(shakespeare_head, tmp_path, max_steps=1))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model "))
    shown = line.split(" | ")[1].split(", ")
    assert shown == [f"{f.name} {getattr(model_cfg, f.name)}" for f in dataclasses.fields(GPTConfig)  # a new
                     if f.name not in setup.SHAPE and getattr(model_cfg, f.name) not in (0, False)]  # window 0: unsaid
    assert "pos rope" in shown
