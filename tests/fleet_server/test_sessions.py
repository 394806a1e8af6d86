"""Dashboard sessions live in the database: any API replica serves one operator.

The store and :class:`~fleet_server.dashboard.session.Sessions` on both engines (SQLite and
PostgreSQL): a session opens, is found, expires, is deleted at sign-out and when its token
is revoked, the oldest go past the bound, and nothing stored is the cookie's id or the
token. Then two real API replicas (two ``FleetServer(role="api")`` serving HTTP over one
PostgreSQL database): signed in through one, the session works on the other, signing out
on one ends it on both, and it expires on a replica whose clock has passed its age.
"""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest

from fleet_server.dashboard.session import COOKIE, MAX_AGE_S, Sessions
from fleet_server.errors import AuthenticationError, PermissionDeniedError
from fleet_server.registry.auth import secret_hash
from fleet_server.server import FleetServer
from tests.fleet_server.conftest import make_config

NOW = 1_800_000_000.0


def _rows(services) -> list[dict]:
    return services.store._rows("SELECT * FROM sessions ORDER BY created")


def test_a_session_opens_is_found_and_ends_at_sign_out(services_on):
    s = services_on
    token = s.auth.create_token("ana", "viewer", "test", NOW).secret
    sessions = Sessions(s.store)
    sid, who = sessions.login(s.auth, f"  {token} ", NOW)
    assert (who.name, who.role) == ("ana", "viewer") and len(sid) >= 40
    again = Sessions(s.store)  # another replica: no state of its own
    found = again.principal(s.auth, sid, NOW + 1)
    assert found is not None and (found.name, found.role) == ("ana", "viewer")
    # at rest: the id's sha256 and the token row's id, neither the id nor the token
    [row] = _rows(s)
    assert row["id"] == secret_hash(sid) and row["token_id"] == s.auth.list_tokens()[0].id
    assert row["expires"] == NOW + MAX_AGE_S
    assert sid not in str(row) and token not in str(row)
    again.logout(sid)
    assert _rows(s) == [] and sessions.principal(s.auth, sid, NOW + 2) is None


def test_a_session_expires_at_its_age_and_expired_ones_are_deleted(services_on):
    s = services_on
    token = s.auth.create_token("ana", "operator", "test", NOW).secret
    sessions = Sessions(s.store, max_age_s=60)
    sid, _ = sessions.login(s.auth, token, NOW)
    assert sessions.principal(s.auth, sid, NOW + 59.9) is not None
    assert sessions.principal(s.auth, sid, NOW + 60) is None
    assert sessions.count(NOW + 60) == 0 and len(_rows(s)) == 1  # not found, still stored
    later, _ = sessions.login(s.auth, token, NOW + 61)  # a login sweeps the expired
    assert [r["id"] for r in _rows(s)] == [secret_hash(later)]
    assert s.store.delete_expired_sessions(NOW + 200) == 1 and _rows(s) == []


def test_revoking_the_token_ends_its_sessions(services_on):
    s = services_on
    token = s.auth.create_token("ana", "viewer", "test", NOW).secret
    sessions = Sessions(s.store)
    sid, _ = sessions.login(s.auth, token, NOW)
    s.auth.revoke_token("ana", "test", NOW + 1)
    assert sessions.principal(s.auth, sid, NOW + 2) is None
    assert _rows(s) == []  # the refused session is deleted
    with pytest.raises(AuthenticationError, match="revoked"):
        sessions.login(s.auth, token, NOW + 3)


def test_sessions_are_bounded_the_oldest_go_first(services_on):
    s = services_on
    token = s.auth.create_token("ana", "viewer", "test", NOW).secret
    sessions = Sessions(s.store, max_sessions=3)
    sids = [sessions.login(s.auth, token, NOW + i)[0] for i in range(5)]
    assert sessions.count(NOW + 5) == 3
    alive = [sessions.principal(s.auth, sid, NOW + 5) is not None for sid in sids]
    assert alive == [False, False, True, True, True]


@pytest.mark.parametrize("sid", [None, "", "x" * 65, "not-a-session"],
                         ids=["none", "empty", "oversized", "unknown"])
def test_no_session_for_a_cookie_that_names_none(services_on, sid):
    s = services_on
    token = s.auth.create_token("ana", "viewer", "test", NOW).secret
    Sessions(s.store).login(s.auth, token, NOW)
    assert Sessions(s.store).principal(s.auth, sid, NOW) is None
    Sessions(s.store).logout(sid)  # signing out of nothing is no error
    assert len(_rows(s)) == 1


def test_device_secrets_and_bad_tokens_open_no_session(services_on):
    s = services_on
    _, issued = s.registry.add_device("dev1", {}, "test", NOW)
    sessions = Sessions(s.store)
    with pytest.raises(PermissionDeniedError):
        sessions.login(s.auth, issued.secret, NOW)
    for bad in ("", "efo_" + "x" * 200, "efo_unknown"):
        with pytest.raises(AuthenticationError):
            sessions.login(s.auth, bad, NOW)
    assert _rows(s) == []


class Clock:
    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@pytest.fixture
def replicas(tmp_path, signing_keys, postgres):
    """Two API replicas serving HTTP over one PostgreSQL database: (url A, url B, B's clock,
    a viewer token)."""
    config = replace(make_config(tmp_path, signing_keys, db=postgres.new_database()),
                     role="api")
    clock_b = Clock()
    a, b = FleetServer(config), FleetServer(config, clock=clock_b)
    try:
        a.start()
        b.start()
        urls = a.start_http(), b.start_http()
        token = a.services.auth.create_token("ana", "viewer", "test", time.time()).secret
        yield *urls, clock_b, token
    finally:
        for server in (b, a):
            server.stop_http()
            server.stop()


def test_signed_in_on_one_replica_the_session_works_on_the_other(replicas):
    url_a, url_b, _, token = replicas
    with httpx.Client(base_url=url_a) as a:
        r = a.post("/login", data={"token": token, "next": "/devices"})
        assert r.status_code == 303 and r.headers["location"] == "/devices"
        sid = a.cookies[COOKIE]
    with httpx.Client(base_url=url_b, cookies={COOKIE: sid}) as b:
        page = b.get("/devices")
        assert page.status_code == 200 and "ana (viewer)" in page.text
        assert b.post("/logout").status_code == 303  # signed out on B ...
    r = httpx.get(url_a + "/", cookies={COOKIE: sid})  # ... is signed out on A
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_a_session_expires_on_every_replica(replicas):
    url_a, url_b, clock_b, token = replicas
    with httpx.Client(base_url=url_a) as a:
        assert a.post("/login", data={"token": token}).status_code == 303
        sid = a.cookies[COOKIE]
        assert a.get("/").status_code == 200
    clock_b.ahead = MAX_AGE_S + 1  # B's time is past the session's age
    r = httpx.get(url_b + "/", cookies={COOKIE: sid})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
