"""The runner's failure type: a one-line message for anything that stops a run (not bad input)."""


class RunError(Exception):
    """A run could not be set up or torn down; shown as `pyunion: MESSAGE`, exit status 125."""
