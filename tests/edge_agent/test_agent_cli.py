"""``edge-agent`` commands: predict from a file, status, help, and one-line errors."""

from __future__ import annotations

import json

import pytest

from edge_agent.cli import cli, main
from tests.bundles import FEATURES, sensor_data


@pytest.fixture
def inputs(tmp_path):
    frame = sensor_data(6, seed=2)[list(FEATURES)]
    csv_path = tmp_path / "rows.csv"
    frame.to_csv(csv_path, index=False)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n")
    return csv_path, jsonl


def test_predict_from_csv_and_jsonl_agree(bundles, signing_keys, inputs, capsys):
    bundle = bundles.build("1.0.0")
    trust = [a for spec in signing_keys.trust_specs() for a in ("--trust", spec)]
    outputs = []
    for path in inputs:
        assert main(["predict", "--bundle", str(bundle), "--input", str(path), *trust,
                     "--json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        outputs.append([json.loads(line) for line in lines])
    # each answer names the file line it answers: CSV after its header, JSON lines from 1
    assert [a.pop("line") for a in outputs[0]] == [2, 3, 4, 5, 6, 7]
    assert [a.pop("line") for a in outputs[1]] == [1, 2, 3, 4, 5, 6]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    assert {"label", "probabilities"} <= set(outputs[0][0])
    assert main(["predict", "--bundle", str(bundle), "--input", str(inputs[0]), *trust]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "sensor@1.0.0: 6 row(s)"
    assert table[1].split() == ["line", "label", "p(top)"] and table[2].split()[0] == "2"


@pytest.mark.parametrize(("args", "text"), [
    pytest.param(["--trust", "{stranger}"], "no signature by a trusted key", id="untrusted"),
    pytest.param(["--trust", "/nonexistent.pub"], "nonexistent.pub", id="missing-key"),
    pytest.param([], "--trust", id="no-trust"),
])
def test_predict_refusals_are_one_line(bundles, signing_keys, inputs, tmp_path, capsys, args,
                                       text):
    from tests.bundles import make_keys

    stranger = make_keys(tmp_path / "stranger").build.public
    args = [a.format(stranger=stranger) for a in args]
    code = main(["predict", "--bundle", str(bundles.build("1.0.0")), "--input",
                 str(inputs[0]), *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and text in err and len(err.splitlines()) <= 2


def test_predict_names_a_bad_cell(bundles, signing_keys, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("temperature,humidity,vibration,current\n60,40,1.0,hot\n")
    code = main(["predict", "--bundle", str(bundles.build("1.0.0")), "--input", str(bad),
                 "--trust", signing_keys.trust_specs()[0]])
    err = capsys.readouterr().err
    assert code == 1 and "'current'" in err and "bad.csv:2" in err


def test_a_row_the_model_refuses_is_named_by_its_file_line(bundles, signing_keys, tmp_path,
                                                           capsys):
    """The schema check runs in batches; its error names the line, not the batch index."""
    rows = sensor_data(4, seed=3)[list(FEATURES)].to_dict("records")
    rows[2]["current"] = "hot"  # a string where the schema wants a number
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n" + "\n".join(json.dumps(r) for r in rows) + "\n")  # a blank first
    code = main(["predict", "--bundle", str(bundles.build("1.0.0")), "--input", str(bad),
                 "--trust", signing_keys.trust_specs()[0]])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:4: " in err and "'current'" in err


def test_status_of_a_device_that_never_ran(tmp_path, signing_keys, capsys):
    from tests.edge_agent.agent_helpers import write_config

    class Broker:
        host, port = "127.0.0.1", 1

    config = write_config(tmp_path, device="dev9", broker=Broker, password="pw",
                          trust=signing_keys.trust_specs(), http_port=0)
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "dev9" in out and "active    none" in out
    assert main(["status", "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"]["active"] is None and doc["running"] is None


def test_a_bad_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text("[device]\nid = 'x'\ncolour = 'red'\n")
    assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-agent: error:") and "device.colour" in err


def test_every_command_has_help():
    for name, command in cli.commands.items():
        assert command.help and len(command.help) > 10, name
        for param in command.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"{name} --{param.name}"
