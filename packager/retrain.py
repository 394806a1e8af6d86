"""The retraining loop, one run: fresh data → split → train → build against the champion →
promote through a staged rollout, or record why not (``edgepack retrain RECIPE``).

A recipe (``recipe.toml``, versioned with the training code) says what to do::

    name = "sensor-retrain"          # the run records' key on the server
    bundle = "sensor"                # the bundle name it builds
    group = "everyone"               # the group whose running bundle is the champion
    key = "keys/build.key"           # the signing key (relative to the recipe's folder)
    target = "fault"
    data = "training.data:load"      # module:function () -> DataFrame (your warehouse),
                                     # or "fleet": the rows the group's devices captured
                                     # (`fleet dataset export`), see below
    train = "training.model:fit"     # module:function (DataFrame) -> fitted estimator
    time_column = "ts"               # optional: the held-out rows are the most recent
    holdout = 0.2                    # the held-out share (default 0.2)
    promote_if = ["accuracy>=+0.01"] # edgepack build --promote-if rules (default: not worse)
    version = "minor"                # the challenger's version: the champion's, bumped

    [rollout]                        # fleet rollout create's options
    stages = "10%,50%,100%"
    soak = "1h"
    shadow_first = false
    gates = { max_error_rate = 0.02 }

The fleet's own data: ``data = "fleet"`` (labelled rows of the last 14 days), or a table
``[data]`` with ``source = "fleet"``, ``since = "14d"`` and ``labelled = true`` (TOML
cannot give ``data`` both a text and a table). The run then fetches the capture export of
the champion (the bundle the group runs now) for the group over the API
(``GET /api/v1/capture/export``): the captured features, the true label as the
``target`` column, the serving time as ``time_column`` (if set).

A run (:func:`run`) records itself on the fleet server (``/api/v1/retrains``) first, then:
fetches the data, splits off the held-out rows (the newest ``holdout`` share by
``time_column``, else the last rows), trains, finds the champion (the bundle the group's
devices run now: the most common running bundle of that name, else the most common desired
one) and downloads it, builds the challenger with ``--eval-data`` and ``--champion`` (the
comparison on the same held-out rows, the rules, the significance test: :mod:`packager.champion`),
and then either uploads the challenger and creates the staged rollout (started, unless the
group needs an approver) and finishes the run ``promoted``, or finishes it ``rejected``
with the comparison's reason and deploys nothing. Any error finishes it ``failed`` with the
reason. The rollout's own gates still judge the challenger on the devices.

This module talks to the fleet server only through its REST API (httpx), never its code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.contract.manifest import NAME_RE, parse_version
from edgefleet.contract.messages_base import download_path
from edgefleet.contract.wire import canonical_json
from packager.errors import ChampionLostError, FleetApiError, RecipeError
from packager.tomlfile import read_toml

__all__ = ["Recipe", "RunOutcome", "load_recipe", "run", "split_holdout"]

_ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
_KEYS = {"name", "bundle", "group", "key", "target", "data", "train", "time_column",
         "holdout", "promote_if", "version", "rollout", "watch"}
_ROLLOUT_KEYS = {"stages", "soak", "shadow_first", "gates", "requires_approval"}
MAX_RECIPE_BYTES = 64 * 1024
FLEET_DATA = "fleet"  # data = "fleet": the capture export of the group's champion
_SINCE_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?[smhd]\Z")
MEMBERS_READ = 500  # group members whose desired state is read to find the champion
MAX_TABLE_CHARS = 16_000  # of a lost comparison's table, kept in the run's metrics


@dataclass(frozen=True)
class Recipe:
    path: Path
    sha256: str  # of the recipe file's bytes: the run record names it
    name: str
    bundle: str
    group: str
    key: Path
    target: str
    data: str
    train: str
    time_column: str | None = None
    holdout: float = 0.2
    promote_if: tuple[str, ...] = ()
    version: str = "minor"  # major | minor | patch
    rollout: dict[str, Any] = field(default_factory=dict)
    watch: dict[str, Any] = field(default_factory=dict)  # packager.watch.policy_of reads it
    data_since: str = "14d"  # data = "fleet": rows served since then ...
    data_labelled: bool = True  # ... and only those with a true label


def _data_table(doc: dict[str, Any], bad: Callable[[str, str], RecipeError]
                ) -> tuple[dict[str, Any], str, bool]:
    """A ``[data]`` table read: the recipe with ``data`` its source, and the table's
    ``since`` and ``labelled`` (their defaults when ``data`` is a plain entry point)."""
    since, labelled = "14d", True
    if not isinstance(doc.get("data"), dict):
        return doc, since, labelled
    table = doc["data"]
    extra = sorted(set(table) - {"source", "since", "labelled"})
    if extra:
        raise bad("data", f"unknown key {extra[0]!r} (source, since, labelled)")
    since, labelled = table.get("since", since), table.get("labelled", labelled)
    if not isinstance(since, str) or not _SINCE_RE.match(since):
        raise bad("data.since", "a duration like 14d, 12h")
    if not isinstance(labelled, bool):
        raise bad("data.labelled", "true or false")
    return {**doc, "data": table.get("source")}, since, labelled


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe.

    Raises:
        RecipeError: unreadable, not TOML, an unknown or missing key, a bad value (named).
    """
    doc, raw = read_toml(path, MAX_RECIPE_BYTES, RecipeError, "recipe")

    def bad(key: str, why: str) -> RecipeError:
        return RecipeError(f"{path}: {key}: {why}", field=key)

    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (the keys: {', '.join(sorted(_KEYS))})")
    doc, since, labelled = _data_table(doc, bad)
    for key in ("name", "bundle", "group", "key", "target", "data", "train"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise bad(key, "missing, or not a text")
    for key in ("data", "train"):
        if not _ENTRY_RE.match(doc[key]) and not (key == "data" and doc[key] == FLEET_DATA):
            raise bad(key, f"{doc[key]!r} is not module:function"
                      + (' nor "fleet"' if key == "data" else ""))
    if not NAME_RE.match(doc["bundle"]):
        raise bad("bundle", f"{doc['bundle']!r} is not a bundle name")
    holdout = doc.get("holdout", 0.2)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) \
            or not 0.05 <= holdout <= 0.5:
        raise bad("holdout", "a share between 0.05 and 0.5")
    rules = doc.get("promote_if", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise bad("promote_if", "a list of rules like 'accuracy>=+0.01'")
    if doc.get("version", "minor") not in ("major", "minor", "patch"):
        raise bad("version", "major, minor or patch")
    rollout = doc.get("rollout", {})
    if not isinstance(rollout, dict) or set(rollout) - _ROLLOUT_KEYS:
        extra = sorted(set(rollout) - _ROLLOUT_KEYS) if isinstance(rollout, dict) else []
        raise bad("rollout", f"unknown key {extra[0]!r}" if extra else "a table")
    watch = doc.get("watch", {})
    if not isinstance(watch, dict):
        raise bad("watch", "a table")
    time_column = doc.get("time_column")
    if time_column is not None and not isinstance(time_column, str):
        raise bad("time_column", "a column name")
    return Recipe(path=path, sha256=hashlib.sha256(raw).hexdigest(), name=doc["name"],
                  bundle=doc["bundle"], group=doc["group"],
                  key=(path.parent / doc["key"]).resolve(), target=doc["target"],
                  data=doc["data"], train=doc["train"], time_column=time_column,
                  holdout=float(holdout), promote_if=tuple(rules),
                  version=doc.get("version", "minor"), rollout=dict(rollout),
                  watch=dict(watch), data_since=since, data_labelled=labelled)


def entry_point(spec: str, where: Path) -> Callable[..., Any]:
    """``module:function``, importable from the recipe's folder.

    Raises:
        RecipeError: the module or the function cannot be found.
    """
    module_name, _, name = spec.partition(":")
    folder = str(where.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"{where}: cannot load {spec} ({exc})") from exc
    if not callable(fn):
        raise RecipeError(f"{where}: {spec} is not a function")
    return fn


def split_holdout(frame: Any, time_column: str | None, share: float) -> tuple[Any, Any]:
    """``(train, held_out)``: the newest ``share`` of the rows by ``time_column`` (stable
    for ties), else the last rows in the frame's order; at least one row each side."""
    n = len(frame)
    if n < 2:
        raise RecipeError(f"{n} row(s) of data: too few to train and hold out")
    ordered = frame.sort_values(time_column, kind="stable") if time_column else frame
    cut = min(n - 1, max(1, n - math.ceil(n * share)))
    return ordered.iloc[:cut], ordered.iloc[cut:]


def next_version(champion: str | None, bump: str) -> str:
    if champion is None:
        return "1.0.0"
    major, minor, patch = parse_version(champion)[:3]
    return {"major": f"{major + 1}.0.0", "minor": f"{major}.{minor + 1}.0",
            "patch": f"{major}.{minor}.{patch + 1}"}[bump]


class FleetApi:
    """The few REST calls a run makes (httpx, bearer token); an error answer raises
    :class:`~packager.errors.FleetApiError` with the server's message and status."""

    def __init__(self, server: str, token: str | None, timeout: float = 60.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers,
                                  timeout=timeout)
        self._errors = httpx.HTTPError

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except self._errors as exc:
            raise FleetApiError(f"cannot reach {self._http.base_url}: {exc}", status=0) from exc
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise FleetApiError(f"{method} {path}: {message} (HTTP {r.status_code})",
                                status=r.status_code)
        return None if r.status_code == 204 or not r.content else \
            (r.json() if r.headers.get("content-type", "").startswith("application/json")
             else r.content)


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  # promoted | rejected | failed
    champion: str | None
    challenger: str | None
    rollout: str | None
    reason: str


def champion_of(api: FleetApi, recipe: Recipe) -> str | None:
    """The bundle (name@version) the recipe's group runs now: the most common running
    bundle of the recipe's name among the group's devices, else the most common desired
    one; None when the group runs none yet."""
    group = api.call("GET", f"/api/v1/groups/{recipe.group}")
    labels = [f"{k}={v}" for k, v in sorted(group["selector"].items())]
    devices = api.call("GET", "/api/v1/devices",
                       params={"label": labels, "limit": MEMBERS_READ})
    running = Counter(f"{d['bundle']['name']}@{d['bundle']['version']}" for d in devices
                      if d.get("bundle") and d["bundle"]["name"] == recipe.bundle)
    if running:
        return running.most_common(1)[0][0]
    desired: Counter[str] = Counter()
    for d in devices:
        state = api.call("GET", f"/api/v1/devices/{d['id']}/desired")
        ref = (state or {}).get("bundle")
        if ref and ref["name"] == recipe.bundle:
            desired[f"{ref['name']}@{ref['version']}"] += 1
    return desired.most_common(1)[0][0] if desired else None


def fleet_frame(api: FleetApi, recipe: Recipe) -> Any:
    """The rows the group's devices captured for its champion, labelled, as a DataFrame:
    the features, the true label as ``recipe.target``, the serving time as
    ``recipe.time_column`` (when the recipe sets one).

    Raises:
        RecipeError: the group runs no bundle yet, or nothing was captured.
        FleetApiError: the server refused the export.
    """
    import io

    import pandas as pd

    champion = champion_of(api, recipe)
    if champion is None:
        raise RecipeError(f"data = fleet: group {recipe.group!r} runs no {recipe.bundle} "
                          "yet, so no rows were captured for it", field="data")
    body = api.call("GET", "/api/v1/capture/export", params={
        "bundle": champion, "group": recipe.group, "since": recipe.data_since,
        **({"labelled": "true"} if recipe.data_labelled else {})})
    if not body:
        raise RecipeError(f"data = fleet: no captured rows of {champion} in group "
                          f"{recipe.group!r} since {recipe.data_since}"
                          + (" with a label" if recipe.data_labelled else ""), field="data")
    frame = pd.read_json(io.BytesIO(body), lines=True, dtype=False)
    frame = frame.drop(columns=["device", "id", "predicted"]).rename(
        columns={"label": recipe.target})
    if recipe.time_column:
        frame = frame.rename(columns={"time": recipe.time_column})
    else:
        frame = frame.drop(columns=["time"])
    return frame


def _revision(where: Path) -> str:
    from packager.build import _git_revision

    return _git_revision(where) or ""


def run(recipe: Recipe, api: FleetApi, *, trigger: str = "manual", work: Path,
        run_id: int | None = None, say: Callable[[str], None] = lambda _: None) -> RunOutcome:
    """One run of the loop (see the module docstring). ``run_id``: a run an operator
    requested and this runner claimed; otherwise one is started here.

    Raises:
        FleetApiError: the server refused to record the run (nothing else was done).
    """
    if run_id is None:
        record = api.call("POST", "/api/v1/retrains", json={
            "recipe": recipe.name, "recipe_hash": recipe.sha256,
            "revision": _revision(recipe.path.parent), "trigger": trigger,
            "group": recipe.group, "bundle": recipe.bundle})
        run_id = int(record["id"])
    say(f"retrain run {run_id}: recipe {recipe.name} ({trigger})")

    def finish(status: str, **changes: Any) -> RunOutcome:
        done = api.call("PATCH", f"/api/v1/retrains/{run_id}",
                        json={"status": status, **changes})
        return RunOutcome(run_id, status, done["champion"], done["challenger"],
                          done["rollout"], done["reason"])

    try:
        return _run(recipe, api, run_id, work, say, finish)
    except ChampionLostError as exc:
        say(f"the challenger does not beat the champion: {exc}")
        # the whole comparison as edgepack build prints it: the run says why, with numbers
        return finish("rejected", reason=str(exc)[:4000],
                      metrics={"comparison_table": exc.table[:MAX_TABLE_CHARS]})
    except Exception as exc:  # recorded on the server, then raised for the caller
        with contextlib.suppress(FleetApiError):  # the run's error matters more
            finish("failed", reason=f"{type(exc).__name__}: {exc}"[:4000])
        raise


def load_frame(recipe: Recipe, api: FleetApi) -> Any:
    """The recipe's data: the fleet's captured rows or its own function's DataFrame.

    Raises:
        RecipeError: the data has no target column.
    """
    frame = fleet_frame(api, recipe) if recipe.data == FLEET_DATA else \
        entry_point(recipe.data, recipe.path)()
    if recipe.target not in getattr(frame, "columns", ()):
        raise RecipeError(f"{recipe.data} returned no column {recipe.target!r} (the target)",
                          field="target")
    return frame


def labelled_rows(frame: Any, target: str) -> int:
    """Rows whose label is known (the target is not missing)."""
    return int(frame[target].notna().sum())


def _run(recipe: Recipe, api: FleetApi, run_id: int, work: Path,
         say: Callable[[str], None], finish: Callable[..., RunOutcome]) -> RunOutcome:
    import joblib

    from packager.build import BuildOptions, build

    work.mkdir(parents=True, exist_ok=True)
    frame = load_frame(recipe, api)
    train, held = split_holdout(frame, recipe.time_column, recipe.holdout)
    train_csv, held_csv = work / "train.csv", work / "held_out.csv"
    train.to_csv(train_csv, index=False)
    held.to_csv(held_csv, index=False)
    data: dict[str, Any] = {
        "rows": len(frame), "labelled_rows": labelled_rows(frame, recipe.target),
        "train_rows": len(train), "held_out_rows": len(held),
        "sha256": hashlib.sha256(train_csv.read_bytes() + held_csv.read_bytes()).hexdigest()}
    if recipe.time_column:
        data["time_range"] = [str(frame[recipe.time_column].min()),
                              str(frame[recipe.time_column].max())]
        data["held_out_from"] = str(held[recipe.time_column].min())
    api.call("PATCH", f"/api/v1/retrains/{run_id}", json={"data": data})
    say(f"data: {len(frame)} rows, {len(held)} held out (the newest)")

    champion = champion_of(api, recipe)
    champion_path = None
    if champion is not None:
        name, version = champion.split("@")
        champion_path = work / f"{name}-{version}.champion.edgebundle"
        champion_path.write_bytes(
            api.call("GET", download_path(name, version)))
        api.call("PATCH", f"/api/v1/retrains/{run_id}", json={"champion": champion})
    say(f"champion: {champion or 'none (the group runs no ' + recipe.bundle + ' yet)'}")

    model = entry_point(recipe.train, recipe.path)(train)
    joblib.dump(model, work / "model.joblib")
    version = next_version(champion and champion.split("@")[1], recipe.version)
    challenger = f"{recipe.bundle}@{version}"
    api.call("PATCH", f"/api/v1/retrains/{run_id}", json={"challenger": challenger})
    result = build(BuildOptions(
        model=work / "model.joblib", train_data=train_csv, eval_data=held_csv,
        target=recipe.target, name=recipe.bundle, version=version, key=recipe.key,
        out_dir=work, champion=champion_path, promote_if=recipe.promote_if,
        time_column=recipe.time_column,
        description=f"retrained by recipe {recipe.name} (run {run_id})"))
    comparison = result.manifest.card.champion if result.manifest.card else None
    metrics = {"challenger": dict(result.manifest.metrics)}
    if comparison is not None:
        metrics["comparison"] = json.loads(canonical_json(comparison.to_dict()))
    api.call("PATCH", f"/api/v1/retrains/{run_id}", json={"metrics": metrics})
    say(f"challenger {challenger} built and, against {champion or 'nothing'}, promoted")

    api.call("POST", "/api/v1/bundles", content=result.path.read_bytes(),
             headers={"Content-Type": "application/octet-stream"})
    body: dict[str, Any] = {"bundle": challenger, "group": recipe.group,
                            "id": f"retrain-{run_id}", "start": True}
    body.update(_rollout_body(recipe.rollout))
    rollout = api.call("POST", "/api/v1/rollouts", json=body)
    say(f"rollout {rollout['id']}: {rollout['status']}")
    return finish("promoted", rollout=rollout["id"])


def _rollout_body(options: dict[str, Any]) -> dict[str, Any]:
    from edgefleet.parsing import parse_duration

    body: dict[str, Any] = {}
    if "stages" in options or "soak" in options:
        fractions = [float(x[:-1]) / 100 if x.endswith("%") else float(x)
                     for x in str(options.get("stages", "1%,10%,50%,100%")).split(",")]
        soak = parse_duration(str(options.get("soak", "1h")), "rollout.soak")
        body["stages"] = [{"fraction": f, "min_devices": 1, "soak_s": soak}
                          for f in fractions]
    for key in ("shadow_first", "requires_approval"):
        if options.get(key):
            body[key] = True
    if options.get("gates"):
        body["gates"] = dict(options["gates"])
    return body
