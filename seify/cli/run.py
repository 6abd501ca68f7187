"""The command line's entry point: parse, run, and turn errors into one line and an exit code (2 for bad input, 1
for a bug); ``--debug``, anywhere on the line, shows the traceback."""
from __future__ import annotations

import sys

import typer

from ..errors import SeifyError, first_line, flag
from . import output
from .commands import app, state


def main() -> None:
    # --debug is the app's option; moved before the command, it is accepted anywhere on the line
    args = sys.argv[1:]
    sys.argv[1:] = ["--debug"] * ("--debug" in args) + [a for a in args if a != "--debug"]
    try:
        code = app(standalone_mode=False)
    except SeifyError as e:
        _fail(e, 2, e.render(flag))
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except torch_out_of_memory() as e:  # the machine's limit, not a seify bug: say what to lower
        _fail(e, 2, f"out of memory on the device ({first_line(e).split('. ')[0]}); lower --batch-size (or "
                    "--img-size, --input-size), or use a device with more memory")
    except Exception as e:
        if _usage_error(e):  # a flag or argument the parser refused: one line too, as seify's own errors
            _fail(e, 2, _usage_line(e))
        _fail(e, 1, f"{first_line(e)} (this is a seify bug; run with --debug for the traceback)")
    sys.exit(code if isinstance(code, int) else 0)


def torch_out_of_memory() -> tuple[type[Exception], ...]:
    """torch's out-of-memory error, where torch is loaded (the CLI imports it only when a command needs it)."""
    torch = sys.modules.get("torch")
    return (torch.OutOfMemoryError,) if torch is not None else ()


def _usage_error(e: Exception) -> bool:
    """Click's usage errors (exit code 2), which Typer raises from its own copy of click."""
    return getattr(e, "exit_code", None) == 2 and hasattr(e, "format_message")


def _usage_line(e) -> str:
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":
        return f"{ctx.command_path if ctx else 'seify'} needs arguments; see --help"
    return e.format_message() + (f" (see {ctx.command_path} --help)" if ctx else "")


def _fail(e: Exception, code: int, message: str) -> None:
    if state["debug"]:
        import traceback
        traceback.print_exception(e)
    print(f"error: {output.one_line(message)}", file=sys.stderr)
    sys.exit(code)
