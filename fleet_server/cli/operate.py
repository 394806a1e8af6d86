"""The ``fleet`` commands that operate a fleet through the REST API (``--server``,
``--token``): devices, groups, bundles, desired state, drift reports, alerts.

They parse, call the API and print; the server decides. :mod:`fleet_server.cli.main` adds them to
the ``fleet`` group.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any

import click

from fleet_server.cli.client import FleetClient
from fleet_server.cli.util import (
    JSON_OPTION,
    api_command,
    num,
    pairs,
    parse_time,
    print_json,
    print_rows,
    stamp,
    table,
)

__all__ = ["alerts", "bundle", "desired", "device_list", "device_remove", "device_show", "drift",
           "group"]


_DEVICE_HEAD = ["device", "online", "last seen", "bundle", "labels"]


def _device_cells(d: dict[str, Any]) -> list[Any]:
    return [d["id"], "yes" if d["online"] else "no", stamp(d["last_seen"]),
            f"{d['bundle']['name']}@{d['bundle']['version']}" if d["bundle"] else "-",
            ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))]


@click.command("list", help="List devices, filtered by labels and online state.")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Must match (repeat).")
@click.option("--online/--offline", default=None, help="Only online or offline devices.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def device_list(api: FleetClient, label: tuple[str, ...], online: bool | None,
                as_json: bool) -> None:
    devices = api.get("/api/v1/devices", label=list(label) or None,
                      online=None if online is None else str(online).lower())
    print_rows(devices, as_json, _DEVICE_HEAD, _device_cells)



@click.command("show", help="One device: state, health, desired state, reports.")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def device_show(api: FleetClient, device_id: str, as_json: bool) -> None:
    d = api.get(f"/api/v1/devices/{device_id}")
    if as_json:
        print_json(d)
        return
    click.echo(table(_DEVICE_HEAD, [_device_cells(d)]))
    health = d.get("health") or {}
    if health:
        click.echo("health: " + ", ".join(f"{k}={v}" for k, v in sorted(health.items())))
    desired = d.get("desired")
    if desired:
        b = desired["bundle"]
        click.echo(f"desired: revision {desired['revision']}, "
                   f"{b['name'] + '@' + b['version'] if b else 'no bundle'}")
    for r in d.get("reports", [])[:5]:
        click.echo(f"report: {stamp(r['received'])} rev {r['revision']} {r['outcome']} "
                   f"{r['bundle']['name']}@{r['bundle']['version']} {r['reason']}".rstrip())


@click.command("remove", help="Decommission a device: its secret stops working, its "
                              "desired state goes (cleared on the broker too); then run "
                              "`fleet broker-config` again for its broker account.")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def device_remove(api: FleetClient, device_id: str, as_json: bool) -> None:
    done = api.request("DELETE", f"/api/v1/devices/{device_id}").json()
    if as_json:
        print_json(done)
        return
    click.echo(f"device {device_id!r} removed; its retained desired state "
               + ("is cleared" if done["retained_cleared"] else
                  "is cleared when the server next connects to the broker"))
    click.echo(f"its broker account: {done['broker_account']}")


# --------------------------------------------------------------------------- groups


@click.group(help="Device groups (named label selectors).")
def group() -> None:
    pass


_DRIFT_HELP = ("The group's own drift setting over the server's (repeat): e.g. "
               "importance_share=0.2, persistence=2, persistence_of=3, lateness_s=300, "
               "psi_drift=0.2 (the keys of `fleet serve --drift`).")


_PERFORMANCE_HELP = ("The group's own performance alert tolerance over the server's "
                     "(repeat): rate=0.02 (accuracy may fall two points below the packaged "
                     "value), error=0.1, min_labelled=500, min_served=1000 (the keys of "
                     "`fleet serve --performance`).")


def _drift_settings(items: tuple[str, ...], option: str = "--drift") -> dict[str, float]:
    out = {}
    for key, text in pairs(items, option).items():
        try:
            out[key] = float(text)
        except ValueError:
            raise click.BadParameter(f"{option} {key}: {text!r} is not a number") from None
    return out


def _settings(drift: dict[str, Any]) -> str:
    return ",".join(f"{k}={num(v, 'g')}" for k, v in sorted(drift.items())) or "-"


def check_important(api: FleetClient, important: tuple[str, ...], label: str | None) -> None:
    """With ``--bundle``, every ``--important`` feature must be one of its inputs.

    Raises:
        click.BadParameter: a feature the bundle does not take (the closest named).
    """
    if label is None or not important:
        return
    name, _, version = label.partition("@")
    inputs = [f["name"] for f in api.get(f"/api/v1/bundles/{name}/{version}")
              ["manifest"]["inputs"]]
    for feature in important:
        if feature not in inputs:
            near = difflib.get_close_matches(feature, inputs, n=1)
            raise click.BadParameter(
                f"{feature!r} is not an input of {label}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; its inputs: {', '.join(inputs[:20])}", param_hint="--important")


def capture_options(command: Any) -> Any:
    """``--capture on|off|reset``, ``--capture-rate``, ``--capture-cap``,
    ``--capture-features``: a group's data capture (issue 15)."""
    for option in reversed((
        click.option("--capture", "capture", type=click.Choice(["on", "off", "reset"]),
                     default=None, help="Data capture on the group's devices: on, off (stops "
                     "at once), or reset (none: each device's own config stands)."),
        click.option("--capture-rate", type=float, default=None, metavar="SHARE",
                     help="Share of served rows sampled, in [0, 1] (default 0.01)."),
        click.option("--capture-cap", type=int, default=None, metavar="ROWS",
                     help="Rows a window at most, per device (default 1000)."),
        click.option("--capture-features", default=None, metavar="A,B,C",
                     help="The allowlist: inputs of the bundle the group runs; no other "
                          "feature leaves a device (default: each device's own list)."),
    )):
        command = option(command)
    return command


