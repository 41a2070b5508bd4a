"""bench.py: reading train.py's lines, stopping a run at its target, the ablation's table and
report, and a smoke run of the throughput and generation modes. Training is replaced by a
stand-in script (no torch import), so the whole file runs in a few seconds."""

import json
import math
import sys
import time

import pytest

import bench
from config import TinyLLMError

# lines exactly as train.py prints them
EVAL_0 = ("eval      0/3000 | train 4.1782 | val 4.1782 (6.028 bits/char) | lr 0.00e+00 | grad norm 0.000 "
          "| uniform baseline ln(V) = 4.1897 | new best")
EVAL_250 = ("eval    250/3000 | train 1.9123 | val 1.9876 (2.868 bits/char) | lr 1.97e-03 | grad norm 0.412 "
            "| 35.1 ms/step | 116,695 tok/s | ETA 1m38s | new best")
EVAL_OLD = "eval    250/3000 | train 1.9123 | val 1.9876 | lr 1.97e-03 | grad norm 0.412 | 35.1 ms/step"
STEP = "step     50/3000 | loss 2.4660 | lr 1.00e-03 | grad norm 0.924 | 6.6 ms/step | 38,581 tok/s | ETA 0m19s"
MODEL = "model 824,897 parameters: 4 layers, 4 heads, 128 wide, block 128, vocab 65 | norm layernorm, mlp gelu"

