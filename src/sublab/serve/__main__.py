"""`python -m sublab.serve MODEL ... [flags]`: the same server as `sublab serve`, with every flag."""

from __future__ import annotations

import argparse
import sys

from sublab.errors import SublabError
from sublab.serve.options import add_arguments, options_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sublab.serve", description="An OpenAI-compatible API over local models."
    )
    add_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: $SUBLAB_THREADS or 1)"
    )
    args = parser.parse_args(argv)
    from sublab.serve.app import serve

    try:
        serve(options_from_args(args))
    except SublabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