def capture_body(capture: str | None, rate: float | None, cap: int | None,
                 features: str | None) -> dict[str, Any] | None:
    """The API's ``capture`` object from the options (None: none given)."""
    if capture is None and rate is None and cap is None and features is None:
        return None
    body: dict[str, Any] = {}
    if capture == "reset":
        body["reset"] = True
    elif capture is not None:
        body["enabled"] = capture == "on"
    if rate is not None:
        body["rate"] = rate
    if cap is not None:
        body["max_rows"] = cap
    if features is not None:
        body["features"] = [f.strip() for f in features.split(",") if f.strip()]
    return body


def capture_text(policy: dict[str, Any] | None) -> str:
    if policy is None:
        return "-"
    if not policy["enabled"]:
        return "off"
    features = policy.get("features")
    return (f"rate {num(policy['rate'], 'g')}, at most {policy['max_rows']} rows a window, "
            + ("the devices' own features" if features is None else
               "features " + ",".join(features)))


@group.command("create", help="Create a group of the devices matching every --selector.")
@click.argument("name")
@click.option("--selector", multiple=True, metavar="KEY=VALUE", help="Label to match (repeat).")
@click.option("--requires-approval", is_flag=True, help="Rollouts to it need an approver.")
@click.option("--important", multiple=True, help="A feature whose drift makes the group drift.")
@click.option("--require", "require", multiple=True, metavar="card,approval,fairness,champion",
              help="What a bundle must carry before a rollout to this group: a card, an "
                   "approver's signature, fairness checks passed, a champion comparison won "
                   "(comma-separated or repeated).")
@click.option("--drift", "drift", multiple=True, metavar="KEY=VALUE", help=_DRIFT_HELP)
@click.option("--performance", "performance", multiple=True, metavar="KEY=VALUE",
              help=_PERFORMANCE_HELP)
@click.option("--bundle", "schema_of", default=None, metavar="NAME@VERSION",
              help="Check --important against this bundle's inputs (a misspelt feature is "
                   "refused, naming the closest).")
@capture_options
@JSON_OPTION
@api_command
def group_create(api: FleetClient, name: str, selector: tuple[str, ...],
                 requires_approval: bool, important: tuple[str, ...],
                 require: tuple[str, ...], drift: tuple[str, ...],
                 performance: tuple[str, ...], schema_of: str | None,
                 capture: str | None, capture_rate: float | None, capture_cap: int | None,
                 capture_features: str | None, as_json: bool) -> None:
    check_important(api, important, schema_of)
    requires = [r.strip() for value in require for r in value.split(",") if r.strip()]
    body = {"name": name, "selector": pairs(selector, "selector"),
            "requires_approval": requires_approval, "important_features": list(important),
            "requires": requires, "drift": _drift_settings(drift),
            "performance": _drift_settings(performance, "--performance")}
    wanted = capture_body(capture, capture_rate, capture_cap, capture_features)
    if wanted is not None:
        body["capture"] = wanted
    g = api.post("/api/v1/groups", body)
    if as_json:
        print_json(g)
        return
    needs = f", requires {', '.join(g['requires'])}" if g.get("requires") else ""
    click.echo(f"group {g['name']!r} created ({g['members']} member(s){needs})"
               + (f", drift settings {_settings(g['drift'])}" if g["drift"] else "")
               + (f", performance tolerances {_settings(g['performance'])}"
                  if g.get("performance") else "")
               + (f", capture {capture_text(g['capture'])}" if g.get("capture") else ""))


