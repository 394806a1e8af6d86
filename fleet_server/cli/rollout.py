"""``fleet rollout ...``: staged rollouts over the REST API.

``create`` and ``plan`` (a dry run) build the REST body from options; ``status`` shows
one rollout's stages, gates and devices (or lists them all); ``approve``, ``start``,
``pause``, ``resume``, ``promote`` and ``abort`` act on one. Every command takes
``--json``. The server decides everything; errors are one line and an exit status by
kind (:mod:`edgefleet.cli`). Gate names are checked here, against
:class:`~fleet_server.rollouts.values.GateThresholds`, so a typo lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import click

from edgefleet.contract.errors import SchemaError
from edgefleet.parsing import parse_duration, split_pair
from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import api_command, human_duration, num, print_json, stamp, table
from fleet_server.rollouts.values import GateThresholds

__all__ = ["duration", "parse_gate", "parse_stages", "rollout"]

def duration(text: str, what: str = "--soak") -> float:
    """A duration option (:func:`edgefleet.parsing.parse_duration`) in seconds.

    Raises:
        click.BadParameter: no unit, or not a duration.
    """
    try:
        return parse_duration(text, what)
    except SchemaError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def parse_stages(text: str) -> list[float]:
    """``1%,10%,50%,100%`` (or ``0.01,0.1,0.5,1``) → fractions.

    Raises:
        click.BadParameter: an item that is not a percentage or a fraction.
    """
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
        except ValueError:
            raise click.BadParameter(f"{item!r}: use 1%,10%,50%,100% or 0.01,0.1,0.5,1",
                                     param_hint="--stages") from None
        out.append(value)
    return out


GATE_NAMES = tuple(fd.name for fd in dataclasses.fields(GateThresholds))


def parse_gate(item: str) -> tuple[str, Any]:
    """``name=value``: ``none`` disables the gate; true/false, numbers, abort/pause.

    Raises:
        click.BadParameter: no ``=``, or a name that is not a gate (the valid ones listed,
            the closest first).
    """
    try:
        name, raw = split_pair(item, "--gate")
    except SchemaError as exc:
        raise click.BadParameter(str(exc), param_hint="--gate") from None
    if name not in GATE_NAMES:
        near = difflib.get_close_matches(name, GATE_NAMES, n=1)
        raise click.BadParameter(
            f"{name!r} is not a gate{f' (did you mean {near[0]!r}?)' if near else ''}; "
            f"the gates: {', '.join(GATE_NAMES)}", param_hint="--gate")
    low = raw.strip().lower()
    if low in ("none", "null", "off"):
        return name, None
    if low in ("true", "false"):
        return name, low == "true"
    try:
        return name, int(raw)
    except ValueError:
        pass
    try:
        return name, float(raw)
    except ValueError:
        return name, raw


def _spec(bundle: str, group: str, stages: str | None, soak: str | None,
          min_devices: str | None, shadow_first: bool, gates: tuple[str, ...],
          rollout_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"bundle": bundle, "group": group}
    if stages is not None or soak is not None or min_devices is not None:
        fractions = parse_stages(stages) if stages is not None else [0.01, 0.1, 0.5, 1.0]
        floors = [1, 3, 10, 1] if stages is None else [1] * len(fractions)
        if min_devices is not None:
            try:
                given = [int(x) for x in min_devices.split(",")]
            except ValueError:
                raise click.BadParameter(f"{min_devices!r}: an integer, or one per stage",
                                         param_hint="--min-devices") from None
            if len(given) not in (1, len(fractions)):
                raise click.BadParameter(f"{len(given)} values for {len(fractions)} stages",
                                         param_hint="--min-devices")
            floors = given * len(fractions) if len(given) == 1 else given
        soak_s = duration(soak) if soak is not None else 3600.0
        body["stages"] = [{"fraction": f, "min_devices": n, "soak_s": soak_s}
                          for f, n in zip(fractions, floors, strict=True)]
    if shadow_first:
        body["shadow_first"] = True
    if gates:
        body["gates"] = dict(parse_gate(g) for g in gates)
    if rollout_id is not None:
        body["id"] = rollout_id
    return body


_GATE_DEFAULTS = ", ".join(f"{fd.name}={fd.default}" for fd in dataclasses.fields(GateThresholds))


def stage_notes(stages: list[dict[str, Any]]) -> list[str]:
    """Warnings about a plan's stages and when each may start, for people.

    A small group collapses stages: 1 % and 10 % of 3 devices are both one device, so a
    stage can add no device, or reach the whole group before the last stage. Each stage's
    earliest start is the sum of the soaks before it (gates that wait for data, installs
    and approvals only delay it).
    """
    notes, start, total = [], 0.0, stages[-1]["size"] if stages else 0
    for prev, cur in zip([None, *stages], stages, strict=False):
        if prev is not None and cur["size"] <= prev["size"]:
            notes.append(f"warning: stage {cur['index']} ({cur['fraction']:.0%}) adds no "
                         f"device to stage {prev['index']}'s {prev['size']}: the group is "
                         f"too small for these stages")
        elif cur is not stages[-1] and cur["size"] >= total and total:
            notes.append(f"warning: stage {cur['index']} ({cur['fraction']:.0%}) already "
                         f"holds all {total} devices")
    for s in stages:
        s["earliest_start"] = start
        start += s["soak_s"]
    return notes


def _plan_options(fn: Any) -> Any:
    for option in reversed([
        click.argument("bundle"),
        click.option("--group", required=True, help="The device group to roll out to."),
        click.option("--stages", default=None, metavar="1%,10%,50%,100%",
                     help="Stage sizes, as shares of the group (the last must be 100%)."),
        click.option("--soak", default=None, metavar="DURATION",
                     help="Soak time of every stage: 90s, 30m, 1h (default 1h)."),
        click.option("--min-devices", default=None, metavar="N[,N...]",
                     help="Smallest stage size, one for all or one per stage."),
        click.option("--shadow-first", is_flag=True,
                     help="Run the bundle as a shadow on the first stage first."),
        click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
                     help="A gate threshold, e.g. max_error_rate=0.02 (none disables). "
                          f"The gates and their defaults: {_GATE_DEFAULTS}."),
        click.option("--id", "rollout_id", default=None, help="The rollout id (default: "
                     "generated)."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]):
        fn = option(fn)
    return fn


def _summary_rows(items: list[dict[str, Any]]) -> str:
    return table(["id", "bundle", "group", "status", "stage", "created", "finished"],
                 [[r["id"], r["bundle"], r["group"], r["status"], r["stage"],
                   stamp(r["created_at"]), stamp(r["finished_at"])] for r in items])


def _show(r: dict[str, Any]) -> None:
    click.echo(f"rollout {r['id']}: {r['bundle']} to group {r['group']}, {r['status']}, "
               f"stage {r['stage']} (created {stamp(r['created_at'])}"
               + (f", finished {stamp(r['finished_at'])})" if r["finished_at"] else ")"))
    click.echo("")
    click.echo(table(["stage", "share", "min", "soak", "size", "state"],
                     [[s["index"], f"{s['fraction']:.0%}", s["min_devices"],
                       human_duration(s["soak_s"]), s["size"], s["state"]]
                      for s in r["stages"]]))
    if r["gate_results"]:
        click.echo("")
        click.echo(table(["gate", "outcome", "value", "op", "threshold", "reason"],
                         [[g["name"], g["outcome"], num(g["value"], ".4g"), g["op"],
                           num(g["threshold"], ".4g"), g["reason"]]
                          for g in r["gate_results"]]))
    if r["devices"]:
        click.echo("")
        click.echo(table(["device", "role", "stage", "phase", "running", "online"],
                         [[d["device"], d["role"], "-" if d["stage"] is None else d["stage"],
                           d["phase"], d["running"] or "-", "yes" if d["online"] else "no"]
                          for d in r["devices"]]))
    if r["audit"]:
        last = r["audit"][-1]
        click.echo("")
        click.echo(f"last: {stamp(last['time'])} {last['actor']} {last['action']} "
                   f"{last['from_status'] or '-'} -> {last['to_status']}"
                   + (f": {last['reason']}" if last["reason"] else ""))


@click.group(help="Staged rollouts of a bundle to a device group.")
def rollout() -> None:
    pass


@rollout.command("create", help="Create a staged rollout of BUNDLE (name@version) to a group.")
@_plan_options
@click.option("--shadow-soak", default=None, metavar="DURATION",
              help="How long the shadow phase runs (default 1h).")
@click.option("--install-timeout", default=None, metavar="DURATION",
              help="A canary not installed after this fails (default 30m).")
@click.option("--requires-approval", is_flag=True, help="Wait for an approver to approve.")
@click.option("--start", is_flag=True, help="Start at once (unless it needs approval).")
@api_command
def rollout_create(api: FleetClient, bundle: str, group: str, stages: str | None,
                   soak: str | None, min_devices: str | None, shadow_first: bool,
                   gates: tuple[str, ...], rollout_id: str | None, as_json: bool,
                   shadow_soak: str | None, install_timeout: str | None,
                   requires_approval: bool, start: bool) -> None:
    body = _spec(bundle, group, stages, soak, min_devices, shadow_first, gates, rollout_id)
    if shadow_soak is not None:
        body["shadow_soak_s"] = duration(shadow_soak, "--shadow-soak")
    if install_timeout is not None:
        body["install_timeout_s"] = duration(install_timeout, "--install-timeout")
    if requires_approval:
        body["requires_approval"] = True
    if start:
        body["start"] = True
    r = api.post("/api/v1/rollouts", body)
    if as_json:
        print_json(r)
        return
    click.echo(f"rollout {r['id']} created: {r['bundle']} to group {r['group']} "
               f"({r['status']}, {len(r['stages'])} stages)")
    for note in stage_notes(r["stages"]):
        click.echo(note, err=True)


@rollout.command("plan", help="Dry run: which devices each stage of a rollout would hold.")
@_plan_options
@api_command
def rollout_plan(api: FleetClient, bundle: str, group: str, stages: str | None,
                 soak: str | None, min_devices: str | None, shadow_first: bool,
                 gates: tuple[str, ...], rollout_id: str | None, as_json: bool) -> None:
    body = _spec(bundle, group, stages, soak, min_devices, shadow_first, gates, rollout_id)
    p = api.post("/api/v1/rollouts/preview", body)
    if as_json:
        print_json(p)
        return
    click.echo(f"plan {p['id']}: {p['bundle']} to group {p['group']} ({p['devices']} "
               f"devices{', shadow first' if p['shadow_first'] else ''}"
               f"{', needs approval' if p['requires_approval'] else ''})")
    shown = 8
    notes = stage_notes(p["stages"])
    click.echo(table(["stage", "share", "size", "soak", "starts", "devices"],
                     [[s["index"], f"{s['fraction']:.0%}", s["size"],
                       human_duration(s["soak_s"]),
                       "at start" if not s["earliest_start"]
                       else f"+{human_duration(s['earliest_start'])}",
                       ",".join(s["devices"][:shown])
                       + (f",... (+{len(s['devices']) - shown})"
                          if len(s["devices"]) > shown else "")]
                      for s in p["stages"]]))
    click.echo("(starts: the earliest, after the soaks before it; gates waiting for data, "
               "installs and approvals delay it)")
    for note in notes:
        click.echo(note, err=True)
    if rollout_id is None:
        click.echo(f"(the order depends on the id: create with --id {p['id']} to get it)")


@rollout.command("status", help="One rollout's stages, gates and devices; no ID: list them.")
@click.argument("rollout_id", required=False)
@click.option("--status", "only", default=None, help="List only rollouts in this status.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def rollout_status(api: FleetClient, rollout_id: str | None, only: str | None,
                   as_json: bool) -> None:
    if rollout_id is None:
        items = api.get("/api/v1/rollouts", status=only)
        if as_json:
            print_json(items)
        else:
            click.echo(_summary_rows(items))
        return
    r = api.get(f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        print_json(r)
    else:
        _show(r)


def _action(name: str, text: str) -> None:
    @rollout.command(name, help=text)
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (goes into the audit log).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @api_command
    def run(api: FleetClient, rollout_id: str, reason: str, as_json: bool) -> None:
        r = api.post(f"/api/v1/rollouts/{rollout_id}/{name}", {"reason": reason})
        if as_json:
            print_json(r)
            return
        click.echo(f"rollout {r['id']}: {name} done, now {r['status']} (stage {r['stage']})")

    run.__name__ = f"rollout_{name}"


for _name, _text in (
        ("approve", "Approve a rollout that needs it (approver role, approver-signed bundle)."),
        ("start", "Start a ready rollout."),
        ("pause", "Pause a rollout: nothing automatic happens until resumed."),
        ("resume", "Resume a paused rollout (its soak restarts)."),
        ("promote", "Skip the rest of the soak: advance to the next stage now."),
        ("abort", "Abort: every touched device goes back to its previous bundle.")):
    _action(_name, _text)
