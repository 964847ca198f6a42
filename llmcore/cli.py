"""The `llmcore` command line: `llmcore info`, `llmcore bench attention`."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
