"""Options that several subcommands share, defined once (argparse parent parsers): the same
spelling, check and help wherever they appear. Every subcommand parses its arguments intermixed,
so these go anywhere among its positional arguments (before the config, between overrides, last).
Nothing here imports torch: `megajepa X --help` and argument errors are instant."""

from __future__ import annotations

import argparse
from typing import Optional


def _at_least(minimum: int):
    def check(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text}")
        return value

    check.__name__ = f"at_least_{minimum}"  # argparse names the type in its "invalid ..." message
    return check


at_least_one = _at_least(1)


def nproc_parent(default: Optional[int], default_help: str) -> argparse.ArgumentParser:
    """--nproc: the ranks a command starts itself (demo, bench)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--nproc", type=at_least_one, default=default, help=f"ranks to start ({default_help})")
    return parent


def seeds_parent() -> argparse.ArgumentParser:
    """--seeds: training runs per arm, seeds 0..N-1 (compare)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--seeds", type=at_least_one, default=3, help="seeds per arm, 0..N-1 (default 3)")
    return parent


def evaluation_parent() -> argparse.ArgumentParser:
    """What the held-out evaluation takes (eval, and compare's evaluation of every run)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--limit", type=at_least_one, default=None, help="evaluate the first N pairs only")
    parent.add_argument(
        "--batch-pairs", type=_at_least(2), default=32,
        help="pairs per batch: the retrieval candidates (default 32; at least 2)",
    )
    parent.add_argument(
        "--max-new-tokens", type=at_least_one, default=None,
        help="generation cap (default: 2x the longest reference, at least 32, within the model's positions)",
    )  # fmt: skip
    return parent
