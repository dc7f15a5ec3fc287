"""A one-line progress bar for large uploads and downloads (stderr, no dependencies).

    with Progress(total_bytes, "download run1/best") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

``enabled=None`` (the default everywhere) shows the bar only when the stream is a terminal;
``True`` forces it, ``False`` silences it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes"]

WIDTH = 28
REFRESH_S = 0.1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Bytes done out of ``total`` (None: unknown), redrawn at most every 0.1 s."""

    def __init__(
        self,
        total: int | None,
        label: str,
        enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = total
        self.label = label
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._closed = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = f"{human_bytes(self.done / elapsed)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * WIDTH)
            bar = "#" * filled + "." * (WIDTH - filled)
            return (
                f"{self.label} [{bar}] {frac * 100:5.1f}% "
                f"{human_bytes(self.done)}/{human_bytes(self.total)} {rate}"
            )
        return f"{self.label} {human_bytes(self.done)} {rate}"

    def _draw(self) -> None:
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= REFRESH_S:
            self._drawn = now
            self._draw()

    def close(self) -> None:
        """Draw the final state and end the line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
