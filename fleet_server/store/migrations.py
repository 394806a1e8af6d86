"""Versioned schema migrations of the fleet database (``PRAGMA user_version``).

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the version
bump, so a crash mid-way leaves the previous version intact and two processes opening the
same file at once migrate it once (the second re-reads the version under the write lock).
A file whose version is higher than :data:`LATEST` was written by a newer server and is
refused rather than guessed at.

History:

1. registry, credentials, groups, bundles, window summaries, reports, dead letters, audit;
2. rollups and drift: ``summaries.folded`` (existing summaries become pending, so the
   server folds them into the new rollups when it starts), rollups, desired state, drift
   windows, alerts and webhook attempts;
3. rollouts: one row per rollout (its plan, its state with the audit history, the last
   gate results, what was last sent to each device);
4. ``summaries.packed``: a summary's profile, packed into the rollup layout at ingest;
5. removed devices: who removed which device when, and whether its retained desired state
   is cleared on the broker yet (the server clears it on its next connection if not);
   ``desired.previous``, the desired bundle before the current one (the rollback slot a
   device may still download);
6. delivery acknowledgements: per device and numbered stream (summary, report), the
   highest sequence up to which everything is stored or settled, and the highest
   ``floor`` the device has declared (see :mod:`edgefleet.contract.messages`); and the
   sequences refused for good (dead-lettered after decoding: a clock skew, a reference
   mismatch), which the acknowledgement may pass too;
7. the audit log hash-chained: ``audit.prev`` and ``audit.hash`` (entries written before
   stay NULL: SQL has no sha256, and sealing them later, outside this transaction, would
   also seal whatever had been edited by then; the chain starts at the first new entry);
8. the outcomes queue (issue 14): per device, numbered batches of true labels uploaded
   centrally (``outcome_batches``: the outcomes as JSON, when made, when last sent, how
   often), and per device the highest batch made, the highest the device has receipted,
   and how many outcomes it has receipted (``outcome_queues``). A receipted batch's row is
   deleted (its count stays in the queue row), so the table holds only what is undelivered;
9. performance: one row per (device, summary sequence, bundle) holding a summary's
   performance entry for that bundle (realized and estimated blocks in their wire form,
   checked at ingest against the bundle's spec), attributed to the entry's bundle, which
   need not be the summary's (outcomes joined after the device switched bundles);
10. ``groups.drift``: a group's own drift settings over the server's (a JSON object of
    :data:`fleet_server.config.DRIFT_KEYS` settings; ``{}``, the server's, for every
    existing group);
11. governance: ``groups.requires`` (what a group requires of a bundle before a rollout:
    card, approval, fairness, champion) and ``bundle_approvals``, the signed approval
    statements of each stored bundle, checked against the server's trust store at upload;
    a re-upload of the same manifest with new approvals (an approver's renewal of the review
    date) adds its statements here, the stored bundle file staying the one first uploaded;
12. dashboard sessions in the database, so any API replica serves one operator's session:
    the sha256 of the session id the cookie carries (never the id itself, nor the operator
    token it stands for), the token it signs in, when it was opened and when it expires;
13. retraining runs (issue 15): one row a run of the loop, its lineage in ids (the alert
    that triggered it, the champion, the challenger, the rollout); at most one running
    per recipe;
14. data capture (issue 15): ``captured``, the rows devices sampled and uploaded (their
    allowlisted features and the model's outputs as JSON, the true label once an outcome
    arrives centrally), one per (device, prediction id); ``capture_batches``, the batch ids
    each device has uploaded (an upload is stored once); ``capture_labels``, the outcomes
    uploaded centrally, by (device, prediction id), so a row captured after its outcome
    gets its label too;
15. a group's own rollups (issue 18): ``group_rollup_starts``, from when each group's rollups
    (scope ``group:<name>`` in ``rollups``) are complete; ``performance_rollups``, the sums
    of performance entries per bundle, width (an hour, a day), bucket and scope (device,
    group, fleet), kept at ingest;
16. data capture per group (issue 15): ``groups.capture``, the group's
    :class:`~edgefleet.contract.messages.CapturePolicy` as JSON (NULL: none set, every
    existing group), and ``desired.capture``, the policy a device's desired state carries
    (the stricter of its groups'), changed with a new revision;
17. ``groups.performance``: a group's own performance alert tolerances over the server's
    (a JSON object of :data:`fleet_server.config.PERFORMANCE_KEYS` settings; ``{}``, the
    server's, for every existing group).

Migrations are append-only: a released one is never edited, a change is a new one. This
module holds SQL text only; :mod:`fleet_server.store` runs it.
"""

