"""``fleet dataset export``: the rows devices captured, with their true labels, as a file.

The command streams ``GET /api/v1/capture/export`` (JSON lines) to a temporary file,
then writes CSV (columns ``device``, ``id``, ``time``, every feature in the order first
seen, ``predicted``, ``label``; an unlabelled row's label is empty) or Parquet (only when
pyarrow is installed: it is not a dependency of the fleet server).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import api_command, print_json
from fleet_server.errors import InvalidRequestError

__all__ = ["dataset", "write_rows"]

LEADING = ("device", "id", "time")
TRAILING = ("predicted", "label")


@click.group(help="Datasets of captured rows, ready to train on.")
def dataset() -> None:
    pass


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in LEADING and key not in TRAILING:
                seen.setdefault(key, None)
    return [*LEADING, *seen, *TRAILING]


def _read(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_rows(lines: Path, out: Path) -> int:
    """Write the JSON-lines export ``lines`` to ``out`` (.csv or .parquet); returns rows.

    Raises:
        InvalidRequestError: another suffix, or .parquet without pyarrow installed.
    """
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InvalidRequestError(f"--out {out.name}: write .csv or .parquet", field="out")
    columns = _columns(_read(lines))
    if suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InvalidRequestError("--out .parquet needs pyarrow (pip install pyarrow); "
                                      "or write .csv", field="out") from None
        rows = list(_read(lines))
        pq.write_table(pa.Table.from_pylist(rows), str(out))
        return len(rows)
    n = 0
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in _read(lines):
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
            n += 1
    return n


@dataset.command("export", help="Export the rows devices captured for bundle "
                                "NAME@VERSION, with the true labels joined from outcomes, "
                                "to FILE.csv or FILE.parquet (Parquet needs pyarrow).")
@click.argument("bundle")
@click.option("--group", default=None, help="Only rows of the group's members.")
@click.option("--since", default=None, help="Only rows served since (14d, 12h, or unix "
                                            "seconds); default: all retained.")
@click.option("--labelled", is_flag=True, help="Only rows with a true label.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The file to write (.csv or .parquet).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (rows, file).")
@api_command
def export(api: FleetClient, bundle: str, group: str | None, since: str | None,
           labelled: bool, out: Path, as_json: bool) -> None:
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise InvalidRequestError(f"--out {out.name}: write .csv or .parquet", field="out")
    fd, tmp = tempfile.mkstemp(suffix=".jsonl", dir=out.parent if str(out.parent) else None)
    try:
        with os.fdopen(fd, "wb") as fh:
            api.download_lines("/api/v1/capture/export", fh, bundle=bundle, group=group,
                               since=since, labelled="true" if labelled else None)
        n = write_rows(Path(tmp), out)
    finally:
        os.unlink(tmp)
    if as_json:
        print_json({"bundle": bundle, "rows": n, "out": str(out)})
        return
    click.echo(f"{n} row(s) of {bundle} written to {out}")
