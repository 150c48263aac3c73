"""The `kvsurgery` command. Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules that are not installed yet are simply not offered."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "recipes": ("kvsurgery.cli.recipes", "list the passes a recipe can name"),
    "calibrate": ("kvsurgery.calibration.cli", "calibrate a method on the loaded model (headkv, prefixkv, ...)"),
    "eval": ("kvsurgery.eval.cli", "accuracy of recipes on synthetic long-context tasks"),
    "bench": ("kvsurgery.bench.decode", "decode speed and memory of recipes on a model shape"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvsurgery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # this subcommand's module is not part of this installation
            raise
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
