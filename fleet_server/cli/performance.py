"""``fleet performance``: realized and estimated performance of a bundle, per window.

It parses, calls ``GET /api/v1/performance`` and prints; the server merges and judges.
"""

from __future__ import annotations

import time
from typing import Any

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import api_command, fail, num, parse_time, print_json, stamp, table

__all__ = ["performance"]


def _interval(m: dict[str, Any] | None, fmt: str) -> str:
    if not m or m.get("value") is None:
        return "-"
    if m.get("low") is None or m.get("high") is None:
        return num(m["value"], fmt)
    return f"{num(m['value'], fmt)} [{num(m['low'], fmt)}, {num(m['high'], fmt)}]"


def rows_of(result: dict[str, Any]) -> list[list[Any]]:
    """The table's rows: one per window with data, then the whole range."""
    metric = result["metric"]
    expected = result["expected"].get(metric)
    shown = num(expected["value"]) if expected else "-"
    out = []
    for p in [*result["points"], None]:
        point = result["total"] if p is None else p
        if p is not None and not point["entries"]:
            continue
        label = "total" if p is None else stamp(point["start"])
        out.append([label, point["devices"], point["labelled"],
                    _interval(point["realized"].get(metric), ".3f"),
                    num((point["estimated"].get(metric) or {}).get("value")), shown])
    return out


@click.command(help="Realized and estimated performance of a bundle (NAME@VERSION) per "
                    "window, against what it measured at packaging.")
@click.argument("label", metavar="NAME@VERSION")
@click.option("--group", default=None, help="Only this group's devices.")
@click.option("--device", default=None, help="Only this device.")
@click.option("--since", default="7d", show_default=True,
              help="How far back: 12h, 7d, 30d (or unix seconds).")
@click.option("--until", default=None, help="End: 1h (ago), ISO 8601 or unix time (default: "
                                             "now).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@api_command
def performance(api: FleetClient, label: str, group: str | None, device: str | None,
                since: str, until: str | None, as_json: bool) -> None:
    if group and device:
        fail("give --group or --device, not both")
    result = api.get("/api/v1/performance", bundle=label, group=group, device=device,
                     since=since, until=parse_time(until, time.time()))
    if as_json:
        print_json(result)
        return
    metric = result["metric"]
    click.echo(f"{result['bundle']}  {result['scope']}  {stamp(result['since'])} .. "
               f"{stamp(result['until'])}  by {result['step'] // 3600} h"
               + ("  (truncated: the newest entries left out)" if result["truncated"] else ""))
    click.echo(table(["window", "devices", "n labelled", f"realized {metric} [95 %]",
                      f"estimated {metric}", "expected"], rows_of(result)))
    for side, v in sorted(result["verdicts"].items()):
        click.echo(f"{side}: {v['verdict']} ({v['reason']})")
    if result.get("tolerances"):
        own = set(result.get("overrides") or ())
        click.echo("tolerances: " + ", ".join(
            f"{k}={v:g}" + (" (group)" if k in own else "")
            for k, v in result["tolerances"].items()))
