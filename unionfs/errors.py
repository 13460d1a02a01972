"""The one exception type for bad user input: printed as one line, never a traceback."""


class UsageError(Exception):
    """Bad input from the user; the message is shown as `pyunion: MESSAGE`."""
