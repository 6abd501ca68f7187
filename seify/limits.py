"""The limits of what seify takes, and the checks that refuse what lies outside them, in one place.

A value is refused before any work is done, whichever command or function it reaches, with the same words.
"""
from __future__ import annotations

import math
import re

from .errors import SeifyError

MAX_IMAGE_SIZE = 4096  # pixels a side
MAX_CHANNELS = 64  # input channels
MAX_BATCH_SIZE = 65536
MAX_TIMED_BATCH = 4096  # profile's timed batches
MAX_CLASSES = 1_000_000
CONFUSION_CLASSES = 1000  # a confusion matrix is reported up to this many classes (a million counts)


MIN_IMAGE_SIZE = 8  # pixels a side a model is run at


def check_img_size(value: int | None) -> None:
    """An image size a model is trained or run at (``--img-size``), or none."""
    if value is not None:
        check_whole(value, "img_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def check_whole(value, name: str, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise SeifyError(f"{{{name}}} must be a whole number {bound}, not {value!r}", name)


def check_number(value, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g} and {'<' if high_open else '<='} {high:g}"
        raise SeifyError(f"{{{name}}} must be a finite number {bounds}, not {value!r}", name)


def check_choice(value, name: str, allowed: tuple) -> None:
    if value not in allowed:
        raise SeifyError(f"{{{name}}} must be one of {', '.join(allowed)}, not {value!r}", name)


def check_pattern(text: str | None, name: str) -> None:
    """A regular expression (``--include``, ``--exclude``), or none."""
    try:
        re.compile(text or "")
    except (re.error, TypeError) as e:
        raise SeifyError(f"{{{name}}} is not a valid regular expression: {e}", name) from e
