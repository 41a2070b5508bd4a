"""docs/flags.md, made from config.py's settings: the presets, then every flag of train.py and generate.py with its
meaning and base default. After a new or changed setting: python -m tools.flags > docs/flags.md"""

import dataclasses

from config import PRESETS, GPTConfig, RunOptions, SampleConfig, Sampler, TrainConfig


def markdown_flags(classes=(GPTConfig, TrainConfig, RunOptions)):
    rows = ["| flag | meaning | default |", "| --- | --- | --- |"]
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = " ".join(f"`{s}`" for s in (f"--{f.name}", *meta.get("aliases", ())))
            choices = " (" + " \\| ".join(meta["choices"]) + ")" if meta.get("choices") else ""
            default = "" if f.default in ("", None) else f"`{f.default}`"
            resumed = "; `--resume` may change it" if meta["changeable"] else ""
            meaning = meta["help"].replace("|", "\\|") + choices + resumed
            rows.append(f"| {flag} | {meaning} | {default} |")
    return "\n".join(rows) + "\n"


PRESET_COLUMNS = ("n_layer", "n_head", "n_embd", "block_size", "pos", "mlp", "norm", "bias", "dropout",
                  "batch_size", "time_budget", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "beta2")


def markdown_presets():
    base = {f.name: f.default for cls in (GPTConfig, TrainConfig) for f in dataclasses.fields(cls)}
    rows = ["| preset | " + " | ".join(PRESET_COLUMNS) + " |", "| --- " * (len(PRESET_COLUMNS) + 1) + "|"]
    for name, preset in PRESETS.items():
        rows.append(f"| `{name}` | " + " | ".join(str(preset.get(c, base[c])) or "-" for c in PRESET_COLUMNS) + " |")
    return "\n".join(rows) + "\n"


def main():
    print("# Every setting\n\nThe presets and every flag of train.py and generate.py, with their meaning and base "
          "default, as config.py defines them (this page is `python -m tools.flags > docs/flags.md`). A preset's "
          "values override the base defaults; `--help` shows the defaults your machine and preset will use.\n\n"
          "## Presets\n\n" + markdown_presets() + "\n## train.py\n\n" + markdown_flags()
          + "\n## generate.py\n\n" + markdown_flags((Sampler, SampleConfig)), end="")


if __name__ == "__main__":
    main()
