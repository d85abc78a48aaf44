"""Progress of the long operator commands (backfill, catch-up), on stderr so stdout keeps only results.

On a terminal the status is one line rewritten in place; anywhere else (a log file, CI, a test) each change is
a line of its own, and an unchanged status is not repeated.
"""

from __future__ import annotations

import sys
from typing import TextIO


class StatusLine:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._rewrite = self._stream.isatty()
        self._shown: str | None = None

    def show(self, text: str) -> None:
        if text == self._shown:
            return
        self._shown = text
        if self._rewrite:
            # Back to the start of the line, the new text, then clear whatever the old one left.
            self._stream.write(f"\r{text}\x1b[K")
        else:
            self._stream.write(f"{text}\n")
        self._stream.flush()

    def end(self) -> None:
        """Leaves the last status on screen; whatever is printed next starts on a line of its own."""
        if self._rewrite and self._shown is not None:
            self._stream.write("\n")
            self._stream.flush()
        self._shown = None
