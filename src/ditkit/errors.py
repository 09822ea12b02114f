"""User-facing errors: the CLI prints these as one line, without a traceback."""


class DitkitError(Exception):
    """Bad input or state that the user can fix; the message names the problem and the fix."""