from __future__ import annotations

__all__ = ["AUDIT_CHAIN", "LATEST", "MIGRATIONS"]

_V1 = """
CREATE TABLE tokens (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    role        TEXT    NOT NULL,
    hash        TEXT    NOT NULL UNIQUE,
    created     REAL    NOT NULL,
    created_by  TEXT    NOT NULL,
    last_used   REAL,
    revoked     REAL
);
CREATE TABLE devices (
    id              TEXT    PRIMARY KEY,
    labels          TEXT    NOT NULL DEFAULT '{}',
    set_labels      TEXT    NOT NULL DEFAULT '{}',
    reported_labels TEXT    NOT NULL DEFAULT '{}',
    secret_hash     TEXT    UNIQUE,
    mqtt_hash       TEXT,
    created         REAL    NOT NULL,
    created_by      TEXT    NOT NULL DEFAULT '',
    online          INTEGER NOT NULL DEFAULT 0,
    status_time     REAL,
    last_seen       REAL,
    agent_version   TEXT    NOT NULL DEFAULT '',
    bundle          TEXT,
    shadow          TEXT,
    health          TEXT,
    heartbeat_time  REAL,
    last_summary    REAL,
    summaries       INTEGER NOT NULL DEFAULT 0,
    dropped         INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE device_labels (
    device  TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (device, key)
);
CREATE INDEX device_labels_kv ON device_labels (key, value);
CREATE TABLE groups (
    name                TEXT    PRIMARY KEY,
    selector            TEXT    NOT NULL,
    requires_approval   INTEGER NOT NULL DEFAULT 0,
    important_features  TEXT    NOT NULL DEFAULT '[]',
    created             REAL    NOT NULL,
    created_by          TEXT    NOT NULL
);
CREATE TABLE bundles (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    sha256          TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    reference_hash  TEXT    NOT NULL,
    manifest        TEXT    NOT NULL,
    reference       BLOB    NOT NULL,
    signers         TEXT    NOT NULL,
    uploaded        REAL    NOT NULL,
    uploaded_by     TEXT    NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE summaries (
    id              INTEGER PRIMARY KEY,
    device          TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    bundle_name     TEXT    NOT NULL,
    bundle_version  TEXT    NOT NULL,
    reference_hash  TEXT    NOT NULL,
    window_start    REAL    NOT NULL,
    window_end      REAL    NOT NULL,
    rows            INTEGER NOT NULL,
    received        REAL    NOT NULL,
    latency         TEXT    NOT NULL,
    errors          TEXT    NOT NULL,
    shadow          TEXT,
    dropped         INTEGER NOT NULL,
    profile         BLOB    NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX summaries_window ON summaries (window_end);
CREATE TABLE reports (
    id          INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    revision    INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    bundle      TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    time        REAL    NOT NULL,
    received    REAL    NOT NULL,
    UNIQUE (device, seq)
);
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY,
    received    REAL    NOT NULL,
    topic       TEXT    NOT NULL,
    device      TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE TABLE counters (
    name    TEXT    PRIMARY KEY,
    value   INTEGER NOT NULL
);
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY,
    time    REAL    NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    target  TEXT    NOT NULL,
    details TEXT    NOT NULL
);
"""

