"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit code 2."""


class FirstSkipError(ValueError):
    """A user-facing error: its message says what is wrong and how to fix it."""
