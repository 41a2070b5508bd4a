"""Whether bfloat16 trains faster than float32 on this CPU, measured: steps of this machine's
default model timed in each, in turns, and the --dtype to pass. Without it, --dtype auto decides by
what the CPU is (machinery/devices.py's auto_dtype), never by a timing.

    python -m tools.precision
"""

import time
from dataclasses import replace

import torch

import train
from config import PRESETS, TinyLLMError, build_configs
from machinery import cli, devices
from model import GPT
from optim import make_optimizer

# bfloat16 ends about 0.012 higher in val loss at equal steps: it pays from about 25% more steps
MARGIN = 1.25


def step_seconds(model_cfg, cfg, dtypes, steps):
    """{dtype: a step's seconds} on random tokens. The dtypes take turns, so drift slows each
    alike; the first two steps of each pay for allocations and are not counted."""
    cpu = torch.device("cpu")
    model = GPT(replace(model_cfg, vocab_size=66))  # a character model's vocabulary
    optimizer = make_optimizer(model, cfg, cpu)
    tokens = torch.randint(66, (cfg.batch_size, model_cfg.block_size + 1))

    def batch():
        return tokens[:, :-1], tokens[:, 1:]

    seconds = dict.fromkeys(dtypes, 0.0)
    for i in range(steps + 2):
        for dtype in dtypes:
            start = time.perf_counter()
            precision = devices.Precision(dtype, ctx=devices.autocast(cpu, dtype))
            figures = train.train_step(model, optimizer, batch, cfg.lr, cfg, precision)
            figures["loss"].item()  # the step is done
            seconds[dtype] += (time.perf_counter() - start) * (i >= 2)
    return {dtype: total / steps for dtype, total in seconds.items()}


def main(argv=None):
    parser = cli.ArgumentParser(description="Time float32 and bfloat16 steps on this CPU.")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: as train.py)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each (20)")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 10_000 or args.threads < 0:
        raise TinyLLMError("--steps must be 1 to 10000 and --threads 0 or more")
    threads = devices.set_threads(args.threads)
    cpu = torch.device("cpu")
    preset = devices.machine_preset(cpu, {"threads": threads})[0]
    model_cfg, cfg = build_configs({}, PRESETS[preset])
    seconds = step_seconds(model_cfg, cfg, ("float32", "bfloat16"), args.steps)
    ratio = seconds["float32"] / seconds["bfloat16"]
    best = "bfloat16" if ratio >= MARGIN else "float32"
    auto, why = devices.auto_dtype(cpu)
    cli.log(
        f"a step of preset {preset} on {threads} threads: float32 "
        f"{1000 * seconds['float32']:.1f} ms, bfloat16 {1000 * seconds['bfloat16']:.1f} ms: "
        f"bfloat16 at {ratio:.2f}x float32's speed"
    )
    cli.log(
        f"pass --dtype {best} (bfloat16 pays from {MARGIN}x); --dtype auto takes {auto} "
        f"here ({why})"
    )


if __name__ == "__main__":
    cli.run_cli(main)
