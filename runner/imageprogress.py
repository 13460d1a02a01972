"""Progress bars on stderr for long image operations, shown only when stderr is a terminal."""

import sys

BAR_WIDTH = 30
LARGE = 4 << 20  # bytes; smaller jobs finish too fast to need a bar


class Progress:
    """A one-line `label [####    ] 12.0/40.0 MB` bar, redrawn in place; a no-op off a terminal."""

    def __init__(self, label: str, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.label, self.total, self.shown = label, max(total, 1), -1
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.active = tty and total >= LARGE

    def update(self, done: int) -> None:
        if not self.active:
            return
        step = min(BAR_WIDTH * 4, done * BAR_WIDTH * 4 // self.total)
        if step == self.shown:
            return
        self.shown = step
        filled = step // 4
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        mb = 1 << 20
        self.stream.write(f"\r{self.label} [{bar}] {done / mb:.1f}/{self.total / mb:.1f} MB")
        self.stream.flush()

    def close(self) -> None:
        if self.active and self.shown >= 0:
            self.stream.write("\n")
            self.stream.flush()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
