"""The command line the experiment scripts share: `SCRIPT COMMAND [VARIANT ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def run_cli(doc: str, variants: dict, commands: dict[str, Callable[[list[str]], None]]) -> None:
    """Parse `COMMAND [VARIANT ...]`, refuse unknown variants, and call the command with the chosen
    variants (all of them when none is named)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("command", choices=list(commands))
    parser.add_argument("names", nargs="*", help=f"variants (default: all of {', '.join(variants)})")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in variants]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (known: {', '.join(variants)})")
    commands[args.command](args.names or list(variants))
