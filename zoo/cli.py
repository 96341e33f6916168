"""The ``attnzoo`` console script."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.models, image=args.image, repeats=args.repeats)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ._registry import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="attnzoo: efficient-attention vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="build every zoo model, run it on a real photo and print params / GFLOPs / CPU latency",
        description="Build every registered attnzoo model, run it on a real photo shipped with scikit-learn and "
        "print a table of parameters, GFLOPs (multiply-accumulates) and CPU latency.",
    )
    demo.add_argument("--models", default="", metavar="PATTERN", help="timm wildcard filter, e.g. 'gated_vit_*'")
    demo.add_argument("--image", default=None, help="an image file to use instead of scikit-learn's china.jpg")
    demo.add_argument("--repeats", type=int, default=3, help="timed forward passes per model (median reported)")
    demo.set_defaults(func=_cmd_demo)

    models = commands.add_parser(
        "models", help="list the registered attnzoo models", description="List attnzoo's models in timm's registry."
    )
    models.add_argument("pattern", nargs="?", default="", help="timm wildcard filter")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