_V2 = """
ALTER TABLE summaries ADD COLUMN folded INTEGER NOT NULL DEFAULT 0;
CREATE INDEX summaries_pending ON summaries (bundle_name, bundle_version) WHERE folded = 0;
CREATE TABLE rollups (
    bundle_id   INTEGER NOT NULL,
    width       INTEGER NOT NULL,
    bucket      INTEGER NOT NULL,
    scope       TEXT    NOT NULL,
    rows        INTEGER NOT NULL,
    summaries   INTEGER NOT NULL,
    data        BLOB    NOT NULL,
    PRIMARY KEY (bundle_id, width, bucket, scope)
);
CREATE INDEX rollups_scope ON rollups (bundle_id, width, scope, bucket);
CREATE TABLE desired (
    device          TEXT    PRIMARY KEY,
    revision        INTEGER NOT NULL,
    bundle          TEXT,
    shadow          TEXT,
    allow_downgrade INTEGER NOT NULL DEFAULT 0,
    updated         REAL    NOT NULL,
    updated_by      TEXT    NOT NULL
);
CREATE TABLE drift_windows (
    id              INTEGER PRIMARY KEY,
    bundle_id       INTEGER NOT NULL,
    scope           TEXT    NOT NULL,
    window_start    INTEGER NOT NULL,
    window_end      INTEGER NOT NULL,
    verdict         TEXT    NOT NULL,
    share_drifted   REAL    NOT NULL,
    rows            INTEGER NOT NULL,
    devices         INTEGER NOT NULL,
    features        TEXT    NOT NULL,
    evaluated       REAL    NOT NULL,
    UNIQUE (bundle_id, scope, window_start)
);
CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    bundle_id   INTEGER NOT NULL,
    group_name  TEXT    NOT NULL DEFAULT '',
    device      TEXT    NOT NULL DEFAULT '',
    state       TEXT    NOT NULL,
    opened      REAL    NOT NULL,
    resolved    REAL,
    message     TEXT    NOT NULL,
    details     TEXT    NOT NULL,
    webhook     TEXT    NOT NULL DEFAULT 'none',
    attempts    INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, bundle_id, group_name, device)
    WHERE state = 'open';
CREATE TABLE webhook_attempts (
    id          INTEGER PRIMARY KEY,
    alert_id    INTEGER NOT NULL REFERENCES alerts (id),
    attempt     INTEGER NOT NULL,
    time        REAL    NOT NULL,
    status      INTEGER,
    error       TEXT    NOT NULL DEFAULT ''
);
"""

_V3 = """
CREATE TABLE rollouts (
    id              TEXT    PRIMARY KEY,
    group_name      TEXT    NOT NULL,
    bundle          TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    plan            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    gate_results    TEXT    NOT NULL DEFAULT '[]',
    sent            TEXT    NOT NULL DEFAULT '{}',
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL
);
CREATE INDEX rollouts_status ON rollouts (status, group_name);
CREATE INDEX reports_device ON reports (device, received);
CREATE INDEX summaries_device ON summaries (device, window_end);
"""

# A summary is decoded once, at ingest: its profile, checked against the bundle's reference
# and packed into the rollup layout, is kept beside the message, so the rollout gates merge
# bytes instead of parsing JSON again. NULL while the summary waits for its bundle.
_V4 = """
ALTER TABLE summaries ADD COLUMN packed BLOB;
"""

_V5 = """
CREATE TABLE removed_devices (
    device          TEXT    PRIMARY KEY,
    removed         REAL    NOT NULL,
    removed_by      TEXT    NOT NULL,
    retained_cleared INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE desired ADD COLUMN previous TEXT;
"""

_V6 = """
CREATE TABLE acks (
    device  TEXT    NOT NULL,
    stream  TEXT    NOT NULL,
    acked   INTEGER NOT NULL,
    floor   INTEGER NOT NULL,
    PRIMARY KEY (device, stream)
);
CREATE TABLE settled (
    device  TEXT    NOT NULL,
    stream  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (device, stream, seq)
);
"""

