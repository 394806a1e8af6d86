"""The ``fleet`` CLI through click's CliRunner, against a real server over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import click
import httpx
import pytest
from click.testing import CliRunner

from fleet_server.cli import main
from fleet_server.cli.util import parse_time
from tests.broker import free_port
from tests.fleet_server.conftest import profile_of, summary_of, wait_until

pytestmark = pytest.mark.slow


def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, f"{prefix}{name} ")
    return out


@pytest.mark.parametrize(("name", "cmd"), commands(main), ids=[n for n, _ in commands(main)])
def test_every_command_has_help(name, cmd):
    assert cmd.help and len(cmd.help) > 10, f"{name} has no help text"
    result = CliRunner().invoke(main, [*name.split(), "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts[0]} has no help text"


@pytest.mark.parametrize(("text", "want"), [("90m", 1000.0 - 5400), ("2d", 1000.0 - 172800),
                                            ("1500", 1500.0),
                                            ("2026-01-01T00:00:00Z", 1767225600.0),
                                            ("2026-01-01T01:00:00+01:00", 1767225600.0)],
                         ids=["minutes", "days", "unix", "iso-utc", "iso-offset"])
def test_times_are_read_as_people_write_them(text, want):
    assert parse_time(text, now=1000.0) == want


@pytest.fixture
def cli(server_factory, sensor_bundle):
    server = server_factory(http=True)
    s = server.services
    token = s.auth.create_token("cli", "operator", "test", time.time()).secret
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> click.testing.Result:
        result = runner.invoke(main, list(args), env={"FLEET_SERVER": server.base_url,
                                                      "FLEET_TOKEN": token},
                               catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run, server


def test_operating_a_fleet_from_the_cli(cli, sensor_bundle):
    run, server = cli
    s = server.services
    assert "uploaded" in run("bundle", "upload", str(sensor_bundle)).output
    assert "already stored" in run("bundle", "upload", str(sensor_bundle)).output
    assert "sensor@1.0.0" in run("bundle", "list").output
    assert "temperature" in run("bundle", "show", "sensor@1.0.0").output
    secret = run("device", "add", "dev1", "--label", "site=a").stdout.strip()
    assert secret.startswith("efd_")
    run("device", "add", "dev2", "--label", "site=b")
    assert "(1 member(s))" in run("group", "create", "plant-a", "--selector", "site=a",
                                  "--important", "vibration").output
    listing = run("group", "list").output
    assert "plant-a" in listing and "site=a" in listing and "vibration" in listing
    out = run("devices", "--label", "site=a").output
    assert "dev1" in out and "dev2" not in out
    devs = json.loads(run("device", "list", "--json").output)
    assert [d["id"] for d in devs] == ["dev1", "dev2"]
    assert "revision 1" in run("desired", "set", "dev1", "sensor@1.0.0").output
    assert "revision 1" in run("device", "show", "dev1").output
    # the devices send windows; the drift table shows what they profiled
    ref = s.bundles.reference(1)
    now = time.time()
    from edgefleet.contract.messages import encode, topic
    from fleet_server.telemetry.link import Incoming

    for i, d in enumerate(("dev1", "dev2")):
        msg = summary_of(d, 1, profile_of(ref.spec, 500, i, {"temperature": 9.0}, ref.base),
                         now - 120, now - 60)
        s.ingestor.process([Incoming(topic(d, "summary"), encode(msg), 1, 1, 1, now)])
    table = run("drift", "sensor@1.0.0", "--since", "1h").output
    lines = table.splitlines()
    assert lines[1].split() == ["feature", "verdict", "PSI", "KS", "W", "JS", "n"]
    temperature = next(line.split() for line in lines if line.startswith("temperature"))
    assert temperature[1] == "drift" and temperature[-1] == "1000"
    report = json.loads(run("drift", "sensor@1.0.0", "--group", "plant-a", "--json").output)
    assert report["devices"] == 1 and report["report"]["rows_live"] == 500
    assert run("alerts").output.split() == ["id", "kind", "state", "opened", "bundle", "group",
                                            "device", "message"]  # none yet: the header only
    assert json.loads(run("alerts", "--json").output) == []
    run("group", "delete", "plant-a")


def test_errors_are_one_line_and_exit_by_kind(cli, tmp_path):
    run, server = cli
    result = run("bundle", "show", "sensor@9.9.9", ok=False)
    assert result.exit_code == 3  # not found (edgefleet.cli)
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith("fleet: error: bundle 'sensor@9.9.9' not found")
    result = run("group", "create", "Bad Name", ok=False)
    assert result.exit_code == 1 and "name: String should match pattern" in result.output
    bad = tmp_path / "x.edgebundle"
    bad.write_bytes(b"not a bundle")
    result = run("bundle", "upload", str(bad), ok=False)
    assert result.exit_code == 1 and "BundleFormatError" in result.output
    result = CliRunner().invoke(main, ["devices", "--server", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 7 and result.output.startswith("fleet: error: cannot reach")
    result = CliRunner().invoke(main, ["devices", "--server", server.base_url, "--token",
                                       "efo_wrong"])
    assert result.exit_code == 5 and "unknown token" in result.output
    assert "--token or set FLEET_TOKEN" in result.output
    result = CliRunner().invoke(main, ["devices", "--server", server.base_url],
                                env={"FLEET_TOKEN": None})
    assert result.exit_code == 5 and "FLEET_TOKEN" in result.output


def test_tokens_and_device_credentials_on_the_database(tmp_path, db):
    """Every command taking --db, on a SQLite file and on a postgresql:// URL."""
    db = str(db)
    runner = CliRunner()
    made = runner.invoke(main, ["token", "create", "ana", "--role", "approver", "--db", db])
    assert made.exit_code == 0 and made.stdout.strip().startswith("efo_")
    listed = runner.invoke(main, ["token", "list", "--db", db, "--json"])
    assert [(t["name"], t["role"]) for t in json.loads(listed.output)] == [("ana", "approver")]
    assert made.stdout.strip() not in listed.output
    again = runner.invoke(main, ["token", "create", "ana", "--role", "viewer", "--db", db])
    assert again.exit_code == 4 and "exists already" in again.output
    assert runner.invoke(main, ["token", "revoke", "ana", "--db", db]).exit_code == 0
    dev = runner.invoke(main, ["device", "add", "press-1", "--label", "site=a", "--db", db])
    assert dev.exit_code == 0 and dev.stdout.strip().startswith("efd_")
    out = tmp_path / "passwd"
    assert runner.invoke(main, ["device", "passwd-file", "--db", db, "--out", str(out)]
                         ).exit_code == 0
    assert out.read_text().startswith("press-1:$7$101$")
    assert (out.stat().st_mode & 0o777) == 0o600
    conf = runner.invoke(main, ["broker-config", "--db", db, "--out", str(tmp_path / "mq"),
                                "--json"])
    assert conf.exit_code == 0, conf.output
    assert json.loads(conf.output)["accounts"] == 2  # press-1 and the server


