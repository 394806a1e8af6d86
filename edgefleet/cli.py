"""What the three command-line programs share: exit codes by kind of failure, and the one
way a refusal is printed.

``edgepack``, ``edge-agent`` and ``fleet`` each print a refusal as one line on stderr,
``<program>: error: <message>``, and exit with a status that tells a script what kind of
failure it was, without parsing the message:

    0  done
    1  refused or failed (bad input, a bundle that does not verify, a database error, ...)
    2  usage: an unknown option, a missing argument, a value of the wrong form (click's)
    3  not found: the device, bundle, group, rollout or file named does not exist
    4  conflict: it exists already, differs from what exists, or its state forbids this
    5  not allowed: no token, an unknown or revoked one, or a role without the right
    6  refused by a check: a fidelity, fairness or champion gate, a rollout gate
    7  unavailable: the server or broker cannot be reached now; try again later

Colour only on a terminal and never with ``NO_COLOR`` set (:func:`colour`): the error
prefix, and table cells that are verdicts (drift, fail, ok, ...).

A class says which by its ``exit_code`` attribute; the fleet server's errors carry an HTTP
``status`` (their own, or the server's answer for the CLI's client), mapped here. Output
piped into a program that stops reading (``| head``) ends quietly with status 0.

This module imports only click and the standard library, so every program (the device's
included) can use it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import click

from edgefleet.errors import EdgefleetError

__all__ = ["CONFLICT", "EXIT_CODES_HELP", "FAILURE", "GATE", "NOT_FOUND", "OK", "UNAUTHORISED",
           "UNAVAILABLE", "USAGE", "JsonLogFormatter", "colour", "error_line", "exit_code",
           "paint", "run"]

OK, FAILURE, USAGE, NOT_FOUND, CONFLICT, UNAUTHORISED, GATE, UNAVAILABLE = range(8)

EXIT_CODES_HELP = ("Exit status: 0 done, 1 refused or failed, 2 usage, 3 not found, "
                   "4 conflict, 5 not allowed (token or role), 6 refused by a check "
                   "(fidelity, fairness, champion or rollout gate), 7 server or broker "
                   "unavailable.")

_BY_STATUS = {404: NOT_FOUND, 409: CONFLICT, 401: UNAUTHORISED, 403: UNAUTHORISED,
              503: UNAVAILABLE, 0: UNAVAILABLE}


# a table cell that is one of these words is coloured by what it says
_RED = frozenset({"drift", "fail", "failed", "aborted", "open", "offline", "overdue",
                  "rejected", "broken"})
_YELLOW = frozenset({"warn", "pending", "paused", "waiting", "due", "requested", "running"})
_GREEN = frozenset({"ok", "pass", "completed", "online", "resolved", "promoted", "intact"})


def colour(err: bool = False) -> bool:
    """Whether to colour: the stream is a terminal and ``NO_COLOR`` is not set
    (https://no-color.org); pipes, files and CI logs get plain text."""
    if os.environ.get("NO_COLOR"):
        return False
    stream = sys.stderr if err else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def paint(word: str, padded: str | None = None, *, err: bool = False) -> str:
    """``padded`` (default ``word``) coloured by what ``word`` says, when colouring."""
    text = word if padded is None else padded
    if not colour(err):
        return text
    key = word.strip().lower()
    fg = "red" if key in _RED else "yellow" if key in _YELLOW else \
        "green" if key in _GREEN else None
    return click.style(text, fg=fg) if fg else text


def error_line(prog: str, message: str) -> str:
    """``<prog>: error: <message>``, the prefix in bold red on a terminal."""
    prefix = f"{prog}: error:"
    if colour(err=True):
        prefix = click.style(prefix, fg="red", bold=True)
    return f"{prefix} {message}"


def exit_code(exc: BaseException) -> int:
    """The exit status for an error: its class's ``exit_code``, else by its HTTP status."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return _BY_STATUS.get(status, FAILURE)
    return FAILURE


def run(group: click.Command, prog: str, argv: Sequence[str] | None = None) -> int:
    """Run a click program, turning edgefleet errors into one line and an exit status.

    A refusal that carries a ``table`` (a gate's verdict, row by row) prints it after the
    line.
    """
    try:
        group.main(args=list(argv) if argv is not None else None, prog_name=prog,
                   standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return FAILURE
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except EdgefleetError as exc:
        click.echo(error_line(prog, str(exc)), err=True)
        table = getattr(exc, "table", "")
        if table:
            click.echo(table, err=True)
        return exit_code(exc)
    except BrokenPipeError:
        _quiet_stdout()
        return OK
    except SystemExit:
        # click answers a closed pipe itself: it wraps stdout in its PacifyFlushWrapper
        # (so the final flush stays quiet) and exits 1; a closed pipe is not a failure
        if type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            return OK
        raise
    return OK


def _quiet_stdout() -> None:
    """After a reader closed the pipe, point stdout at /dev/null so that the interpreter's
    final flush does not raise again (the recipe in Python's signal documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line (``--json`` on the long-running commands): what log shippers
    (journald, Loki, CloudWatch) parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=True)
