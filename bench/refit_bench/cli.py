"""`refit-bench`: the project's benchmark CLI. Each mode is a module with `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modes, in the order `--help` lists them; append new ones here.
MODES: list[str] = ["refit_bench.transport", "refit_bench.refit_run", "refit_bench.vllm_run", "refit_bench.plan"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("REFIT_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="refit-bench", description=__doc__)
    subparsers = parser.add_subparsers(dest="mode", required=True)
    runners = {}
    for name in MODES:
        module = importlib.import_module(name)
        sub = module.add_parser(subparsers)
        runners[sub.prog.split()[-1]] = module.run
    args = parser.parse_args(argv)
    return runners[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
