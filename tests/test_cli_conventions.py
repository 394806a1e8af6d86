"""One convention across the three programs (issue 17): ``-h`` and ``--help`` on every
command, ``--version`` on each program, one error prefix, exit statuses by kind of
failure (edgefleet.cli), and a pipe closed early ends quietly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edge_agent.cli import cli as agent_cli
from edgefleet.cli import (
    CONFLICT,
    FAILURE,
    GATE,
    NOT_FOUND,
    UNAUTHORISED,
    UNAVAILABLE,
    exit_code,
    run,
)
from edgefleet.errors import EdgefleetError
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ClientError, ConflictError, NotFoundError
from packager.cli import cli as edgepack_cli
from packager.errors import FairnessError, FidelityError

PROGRAMS = {"fleet": fleet_cli, "edgepack": edgepack_cli, "edge-agent": agent_cli}


def _commands(group: click.Command, path: tuple[str, ...]):
    yield path, group
    if isinstance(group, click.Group):
        for name, sub in sorted(group.commands.items()):
            yield from _commands(sub, (*path, name))


ALL = [(prog, path) for prog, root in PROGRAMS.items() for path, _ in _commands(root, ())]


def test_the_tree_is_walked() -> None:
    assert len(ALL) > 40  # the walk reaches the nested commands, not only the roots
    assert ("fleet", ("rollout", "create")) in ALL


@pytest.mark.parametrize(("prog", "path"), ALL, ids=[" ".join((p, *c)) for p, c in ALL])
def test_every_command_answers_dash_h(prog: str, path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(PROGRAMS[prog], [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")


@pytest.mark.parametrize(("prog", "path"), ALL, ids=[" ".join((p, *c)) for p, c in ALL])
def test_every_command_takes_json(prog: str, path: tuple[str, ...]) -> None:
    """--json on every command: a document on stdout, or JSON log lines for the
    long-running ones (serve, ingest, edge-agent run)."""
    command = PROGRAMS[prog]
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    if isinstance(command, click.Group):
        return
    assert "--json" in {o for p in command.params for o in getattr(p, "opts", ())}


def test_json_log_lines() -> None:
    from edgefleet.cli import JsonLogFormatter

    record = logging.LogRecord("fleet_server.rollouts", logging.INFO, __file__, 1,
                               "rollout %s: %s", ("r1", "promote"), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["level"] == "INFO" and line["message"] == "rollout r1: promote"
    assert line["logger"] == "fleet_server.rollouts" and line["time"].endswith("+00:00")


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_every_program_has_a_version_and_documents_its_exit_statuses(prog: str) -> None:
    result = CliRunner().invoke(PROGRAMS[prog], ["--version"])
    assert result.exit_code == 0 and prog in result.output and "version" in result.output
    assert "6 refused by a check" in CliRunner().invoke(PROGRAMS[prog], ["-h"]).output


@pytest.mark.parametrize(("error", "code"), [
    (EdgefleetError("x"), FAILURE),
    (NotFoundError("bundle", "m@1"), NOT_FOUND),
    (ConflictError("exists"), CONFLICT),
    (ClientError("refused", status=404), NOT_FOUND),
    (ClientError("refused", status=409), CONFLICT),
    (ClientError("no token", status=401), UNAUTHORISED),
    (ClientError("role", status=403), UNAUTHORISED),
    (ClientError("unreachable", status=0), UNAVAILABLE),
    (ClientError("bad field", status=422), FAILURE),
    (FidelityError("too far"), GATE),
    (FairnessError("gap"), GATE),
])
def test_exit_statuses_by_kind(error: Exception, code: int) -> None:
    assert exit_code(error) == code


def test_a_refusal_is_one_line_with_the_programs_prefix_and_its_table(capsys) -> None:
    @click.command()
    def refuse() -> None:
        raise FidelityError("the converted model disagrees", table="row  diff\n0    0.5")

    assert run(refuse, "edgepack", []) == GATE
    err = capsys.readouterr().err.splitlines()
    assert err == ["edgepack: error: the converted model disagrees", "row  diff", "0    0.5"]


def test_an_unreachable_server_exits_unavailable() -> None:
    result = CliRunner().invoke(fleet_cli, ["devices", "--server", "http://127.0.0.1:9"])
    assert result.exit_code == UNAVAILABLE
    assert result.output.startswith("fleet: error: cannot reach http://127.0.0.1:9")


def test_output_piped_into_a_reader_that_stops_ends_quietly() -> None:
    # `edgepack --help | head -1`: the reader closes the pipe after one line
    code = ("import sys\nfrom edgefleet.cli import run\nimport click\n"
            "@click.command()\ndef loud():\n"
            "    for i in range(100000):\n        click.echo('x' * 80)\n"
            "sys.exit(run(loud, 'edgepack', []))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


@pytest.mark.parametrize(("args", "level"), [
    (["serve", "-h"], logging.INFO), (["ingest", "-h"], logging.INFO),
    (["devices", "-h"], logging.WARNING), (["--log-level", "ERROR", "serve", "-h"], logging.ERROR),
])
def test_the_server_commands_log_at_info_by_default(args: list[str], level: int) -> None:
    """`fleet serve` shows rollout transitions, alerts and webhook deliveries by default;
    the API client's commands stay quiet."""
    root = logging.getLogger()
    before = root.level
    try:
        assert CliRunner().invoke(fleet_cli, args).exit_code == 0
        assert root.level == level
    finally:
        root.setLevel(before)


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch) -> None:
    """Verdict cells and the error prefix are coloured on a terminal; NO_COLOR and pipes
    get plain text; colouring after padding keeps the columns aligned."""
    from edgefleet import cli as shared
    from fleet_server.cli.util import table

    rows = [["humidity", "drift"], ["temperature", "ok"]]
    monkeypatch.setattr(shared, "colour", lambda err=False: False)
    plain = table(["feature", "verdict"], rows).splitlines()
    assert plain == ["feature      verdict", "humidity     drift", "temperature  ok"]
    assert not shared.error_line("fleet", "x").startswith("\x1b[")
    monkeypatch.setattr(shared, "colour", lambda err=False: True)
    coloured = table(["feature", "verdict"], rows).splitlines()
    assert coloured[1] == "humidity     " + click.style("drift  ", fg="red")
    assert coloured[2] == "temperature  " + click.style("ok     ", fg="green")
    assert click.unstyle(coloured[2]).rstrip() == plain[2]  # aligned as without colour
    assert shared.error_line("fleet", "x") == click.style("fleet: error:", fg="red",
                                                          bold=True) + " x"
    monkeypatch.undo()
    monkeypatch.setenv("NO_COLOR", "1")
    assert shared.colour() is False and shared.colour(err=True) is False
    monkeypatch.delenv("NO_COLOR")
    assert shared.colour() is False  # pytest's captured stdout is not a terminal


@pytest.mark.parametrize(("prog", "var"), [("fleet", "_FLEET_COMPLETE"),
                                           ("edgepack", "_EDGEPACK_COMPLETE"),
                                           ("edge-agent", "_EDGE_AGENT_COMPLETE")])
def test_shell_completion_as_the_readme_says(prog: str, var: str) -> None:
    from pathlib import Path

    binary = Path(sys.executable).parent / prog
    out = subprocess.run([str(binary)], env={**os.environ, var: "bash_source"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"complete -o nosort -F _{prog.replace('-', '_')}" \
        "_completion" in out.stdout
