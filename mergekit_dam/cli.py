"""`mergekit-dam`: the plugin's own commands (the merge itself runs in `mergekit-yaml`)."""

from __future__ import annotations

import argparse
import logging
import sys

from mergekit_dam.config import DamError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mergekit-dam", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="merge generated tiny models with dam and linear via mergekit-yaml")
    demo.add_argument("workdir", nargs="?", default="dam-demo", help="where models, artifact and merges go")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.command == "demo":
            from mergekit_dam.demo import run_demo

            run_demo(args.workdir, quiet=args.quiet)
    except DamError as error:
        print(f"mergekit-dam error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
