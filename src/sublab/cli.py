"""The `sublab` command. Thin wrappers: each subcommand parses arguments and calls one stage function.

    sublab mnist CONFIG.yaml [--set a.b=v] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from sublab.errors import SublabError


def _cmd_mnist(args: argparse.Namespace) -> None:
    from sublab.mnist.experiment import main as mnist_main

    out = mnist_main(args.config, args.set, args.out)
    print(f"report: {out / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sublab", description="Subliminal learning experiments end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mnist", help="auxiliary-logit MLP experiment (batched ensemble) and the theorem")
    m.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    m.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    m.set_defaults(func=_cmd_mnist)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SublabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
