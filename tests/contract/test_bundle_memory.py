"""Verification in bounded memory, measured: a real subprocess verifies a bundle file and
reports how far its peak resident memory rose while it did.

The peak is the kernel's high-water mark of the process's own memory (``VmHWM`` in
``/proc/self/status``); ``ru_maxrss`` is reported beside it but not judged: on Linux it
carries the *parent's* resident size across fork and exec, so under a large pytest process
it would hide a rise of a few hundred MiB.

The bound (issue 12): at most 64 MiB above the largest member actually kept. Members are
streamed to files, so nothing is kept in memory and the rise must stay under 64 MiB for a
bundle with a 128 MiB model and for hostile ones (a 192 MiB member the manifest does not
list, a second gzip stream behind a large valid one). A control run verifies the same
file with the in-memory API and must rise by at least the member's size: the measurement
sees what it is meant to see.

The bundles are written streaming (tar headers, a repeated 1 MiB pattern, ``zlib``), so
building them holds no large buffer either.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from edgefleet.contract.manifest import FileEntry
from edgefleet.contract.signing import Envelope, generate_key, write_key_pair
from tests.contract.conftest import REFERENCE_BYTES, make_manifest

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BOUND = 64 * MiB
MODEL_MIB = 128
PATTERN = bytes(range(256)) * 4096  # 1 MiB, compresses about 1000 to 1

PROBE = r"""
import json, resource, sys
from pathlib import Path
from edgefleet.contract.bundle import read_bundle_file, verify_bundle, verify_bundle_file
from edgefleet.contract.errors import BundleError
from edgefleet.contract.signing import TrustStore
path, key, into, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
trust = TrustStore.from_files([key])
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) * 1024
before, maxrss_before = hwm(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if mode == "file":
        verify_bundle_file(path, into, trust)
    else:
        verify_bundle(read_bundle_file(path), trust)
    outcome = "valid"
except BundleError as exc:
    outcome = type(exc).__name__
after, maxrss_after = hwm(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "rise_bytes": after - before, "peak_bytes": after,
                  "ru_maxrss_rise_bytes": (maxrss_after - maxrss_before) * 1024}))
"""


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_767_225_600
    return info.tobuf(format=tarfile.USTAR_FORMAT)


class _Writer:
    """A gzip'd tar written as it goes."""

    def __init__(self, path: Path) -> None:
        self.fh = path.open("wb")
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def raw(self, data: bytes) -> None:
        self.fh.write(self.z.compress(data))

    def member(self, name: str, size: int, chunks) -> None:
        self.raw(_tar_header(name, size))
        for chunk in chunks:
            self.raw(chunk)
        self.raw(b"\0" * (-size % 512))

    def close(self, tail: bytes = b"") -> None:
        self.raw(b"\0" * 1024)
        self.fh.write(self.z.flush())
        self.fh.write(tail)
        self.fh.close()


def _pattern(mib: int):
    return (PATTERN for _ in range(mib))


def _digest(mib: int) -> str:
    h = hashlib.sha256()
    for chunk in _pattern(mib):
        h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    key = generate_key()
    _, public = write_key_pair(key, root / "keys", "build")
    return root, key, public


def _bundle(root: Path, key, name: str, *, model_mib: int, unlisted_mib: int = 0,
            tail: bytes = b"") -> Path:
    entries = (FileEntry("model.onnx", _digest(model_mib), model_mib * MiB),
               FileEntry("reference.json", hashlib.sha256(REFERENCE_BYTES).hexdigest(),
                         len(REFERENCE_BYTES)))
    manifest = replace(make_manifest({"model.onnx": b"", "reference.json": b""}),
                       files=entries)
    raw_manifest = manifest.to_bytes()
    envelope = Envelope().signed(key, raw_manifest).to_bytes()
    path = root / f"{name}.edgebundle"
    w = _Writer(path)
    w.member("manifest.json", len(raw_manifest), [raw_manifest])
    w.member("signatures.json", len(envelope), [envelope])
    if unlisted_mib:
        w.member("junk.bin", unlisted_mib * MiB, _pattern(unlisted_mib))
    w.member("model.onnx", model_mib * MiB, _pattern(model_mib))
    w.member("reference.json", len(REFERENCE_BYTES), [REFERENCE_BYTES])
    w.close(tail)
    return path


def _second_stream(mib: int) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = [z.compress(_tar_header("evil.sh", mib * MiB))]
    out += [z.compress(chunk) for chunk in _pattern(mib)]
    out.append(z.flush())
    return b"".join(out)


def _probe(path: Path, public: Path, into: Path, mode: str = "file") -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), f"build={public}",
                           str(into), mode], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


CASES = {
    "valid-128-mib-model": ({"model_mib": MODEL_MIB}, "valid"),
    "unlisted-192-mib-member": ({"model_mib": 1, "unlisted_mib": 192}, "ExtraMemberError"),
    "second-stream-behind-a-large-bundle": ({"model_mib": 64, "tail": "second"},
                                            "MultipleStreamError"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peak_memory_while_verifying_a_file_stays_within_the_bound(case, keyed, tmp_path):
    root, key, public = keyed
    kwargs, outcome = CASES[case]
    kwargs = dict(kwargs)
    if kwargs.get("tail") == "second":
        kwargs["tail"] = _second_stream(128)
    path = _bundle(root, key, case, **kwargs)
    assert path.stat().st_size < 4 * MiB  # small on the wire, large inflated
    got = _probe(path, public, tmp_path / "members")
    assert got["outcome"] == outcome, got
    assert got["rise_bytes"] <= BOUND, got
    kept = tmp_path / "members"
    if outcome == "valid":
        assert (kept / "model.onnx").stat().st_size == MODEL_MIB * MiB
    else:
        assert not kept.exists()


def test_the_in_memory_control_rises_by_the_member(keyed, tmp_path):
    """The same measurement sees a member held in memory: the in-memory API on the same
    file rises by at least the model's size."""
    root, key, public = keyed
    path = _bundle(root, key, "control", model_mib=MODEL_MIB)
    got = _probe(path, public, tmp_path / "unused", mode="bytes")
    assert got["outcome"] == "valid", got
    assert got["rise_bytes"] >= MODEL_MIB * MiB, got