@group.command("update", help="Change a group's important features, drift settings, "
                              "performance tolerances or data capture.")
@click.argument("name")
@click.option("--important", multiple=True,
              help="Replace the important features (repeat; see --no-important).")
@click.option("--no-important", is_flag=True, help="Clear the important features.")
@click.option("--drift", "drift", multiple=True, metavar="KEY=VALUE", help=_DRIFT_HELP)
@click.option("--reset-drift", multiple=True, metavar="KEY",
              help="A drift setting back to the server's (repeat; 'all' for every one).")
@click.option("--performance", "performance", multiple=True, metavar="KEY=VALUE",
              help=_PERFORMANCE_HELP)
@click.option("--reset-performance", multiple=True, metavar="KEY",
              help="A performance tolerance back to the server's (repeat; 'all' for every "
                   "one).")
@click.option("--bundle", "schema_of", default=None, metavar="NAME@VERSION",
              help="Check --important against this bundle's inputs.")
@capture_options
@JSON_OPTION
@api_command
def group_update(api: FleetClient, name: str, important: tuple[str, ...], no_important: bool,
                 drift: tuple[str, ...], reset_drift: tuple[str, ...],
                 performance: tuple[str, ...], reset_performance: tuple[str, ...],
                 schema_of: str | None,
                 capture: str | None, capture_rate: float | None, capture_cap: int | None,
                 capture_features: str | None, as_json: bool) -> None:
    check_important(api, important, schema_of)
    if important and no_important:
        raise click.UsageError("--important and --no-important contradict each other")
    body: dict[str, Any] = {"drift": _drift_settings(drift), "reset_drift": list(reset_drift),
                            "performance": _drift_settings(performance, "--performance"),
                            "reset_performance": list(reset_performance)}
    if important or no_important:
        body["important_features"] = list(important)
    wanted = capture_body(capture, capture_rate, capture_cap, capture_features)
    if wanted is not None:
        body["capture"] = wanted
    g = api.request("PATCH", f"/api/v1/groups/{name}", json=body).json()
    if as_json:
        print_json(g)
        return
    shown = g.get("capture") is not None or wanted is not None
    click.echo(f"group {g['name']!r}: important {','.join(g['important_features']) or '-'}; "
               f"drift settings {_settings(g['drift'])}"
               + (f"; performance tolerances {_settings(g['performance'])}"
                  if g.get("performance") else "")
               + (f"; capture {capture_text(g.get('capture'))}" if shown else ""))


@group.command("show", help="One group: selector, members, requirements, drift settings, "
                            "performance tolerances, data capture.")
@click.argument("name")
@JSON_OPTION
@api_command
def group_show(api: FleetClient, name: str, as_json: bool) -> None:
    g = api.get(f"/api/v1/groups/{name}")
    if as_json:
        print_json(g)
        return
    for key, value in (
            ("group", g["name"]), ("members", g["members"]),
            ("selector", ",".join(f"{k}={v}" for k, v in sorted(g["selector"].items())) or "*"),
            ("approval", "required" if g["requires_approval"] else "not required"),
            ("requires", ",".join(g.get("requires") or []) or "-"),
            ("important", ",".join(g["important_features"]) or "-"),
            ("drift", _settings(g["drift"])),
            ("performance", _settings(g.get("performance") or {})),
            ("capture", capture_text(g.get("capture")) if g.get("capture") is not None
             else "- (each device's own config)")):
        click.echo(f"{key:10} {value}")


