"""`kvsurgery calibrate <method>`: each calibrator is a module of this package exposing `METHOD`,
`add_arguments(parser)` and `calibrate(args) -> pathlib.Path`; they are found by scanning the package."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import kvsurgery.calibration as package


def _calibrators() -> dict:
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "METHOD") and hasattr(module, "calibrate"):
            found[module.METHOD] = module
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", required=True)
    for name, module in sorted(_calibrators().items()):
        doc = (module.__doc__ or name).strip().splitlines()[0]
        module.add_arguments(methods.add_parser(name, help=doc, description=doc))


def run(args: argparse.Namespace) -> int:
    path = _calibrators()[args.method].calibrate(args)
    print(f"wrote {path}")
    return 0
