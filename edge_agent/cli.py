"""``edge-agent``: run the daemon, predict once from a file, explain one prediction, show the
device's status.

Commands call the library and format; they hold no rules. A refusal prints one line on
stderr (``edge-agent: error: ...``) and exits 1; a usage mistake is click's exit 2.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgefleet import __version__
from edgefleet.cli import EXIT_CODES_HELP, JsonLogFormatter
from edgefleet.cli import run as run_program
from edgefleet.contract.errors import InputError

__all__ = ["cli", "main"]

MAX_INPUT_BYTES = 64 * 1024 * 1024


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="edge-agent")
def cli() -> None:
    """The edgefleet device agent: serve verified models, report, follow the fleet."""


@cli.command()
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The agent's TOML config.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
@click.option("--json", "as_json", is_flag=True,
              help="Log one JSON object a line on stderr (for journald and log shippers).")
def run(config_path: Path, log_level: str, as_json: bool) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from edge_agent.config import load_config
    from edge_agent.daemon import AgentDaemon

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if as_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    AgentDaemon(load_config(config_path)).run()


def _read_rows(path: Path, manifest: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows from CSV (header row) or JSON lines, typed by the bundle's schema, and the file
    line of each (so every error names the line, as an editor shows it)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read ({exc.strerror})") from exc
    if len(raw) > MAX_INPUT_BYTES:
        raise click.ClickException(f"{path}: larger than {MAX_INPUT_BYTES} bytes")
    text = raw.decode("utf-8", errors="replace")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise click.ClickException(f"{path}:{number}: not JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise click.ClickException(f"{path}:{number}: expected an object per line")
            rows.append(row)
            lines.append(number)
        return rows, lines
    kinds = {s.name: s.kind for s in manifest.inputs}
    reader = csv.DictReader(io.StringIO(text))
    rows, lines = [], []
    for record in reader:
        number = reader.line_num
        row: dict[str, Any] = {}
        for name, cell in record.items():
            if name not in kinds:
                continue
            if cell is None or cell == "":
                row[name] = None
            elif kinds[name] == "numeric":
                try:
                    row[name] = float(cell)
                except ValueError:
                    raise InputError(f"{path}:{number}: feature {name!r} is numeric, got "
                                     f"{cell[:40]!r}", feature=name) from None
            else:
                row[name] = cell
        rows.append(row)
        lines.append(number)
    return rows, lines


def _verified_model(bundle_path: Path, trust: tuple[str, ...], config_path: Path | None,
                    threshold: int | None) -> Any:
    """The bundle at ``bundle_path``, verified against ``--trust`` (or the config's trust
    store and policy) and loaded."""
    from edge_agent.model import LoadedModel
    from edgefleet.contract.bundle import unpack_verified
    from edgefleet.contract.signing import Policy, TrustStore

    specs, roles = list(trust), ()
    if config_path is not None:
        from edge_agent.config import load_config

        config = load_config(config_path)
        specs += list(config.trust_keys)
        roles = config.required_roles
        threshold = threshold or config.threshold
    if not specs:
        raise click.ClickException("give --trust PUBKEY (or --config): bundles are "
                                   "verified before they run")
    store = TrustStore.from_files(specs)
    with unpack_verified(bundle_path, store, Policy(threshold or 1, frozenset(roles))) as bundle:
        return LoadedModel(bundle)  # streamed and verified into a temporary directory


def _trust_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--trust``, ``--config`` and ``--threshold``: whom a one-off command trusts (read by
    :func:`_verified_model`)."""
    command = click.option("--threshold", type=int, default=None,
                           help="Trusted signatures needed.")(command)
    command = click.option("--config", "config_path",
                           type=click.Path(dir_okay=False, path_type=Path),
                           help="Take the trust store and policy from this agent config.")(
                               command)
    return click.option("--trust", multiple=True, metavar="[ROLE=]PUBKEY",
                        help="A trusted public key (repeat). Or take them from --config.")(
                            command)


@cli.command()
@click.option("--bundle", "bundle_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The .edgebundle file.")
@click.option("--input", "input_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Rows: CSV with a header row, or JSON lines (.jsonl).")
@_trust_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row on stdout.")
def predict(bundle_path: Path, input_path: Path, trust: tuple[str, ...],
            config_path: Path | None, threshold: int | None, as_json: bool) -> None:
    """Verify a bundle and predict the rows of a file with it (one-off use)."""
    from edge_agent.agent import Agent

    model = _verified_model(bundle_path, trust, config_path, threshold)
    rows, lines = _read_rows(input_path, model.manifest)
    if not rows:
        raise click.ClickException(f"{input_path}: no rows")
    agent = Agent("local")
    try:
        agent.activate(model)
        answers = []
        for start in range(0, len(rows), model.validator.max_rows):
            part = rows[start:start + model.validator.max_rows]
            try:
                # no id: nothing keeps these predictions for an outcome to join
                answers += agent.predict(part)._replace(ids=()).rows(model.classes)
            except InputError as exc:  # the batch's row index → the file's line
                if exc.row is None:
                    raise
                line = lines[start + exc.row]
                raise InputError(f"{input_path}:{line}: {exc}", feature=exc.feature,
                                 row=start + exc.row) from None
    finally:
        agent.close()
    if as_json:  # one object a line, with the file line it answers
        for line, answer in zip(lines, answers, strict=True):
            click.echo(json.dumps({"line": line, **answer}, separators=(",", ":")))
        return
    click.echo(f"{model.label}: {len(answers)} row(s)")
    regressor = not answers or "label" not in answers[0]
    click.echo("   line  value" if regressor else "   line  label             p(top)")
    for line, answer in zip(lines, answers, strict=True):
        if "label" in answer:
            probs = answer.get("probabilities") or {}
            top = max(probs.values()) if probs else None
            click.echo(f"  {line:>5}  {answer['label']!s:<16}"
                       + (f"  {top:.3f}" if top is not None else ""))
        else:
            click.echo(f"  {line:>5}  {answer['value']:.6g}")


