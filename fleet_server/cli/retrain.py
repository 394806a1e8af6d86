"""``fleet retrain list|show|start``: the retraining runs over the REST API.

``start`` asks for a run of a recipe (``requested``): a watching runner (``edgepack retrain
--watch``) claims it. ``show`` prints one run and its lineage, from the alert that
triggered it to the rollout that took the challenger to the devices.
"""

from __future__ import annotations

from typing import Any

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import JSON_OPTION, api_command, print_json, print_rows, stamp

__all__ = ["retrain"]


@click.group(help="Retraining runs (edgepack retrain): list, show with lineage, request.")
def retrain() -> None:
    pass


@retrain.command("list", help="Runs, newest first.")
@click.option("--recipe", default=None, help="Only this recipe's runs.")
@click.option("--status", default=None,
              type=click.Choice(["requested", "running", "promoted", "rejected", "failed"]),
              help="Only runs in this status.")
@click.option("--alert", "alert_id", type=int, default=None,
              help="Only the runs this alert triggered.")
@JSON_OPTION
@api_command
def retrain_list(api: FleetClient, recipe: str | None, status: str | None,
                 alert_id: int | None, as_json: bool) -> None:
    print_rows(api.get("/api/v1/retrains", recipe=recipe, status=status, alert=alert_id),
               as_json, ["id", "recipe", "trigger", "status", "started", "champion",
                         "challenger", "rollout", "reason"],
               lambda r: [r["id"], r["recipe"], r["trigger"], r["status"], stamp(r["started"]),
                          r["champion"] or "-", r["challenger"] or "-", r["rollout"] or "-",
                          r["reason"][:60] or "-"])


def data_line(data: dict[str, Any]) -> str:
    """What a run trained on, for people: ``rows 3300, ..., time_range A .. B, sha256
    0f5c3c2f8b31d77f…`` (a range joined, a digest cut; ``--json`` has them whole)."""
    def shown(key: str, value: Any) -> str:
        if isinstance(value, list):
            return " .. ".join(map(str, value))
        if key == "sha256" and isinstance(value, str) and len(value) > 16:
            return value[:16] + "…"
        return str(value)

    return ", ".join(f"{k} {shown(k, v)}" for k, v in sorted(data.items()))


def _link(link: dict[str, Any]) -> str:
    extra = {k: v for k, v in link.items() if k not in ("step", "id", "state") and v}
    tail = "  " + ", ".join(f"{k} {v}" for k, v in extra.items()) if extra else ""
    return f"{link['step']:<10} {link['id']}  ({link['state']}){tail}"


@retrain.command("show", help="One run: what it trained on, how it compared, its lineage.")
@click.argument("run_id", type=int)
@JSON_OPTION
@api_command
def retrain_show(api: FleetClient, run_id: int, as_json: bool) -> None:
    r = api.get(f"/api/v1/retrains/{run_id}")
    if as_json:
        print_json(r)
        return
    click.echo(f"retrain run {r['id']}: recipe {r['recipe']} for group {r['group']}, "
               f"{r['status']} (trigger {r['trigger']}, by {r['actor']})")
    click.echo(f"started {stamp(r['started'])}, finished {stamp(r['finished'])}; "
               f"recipe {r['recipe_hash'][:12] or '-'}, code {r['revision'][:12] or '-'}")
    if r["reason"]:
        click.echo(f"reason: {r['reason']}")
    if r["data"]:
        click.echo(f"data: {data_line(r['data'])}")
    click.echo("")
    click.echo("lineage:")
    for link in r["lineage"]:
        click.echo(f"  {_link(link)}")


@retrain.command("start", help="Ask for a run of RECIPE now (a watching runner claims it).")
@click.argument("recipe")
@click.option("--group", required=True, help="The group the recipe's bundle runs on.")
@click.option("--bundle", required=True, help="The bundle name the recipe builds.")
@JSON_OPTION
@api_command
def retrain_start(api: FleetClient, recipe: str, group: str, bundle: str,
                  as_json: bool) -> None:
    run = api.post("/api/v1/retrains", {"recipe": recipe, "group": group, "bundle": bundle,
                                        "trigger": "manual", "requested": True})
    if as_json:
        print_json(run)
        return
    click.echo(f"retrain run {run['id']} requested for recipe {recipe}: a runner watching "
               "it (edgepack retrain --watch) starts it")
