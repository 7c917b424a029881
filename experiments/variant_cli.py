"""The command line the experiment scripts share: `SCRIPT COMMAND [VARIANT ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def run_cli(doc: str, variants: dict, commands: dict[str, Callable[..., None]], seeds: bool = False) -> None:
    """Parse `COMMAND [VARIANT ...]` (and `--seeds S ...` when `seeds`), refuse unknown variants, and call
    the command with the chosen variants (all of them when none is named), and the seeds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("command", choices=list(commands))
    parser.add_argument("names", nargs="*", help=f"variants (default: all of {', '.join(variants)})")
    if seeds:
        parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in variants]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (known: {', '.join(variants)})")
    names = args.names or list(variants)
    if seeds:
        commands[args.command](names, args.seeds)
    else:
        commands[args.command](names)
