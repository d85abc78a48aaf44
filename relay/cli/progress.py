"""How the commands show what they are doing while they do it.

The long commands (backfill, catch-up) keep their progress on stderr, so stdout keeps only results: on a
terminal the status is one line rewritten in place; anywhere else (a log file, CI, a test) each change is a
line of its own, and an unchanged status is not repeated. The Auth0 steps of deploy-action and verify are
lines on stdout, each flushed at once, as are Auth0's rate-limit waits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def say(line: str) -> None:
    """One step done, on stdout at once."""
    print(line, flush=True)


def rate_limit_notice(stream: TextIO, status: StatusLine | None = None) -> Callable[[str, float], None]:
    """Tells the operator on `stream` of each wait after Auth0 answered 429. A `status` line rewritten on the
    same terminal is ended first, so that the notice gets a line of its own instead of the end of it."""

    def notice(what: str, seconds: float) -> None:
        if status is not None:
            status.end()
        print(
            f"  rate limited by Auth0 while trying to {what}; retrying in {seconds:g} s",
            file=stream,
            flush=True,
        )

    return notice