# A stand-in for train.py: prints a model line and one eval line per (step, val) in --vals,
# writes history.json (full precision) and its own argv to --out_dir, then may hang.
FAKE_TRAIN = r'''
import json, os, sys, time
args = sys.argv[1:]

def flag(name, default=None):  # like argparse: --name value or --name=value, the last one wins
    value = default
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value

out_dir = flag("--out_dir")
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "argv.json"), "w") as f:
    json.dump(args, f)
if flag("--pos") == "rope" and flag("--fail_rope") == "1":
    print("error: rope is broken today", flush=True)
    sys.exit(2)
vals = [float(v) for v in flag("--vals", "4.0,3.0").split(",")]
offset = {"learned": 0.0, "rope": -0.1}.get(flag("--pos", "learned"), 0.0)
print("model 1,234 parameters: 1 layers", flush=True)
history = []
for i, v in enumerate(vals):
    v = v + offset + 0.000012345  # more digits than the printed line keeps
    history.append({"step": 10 * i, "train_loss": v, "val_loss": v, "lr": 0.001, "grad_norm": 1.0})
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(history, f)
    print(f"eval {10 * i:>6}/{10 * (len(vals) - 1)} | train {v:.4f} | val {v:.4f} ({v / 0.5:.3f} bits/char)"
          f" | lr 1.00e-03 | grad norm 1.000 | 2.5 ms/step", flush=True)
    time.sleep(0.05)
if flag("--hang") == "1":
    time.sleep(120)  # only a signal from bench.py ends this in time
print("done", flush=True)
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    monkeypatch.setattr(bench, "TRAIN_PY", str(path))
    return str(path)


# ----------------------------------------------------------------------------- parsing

def test_parse_eval_line_reads_train_py_lines():
    assert bench.parse_eval_line(EVAL_250) == {"step": 250, "max_steps": 3000, "train_loss": 1.9123,
                                               "val_loss": 1.9876, "bits_per_char": 2.868}
    assert bench.parse_eval_line(EVAL_0)["step"] == 0
    assert bench.parse_eval_line(EVAL_OLD + "\n") == {"step": 250, "max_steps": 3000, "train_loss": 1.9123,
                                                      "val_loss": 1.9876}  # without the bits/char part
    nan = bench.parse_eval_line("eval     10/100 | train nan | val nan | lr 1.00e-03")
    assert math.isnan(nan["val_loss"]) and not nan["val_loss"] <= 10  # a diverged run never "reaches" a target


@pytest.mark.parametrize("line", [STEP, MODEL, "", "evaluation done", "done: 3000 steps in 4m10s | best val loss 1.8",
                                  "eval 10/100 | train 2.0 | val oops"])
def test_parse_eval_line_ignores_other_lines(line):
    assert bench.parse_eval_line(line) is None


def test_parse_params_line():
    assert bench.parse_params_line(MODEL) == 824_897
    assert bench.parse_params_line(STEP) is None
    assert bench.MS_PER_STEP.search(EVAL_250)[1] == "35.1"


# ----------------------------------------------------------------------------- running train.py

def test_run_train_stops_the_process_at_the_target(fake_train, capsys):
    cmd = [sys.executable, fake_train, "--out_dir", "unused", "--vals", "4.0,3.0,2.0,1.0", "--hang", "1"]
    t0 = time.perf_counter()
    run = bench.run_train(cmd, stop_when=lambda ev: ev["val_loss"] <= 2.5)
    assert time.perf_counter() - t0 < 30  # terminated, not waited out (the script hangs for 120 s)
    assert run["stopped_at"]["step"] == 20 and run["stopped_at"]["val_loss"] == pytest.approx(2.0, abs=1e-3)
    assert [ev["step"] for ev in run["evals"]] == [0, 10, 20]  # nothing read after the stop
    assert run["returncode"] != 0 and run["params"] == 1234 and run["ms_per_step"] == 2.5
    assert 0 < run["evals"][0]["seconds"] <= run["evals"][-1]["seconds"] <= run["wall_s"]
    echoed = [l for l in capsys.readouterr().out.splitlines() if "eval" in l]
    assert len(echoed) == 3 and echoed[-1].endswith("2.5 ms/step")  # each eval line echoed as it came


def test_time_to_target_reports_seconds_and_a_miss(fake_train, tmp_path):
    out = tmp_path / "ttt.json"
    result = bench.main(["time_to_target", "--target", "2.5", "--out", str(out), "--",
                         "--vals", "4,3,2,1", "--hang", "1", "--out_dir", "must_not_win"])
    saved = json.loads(out.read_text())
    assert saved["reached"] and saved["step"] == 20 and 0 < saved["seconds"] < 30
    assert saved["machine"]["torch"] and saved["machine"]["cpu"] and saved["machine"]["torch_threads"] >= 1
    out_dir = result["command"][-1]
    assert result["command"][-2] == "--out_dir" and out_dir != "must_not_win"  # a temp dir, removed after
    assert not (tmp_path / "must_not_win").exists()

    miss = bench.main(["time_to_target", "--target", "0.5", "--out", str(out), "--", "--vals", "4,3"])
    assert not miss["reached"] and miss["seconds"] is None and miss["returncode"] == 0 and miss["error"] is None
    assert [ev["val_loss"] for ev in miss["evals"]] == pytest.approx([4.0, 3.0], abs=1e-3)


# ----------------------------------------------------------------------------- ablation

def test_select_variants():
    assert bench.select_variants(None) == ["vanilla", "rmsnorm", "swiglu", "sinusoidal", "rope", "all"]
    assert bench.select_variants("rope, vanilla") == ["rope", "vanilla"]
    assert bench.VARIANTS["all"] == {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope"}
    with pytest.raises(TinyLLMError, match="bogus"):
        bench.select_variants("vanilla,bogus")


def test_markdown_table_pads_columns():
    table = bench.markdown_table(["variant", "loss"], [["rope", "1.8"], ["vanilla", "1.95"]])
    assert table == ("| variant | loss |\n"
                     "|---------|------|\n"
                     "| rope    | 1.8  |\n"
                     "| vanilla | 1.95 |\n")


def test_summarize_variant_prefers_history_and_falls_back_to_ln2():
    run = {"returncode": 0, "params": 10, "wall_s": 1.0, "ms_per_step": 2.0, "tail": [],
           "evals": [{"step": 0, "val_loss": 4.0}, {"step": 10, "val_loss": 2.0}]}
    history = [{"step": 0, "val_loss": 4.00001}, {"step": 10, "val_loss": 1.99999}, {"step": 20, "val_loss": 2.1}]
    row = bench.summarize_variant("rope", run, history)
    assert row["best_val_loss"] == 1.99999 and row["best_step"] == 10 and row["steps"] == 20
    assert row["bpc"] == pytest.approx(1.99999 / math.log(2))  # no bits/char printed: char tokenizer
    assert row["pos"] == "rope" and row["error"] is None
    failed = bench.summarize_variant("all", {**run, "returncode": 2, "tail": ["error: boom"]}, None)
    assert failed["error"] == "error: boom" and failed["best_val_loss"] is None
    table = bench.ablation_table([bench.summarize_variant("vanilla", run, None), row, failed])
    lines = table.splitlines()
    assert len(lines) == 5 and "vs vanilla" in lines[0] and "| 20    |" in lines[3]
    assert "-0.0000" in lines[3] and "failed: error: boom" in lines[4]  # rope's delta, all's failure


def test_ablation_runs_each_variant_with_its_switches(fake_train, tmp_path):
    runs, md = tmp_path / "runs", tmp_path / "report" / "ablation.md"
    bench.main(["ablation", "--only", "vanilla,rope", "--max_steps", "7", "--runs_dir", str(runs),
                "--out", str(tmp_path / "ablation.json"), "--out_md", str(md), "--",
                "--vals", "4,3,2.5", "--pos", "sinusoidal"])
    saved = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["name"]: r for r in saved["variants"]}
    assert list(rows) == ["vanilla", "rope"] and saved["error"] is None
    for name, row in rows.items():
        argv = json.loads((runs / name / "argv.json").read_text())
        assert argv[argv.index("--max_steps") + 1] == "7" and "--sample_tokens" in argv
        assert argv[-2:] == ["--out_dir", str(runs / name)]
        pos = [a for a in argv if a.startswith("--pos")]
        assert pos[-1] == f"--pos={bench.VARIANTS[name]['pos']}"  # the variant's switch beats the extra flag
        assert row["params"] == 1234 and row["best_step"] == 20
    # best val from history.json (full precision), bpc from the printed bits/char
    assert rows["vanilla"]["best_val_loss"] == pytest.approx(2.500012345, abs=1e-9)
    assert rows["rope"]["best_val_loss"] == pytest.approx(2.400012345, abs=1e-9)
    assert rows["rope"]["bpc"] == pytest.approx(4.8, abs=1e-3)
    report = md.read_text()
    assert "| rope    | layernorm | gelu | rope    | 1,234  | 20    |" in report and "-0.1000" in report
    assert "![val loss by variant](ablation.png)" in report
    assert (md.parent / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_keeps_going_after_a_failure_and_says_so(fake_train, tmp_path):
    out = tmp_path / "ablation.json"
    with pytest.raises(TinyLLMError, match="rope"):
        bench.main(["ablation", "--only", "rope,vanilla", "--out", str(out), "--out_md", str(tmp_path / "a.md"),
                    "--", "--fail_rope", "1"])
    rows = json.loads(out.read_text())["variants"]  # written before the error
    assert rows[0]["error"] == "error: rope is broken today" and rows[1]["error"] is None


# ----------------------------------------------------------------------------- the in-process modes

TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--device", "cpu"]


def test_train_mode_smoke(tmp_path):
    out = tmp_path / "train.json"
    bench.main(["train", *TINY, "--batch_size", "4", "--steps", "4", "--warmup", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    for key in ("machine", "model_config", "params", "ms_per_step", "tokens_per_s", "peak_memory_mib", "mfu"):
        assert key in result
    for key in ("cpu", "gpu", "torch", "torch_threads", "python", "date"):
        assert key in result["machine"]
    assert result["mode"] == "train" and result["model_config"]["n_embd"] == 32
    assert len(result["step_ms"]) == 4  # warm-up steps are not timed
    assert result["tokens_per_step"] == 4 * 16 and result["tokens_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(64 / (result["ms_per_step"] / 1000))
    assert result["peak_memory_mib"] > 0 and result["mfu"] is None  # no MFU without a known GPU


def test_generate_mode_smoke(tmp_path):
    out = tmp_path / "generate.json"
    result = bench.main(["generate", *TINY, "--new_tokens", "8", "--num_samples", "2", "--out", str(out)])
    assert json.loads(out.read_text())["speedup"] == result["speedup"]
    for path in ("kv_cache", "full_recompute"):
        assert result[path]["tokens_per_s"] == pytest.approx(16 / result[path]["seconds"])
    assert result["speedup"] == pytest.approx(result["kv_cache"]["tokens_per_s"] /
                                              result["full_recompute"]["tokens_per_s"])
    assert isinstance(result["same_tokens"], bool)


def test_extra_flags_only_where_train_py_runs(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["train", "--steps", "1", "--out", str(tmp_path / "x.json"), "--", "--n_layer", "1"])
    assert not (tmp_path / "x.json").exists()
