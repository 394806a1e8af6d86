"""The device side stays light: no agent or contract module pulls in the build or server stack."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import edge_agent
import edgefleet.contract

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("sklearn", "skl2onnx", "fastapi", "pandas", "onnx", "uvicorn", "sqlite_utils", "scipy")


def test_every_agent_module_imports_without_the_heavy_stack():
    modules = sorted(
        [f"edge_agent.{m.name}" for m in pkgutil.iter_modules(edge_agent.__path__)]
        + [f"edgefleet.contract.{m.name}"
           for m in pkgutil.iter_modules(edgefleet.contract.__path__)])
    assert "edge_agent.daemon" in modules and "edge_agent.cli" in modules
    assert "edgefleet.contract.bundle" in modules and "edgefleet.contract.inputs" in modules
    code = (f"import sys; import {', '.join(modules)}; "
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


# what a process that only serves a bundle has no use for: the MQTT link, HTTP and TLS
# (data capture's uploads, downloads), the daemon itself (resident memory, issue 13)
NOT_FOR_SERVING = ("paho", "ssl", "urllib.request", "http.server", "edge_agent.capture",
                   "edge_agent.daemon", "edge_agent.mqtt", "edge_agent.download")


def test_serving_a_bundle_imports_neither_the_network_nor_the_daemon():
    code = ("import sys; import edge_agent.agent, edge_agent.model, edgefleet.contract.bundle; "
            f"bad = [m for m in {NOT_FOR_SERVING!r} if m in sys.modules]; "
            "assert not bad, bad; print('lean')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "lean"
