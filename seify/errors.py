"""The one error type users see: a mistake in their input, reported in one line (exit code 2 on the CLI)."""


class SeifyError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what to do."""