_V7 = """
ALTER TABLE audit ADD COLUMN prev TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
"""

_RETRAINS = """
CREATE TABLE retrains (
    id          INTEGER PRIMARY KEY,
    recipe      TEXT    NOT NULL,
    recipe_hash TEXT    NOT NULL,
    revision    TEXT    NOT NULL DEFAULT '',
    trigger     TEXT    NOT NULL,
    alert_id    INTEGER,
    status      TEXT    NOT NULL,
    group_name  TEXT    NOT NULL,
    bundle      TEXT    NOT NULL,
    champion    TEXT,
    challenger  TEXT,
    rollout     TEXT,
    created     REAL    NOT NULL,
    started     REAL,
    finished    REAL,
    actor       TEXT    NOT NULL,
    data        TEXT    NOT NULL DEFAULT '{}',
    metrics     TEXT    NOT NULL DEFAULT '{}',
    reason      TEXT    NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX retrains_one_running ON retrains (recipe) WHERE status = 'running';
CREATE INDEX retrains_by_recipe ON retrains (recipe, id);
"""

# sent_at: the last send, NULL when due (never sent, or its device came online again since);
# sends: how often it was published (0: never)
_V8 = """
CREATE TABLE outcome_queues (
    device          TEXT    PRIMARY KEY,
    batches         INTEGER NOT NULL,
    receipt         INTEGER NOT NULL DEFAULT 0,
    receipt_at      REAL,
    receipted       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE outcome_batches (
    device      TEXT    NOT NULL,
    batch       INTEGER NOT NULL,
    outcomes    TEXT    NOT NULL,
    count       INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    sent_at     REAL,
    sends       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, batch)
);
"""


_V11 = """
ALTER TABLE groups ADD COLUMN requires TEXT NOT NULL DEFAULT '[]';
CREATE TABLE bundle_approvals (
    id          INTEGER PRIMARY KEY,
    bundle_id   INTEGER NOT NULL,
    keyid       TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    trusted_role TEXT,
    name        TEXT    NOT NULL DEFAULT '',
    comment     TEXT    NOT NULL,
    signed_at   TEXT    NOT NULL,
    review_by   TEXT,
    statement   TEXT    NOT NULL,
    recorded    REAL    NOT NULL,
    UNIQUE (bundle_id, statement)
);
"""

# a session belongs to a token: revoking the token ends it (checked at every request), and
# removing the token's row removes its sessions
_V12 = """
CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY,
    token_id    INTEGER NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    created     REAL    NOT NULL,
    expires     REAL    NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires);
CREATE INDEX sessions_token ON sessions (token_id);
"""

_V10 = """
ALTER TABLE groups ADD COLUMN drift TEXT NOT NULL DEFAULT '{}';
"""

# a summary's performance entries, one per bundle; ``labelled`` and ``served`` are the
# realized and estimated blocks' row counts, so a reader can skip empty ones without JSON
_V9 = """
CREATE TABLE performance (
    id              INTEGER PRIMARY KEY,
    device          TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    bundle_id       INTEGER NOT NULL,
    window_start    REAL    NOT NULL,
    window_end      REAL    NOT NULL,
    labelled        INTEGER NOT NULL,
    served          INTEGER NOT NULL,
    realized        TEXT,
    estimated       TEXT,
    UNIQUE (device, seq, bundle_id)
);
CREATE INDEX performance_bundle ON performance (bundle_id, window_end);
CREATE INDEX performance_device ON performance (device, window_end);
"""

