"""Operating jobs: submitting them to clusters, scheduling them, querying their outputs.

What the commands share: one way to print text for people (Rich, never reading it as markup),
one JSON array layout for scripts, the texts they fill in (templates/), and what to do with
stdout once its reader leaves (`| head`).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Rich loads on first use
    from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console that prints text as given (no markup, emoji or highlighting), no wider than
    the terminal, stdout at its natural width when piped; a reader gone away raises
    BrokenPipeError (Rich would exit 1)."""
    from rich.console import Console

    class Quiet(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    width = None if stderr or sys.stdout.isatty() else 10_000
    return Quiet(
        stderr=stderr, width=width, soft_wrap=True, markup=False, emoji=False, highlight=False
    )


def note(message: str, style: str = "") -> None:
    """One line on stderr for the person running the command."""
    console(stderr=True).print(message, style=style)


def json_rows(rows: list[dict[str, Any]]) -> str:
    """A JSON array, one object a line: valid JSON that also reads well line by line."""
    return "[" + ",\n ".join(json.dumps(r) for r in rows) + "]\n"


def template(name: str) -> str:
    """A text shipped as package data (batch_infer/ops/templates/), for `string.Template`."""
    return importlib.resources.files(__package__).joinpath("templates", name).read_text()


def drop_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so the final flush cannot fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cmd | head` when cmd is cut off


def quiet_pipe(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A command whose stdout reader went away (`| head`) ends with EXIT_PIPE, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except BrokenPipeError:
            drop_stdout()
            return EXIT_PIPE

    return run
