"""``fleet outcomes``: upload true labels for devices, and see how far they are delivered.

The commands call the REST API (``POST`` and ``GET /api/v1/outcomes``) and print; the
server checks every row and queues the upload whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import api_command, print_json, print_rows, stamp, table

__all__ = ["outcomes"]

_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson", "json": "application/json"}
_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


@click.group(help="True labels (outcomes) for predictions made on devices.")
def outcomes() -> None:
    pass


@outcomes.command("upload", help="Queue outcomes for their devices from FILE: CSV with the "
                                 "header device,id,label (a label written as a number is "
                                 "sent as one), JSON lines of {device, id, label}, or JSON "
                                 '{"outcomes": [...]}. All rows are queued or none.')
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--format", "form", type=click.Choice(sorted(_TYPES)), default=None,
              help="The file's form (default: by its suffix, .csv .jsonl .ndjson .json).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def upload(api: FleetClient, file: Path, form: str | None, as_json: bool) -> None:
    form = form or _BY_SUFFIX.get(file.suffix.lower())
    if form is None:
        raise click.BadParameter(f"{file.name}: say --format (csv, jsonl or json)")
    done = api.upload_outcomes(file, _TYPES[form])
    if as_json:
        print_json(done)
        return
    click.echo(table(["device", "queued"], sorted(done["devices"].items())))
    click.echo(f"{done['outcomes']} outcome(s) queued for {len(done['devices'])} device(s)")


@outcomes.command("status", help="Per device: outcomes queued (not sent yet), sent and "
                                 "waiting for the device's receipt, and receipted.")
@click.option("--device", default=None, help="One device only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def status(api: FleetClient, device: str | None, as_json: bool) -> None:
    print_rows(api.get("/api/v1/outcomes", device=device), as_json,
               ["device", "queued", "sent", "receipted", "batch", "receipt", "last receipt"],
               lambda r: [r["device"], r["queued"], r["sent"], r["receipted"], r["batches"],
                          r["receipt"], stamp(r["receipt_at"])])
