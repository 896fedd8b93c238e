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
    train = commands.add_parser("train", help="learn the coefficients of a dam config without merging")
    train.add_argument("config", help="mergekit YAML config with merge_method: dam")
    train.add_argument("--out", help="artifact path (overrides the config's `coefficients`)")
    train.add_argument("--trust-remote-code", action="store_true", help="as mergekit's flag")
    train.add_argument("--transformers-cache", help="as mergekit's flag")
    train.add_argument("--lora-merge-cache", help="as mergekit's flag")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.command == "demo":
            from mergekit_dam.demo import run_demo

            run_demo(args.workdir, quiet=args.quiet)
        elif args.command == "train":
            from mergekit.merge import MergeOptions

            from mergekit_dam.api import train as train_stage

            options = MergeOptions(
                quiet=args.quiet,
                trust_remote_code=args.trust_remote_code,
                transformers_cache=args.transformers_cache,
                lora_merge_cache=args.lora_merge_cache,
            )
            source = train_stage(args.config, options, out=args.out)
            print(source.artifact_path or "no datasets configured: equal coefficients 1/N, nothing to train")
    except DamError as error:
        print(f"mergekit-dam error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
