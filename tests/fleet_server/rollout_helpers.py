"""Helpers of the rollout tests: an approver-signed bundle, a fleet seeded through the real
ingest path (status, reports and summaries as devices send them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgefleet.contract.bundle import pack_bundle, read_unverified
from edgefleet.contract.messages import (
    LATENCY_EDGES_MS,
    BundleRef,
    Report,
    ShadowStats,
    Status,
    Summary,
    decode,
    encode,
)
from edgefleet.contract.profile import to_wire
from edgefleet.contract.signing import load_private_key
from fleet_server.services import Services
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of


def approved_bundle(bundles, keys, version: str, directory: Path) -> Path:
    """``sensor@version`` signed by the build key and the approver key."""
    good = read_unverified(bundles.build(version).read_bytes())
    signer = load_private_key(keys.approver.private)
    envelope = good.envelope.signed(signer, good.manifest.to_bytes())
    files = {k: v for k, v in good.members.items()
             if k not in ("manifest.json", "signatures.json")}
    path = directory / f"sensor-{version}-approved.edgebundle"
    path.write_bytes(pack_bundle(good.manifest, envelope, files, good.mtime))
    return path


class Recorder:
    """A publisher that keeps what it was given (the MQTT link's one method)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def publish_retained(self, topic_name: str, payload: bytes, qos: int = 1) -> bool:
        msg = decode(topic_name, payload)
        self.sent.append((topic_name.split("/")[2], msg.to_dict()))
        return True

    def versions(self) -> dict[str, str | None]:
        """The last bundle version published per device."""
        out: dict[str, str | None] = {}
        for device, body in self.sent:
            out[device] = body["bundle"]["version"] if body.get("bundle") else None
        return out


class Seeder:
    """Sends what devices would, through ``services.ingestor`` (the real ingest path)."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.seq: dict[str, int] = {}

    def _next(self, device: str) -> int:
        self.seq[device] = self.seq.get(device, 0) + 1
        return self.seq[device]

    def _send(self, msg, received: float) -> None:
        result = self.s.ingestor.process(
            [Incoming(msg.topic, encode(msg), 1, 1, 1, received)], now=received)
        assert not result.dead, result.dead

    def online(self, device: str, version: str | None, at: float) -> None:
        bundle = None if version is None else BundleRef("sensor", version)
        self._send(Status(device, "online", "0.1.0", bundle, None, {}, at), at)

    def offline(self, device: str, at: float) -> None:
        self._send(Status(device, "offline", time=at), at)

    def report(self, device: str, version: str, outcome: str, at: float) -> None:
        self._send(Report(device, self._next(device), 1, outcome, BundleRef("sensor", version),
                          "" if outcome == "installed" else "smoke test failed", at), at)

    def summary(self, device: str, version: str, start: float, end: float, *, rows: int = 400,
                errors: int = 0, latency_bucket: int = 3, seed: int = 0,
                as_trained: bool = True, shadow: tuple[str, int, int] | None = None
                ) -> None:
        """A window of ``rows`` predictions answering as in training (``as_trained``
        false: another class mix and confidence, a model that disagrees; ``shadow``:
        ``(version, rows, agreed)`` of a candidate run beside it)."""
        ref = self.s.bundles.reference(self.s.bundles.get("sensor", version).id)
        prof = profile_of(ref.spec, rows, seed + 1000 * self.seq.get(device, 0),
                          base=ref.base if as_trained else None)
        wire = to_wire(prof)
        latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        latency[latency_bucket] = rows
        stats = None if shadow is None else ShadowStats(BundleRef("sensor", shadow[0]),
                                                        shadow[1], shadow[2])
        msg = Summary(device, self._next(device), BundleRef("sensor", version), start, end,
                      wire, tuple(latency), {"runtime": errors} if errors else {}, stats)
        self._send(msg, end)


def devices_named(n: int) -> Sequence[str]:
    return [f"dev{i}" for i in range(1, n + 1)]
