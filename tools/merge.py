"""Fold a LoRA adapter into its base: a plain checkpoint, which needs the base no more.
python -m tools.merge checkpoints/lora/last.pt --out checkpoints/merged.pt"""

import os

from config import TinyLLMError, require
from lora import merge
from machinery import checkpoint, cli


def main(argv=None):
    parser = cli.ArgumentParser(description="Fold a LoRA adapter into its base model.")
    parser.add_argument("adapter", help="a checkpoint of a run trained with --lora_rank")
    parser.add_argument("--out", required=True, metavar="PATH.pt", help="the checkpoint to write")
    args = parser.parse_args(argv)
    saved = checkpoint.load(args.adapter)
    if not saved.get("lora"):
        raise TinyLLMError(f"{args.adapter} is not a LoRA adapter (no --lora_rank run wrote it)")
    # --out may be a trained run's checkpoint
    require(not os.path.exists(args.out), f"--out {args.out} already exists; give a new path")
    cli.check_writable(args.out, "--out", make_folder=True)
    model = merge(checkpoint.model_of(saved, args.adapter))
    # keep the run's record (its data and settings, for tools.score and the export), drop
    # what only a resume needs
    resumes = ("model", "model_config", "tokenizer", "lora", "optimizer", "scaler", "rng", "rngs")
    record = {k: v for k, v in saved.items() if k not in resumes}
    checkpoint.save(args.out, checkpoint.create(model, saved["tokenizer"], **record))
    base = saved["lora"]["base"]
    cli.log(f"wrote {args.out}: {base} with the adapter of {args.adapter} folded in")


if __name__ == "__main__":
    cli.run_cli(main)
