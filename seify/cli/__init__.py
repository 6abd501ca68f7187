"""The ``seify`` command over the Python API, in three rooms: ``flags`` (built from the API's option dataclasses,
grouped in ``--help``), ``output`` (tables, JSON, CSV, progress) and ``commands`` (each command: its flags, one API
call, its output, and the exit codes). Nothing here imports torch at start-up, so ``seify --help`` is fast."""
from .commands import app, main
from .output import one_line as _one_line

__all__ = ["app", "main", "_one_line"]
