"""A progress bar with ETA on stderr (rank 0): redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Steps `start+1 .. total` of one phase; the ETA uses the mean time of the steps seen."""

    WIDTH = 24

    def __init__(self, label: str, total: int, start: int = 0, every: int = 1,
                 enabled: bool = True, stream=None):
        self.label, self.total, self.start, self.every = label, total, start, every
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.began = time.monotonic()

    def update(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        per_step = (time.monotonic() - self.began) / max(done, 1)
        eta = per_step * (self.total - step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        text = (f"[{self.label}] {step}/{self.total} {100 * step / self.total:3.0f}% {shown} "
                f"| {per_step:.2f} s/step ETA {format_duration(eta)}")
        if self.tty:
            filled = int(self.WIDTH * step / self.total)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            end = "\n" if step == self.total else ""
            self.stream.write(f"\r{bar} {text}\x1b[K{end}")
        elif step % self.every == 0 or step == self.total or step == self.start + 1:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A log line that does not garble the bar."""
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
