"""The `llmcore` command line: `llmcore info`, `llmcore bench attention|tokenizer|train-step`."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    import llmcore

    print(json.dumps(llmcore.info(), indent=2))
    return 0


def _bench_attention(args: argparse.Namespace) -> int:
    from llmcore.bench import attention

    attention.main(quick=args.quick, json_path=args.json, budget_s=args.budget, with_reference=not args.no_reference,
                   varlen=not args.no_varlen)
    return 0


def _bench_tokenizer(args: argparse.Namespace) -> int:
    from llmcore.bench import tokenizer

    families = (args.only,) if args.only else ("wordpiece", "cl100k")
    command = ["llmcore bench tokenizer"] + [f"--{k} {getattr(args, k)}" for k in ("json", "md", "only")
                                             if getattr(args, k)]
    command += [f"--{k} {getattr(args, k):g}" for k in ("rounds", "budget")]
    command += [f"--{k.replace('_', '-')}" for k in ("quick", "no_adversarial", "no_memory") if getattr(args, k)]
    out = tokenizer.main(quick=args.quick, json_path=args.json, md_path=args.md, min_rounds=args.rounds,
                         budget_s=args.budget, with_adversarial=not args.no_adversarial, with_memory=not args.no_memory,
                         families=families, command=" ".join(command))
    return 0 if out["summary"].get("all outputs exact") else 1


def _bench_train_step(args: argparse.Namespace) -> int:
    from llmcore.bench import train_step

    train_step.main(json_path=args.json, budget_s=args.budget, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcore", description="llmcore: fast data preparation and fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CPU ISA, threads, CUDA/Triton and attention backends (JSON)")
    p.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks against the reference implementations")
    bsub = bench.add_subparsers(dest="what", required=True)
    p = bsub.add_parser("attention", help="llmcore vs torch SDPA vs eager reference: table + JSON")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="only the two smallest shapes")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case and mode (default 3)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) eager reference")
    p.add_argument("--no-varlen", action="store_true", help="skip the SST-2/IMDB varlen cases")
    p.set_defaults(func=_bench_attention)
    p = bsub.add_parser("tokenizer", help="llmcore vs HF tokenizers (WordPiece) and tiktoken (cl100k): "
                                          "exactness, MB/s, adversarial inputs, memory; Markdown table + JSON")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--md", metavar="PATH", help="also write the Markdown report here")
    p.add_argument("--quick", action="store_true", help="every 10th text of the corpus, short reference time limits")
    p.add_argument("--rounds", type=int, default=7, help="minimum round-robin rounds per case (default 7)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds of round-robin timing per case before stopping past --rounds (default 20)")
    p.add_argument("--only", choices=["wordpiece", "cl100k"], help="run the throughput cases of one tokenizer only")
    p.add_argument("--no-adversarial", action="store_true", help="skip the 1 MB adversarial inputs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.set_defaults(func=_bench_tokenizer)
    p = bsub.add_parser("train-step", help="one MiniLM training step on 32 SST-2 sentences: llmcore padded and "
                                           "packed vs transformers, fp32 and bf16 autocast")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="a few rounds only")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of round-robin timing per dtype (default 10)")
    p.set_defaults(func=_bench_train_step)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
