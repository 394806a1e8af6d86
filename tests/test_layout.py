"""The folder tree is the architecture: imports run one way, and every public face is real.

- the contracts (``edgefleet``) import none of the three programs;
- no program imports another's internals (``edge_agent``, ``packager`` and ``fleet_server``
  meet only in ``edgefleet``);
- inside ``fleet_server`` the rooms form layers, and a room imports only rooms below it;
- every package's ``__all__`` names things that exist.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("edgefleet", "edge_agent", "packager", "fleet_server", "demo")

# what each top-level package may import from the others (demo tells the story over all)
ALLOWED = {
    "edgefleet": set(),
    "edge_agent": {"edgefleet"},
    "packager": {"edgefleet"},
    "fleet_server": {"edgefleet"},
    "demo": {"edgefleet", "edge_agent", "packager", "fleet_server"},
}

# fleet_server's rooms, lowest first: a room may import only rooms of a lower rank
FLEET_LAYERS = [
    {"errors", "models", "profiles"},
    {"config", "store"},
    {"metrics", "registry"},
    {"telemetry", "monitoring"},
    {"rollouts"},
    {"services"},
    {"dashboard"},
    {"api"},
    {"server"},
    {"cli"},
]
RANK = {room: rank for rank, rooms in enumerate(FLEET_LAYERS) for room in rooms}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _modules(top: str):
    for path in sorted((REPO / top).rglob("*.py")):
        yield path.relative_to(REPO), _imports(path)


@pytest.mark.parametrize("top", PROGRAMS)
def test_programs_meet_only_in_the_contracts(top):
    wrong = [
        f"{path} imports {name}"
        for path, names in _modules(top)
        for name in names
        if name.split(".")[0] in PROGRAMS
        and name.split(".")[0] != top
        and name.split(".")[0] not in ALLOWED[top]
    ]
    assert not wrong, wrong


def test_every_fleet_room_has_a_layer():
    rooms = {p.stem if p.is_file() else p.name
             for p in (REPO / "fleet_server").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert rooms == set(RANK), f"rooms without a layer: {rooms - set(RANK)}"


def test_fleet_rooms_import_only_downward():
    wrong = []
    for path, names in _modules("fleet_server"):
        parts = path.with_suffix("").parts
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        room = parts[1]
        for name in names:
            bits = name.split(".")
            if bits[0] != "fleet_server" or len(bits) < 2 or bits[1] == room:
                continue
            if RANK[bits[1]] >= RANK[room]:
                wrong.append(f"{path} ({room}) imports {name} ({bits[1]})")
    assert not wrong, wrong


def _packages():
    for top in PROGRAMS:
        yield top
        package = importlib.import_module(top)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{top}."):
            if info.ispkg:
                yield info.name


@pytest.mark.parametrize("name", list(_packages()))
def test_every_package_names_its_public_face(name):
    package = importlib.import_module(name)
    assert package.__doc__ and len(package.__doc__.strip()) > 40, f"{name} has no docstring"
    exported = getattr(package, "__all__", None)
    if name in ("demo", "fleet_server.api.routes"):
        return
    assert exported, f"{name} has no __all__"
    for item in exported:
        if not hasattr(package, item):
            importlib.import_module(f"{name}.{item}")  # a submodule named in __all__