@group.command("list", help="List groups with their selectors and member counts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def group_list(api: FleetClient, as_json: bool) -> None:
    print_rows(api.get("/api/v1/groups"), as_json,
               ["group", "members", "selector", "approval", "important", "requires", "drift",
                "capture"],
               lambda g: [g["name"], g["members"],
                          ",".join(f"{k}={v}" for k, v in sorted(g["selector"].items())) or "*",
                          "yes" if g["requires_approval"] else "no",
                          ",".join(g["important_features"]) or "-",
                          ",".join(g.get("requires") or []) or "-", _settings(g["drift"]),
                          capture_text(g.get("capture"))])


@group.command("delete", help="Delete a group (its devices are untouched).")
@click.argument("name")
@JSON_OPTION
@api_command
def group_delete(api: FleetClient, name: str, as_json: bool) -> None:
    api.delete(f"/api/v1/groups/{name}")
    if as_json:
        print_json({"group": name, "deleted": True})
    else:
        click.echo(f"group {name!r} deleted")


# --------------------------------------------------------------------------- bundles


@click.group(help="Bundles on the server.")
def bundle() -> None:
    pass


@bundle.command("upload", help="Upload a bundle; the server verifies it before storing.")
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@JSON_OPTION
@api_command
def bundle_upload(api: FleetClient, path: Path, as_json: bool) -> None:
    status, b = api.upload(path)
    if as_json:  # the stored bundle, and whether this call stored it
        print_json({**b, "created": status == 201})
        return
    what = "uploaded" if status == 201 else "already stored"
    click.echo(f"{b['name']}@{b['version']} {what} (sha256 {b['sha256'][:16]}…)")


@bundle.command("list", help="List stored bundles.")
@click.option("--name", default=None, help="Only this bundle name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def bundle_list(api: FleetClient, name: str | None, as_json: bool) -> None:
    print_rows(api.get("/api/v1/bundles", name=name), as_json,
               ["bundle", "size", "uploaded", "by", "signers"],
               lambda b: [f"{b['name']}@{b['version']}", b["size"], stamp(b["uploaded"]),
                          b["uploaded_by"], ",".join(s["role"] for s in b["signers"])])


_QUESTIONS = (("approved", "who approved it"), ("data", "what data trained it"),
              ("evaluation", "how it was evaluated"), ("biases", "what biases were tested"),
              ("review", "when it is reviewed next"), ("explanations", "how it is explained"))


@bundle.command("show", help="One bundle: the six questions (who approved it, what data "
                             "trained it, how it was evaluated and against what, what biases "
                             "were tested and found, when it is reviewed next, how its "
                             "decisions are explained), each with its evidence, and where it "
                             "runs.")
@click.argument("label", metavar="NAME@VERSION")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def bundle_show(api: FleetClient, label: str, as_json: bool) -> None:
    name, _, version = label.partition("@")
    g = api.get(f"/api/v1/bundles/{name}/{version}/governance")
    if as_json:
        print_json(g)
        return
    click.echo(f"{g['bundle']}  sha256 {g['sha256']}  task {g['task']}"
               + ("" if g["has_card"] else "  (built without a card.toml)"))
    click.echo("inputs: " + ", ".join(g["data"]["inputs"]))
    for key, question in _QUESTIONS:
        click.echo(f"{question + ':':<28} {g[key]['answer']}")
    for a in g["approved"]["approvals"]:
        who = a["name"] or a["keyid"][:16] + "…"
        click.echo(f"  approval: {who} as {a['role']}"
                   f"{'' if a['role_confirmed'] else ' (role not confirmed)'} at "
                   f"{a['signed_at']}: {a['comment']!r}"
                   + (f", review by {a['review_by']}" if a["review_by"] else ""))
    for c in g["biases"]["checks"]:
        click.echo(f"  fairness: {c['column']} {c['gap']} = {num(c['value'])} "
                   f"({c['kind']} {c['bound']}) {'passed' if c['passed'] else 'FAILED'}")
    fleet = g["fleet"]
    click.echo(f"runs on {fleet['devices']} device(s)")
    for grp in fleet["groups"]:
        missing = ", ".join(m["requirement"] for m in grp["missing"])
        click.echo(f"  group {grp['group']}: {grp['running']} running"
                   + (f"; requires {', '.join(grp['requires'])}" if grp["requires"] else "")
                   + (f"; MISSING {missing}" if missing else ""))
    for r in fleet["rollouts"]:
        click.echo(f"  rollout {r['id']} to {r['group']}: {r['status']}")
    for d in fleet["drift"]:
        click.echo(f"  drift {d['scope']}: {d['verdict']}")
    for a in fleet["alerts"]:
        click.echo(f"  alert {a['kind']}: {a['message']}")


# --------------------------------------------------------------------------- desired


@click.group(help="Desired state of devices.")
def desired() -> None:
    pass


@desired.command("set", help="Set the bundle a device should run (NAME@VERSION, or 'none').")
@click.argument("device_id")
@click.argument("label", metavar="NAME@VERSION")
@click.option("--shadow", default=None, metavar="NAME@VERSION", help="Run beside it, unserved.")
@click.option("--allow-downgrade", is_flag=True, help="Allow a lower version than installed.")
@JSON_OPTION
@api_command
def desired_set(api: FleetClient, device_id: str, label: str, shadow: str | None,
                allow_downgrade: bool, as_json: bool) -> None:
    d = api.put(f"/api/v1/devices/{device_id}/desired",
                {"bundle": None if label == "none" else label, "shadow": shadow,
                 "allow_downgrade": allow_downgrade})
    if as_json:
        print_json(d)
        return
    b = d["bundle"]
    click.echo(f"{device_id}: revision {d['revision']}, "
               f"{b['name'] + '@' + b['version'] if b else 'no bundle'}")


# --------------------------------------------------------------------------- drift


@click.command(help="The drift report of a bundle (NAME@VERSION) over the fleet, a group or "
                   "a device.")
@click.argument("label", metavar="NAME@VERSION")
@click.option("--group", default=None, help="Only this group's devices.")
@click.option("--device", default=None, help="Only this device.")
@click.option("--since", default=None, help="Start: 1h, 30m, 2d (ago), ISO 8601 or unix time.")
@click.option("--until", default=None, help="End (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@api_command
def drift(api: FleetClient, label: str, group: str | None, device: str | None,
          since: str | None, until: str | None, as_json: bool) -> None:
    now = time.time()
    result = api.get("/api/v1/drift", bundle=label, group=group, device=device,
                     since=parse_time(since, now), until=parse_time(until, now))
    if as_json:
        print_json(result)
        return
    rep = result["report"]
    click.echo(f"{result['bundle']}  {result['scope']}  {stamp(result['since'])} .. "
               f"{stamp(result['until'])}  {result['devices']} device(s), "
               f"{result['summaries']} summaries, {rep['rows_live']} rows")
    rows = []
    for f in rep["features"]:
        s = f["stats"]
        rows.append([f["name"] if f["role"] == "input" else f"{f['name']} (output)",
                     f["verdict"], num(s.get("psi")), num(s.get("ks")),
                     num(s.get("wasserstein")), num(s.get("js")), f["n_live"]])
    click.echo(table(["feature", "verdict", "PSI", "KS", "W", "JS", "n"], rows))
    click.echo(f"verdict: {rep['verdict']}" + (f" ({'; '.join(rep['reasons'])})"
                                               if rep["reasons"] else ""))
    if rep["rule"] == "importance":
        click.echo(f"inputs weighed by the card's permutation importance: the drifting ones "
                   f"carry {num(100 * (rep['importance_share'] or 0.0), '.0f')} %")
    else:
        click.echo("inputs counted (no permutation importances in the bundle's card)")
    settings = result["settings"]
    mine = set(result["overrides"])
    click.echo("settings: " + ", ".join(
        f"{k}={num(v, 'g') if v is not None else 'auto'}{'*' if k in mine else ''}"
        for k, v in settings.items())
        + (" (* the group's own)" if mine else ""))
    if result.get("suspect"):
        click.echo(f"suspect sensor: drifts alone on {', '.join(result['suspect'])} "
                   f"(against {result['compared_with']})")


@click.command(help="List alerts (drift, suspect sensors).")
@click.option("--state", type=click.Choice(["open", "resolved"]), default=None,
              help="Only open or resolved alerts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_command
def alerts(api: FleetClient, state: str | None, as_json: bool) -> None:
    print_rows(api.get("/api/v1/alerts", state=state), as_json,
               ["id", "kind", "state", "opened", "bundle", "group", "device", "message"],
               lambda a: [a["id"], a["kind"], a["state"], stamp(a["opened"]), a["bundle"],
                          a["group"], a["device"] or "-", a["message"][:80]])
