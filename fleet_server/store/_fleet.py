"""Store tables of the fleet's inventory: tokens, devices and their labels, groups, desired
state and the audit log."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgefleet.contract.messages import BundleRef, CapturePolicy
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import (
    AUDIT_GENESIS,
    AuditEntry,
    AuditLink,
    DesiredRecord,
    Device,
    Group,
    Token,
    audit_digest,
)
from fleet_server.store._base import StoreBase, chunks, dumps, loads


def _ref(text: str | None) -> BundleRef | None:
    doc = loads(text)
    return None if doc is None else BundleRef(**doc)


def _ref_json(ref: BundleRef | None) -> str | None:
    return None if ref is None else dumps(ref.to_dict())


def _capture(text: str | None) -> CapturePolicy | None:
    doc = loads(text)
    return None if doc is None else CapturePolicy.from_dict(doc, "capture")


def _capture_json(policy: CapturePolicy | None) -> str | None:
    return None if policy is None else dumps(policy.to_dict())


def _device(row: dict[str, Any]) -> Device:
    return Device(
        id=row["id"], labels=loads(row["labels"], {}), set_labels=loads(row["set_labels"], {}),
        reported_labels=loads(row["reported_labels"], {}), created=row["created"],
        has_secret=row["secret_hash"] is not None, online=bool(row["online"]),
        status_time=row["status_time"], last_seen=row["last_seen"],
        agent_version=row["agent_version"], bundle=_ref(row["bundle"]),
        shadow=_ref(row["shadow"]), health=loads(row["health"]),
        heartbeat_time=row["heartbeat_time"], last_summary=row["last_summary"],
        summaries=row["summaries"], dropped=row["dropped"])


def _token(row: dict[str, Any]) -> Token:
    return Token(row["id"], row["name"], row["role"], row["created"], row["created_by"],
                 row["last_used"], row["revoked"])


def _group(row: dict[str, Any]) -> Group:
    return Group(row["name"], loads(row["selector"], {}), bool(row["requires_approval"]),
                 tuple(loads(row["important_features"], [])), row["created"], row["created_by"],
                 requires=tuple(loads(row.get("requires"), [])),
                 drift=loads(row["drift"], {}),
                 performance=loads(row.get("performance"), {}),
                 capture=_capture(row.get("capture")))


def selector_sql(selector: Mapping[str, str]) -> tuple[str, list[str]]:
    """A subquery selecting the ids of the devices whose labels match every pair."""
    if not selector:
        return "SELECT id FROM devices", []
    parts, params = [], []
    for key, value in sorted(selector.items()):
        parts.append("SELECT device AS id FROM device_labels WHERE key = ? AND value = ?")
        params += [key, value]
    return " INTERSECT ".join(parts), params


class FleetTables(StoreBase):
    # -- tokens --------------------------------------------------------------------------

    def add_token(self, name: str, role: str, token_hash: str, actor: str, now: float) -> Token:
        """Raises: ConflictError: a token of that name exists (revoked ones too)."""
        with self.transaction():
            if self._one("SELECT id FROM tokens WHERE name = ?", [name]):
                raise ConflictError(f"token {name!r} exists already; pick another name")
            self._exec("INSERT INTO tokens (name, role, hash, created, created_by) "
                       "VALUES (?, ?, ?, ?, ?)", [name, role, token_hash, now, actor])
            return self._token_named(name)

    def _token_named(self, name: str) -> Token:
        row = self._one("SELECT * FROM tokens WHERE name = ?", [name])
        if row is None:
            raise NotFoundError("token", name)
        return _token(row)

    def token_by_hash(self, token_hash: str) -> Token | None:
        row = self._one("SELECT * FROM tokens WHERE hash = ?", [token_hash])
        return None if row is None else _token(row)

    def list_tokens(self) -> list[Token]:
        return [_token(r) for r in self._rows("SELECT * FROM tokens ORDER BY name")]

    def revoke_token(self, name: str, now: float) -> Token:
        """Raises: NotFoundError: no token of that name."""
        with self.transaction():
            token = self._token_named(name)
            if token.revoked is None:
                self._exec("UPDATE tokens SET revoked = ? WHERE name = ?", [now, name])
            return self._token_named(name)

    def touch_token(self, token_id: int, now: float) -> None:
        with self.transaction():
            self._exec("UPDATE tokens SET last_used = ? WHERE id = ?", [now, token_id])

    # -- dashboard sessions (a session id's hash → the token it signs in) ------------------

    def add_session(self, session_hash: str, token_id: int, now: float, expires: float,
                    max_sessions: int) -> int:
        """Open a session; sessions expired by ``now`` go, and past ``max_sessions`` the
        oldest go first. Returns how many went."""
        with self.transaction():
            gone = self._exec("DELETE FROM sessions WHERE expires <= ?", [now]).rowcount
            self._exec("INSERT INTO sessions (id, token_id, created, expires) "
                       "VALUES (?, ?, ?, ?)", [session_hash, token_id, now, expires])
            gone += self._exec(
                "DELETE FROM sessions WHERE id NOT IN (SELECT id FROM sessions "
                "ORDER BY created DESC, id LIMIT ?)", [max_sessions]).rowcount
        return gone

    def session_token(self, session_hash: str, now: float) -> Token | None:
        """The token a session signs in, if the session exists and has not expired (the
        token may be revoked: the caller judges it)."""
        row = self._one("SELECT t.* FROM sessions s JOIN tokens t ON t.id = s.token_id "
                        "WHERE s.id = ? AND s.expires > ?", [session_hash, now])
        return None if row is None else _token(row)

    def delete_session(self, session_hash: str) -> bool:
        """End a session; whether it existed."""
        with self.transaction():
            return self._exec("DELETE FROM sessions WHERE id = ?",
                              [session_hash]).rowcount > 0

    def delete_expired_sessions(self, now: float) -> int:
        with self.transaction():
            return self._exec("DELETE FROM sessions WHERE expires <= ?", [now]).rowcount

    def count_sessions(self, now: float) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM sessions WHERE expires > ?", [now])
        return int(row["n"]) if row else 0

    # -- devices -------------------------------------------------------------------------

    def get_device(self, device: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE id = ?", [device])
        return None if row is None else _device(row)

    def list_devices(self, selector: Mapping[str, str] | None = None, *,
                     online: bool | None = None, limit: int = 1000, offset: int = 0
                     ) -> list[Device]:
        sub, params = selector_sql(selector or {})
        sql = f"SELECT * FROM devices WHERE id IN ({sub})"
        if online is not None:
            sql += " AND online = ?"
            params.append(int(online))
        sql += " ORDER BY id LIMIT ? OFFSET ?"
        return [_device(r) for r in self._rows(sql, [*params, limit, offset])]

    def device_ids(self, selector: Mapping[str, str] | None = None) -> list[str]:
        sub, params = selector_sql(selector or {})
        return [r["id"] for r in self._rows(f"SELECT id FROM ({sub}) AS m ORDER BY 1", params)]

    def count_devices(self, *, online: bool | None = None) -> int:
        if online is None:
            row = self._one("SELECT COUNT(*) AS n FROM devices")
        else:
            row = self._one("SELECT COUNT(*) AS n FROM devices WHERE online = ?", [int(online)])
        return int(row["n"]) if row else 0

    def add_device(self, device: str, labels: Mapping[str, str], secret_hash: str,
                   mqtt_hash: str, actor: str, now: float, *, rotate: bool = False) -> Device:
        """Create a device credential (and the device, if ingest has not seen it yet).

        Raises:
            ConflictError: the device has a credential already and ``rotate`` is false.
        """
        with self.transaction():
            row = self._one("SELECT secret_hash FROM devices WHERE id = ?", [device])
            if row is not None and row["secret_hash"] is not None and not rotate:
                raise ConflictError(f"device {device!r} has a credential already; "
                                    "rotate it explicitly to issue a new one "
                                    "(`fleet device add --rotate`, or rotate: true in "
                                    "the API)")
            if row is None:
                self._exec("INSERT INTO devices (id, created, created_by) VALUES (?, ?, ?)",
                           [device, now, actor])
                self._exec("DELETE FROM removed_devices WHERE device = ?", [device])
            self._exec("UPDATE devices SET secret_hash = ?, mqtt_hash = ? WHERE id = ?",
                       [secret_hash, mqtt_hash, device])
            if labels or row is None:
                self._write_labels(device, set_labels=dict(labels))
            found = self.get_device(device)
            assert found is not None
            return found

    def set_labels(self, device: str, labels: Mapping[str, str]) -> Device:
        """Replace the operator's labels of a device.

        Raises:
            NotFoundError: no such device.
        """
        with self.transaction():
            if self.get_device(device) is None:
                raise NotFoundError("device", device)
            self._write_labels(device, set_labels=dict(labels))
            found = self.get_device(device)
            assert found is not None
            return found

    def _write_labels(self, device: str, *, set_labels: dict[str, str] | None = None,
                      reported: dict[str, str] | None = None) -> bool:
        """Write one side of a device's labels; the operator's override the device's.

        Returns True if the effective labels changed.
        """
        row = self._one("SELECT labels, set_labels, reported_labels FROM devices WHERE id = ?",
                        [device])
        if row is None:
            raise NotFoundError("device", device)
        ours = set_labels if set_labels is not None else loads(row["set_labels"], {})
        theirs = reported if reported is not None else loads(row["reported_labels"], {})
        effective = {**theirs, **ours}
        self._exec("UPDATE devices SET set_labels = ?, reported_labels = ?, labels = ? "
                   "WHERE id = ?", [dumps(ours), dumps(theirs), dumps(effective), device])
        if effective == loads(row["labels"], {}):
            return False
        self._exec("DELETE FROM device_labels WHERE device = ?", [device])
        self._many("INSERT INTO device_labels (device, key, value) VALUES (?, ?, ?)",
                   [(device, k, v) for k, v in sorted(effective.items())])
        return True

    def device_by_secret(self, secret_hash: str) -> str | None:
        row = self._one("SELECT id FROM devices WHERE secret_hash = ?", [secret_hash])
        return None if row is None else row["id"]

    def remove_device(self, device: str, actor: str, now: float) -> None:
        """Decommission a device: its row (credential, labels, state) and its desired state
        go, and a removal record waits for its retained desired state to be cleared.
        Its summaries, reports and rollups stay: they are the fleet's history.

        Raises:
            NotFoundError: no such device.
        """
        with self.transaction():
            if self._exec("DELETE FROM devices WHERE id = ?", [device]).rowcount == 0:
                raise NotFoundError("device", device)
            self._exec("DELETE FROM desired WHERE device = ?", [device])
            self._exec("INSERT INTO removed_devices (device, removed, removed_by) "
                       "VALUES (?, ?, ?) ON CONFLICT (device) DO UPDATE SET removed = "
                       "excluded.removed, removed_by = excluded.removed_by, "
                       "retained_cleared = 0", [device, now, actor])

    def retained_to_clear(self) -> list[str]:
        """Removed devices whose retained desired state may still be on the broker."""
        return [r["device"] for r in self._rows(
            "SELECT device FROM removed_devices WHERE retained_cleared = 0 ORDER BY device")]

    def mark_retained_cleared(self, devices: Sequence[str]) -> None:
        with self.transaction():
            self._many("UPDATE removed_devices SET retained_cleared = 1 WHERE device = ?",
                       [(d,) for d in devices])

    def mosquitto_users(self) -> list[tuple[str, str]]:
        """``(device, $7$ hash)`` of every device with a credential, by id."""
        return [(r["id"], r["mqtt_hash"]) for r in self._rows(
            "SELECT id, mqtt_hash FROM devices WHERE mqtt_hash IS NOT NULL ORDER BY id")]

    # -- registry updates from ingest (inside the ingest transaction) ----------------------

    def ensure_devices(self, devices: Iterable[str], now: float) -> None:
        self._many("INSERT INTO devices (id, created, created_by) VALUES (?, ?, '') "
                   "ON CONFLICT DO NOTHING",
                   [(d, now) for d in sorted(set(devices))])

    def touch_devices(self, seen: Mapping[str, float]) -> None:
        self._many("UPDATE devices SET last_seen = GREATEST(COALESCE(last_seen, 0), ?) "
                   "WHERE id = ?",
                   [(t, d) for d, t in seen.items()])

    def apply_status(self, device: str, *, online: bool, time: float, agent_version: str,
                     bundle: BundleRef | None, shadow: BundleRef | None,
                     labels: dict[str, str] | None) -> bool:
        """Record a status message unless a newer one is stored; True if applied."""
        row = self._one("SELECT status_time FROM devices WHERE id = ?", [device])
        if row is None:
            raise NotFoundError("device", device)
        if row["status_time"] is not None and time < row["status_time"]:
            return False
        self._exec("UPDATE devices SET online = ?, status_time = ?, agent_version = ?, "
                   "bundle = COALESCE(?, bundle), shadow = ? WHERE id = ?",
                   [int(online), time, agent_version, _ref_json(bundle), _ref_json(shadow),
                    device])
        if labels is not None:
            self._write_labels(device, reported=labels)
        return True

    def apply_heartbeats(self, beats: Mapping[str, tuple[float, dict[str, Any]]]) -> None:
        self._many("UPDATE devices SET health = ?, heartbeat_time = ? WHERE id = ? AND "
                   "(heartbeat_time IS NULL OR heartbeat_time <= ?)",
                   [(dumps(body), t, d, t) for d, (t, body) in beats.items()])

    def note_summaries(self, counts: Mapping[str, tuple[int, float, int]]) -> None:
        """Per device: (new summaries, latest window end, outbox drops so far)."""
        self._many("UPDATE devices SET summaries = summaries + ?, "
                   "last_summary = GREATEST(COALESCE(last_summary, 0), ?), "
                   "dropped = GREATEST(dropped, ?) WHERE id = ?",
                   [(n, end, dropped, d) for d, (n, end, dropped) in counts.items()])

    # -- groups --------------------------------------------------------------------------

    def add_group(self, group: Group) -> Group:
        """Raises: ConflictError: a group of that name exists."""
        with self.transaction():
            self._exec(
                "INSERT INTO groups (name, selector, requires_approval, important_features,"
                " created, created_by, requires, drift, performance, capture) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [group.name, dumps(group.selector), int(group.requires_approval),
                 dumps(list(group.important_features)), group.created, group.created_by,
                 dumps(list(group.requires)), dumps(dict(group.drift)),
                 dumps(dict(group.performance)), _capture_json(group.capture)],
                conflict=f"group {group.name!r} exists already")
        return group

    def update_group(self, group: Group) -> Group:
        """Write a group's important features, drift settings, performance tolerances and
        data capture (name, selector and creation stay).

        Raises:
            NotFoundError: no such group.
        """
        with self.transaction():
            if self._exec("UPDATE groups SET important_features = ?, drift = ?, "
                          "performance = ?, capture = ? WHERE name = ?",
                          [dumps(list(group.important_features)), dumps(dict(group.drift)),
                           dumps(dict(group.performance)), _capture_json(group.capture),
                           group.name]).rowcount == 0:
                raise NotFoundError("group", group.name)
        return group

    def get_group(self, name: str) -> Group | None:
        row = self._one("SELECT * FROM groups WHERE name = ?", [name])
        return None if row is None else _group(row)

    def list_groups(self) -> list[Group]:
        return [_group(r) for r in self._rows("SELECT * FROM groups ORDER BY name")]

    def delete_group(self, name: str) -> None:
        """Raises: NotFoundError: no such group."""
        with self.transaction():
            if self._exec("DELETE FROM groups WHERE name = ?", [name]).rowcount == 0:
                raise NotFoundError("group", name)

    # -- desired state -------------------------------------------------------------------

    def get_desired(self, device: str) -> DesiredRecord | None:
        row = self._one("SELECT * FROM desired WHERE device = ?", [device])
        return None if row is None else _desired(row)

    def list_desired(self, devices: Sequence[str] | None = None) -> list[DesiredRecord]:
        if devices is None:
            return [_desired(r) for r in self._rows("SELECT * FROM desired ORDER BY device")]
        out: list[DesiredRecord] = []
        for part in chunks(list(devices), 500):
            marks = ",".join("?" * len(part))
            out += [_desired(r) for r in self._rows(
                f"SELECT * FROM desired WHERE device IN ({marks}) ORDER BY device", part)]
        return out

    def put_desired(self, records: Sequence[DesiredRecord]) -> None:
        with self.transaction():
            self._many(
                "INSERT INTO desired (device, revision, bundle, shadow, allow_downgrade, "
                "updated, updated_by, capture) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device) DO "
                "UPDATE SET revision = excluded.revision, bundle = excluded.bundle, "
                # the rollback slot: the bundle this one replaces (kept while it stays)
                "previous = CASE WHEN desired.bundle = excluded.bundle OR (desired.bundle IS "
                "NULL AND excluded.bundle IS NULL) THEN desired.previous ELSE desired.bundle "
                "END, "
                "shadow = excluded.shadow, allow_downgrade = excluded.allow_downgrade, "
                "updated = excluded.updated, updated_by = excluded.updated_by, "
                "capture = excluded.capture",
                [(r.device, r.revision, _ref_json(r.bundle), _ref_json(r.shadow),
                  int(r.allow_downgrade), r.updated, r.updated_by, _capture_json(r.capture))
                 for r in records])

    def assigned_bundles(self, device: str) -> set[tuple[str, str]]:
        """``(name, version)`` of the desired bundle, shadow and rollback slot of a device
        (empty: no such device, or nothing assigned)."""
        row = self._one("SELECT d.bundle, d.shadow, d.previous FROM desired d "
                        "JOIN devices ON devices.id = d.device WHERE d.device = ?", [device])
        if row is None:
            return set()
        refs = (_ref(row[k]) for k in ("bundle", "shadow", "previous"))
        return {(r.name, r.version) for r in refs if r is not None}

    # -- audit ---------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, details: Mapping[str, Any],
              now: float) -> None:
        """Append an entry chained to the last one (under the write lock, so two writers
        never chain to the same predecessor)."""
        text = dumps(details)
        with self.transaction():
            last = self._one("SELECT hash FROM audit ORDER BY id DESC LIMIT 1")
            prev = (last or {}).get("hash") or AUDIT_GENESIS
            self._exec("INSERT INTO audit (time, actor, action, target, details, prev, hash) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [now, actor, action, target, text, prev,
                        audit_digest(prev, now, actor, action, target, text)])

    def list_audit(self, *, target: str | None = None, since: float | None = None,
                   limit: int = 100) -> list[AuditEntry]:
        """Entries, newest first; with ``since``, only those at or after it."""
        where, params = [], []
        if target is not None:
            where.append("target = ?")
            params.append(target)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        sql = "SELECT * FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        return [AuditEntry(r["id"], r["time"], r["actor"], r["action"], r["target"],
                           loads(r["details"], {}), r["prev"], r["hash"]) for r in rows]

    def audit_links(self, *, after_id: int = 0, limit: int = 10_000) -> list[AuditLink]:
        """Entries as stored (details as text), oldest first, from after ``after_id``."""
        rows = self._rows("SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                          [after_id, limit])
        return [AuditLink(r["id"], r["time"], r["actor"], r["action"], r["target"],
                          r["details"], r["prev"], r["hash"]) for r in rows]


def _desired(row: dict[str, Any]) -> DesiredRecord:
    return DesiredRecord(row["device"], row["revision"], _ref(row["bundle"]),
                         _ref(row["shadow"]), bool(row["allow_downgrade"]), row["updated"],
                         row["updated_by"], _capture(row.get("capture")))