@cli.command()
@click.option("--bundle", "bundle_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The .edgebundle file.")
@click.option("--row", "row_text", required=True, metavar="JSON",
              help='One row as a JSON object (feature → value) or a list in schema order; '
                   '"-" reads it from stdin.')
@_trust_options
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def explain(bundle_path: Path, row_text: str, trust: tuple[str, ...],
            config_path: Path | None, threshold: int | None, as_json: bool) -> None:
    """Explain one prediction: the contribution of each input (baseline substitution
    against the bundle's reference; exact for linear models)."""
    from edge_agent.explain import Explainer

    text = sys.stdin.read(MAX_INPUT_BYTES) if row_text == "-" else row_text
    try:
        row = json.loads(text)
    except ValueError as exc:
        raise click.ClickException(f"--row: not JSON ({exc})") from exc
    if not isinstance(row, (dict, list)):
        raise InputError("--row: expected an object (feature → value) or a list in schema "
                         "order")
    answer = Explainer(_verified_model(bundle_path, trust, config_path, threshold)).explain(row)
    if as_json:
        click.echo(json.dumps(answer.to_dict(), indent=2))
        return
    click.echo(f"{answer.bundle}: {answer.prediction}")
    click.echo(f"method: {answer.method} ({answer.why})")
    click.echo(f"baseline: {answer.baseline}")
    base = "" if answer.baseline_value is None else \
        f" (baseline {answer.baseline_value:.4g})"
    click.echo(f"{answer.score}: {answer.value:.4g}{base}")
    width = max(len(c.feature) for c in answer.contributions)
    for c in answer.contributions:
        click.echo(f"  {c.feature:<{width}}  {c.contribution:+.4f}   value {c.value!s:<12} "
                   f"baseline {c.baseline}")


@cli.command()
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The agent's TOML config.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config_path: Path, as_json: bool) -> None:
    """What is installed, what waits in the outbox, and the running agent's health."""
    from edge_agent.config import load_config
    from edge_agent.outbox import Outbox
    from edge_agent.slots import Slots

    config = load_config(config_path)
    slots = Slots(config.data_dir)
    state = slots.state.to_dict()
    box_path = config.data_dir / "outbox.db"
    outbox = None
    if box_path.exists():
        with Outbox(box_path) as box:
            outbox = {"depth": box.depth, "bytes": box.size, "dropped": box.dropped}
    live = None
    if config.http_port:
        url = f"http://{config.http_host}:{config.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                live = json.loads(response.read(1 << 20))
        except urllib.error.HTTPError as exc:  # 503: running, nothing installed
            live = json.loads(exc.read(1 << 20) or b"{}")
        except (OSError, ValueError):
            live = None
    doc = {"device": config.device_id, "state": state, "outbox": outbox, "running": live}
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return

    def label(ref: dict[str, Any] | None) -> str:
        return "none" if ref is None else f"{ref['name']}@{ref['version']}"

    lines = [f"device    {config.device_id}",
             f"active    {label(state['active'])}",
             f"previous  {label(state['previous'])}",
             f"shadow    {label(state['shadow'])}",
             f"revision  {state['revision']}"]
    for sha, reason in state["failed"].items():
        lines.append(f"failed    {sha[:12]}…  {reason[:100]}")
    if outbox is not None:
        lines.append(f"outbox    {outbox['depth']} waiting ({outbox['bytes']:,} bytes), "
                     f"{outbox['dropped']} dropped")
    if live is None:
        lines.append("agent     not running (no answer on the local endpoint)")
    else:
        lines.append(f"agent     running {live.get('uptime_s', 0):.0f} s, "
                     f"{live.get('predictions', 0)} predictions, {live.get('errors', 0)} errors, "
                     f"{'connected' if live.get('connected') else 'not connected'}")
    click.echo("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; a refusal is one line and an exit status by its kind
    (:mod:`edgefleet.cli`)."""
    return run_program(cli, "edge-agent", argv)


if __name__ == "__main__":
    sys.exit(main())
