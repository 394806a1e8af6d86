"""The tamper-evident audit log: verifying its hash chain, and exporting it.

Every entry carries the sha256 of the entry before it (``prev``) and its own (``hash``,
:meth:`fleet_server.models.AuditLink.digest`), so a change anywhere shows:

- **edited**: an entry whose content no longer gives its stored hash;
- **inserted**: an entry the chain skips (the entry after it names the one before it as
  its predecessor), or a run of entries between an earlier entry and the one that names it;
- **deleted**: an entry whose predecessor is in no stored entry (the one before it is
  gone, or was rewritten together with its hash);
- **unchained**: an entry without a hash after the chain began (hashes stripped).

:func:`verify_chain` is pure over the entries in id order; :class:`AuditLog` reads them from
the store in pages. Entries written before migration 5 carry no hash and are counted, not
judged: the chain starts at the first entry that has one.

What the chain cannot show on its own: entries cut from the end, or a forged entry
appended with a correct hash (the database holds no secret). Keep the ``head`` that
``verify`` reports (or an export) somewhere else; a later head must extend it.

This module does not write the log (the store appends, :meth:`Store.audit`) and decides
nothing about who may read it (the API does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fleet_server.models import AUDIT_GENESIS, AuditLink
from fleet_server.store import Store

__all__ = ["AuditFinding", "AuditLog", "ChainReport", "link_dict", "verify_chain"]

PAGE = 5000
MAX_EXPORT = 1_000_000


@dataclass(frozen=True)
class AuditFinding:
    kind: str  # edited | inserted | deleted | unchained
    entry: int  # the id of the entry at fault (for deleted: the entry after the gap)
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "entry": self.entry, "message": self.message}


@dataclass(frozen=True)
class ChainReport:
    entries: int
    legacy: int  # written before the chain began (no hash)
    head: str | None  # the last entry's hash: keep it elsewhere to detect cut tails
    head_id: int | None
    findings: tuple[AuditFinding, ...]

    @property
    def intact(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, object]:
        return {"intact": self.intact, "entries": self.entries, "legacy": self.legacy,
                "head": self.head, "head_id": self.head_id,
                "findings": [f.to_dict() for f in self.findings]}


def verify_chain(links: Sequence[AuditLink]) -> ChainReport:
    """Walk the entries in id order and name every break of the chain."""
    findings: list[AuditFinding] = []
    legacy = 0
    start = 0
    while start < len(links) and links[start].hash is None:
        legacy += 1
        start += 1
    chain = links[start:]
    seen: dict[str, int] = {AUDIT_GENESIS: -1}  # hash -> index in chain
    expected = AUDIT_GENESIS
    last_id: int | None = links[start - 1].id if start else None
    skip: set[int] = set()
    for i, link in enumerate(chain):
        if i in skip:
            continue
        if link.hash is None:
            findings.append(AuditFinding("unchained", link.id, f"entry {link.id} has no hash "
                                         "after the chain began: its hash was removed"))
            continue
        if link.digest() != link.hash:
            findings.append(AuditFinding("edited", link.id, f"entry {link.id} was edited: its "
                                         "content no longer matches its hash"))
        elif link.prev != expected:
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            if nxt is not None and nxt.prev == expected:
                findings.append(AuditFinding(
                    "inserted", link.id, f"entry {link.id} was inserted: the entry after it "
                    f"({nxt.id}) follows {_name(last_id)}"))
                skip.add(i)
                continue
            if link.prev in seen and seen[link.prev] < i - 1:
                for j in range(seen[link.prev] + 1, i):
                    findings.append(AuditFinding(
                        "inserted", chain[j].id, f"entry {chain[j].id} was inserted: entry "
                        f"{link.id} follows {_name(_id(chain, seen[link.prev]))}"))
            else:
                findings.append(AuditFinding(
                    "deleted", link.id, f"an entry between {_name(last_id)} and entry "
                    f"{link.id} was deleted (or the entry before {link.id} was rewritten "
                    "with a new hash)"))
        seen.setdefault(link.hash, i)
        expected, last_id = link.hash, link.id
    tail = next((x for x in reversed(chain) if x.hash is not None), None)
    return ChainReport(len(links), legacy, tail.hash if tail else None,
                       tail.id if tail else None, tuple(findings))


def _id(chain: Sequence[AuditLink], index: int) -> int | None:
    return chain[index].id if index >= 0 else None


def _name(entry_id: int | None) -> str:
    return "the start of the chain" if entry_id is None else f"entry {entry_id}"


class AuditLog:
    """The audit log's read side: verification and export."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def links(self) -> Iterator[AuditLink]:
        after = 0
        while True:
            page = self.store.audit_links(after_id=after, limit=PAGE)
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1].id

    def verify(self) -> ChainReport:
        """Verify the whole chain (a page at a time from the store)."""
        return verify_chain(list(self.links()))

    def export(self, since: float | None = None, limit: int = MAX_EXPORT) -> list[AuditLink]:
        """Entries at or after ``since`` (unix seconds), oldest first, with their hashes, so
        the export can be checked, and kept, elsewhere."""
        out = [x for x in self.links() if since is None or x.time >= since]
        return out[:limit]


def link_dict(link: AuditLink) -> dict[str, object]:
    """An exported entry: details parsed, and the stored text that the hash covers."""
    return {"id": link.id, "time": link.time, "actor": link.actor, "action": link.action,
            "target": link.target, "details": json.loads(link.details),
            "details_text": link.details, "prev": link.prev, "hash": link.hash}
