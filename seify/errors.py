"""The one error type users see: a mistake in their input, reported in one line (exit code 2 on the CLI)."""
from __future__ import annotations

from typing import Callable


class SeifyError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what to do.

    A message names the options it is about as ``{name}`` placeholders (``options``): the Python API shows the
    keyword (``reduction``), the command line its flag (``--reduction``).
    """

    def __init__(self, message: str, *options: str):
        self.template, self.options = message, options
        super().__init__(self.render(lambda name: name))

    def render(self, style: Callable[[str], str]) -> str:
        text = self.template
        for name in self.options:
            text = text.replace("{" + name + "}", style(name))
        return text


def flag(name: str) -> str:
    """An option's command-line flag: ``reduction`` -> ``--reduction``, ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shown(value) -> str:
    """An option's value as a message shows it: as it is typed on a command line."""
    if value is None:
        return "(not set)"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
