"""Helpers of the ``fleet`` CLI: error exits, time and ``key=value`` parsing, tables, the
API client option pair. Nothing here defines a command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import wraps
from typing import Any

import click

from edgefleet.cli import FAILURE, NOT_FOUND, error_line, exit_code, paint
from edgefleet.contract.errors import SchemaError
from edgefleet.errors import EdgefleetError
from edgefleet.parsing import parse_duration, parse_pairs
from fleet_server.cli.client import FleetClient

__all__ = ["API_OPTIONS", "DB_OPTION", "JSON_OPTION", "api_command", "exits_on_error", "fail",
           "human_duration", "num", "pairs", "parse_time", "print_json", "print_rows", "stamp",
           "table"]

_DB_HELP = ("The server's database: a SQLite file (a path, or sqlite:///path) or "
           "postgresql://user@host[:port]/dbname.")
# a string, not click.Path: a URL is not a path (Path would fold its "//")
DB_OPTION = click.option("--db", default="fleet.db", show_default=True, help=_DB_HELP)
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout (for scripts).")


def fail(message: str, code: int = FAILURE) -> None:
    """Print ``fleet: error: <message>`` on stderr and exit with ``code``
    (:mod:`edgefleet.cli`'s statuses)."""
    click.echo(error_line("fleet", message), err=True)
    sys.exit(code)


def exits_on_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn edgefleet (and OS, value) errors of a command into one line and an exit status
    by their kind (:func:`edgefleet.cli.exit_code`)."""
    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgefleetError as exc:
            fail(str(exc), exit_code(exc))
        except FileNotFoundError as exc:
            fail(str(exc), NOT_FOUND)
        except (ValueError, OSError) as exc:
            fail(str(exc))
    return run


def parse_time(text: str | None, now: float) -> float | None:
    """``1h``/``30m``/``2d`` ago, ISO 8601 (UTC unless it says), or unix seconds."""
    if text is None:
        return None
    try:
        return now - parse_duration(text, "time")
    except SchemaError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: use 1h, 30m, 2d, ISO 8601 or unix seconds") from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict (:func:`edgefleet.parsing.parse_pairs`), a mistake
    being a usage error."""
    try:
        return parse_pairs(items, what)
    except SchemaError as exc:
        raise click.BadParameter(str(exc)) from None


def stamp(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def human_duration(seconds: float | None) -> str:
    """``3600`` → ``1h``, ``5400`` → ``1h30m``, ``90`` → ``1m30s``: for tables (``--json``
    keeps the exact seconds)."""
    if seconds is None:
        return "-"
    left, parts = round(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2:
            break
    return "".join(parts)


def num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; on a terminal (and without ``NO_COLOR``) cells
    that are verdicts are coloured after padding, so the columns stay aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(paint(c, c.ljust(w)) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def print_rows(rows: Sequence[Any], as_json: bool, head: Sequence[str],
               cells: Callable[[Any], Sequence[Any]]) -> None:
    """A list command's answer: ``rows`` as they are with ``--json``, else a table of
    ``head`` with ``cells(row)`` a line."""
    if as_json:
        print_json(rows)
    else:
        click.echo(table(head, [cells(r) for r in rows]))


API_OPTIONS = [
    click.option("--server", envvar="FLEET_SERVER", default="http://127.0.0.1:8000",
                 show_default=True, help="The fleet server's URL (env FLEET_SERVER)."),
    click.option("--token", envvar="FLEET_TOKEN", default=None,
                 help="An operator token (env FLEET_TOKEN)."),
]


def api_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --server/--token and pass a ready client as ``api``."""
    @wraps(fn)
    def run(server: str, token: str | None, **kwargs: Any) -> Any:
        with FleetClient(server, token) as api:
            return fn(api=api, **kwargs)
    for option in reversed(API_OPTIONS):
        run = option(run)
    return exits_on_error(run)