def test_fleet_serve_runs_and_stops_on_sigterm(tmp_path, signing_keys):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet_server.cli", "serve", "--db", str(tmp_path / "f.db"),
         "--port", str(port), "--trust", f"build={signing_keys.build.public}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": "."})
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").json()["mqtt"] == "disabled"
            except httpx.HTTPError:
                return False

        wait_until(healthy, 20, "fleet serve to answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "f.db")])
    assert result.exit_code != 0 and "needs --broker" in result.output


def test_important_features_are_checked_against_a_named_bundle(cli, sensor_bundle):
    run, server = cli
    run("bundle", "upload", str(sensor_bundle))
    typo = run("group", "create", "line-3", "--selector", "line=3", "--important",
               "humidty", "--bundle", "sensor@1.0.0", ok=False)
    assert typo.exit_code == 2  # usage: refused before anything is created
    assert "'humidty' is not an input of sensor@1.0.0 (did you mean 'humidity'?)" \
        in typo.output
    assert server.services.store.get_group("line-3") is None
    run("group", "create", "line-3", "--selector", "line=3", "--important", "humidity",
        "--bundle", "sensor@1.0.0")
    assert server.services.store.get_group("line-3").important_features == ("humidity",)
    again = run("group", "update", "line-3", "--important", "vibraton", "--bundle",
                "sensor@1.0.0", ok=False)
    assert again.exit_code == 2 and "did you mean 'vibration'?" in again.output