# size: the bytes of a row's JSON columns, what the disk budget counts; label: the true
# label as JSON (NULL: none yet), the first one uploaded standing
_CAPTURE = """
CREATE TABLE captured (
    id          INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    pid         TEXT    NOT NULL,
    served      REAL    NOT NULL,
    received    REAL    NOT NULL,
    bundle      TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    features    TEXT    NOT NULL,
    prediction  TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    label       TEXT,
    labelled_at REAL,
    UNIQUE (device, pid)
);
CREATE INDEX captured_bundle ON captured (bundle, version, served);
CREATE INDEX captured_received ON captured (received);
CREATE TABLE capture_batches (
    device      TEXT    NOT NULL,
    batch       TEXT    NOT NULL,
    rows        INTEGER NOT NULL,
    received    REAL    NOT NULL,
    PRIMARY KEY (device, batch)
);
CREATE INDEX capture_batches_received ON capture_batches (received);
CREATE TABLE capture_labels (
    device      TEXT    NOT NULL,
    pid         TEXT    NOT NULL,
    label       TEXT    NOT NULL,
    at          REAL    NOT NULL,
    PRIMARY KEY (device, pid)
);
CREATE INDEX capture_labels_at ON capture_labels (at);
"""

# a group's own rollups (scope "group:<name>" in rollups) are complete from ``start``, a
# bucket boundary of every level, for the group created at ``created`` (a group deleted and
# made again under its name starts anew)
# performance_rollups: the sums of performance entries per bundle, width (an hour, a day),
# bucket and scope (device, "group:<name>", "*"), as ingest adds them; devices: how many
# device rows the bucket has under this scope (1 for a device's own)
_GROUP_ROLLUPS = """
CREATE TABLE group_rollup_starts (
    group_name  TEXT    PRIMARY KEY,
    created     REAL    NOT NULL,
    start       INTEGER NOT NULL
);
CREATE TABLE performance_rollups (
    bundle_id   INTEGER NOT NULL,
    width       INTEGER NOT NULL,
    bucket      INTEGER NOT NULL,
    scope       TEXT    NOT NULL,
    entries     INTEGER NOT NULL,
    labelled    INTEGER NOT NULL,
    served      INTEGER NOT NULL,
    devices     INTEGER NOT NULL,
    realized    TEXT,
    estimated   TEXT,
    PRIMARY KEY (bundle_id, width, bucket, scope)
);
CREATE INDEX performance_rollups_scope ON performance_rollups (bundle_id, width, scope, bucket);
"""

# data capture per group (issue 15): the group's CapturePolicy as JSON (NULL: the group
# sets none), and the one its devices' desired states carry
_CAPTURE_GROUPS = """
ALTER TABLE groups ADD COLUMN capture TEXT;
ALTER TABLE desired ADD COLUMN capture TEXT;
"""

_V17 = """
ALTER TABLE groups ADD COLUMN performance TEXT NOT NULL DEFAULT '{}';
"""

# (version, what it does, SQL); versions are 1, 2, ... in order
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "registry, credentials, groups, bundles, summaries, reports, dead letters, audit", _V1),
    (2, "rollups, desired state, drift windows, alerts, webhook attempts", _V2),
    (3, "rollouts", _V3),
    (4, "summaries keep their packed profile", _V4),
    (5, "removed devices, the desired state's rollback slot", _V5),
    (6, "delivery acknowledgements", _V6),
    (7, "audit hash chain", _V7),
    (8, "the outcomes queue", _V8),
    (9, "performance entries of summaries", _V9),
    (10, "groups' own drift settings", _V10),
    (11, "group requirements, bundle approvals", _V11),
    (12, "dashboard sessions", _V12),
    (13, "retraining runs", _RETRAINS),
    (14, "data capture", _CAPTURE),
    (15, "groups' own rollups, performance rollups", _GROUP_ROLLUPS),
    (16, "data capture per group", _CAPTURE_GROUPS),
    (17, "groups' own performance tolerances", _V17),
)
LATEST = MIGRATIONS[-1][0]
AUDIT_CHAIN = 7  # the version from which audit entries carry prev and hash
