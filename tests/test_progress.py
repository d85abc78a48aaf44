"""How the long commands show progress: a status line rewritten in place on a terminal, a line a change
elsewhere, and Auth0's rate-limit notices on lines of their own either way."""

import io

from relay.cli.progress import StatusLine, rate_limit_notice


class Terminal(io.StringIO):
    """stdout and stderr of one terminal window: everything lands on the same screen."""

    def isatty(self) -> bool:
        return True


def screen_lines(written: str) -> list[str]:
    """The lines a terminal shows: a carriage return goes back to the start, ESC[K clears the rest."""
    lines = []
    for line in written.split("\n"):
        lines.append(line.split("\r")[-1].replace("\x1b[K", ""))
    return lines


def test_a_rate_limit_notice_never_shares_a_line_with_the_status_on_a_terminal() -> None:
    terminal = Terminal()
    status = StatusLine(terminal)
    notice = rate_limit_notice(terminal, status)

    status.show("catch-up: 100 applied")
    notice("read the Events API", 2)
    status.show("catch-up: 200 applied")
    status.end()

    assert screen_lines(terminal.getvalue()) == [
        "catch-up: 100 applied",
        "  rate limited by Auth0 while trying to read the Events API; retrying in 2 s",
        "catch-up: 200 applied",
        "",
    ]


def test_off_a_terminal_each_status_change_is_a_line_and_a_repeat_is_not() -> None:
    log = io.StringIO()
    status = StatusLine(log)
    notice = rate_limit_notice(log, status)

    status.show("backfill: export 10%")
    status.show("backfill: export 10%")
    notice("read the export job", 1)
    status.show("backfill: export 10%")  # shown again: the notice came in between
    status.show("backfill: export 50%")

    assert log.getvalue().splitlines() == [
        "backfill: export 10%",
        "  rate limited by Auth0 while trying to read the export job; retrying in 1 s",
        "backfill: export 10%",
        "backfill: export 50%",
    ]
