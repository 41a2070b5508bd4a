"""Benchmarks: how fast tinyllm trains and generates, how soon it reaches a validation loss, what each modern part
buys (modes in experiments/, commands in docs/benchmarks.md). Figures sit beside a baseline from the same process,
interleaved step by step (shared machines drift by a quarter and more); --out also records the machine."""

import machinery  # noqa: F401 (first, before torch loads: the start time, and OpenMP's idle threads soon sleep)

import json
import math
import os
import sys

from config import PRESETS, GPTConfig, Sampler, TinyLLMError, TrainConfig, make_config
from experiments import ablation, decoding, gpu_report, scaling, speed
from experiments.runs import machine_info
from machinery.cli import ArgumentParser, add_config_flags, check_writable, log, run_cli


def build_parser():
    parser = ArgumentParser(description="Benchmark tinyllm's training, generation, time to a target loss, and "
                                        "an ablation of the model's parts.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def mode(name, summary, train_flags=True):
        p = modes.add_parser(name, help=summary, description=summary)
        p.add_argument("--out", default=os.path.join("bench_results", f"{name}.json"), help="where the JSON goes")
        if train_flags:  # train.py's settings: preset, model shape, batch, device, dtype, threads, ...
            p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: as train.py; small for generate)")
            add_config_flags(p, GPTConfig)
            add_config_flags(p, TrainConfig)
        return p

    p = mode("train", "training throughput: ms/step and tokens/s, variants interleaved")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--untimed", type=int, default=5, help="steps before the timed ones, which pay for compilation "
                                                          "and allocation (default: %(default)s)")
    p.add_argument("--compare", default=None, help="FIELD=A,B,...: variants of one setting, the first the baseline")
    p = mode("generate", "generation speed with the KV cache against full recomputation")
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved; the median counts")
    p = mode("sample", "python generate.py end to end, start-up included", False)
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "best.pt"))
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_cache", action="store_true", help="time generate.py --no_cache instead")
    p = mode("time_to_target", "seconds from process start until train.py's val loss reaches a target", False)
    p.add_argument("--target", type=float, default=1.886)
    p.add_argument("--preset", default=None)
    p.add_argument("--baseline", default=None, help="also time this preset, for a ratio")
    p = mode("ablation", "every modern switch alone and together, at equal steps: a table and a plot")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ablation.VARIANTS)}")
    p.add_argument("--out_md", default=os.path.join("bench_results", "ablation.md"))
    p = mode("decoding", "greedy, beam search and sampling from one checkpoint: log-probability and repetition", False)
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "best.pt"))
    p.add_argument("--prompt", default="To be or not")
    p.add_argument("--new_tokens", type=int, default=300)
    p.add_argument("--beams", type=lambda s: [int(w) for w in s.split(",")], default=[4, 8], help="beam widths")
    p.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--seeds", type=int, default=3, help="samples per temperature")
    p.add_argument("--out_md", default=os.path.join("bench_results", "decoding.md"))
    p = mode("scaling", "scaling laws: sizes x compute budgets, the fitted law, less data; about 30 minutes", False)
    p.add_argument("--minutes", type=float, default=23.0, help="what the runs may take on this machine (default: "
                                                               "%(default)s; the probes and plots add about a minute)")
    p.add_argument("--budgets", type=int, default=4, help="compute budgets, 2x apart (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="3 sizes, 3 budgets, about 3 minutes: a first look")
    p.add_argument("--reuse", action="store_true", help="keep the plan and the runs --out already holds (an "
                                                         "interrupted study, or new plots and fit from a finished one)")
    p.add_argument("--out_png", default=os.path.join("bench_results", "scaling.png"))
    p.add_argument("--data", default=TrainConfig.data, help="the text (default: %(default)s)")
    p = mode("gpu_check", "the GPU report, once on a GPU (about 8 minutes on an H200): tests, start-up, training runs, "
                          "decoding, generate.py, the KV cache in every precision", False)
    p.add_argument("--quick", action="store_true", help="all of it at a toy size, without the GPU tests (a smoke test "
                                                        "on any device)")
    p.add_argument("--out_md", default=os.path.join("bench_results", "gpu_report.md"), help="the Markdown report")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: flags for train.py (time_to_target)
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if extra and args.mode != "time_to_target":
        raise TinyLLMError(f"flags after -- go to train.py, which only time_to_target runs, not {args.mode}")
    for name in ("steps", "new_tokens", "num_samples", "repeats", "seeds", "beams"):
        value = getattr(args, name, 1)
        if min(value if isinstance(value, list) else [value]) < 1:  # (--beams: a list of widths)
            raise TinyLLMError(f"--{name} must be at least 1, got {value}")
    if getattr(args, "untimed", 0) < 0:
        raise TinyLLMError(f"--untimed must be 0 or more, got {args.untimed}")
    if not 0 < getattr(args, "minutes", 1) < math.inf or getattr(args, "budgets", 2) < 2:  # (the fit needs 2)
        raise TinyLLMError(f"--minutes must be a number above 0 and --budgets 2 or more, got {args.minutes} and "
                           f"{args.budgets}")
    for t in getattr(args, "temperatures", []):  # (decoding's: each as generate.py would take it)
        make_config(Sampler, {"temperature": t})
    if not getattr(args, "out_png", ".png").lower().endswith(".png"):
        raise TinyLLMError(f"--out_png must name a .png file, got {args.out_png}")
    for name in ("out", "out_md", "out_png"):
        if getattr(args, name, None):  # checked now, not after an hour of benchmarks
            check_writable(getattr(args, name), f"--{name}", make_folder=True)
    if "checkpoint" in args and not os.path.isfile(args.checkpoint):  # sample and decoding read one
        raise TinyLLMError(f"checkpoint {args.checkpoint} not found (train one with: python train.py)")
    modes = {"train": speed.bench_train, "generate": speed.bench_generate, "sample": speed.bench_sample,
             "time_to_target": lambda a: speed.bench_time_to_target(a, extra),
             "ablation": ablation.bench_ablation, "decoding": decoding.bench_decoding,
             "scaling": scaling.bench_scaling, "gpu_check": gpu_report.bench_gpu_check}
    result = modes[args.mode](args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"mode": args.mode, "machine": machine_info(), **result}, f, indent=1)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_cli(main)
