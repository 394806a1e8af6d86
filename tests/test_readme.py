"""The README's commands, pasted (issue 17): the packaging and operator paths run line by
line in a shell, in a fresh directory, and each must succeed.

What a test cannot paste as is, and is changed here, visibly: ``.venv/bin/`` becomes this
interpreter's bin directory; the fixed ports (Mosquitto's 1883, the server's 8000) become
free ones; the two long-running programs (``mosquitto``, ``fleet serve``) start in the
background and are stopped by their handles; ``FLEET_TOKEN=...`` is the token the first
line printed. The inputs the README assumes (``model.joblib``, ``train.csv``,
``test.csv``, ``card.toml``) are made here: a mixed numeric and categorical scikit-learn
pipeline, as users ship.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.broker import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def blocks(section: str) -> list[list[str]]:
    """The ``sh`` blocks under a README heading, as commands (continuations joined,
    comments dropped), up to the next heading of the same or a higher level."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = re.search(rf"^(#+) {re.escape(section)}\s*$", text, re.M)
    assert start, f"README has no section {section!r}"
    level = len(start.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start.end())
    body = text[start.end():end.start() if end else len(text)]
    out = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.S):
        commands, pending = [], ""
        for line in block.splitlines():
            line = pending + line
            pending = ""
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
        out.append(commands)
    return out


def _inputs(work: Path) -> None:
    """model.joblib, train.csv, test.csv and card.toml, as the README assumes them."""
    import joblib
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(7)
    n = 3000
    frame = pd.DataFrame({
        "humidity": rng.normal(50, 10, n), "tenure": rng.gamma(2.0, 12.0, n),
        "age": rng.integers(18, 80, n).astype(float),
        "region": rng.choice(["north", "south", "east"], n), "sex": rng.choice(["f", "m"], n),
    })
    logit = 0.08 * (frame.humidity - 50) - 0.05 * (frame.tenure - 24) \
        + (frame.region == "north") * 0.8
    frame["label"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame.iloc[:2000].to_csv(work / "train.csv", index=False)
    frame.iloc[2000:].to_csv(work / "test.csv", index=False)
    model = Pipeline([
        ("prep", ColumnTransformer([
            ("num", StandardScaler(), ["humidity", "tenure", "age"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["region", "sex"])])),
        ("clf", LogisticRegression(max_iter=500))])
    model.fit(frame.iloc[:2000].drop(columns="label"), frame.label.iloc[:2000])
    joblib.dump(model, work / "model.joblib")
    (work / "card.toml").write_text(
        'owner = "risk team"\ncontact = "risk@example.com"\n'
        'intended_use = "rank accounts for review"\nreview_by = 2027-06-30\n')


def _run(command: str, work: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _paste(command: str) -> str:
    return command.replace(".venv/bin/", f"{BIN}/")


@pytest.fixture(scope="module")
def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory, shell_env: dict[str, str]) -> Path:
    """A fresh directory where every command of "Packaging a model" ran, in order."""
    work = tmp_path_factory.mktemp("readme")
    _inputs(work)
    for block in blocks("Packaging a model"):  # the card's block included
        for command in block:
            _run(_paste(command), work, shell_env)
    return work


def test_the_readme_sections_are_found() -> None:
    packaging = blocks("Packaging a model")
    assert packaging[0][0].startswith(".venv/bin/edgepack keygen build")
    assert any(c.startswith("fleet serve") for c in blocks("Running the fleet")[0])


def test_packaging_as_the_readme_says(packaged: Path) -> None:
    assert (packaged / "bundles" / "churn-1.0.0.edgebundle").is_file()
    assert (packaged / "bundles" / "credit-1.0.0.edgebundle").is_file()
    assert "<html" in (packaged / "card.html").read_text(encoding="utf-8").lower()


def test_running_the_fleet_as_the_readme_says(packaged: Path,
                                              shell_env: dict[str, str]) -> None:
    tmp_path = packaged  # the operator uploads the bundle packaged above
    mqtt, http = free_port(), free_port()
    env = dict(shell_env)
    token = ""
    background: list[subprocess.Popen[bytes]] = []
    try:
        for command in blocks("Running the fleet")[0]:
            command = command.replace("127.0.0.1:1883", f"127.0.0.1:{mqtt}")
            if command.startswith("fleet broker-config"):
                command += f" --port {mqtt} --bind 127.0.0.1"
            if command.startswith(("mosquitto ", "fleet serve")):
                if command.startswith("fleet serve"):
                    command += f" --port {http}"
                log = (tmp_path / f"{command.split()[0]}.log").open("wb")
                background.append(subprocess.Popen(["bash", "-c", f"exec {command}"],
                                                   cwd=tmp_path, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT))
                _wait_for_port(mqtt if command.startswith("mosquitto") else http, tmp_path)
                continue
            if command.startswith("export FLEET_SERVER"):
                env["FLEET_SERVER"] = f"http://127.0.0.1:{http}"
                env["FLEET_TOKEN"] = token  # what `fleet token create` printed
                continue
            out = _run(command, tmp_path, env)
            if command.startswith("fleet token create"):
                token = out.strip()
        assert "fleet device remove" in command  # the block ran to its last line
    finally:
        for proc in reversed(background):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def _wait_for_port(port: int, work: Path, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in work.glob("*.log"))
    raise AssertionError(f"nothing listens on {port} after {timeout:.0f} s\n{logs}")
