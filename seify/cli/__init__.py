"""The ``seify`` command over the Python API, in four rooms: ``flags`` (built from the API's option dataclasses,
grouped in ``--help``), ``output`` (tables, JSON, CSV, progress), ``commands`` (each command: its flags, one API
call, its output) and ``run`` (the entry point: exit codes, one-line errors). Nothing here imports torch at
start-up, so ``seify --help`` is fast."""
from .commands import app
from .output import one_line as _one_line
from .run import main

__all__ = ["app", "main", "_one_line"]
