"""`kvsurgery recipes`: every pass a recipe can name, with its options and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from kvsurgery import registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also list each pass's options")


def run(args: argparse.Namespace) -> int:
    for name, summary in registry.recipes().items():
        print(f"{name:12s} {summary}")
        if args.verbose:
            for f in dataclasses.fields(registry.get(name).Options):
                print(f"{'':12s}   {f.name} = {f.default!r}")
    return 0
