"""Fleet simulation: N devices, each with its own broker account, against a real Mosquitto
(configured by :mod:`fleet_server.telemetry.broker`, production ACL) and real ingest workers.

Run from the repository root::

    .venv/bin/python benchmarks/fleet_sim.py [--devices 10000] [--out benchmarks/out/fleet_sim.json]
        [--db postgresql://user@host/db | --postgres]

With ``--db`` (an existing server: a fresh database is created beside the one named, per
run) or ``--postgres`` (a private PostgreSQL 15 started here, fsync and synchronous commit
on), every run is made on SQLite and then on PostgreSQL, side by side in one table; the
PostgreSQL database of a run is the SQLite template copied by ``fleet db migrate``'s
copier.

The default (1,000 devices, 3 runs each of 1 and 2 workers) takes about 2.5 minutes on
two cores; ``--devices 10000`` (one run each) about 4.

What runs:

- **Devices.** Every simulated device is registered in the fleet database (``Registry``:
  its own secret, its ``$7$`` hash in the broker's password file) and opens its own MQTT
  3.1.1 connection as its own username, so the broker's per-device ACL (``pattern ...
  %u``) is what admits every message. Devices are lightweight: one publisher process
  drives every connection over raw sockets (a 60-line MQTT encoder, not paho, which
  needs a thread per client). Their messages are the real thing: ``Summary`` messages
  (``edgefleet.contract.messages.encode``) of a 20-feature bundle's profiles of real rows, QoS 1.
- **Server.** ``--workers`` ingest workers (default: a run with 1, then a run with 2),
  each what ``fleet ingest`` runs (a ``FleetServer`` without HTTP, evaluator or desired
  state) in its own process, in one shared subscription (``$share/ingest/...``), writing
  one SQLite file (WAL, ``synchronous=FULL``).
- **Each run** (fresh database copy, fresh broker): (1) *burst*: every device publishes
  ``--windows`` consecutive 60-s windows as fast as it can; sustained throughput is
  summaries stored per second from the first publish to the last commit. (2) *paced*:
  ``--rate`` summaries a second for ``--paced-s`` seconds; each message's window ends at
  its scheduled send time, and its lag is from there to the commit of the transaction
  holding it (``edgefleet_ingest_lag_seconds``), p50/p99. Then: nothing lost or
  duplicated (rows stored vs PUBACKs, distinct (device, seq), the ingest duplicate and
  dead-letter counts), worker RSS (``/proc``), and database bytes per summary and per
  device-day from ``dbstat`` after the burst (one summary per device per ``--window-s``,
  the agent's default 60 s: 1,440 summaries, 1,440 minute rollups and 24 hour rollups a
  device-day), extrapolated to the default retention.

Not measured: TLS, broker persistence (off here), heartbeats/status/reports (small, and
they update rows rather than add them), the drift evaluator and the API under this load,
a network between devices and broker, several machines. The publisher, the broker and
the workers share this machine's cores; the JSON describes the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import selectors
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import machine, table  # noqa: E402

LIBRARIES = ("edgefleet", "numpy", "sqlite-utils", "paho-mqtt", "scikit-learn")
SERVER_USER = "server"
PROFILES = 16  # distinct window profiles, reused across devices (encoding is not timed)
DAY = 86400


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ MQTT on sockets


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, user: str, password: str) -> bytes:
    # MQTT 3.1.1, clean session, username + password, keepalive 0 (no PINGREQs needed)
    body = _s(b"MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big") + \
        _s(client_id.encode()) + _s(user.encode()) + _s(password.encode())
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, mid: int, payload: bytes) -> bytes:
    body = _s(topic.encode()) + mid.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body  # PUBLISH, QoS 1


class Devices:
    """N MQTT connections, one per device account, read through one selector."""

    def __init__(self, host: str, port: int, accounts: list[tuple[str, str]]) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: dict[str, socket.socket] = {}
        self.buf: dict[socket.socket, bytearray] = {}
        self.connacks: dict[str, int] = {}
        self.pubacks = 0
        self.closed = 0
        for device, password in accounts:
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect_packet(f"sim-{device}", device, password))
            self.socks[device] = sock
            self.buf[sock] = bytearray()
            self.sel.register(sock, selectors.EVENT_READ, device)
        deadline = time.monotonic() + 120
        while len(self.connacks) < len(accounts) and time.monotonic() < deadline:
            self.poll(0.5)
        refused = {d: rc for d, rc in self.connacks.items() if rc != 0}
        if len(self.connacks) < len(accounts) or refused:
            raise RuntimeError(f"{len(accounts) - len(self.connacks)} devices got no CONNACK, "
                               f"{len(refused)} refused (e.g. {list(refused.items())[:3]})")

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            sock, device = key.fileobj, key.data
            data = sock.recv(65536)  # type: ignore[union-attr]
            if not data:
                self.sel.unregister(sock)
                self.closed += 1
                continue
            buf = self.buf[sock]  # type: ignore[index]
            buf += data
            while len(buf) >= 2:
                length, mult, i, complete = 0, 1, 1, False
                while i < len(buf) and i <= 4:  # the remaining-length varint
                    byte = buf[i]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not byte & 0x80:
                        complete = True
                        break
                if not complete or len(buf) < i + length:
                    break
                kind = buf[0]
                packet = bytes(buf[i:i + length])
                del buf[:i + length]
                if kind == 0x20:
                    self.connacks[device] = packet[1]
                elif kind == 0x40:
                    self.pubacks += 1

    def send(self, device: str, packet: bytes) -> None:
        self.socks[device].sendall(packet)

    def close(self) -> None:
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
            sock.close()


def _payloads(devices: list[str], profiles: list[dict], seqs: range, ends: list[list[float]],
              window_s: float) -> list[tuple[str, int, bytes]]:
    from edgefleet.contract.messages import BundleRef, Summary, encode, topic

    ref = BundleRef("bench", "1.0.0")
    out = []
    for k, seq in enumerate(seqs):
        for d, device in enumerate(devices):
            end = ends[k][d]
            msg = Summary(device, seq, ref, end - window_s, end,
                          profiles[(d * 7 + seq) % len(profiles)])
            out.append((device, seq, publish_packet(topic(device, "summary"), seq,
                                                    encode(msg))))
    return out


def _publisher(conn, host: str, port: int, accounts: list[tuple[str, str]],
               profiles: list[dict], windows: int, window_s: float, burst_t0: float) -> None:
    """Child process: the devices. Burst, then paced on request; reports what was acked."""
    devices = [d for d, _ in accounts]
    ends = [[burst_t0 + (k + 1) * window_s] * len(devices) for k in range(windows)]
    began = time.perf_counter()
    burst = _payloads(devices, profiles, range(1, windows + 1), ends, window_s)
    encode_s = (time.perf_counter() - began) / len(burst)
    fleet = Devices(host, port, accounts)
    conn.send({"ready": True, "bytes": sum(len(p) for *_, p in burst) / len(burst)})
    conn.recv()  # go
    start = time.time()
    for i, (device, _, packet) in enumerate(burst):
        fleet.send(device, packet)
        if i % 256 == 0:
            fleet.poll(0)
    sent = time.time()
    deadline = time.monotonic() + 600
    while fleet.pubacks < len(burst) and time.monotonic() < deadline:
        fleet.poll(0.2)
    conn.send({"start": start, "sent": sent, "acked": time.time(), "pubacks": fleet.pubacks,
               "closed": fleet.closed})
    rate, seconds = conn.recv()  # paced phase
    n = int(rate * seconds)
    per = -(-n // len(devices))
    # the schedule starts once every payload is encoded (encoding is not what is measured)
    t0 = time.time() + 0.5 + 1.5 * n * encode_s
    at = [t0 + i / rate for i in range(per * len(devices))]
    paced = _payloads(devices, profiles, range(windows + 1, windows + 1 + per),
                      [at[k * len(devices):(k + 1) * len(devices)] for k in range(per)],
                      window_s)[:n]
    late = []
    before = fleet.pubacks
    for i, (device, _, packet) in enumerate(paced):
        delay = at[i] - time.time()
        if delay > 0.0005:
            fleet.poll(delay)  # read PUBACKs while waiting
            delay = at[i] - time.time()
            if delay > 0:
                time.sleep(delay)
        late.append(time.time() - at[i])
        fleet.send(device, packet)
    while fleet.pubacks - before < n and time.monotonic() < deadline + 600:
        fleet.poll(0.2)
    conn.send({"n": n, "t0": t0, "pubacks": fleet.pubacks - before, "closed": fleet.closed,
               "late_ms": {q: float(np.percentile(np.asarray(late) * 1e3, q))
                           for q in (50, 99)}})
    conn.recv()
    fleet.close()


# ------------------------------------------------------------------------ ingest workers


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _worker(conn, db: str, pub: str, host: str, port: int, username: str, password: str,
            name: str, bundle_dir: str) -> None:
    """Child process: what ``fleet ingest`` runs, plus a hook recording each batch's
    commit time, summaries stored and lags."""
    from fleet_server.cli.serve import tune_gc
    from fleet_server.config import BrokerConfig, ServerConfig
    from fleet_server.server import FleetServer

    config = ServerConfig(db=db if "://" in db else Path(db), bundle_dir=Path(bundle_dir),
                          trust=(f"build={pub}",), evaluate=False,
                          broker=BrokerConfig(host=host, port=port, username=username,
                                              password=password, share="ingest",
                                              client_id=name))
    server = FleetServer(config, publish_desired=False)
    batches: list[tuple[float, int, list[float]]] = []
    ingestor = server.services.ingestor
    original = ingestor.process

    def process(batch, now=None):
        result = original(batch, now)
        batches.append((time.time(), result.stored.get("summary", 0), result.lags))
        return result

    ingestor.process = process  # type: ignore[method-assign]
    server.start()
    tune_gc()  # as fleet serve and fleet ingest do
    assert server.link is not None and server.link.wait_connected(10)
    time.sleep(0.5)  # the SUBACK
    conn.send("ready")
    conn.recv()  # stop
    server.stop()
    conn.send(batches)


# ------------------------------------------------------------------------ the run


def _bundle_and_profiles(work: Path) -> tuple[Path, Path, list[dict]]:
    from benchmarks.server import _profile, build_bundle, live_rows
    from edgefleet.contract.bundle import read_unverified
    from edgefleet.contract.profile import parse_reference, to_wire

    bundle, pub, model, ref_x = build_bundle(work)
    spec, _ = parse_reference(read_unverified(bundle.read_bytes()).member("reference.json"))
    rows = live_rows(PROFILES * 30, 1, ref_x).reshape(PROFILES, 30, -1)
    proba = model.predict_proba(rows.reshape(PROFILES * 30, -1)).reshape(PROFILES, 30, -1)
    return bundle, pub, [to_wire(_profile(spec, rows[i], proba[i])) for i in range(PROFILES)]


def _template(work: Path, bundle: Path, pub: Path, devices: int) -> tuple[Path, dict[str, str]]:
    from fleet_server.config import ServerConfig
    from fleet_server.services import build_services

    db = work / "template.db"
    s = build_services(ServerConfig(db=db, trust=(f"build={pub}",)))
    now = time.time()
    s.bundles.upload(bundle.read_bytes(), "sim", now)
    secrets = {}
    with s.store.transaction():  # one transaction: registration is not what is measured
        for i in range(devices):
            device = f"sim{i:05d}"
            secrets[device] = s.registry.add_device(device, {"site": "ab"[i % 2]}, "sim",
                                                    now)[1].secret
    s.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db, secrets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _connect(db: Path | str):
    """A plain connection to the run's database, SQLite or PostgreSQL (read-only use)."""
    if isinstance(db, str) and db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            yield conn
    else:
        with sqlite3.connect(db, timeout=30) as conn:
            yield conn


def _count(db: Path | str) -> int:
    with _connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM summaries").fetchone()[0]


def _wait_stored(db: Path | str, n: int, timeout: float) -> float:
    deadline = time.time() + timeout
    while _count(db) < n:
        if time.time() > deadline:
            raise RuntimeError(f"only {_count(db)} of {n} summaries stored in {timeout} s")
        time.sleep(0.02)
    return time.time()


def _sizes(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db, timeout=30) as conn:
        pages = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
        indexes = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master "
                                    "WHERE type = 'index'"))
        rows = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("summaries", "rollups")}
        by_width = dict(conn.execute("SELECT width, COUNT(*) FROM rollups GROUP BY 1"))
    table_bytes: dict[str, int] = {}
    for name, size in pages.items():  # an index (autoindexes too) counts for its table
        owner = indexes.get(name, name)
        table_bytes[owner] = table_bytes.get(owner, 0) + int(size)
    return {"bytes": {t: table_bytes.get(t, 0) for t in ("summaries", "rollups")},
            "total_bytes": sum(int(v) for v in pages.values()), "rows": rows,
            "rollups_by_width": by_width}


def _integrity(db: Path | str) -> dict[str, int]:
    with _connect(db) as conn:
        n, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT device || '/' || seq) "
                                   "FROM summaries").fetchone()
        dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        pending = conn.execute("SELECT COUNT(*) FROM summaries WHERE folded = 0").fetchone()[0]
        counters = dict(conn.execute("SELECT name, value FROM counters"))
    dups = sum(v for k, v in counters.items() if "dup" in k)
    return {"stored": n, "distinct": distinct, "dead_letters": dead, "unfolded": pending,
            "duplicates_counted": dups}


def one_run(work: Path, template: Path, broker_dir: Path, port: int,
            ingest: list[tuple[str, str]],
            pub: Path, accounts: list[tuple[str, str]], profiles: list[dict], args,
            workers: int, repeat: int, pg_url: str | None = None) -> dict[str, Any]:
    from fleet_server.telemetry.broker import start_broker, stop_broker

    run = work / f"run-{'pg' if pg_url else 'sqlite'}-w{workers}-r{repeat}"
    run.mkdir()
    db: Path | str = run / "fleet.db"
    if pg_url is None:
        shutil.copy(template, db)
    else:
        from fleet_server.store import Store
        from fleet_server.store.copy import copy_database

        db = pg_url
        with Store(template) as src, Store(db) as dst:
            copy_database(src, dst)
    broker = start_broker(broker_dir / "mosquitto.conf", port, run / "mosquitto.log")
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    try:
        pipes = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            # one broker account per worker: the broker binds client ids to accounts
            user, password = ingest[i]
            proc = ctx.Process(target=_worker, args=(child, str(db), str(pub), "127.0.0.1",
                                                     port, user, password, f"sim-ingest-{i}",
                                                     str(work / "template.db.bundles")))
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        for p in pipes:
            assert p.recv() == "ready"
        n_dev, k = len(accounts), args.windows
        burst_t0 = (time.time() // 3600) * 3600 - 2 * 3600  # whole hours ago, minute-aligned
        pparent, pchild = ctx.Pipe()
        publisher = ctx.Process(target=_publisher, args=(
            pchild, "127.0.0.1", port, accounts, profiles, k, float(args.window_s), burst_t0))
        publisher.start()
        procs.append(publisher)
        ready = pparent.recv()
        log(f"  w={workers}: {n_dev:,} devices connected, {ready['bytes']:.0f} B a summary")
        pparent.send("go")
        total = n_dev * k
        stored_at = _wait_stored(db, total, 600)
        burst = pparent.recv()
        sizes = _sizes(db) if pg_url is None else {}
        wall = stored_at - burst["start"]
        log(f"  burst: {total:,} summaries in {wall:.1f} s ({total / wall:,.0f}/s)")
        pparent.send((args.rate, args.paced_s))
        paced = pparent.recv()
        t0 = paced["t0"]
        _wait_stored(db, total + paced["n"], 120)
        rss = [_status(p.pid) for p in procs[:workers]]
        broker_rss = _status(broker.pid)
        results = []
        for p in pipes:
            p.send("stop")
            results.append(p.recv())
        pparent.send("bye")
        integrity = _integrity(db)
        lags = np.asarray([x for r in results for t, _, lg in r if t >= t0 for x in lg]) * 1e3
        per_worker = [sum(n for _, n, _ in r) for r in results]
        out = {
            "engine": "postgresql" if pg_url else "sqlite",
            "workers": workers, "repeat": repeat, "devices": n_dev, "burst_summaries": total,
            "burst_wall_s": wall, "burst_per_s": total / wall,
            "burst_publish_s": burst["sent"] - burst["start"],
            "burst_pubacks": burst["pubacks"], "paced": paced,
            "paced_rate": args.rate, "lag_ms": {q: float(np.percentile(lags, q))
                                                for q in (50, 90, 99)} if len(lags) else {},
            "lag_n": len(lags), "per_worker": per_worker,
            "worker_rss_bytes": [r.get("VmRSS", 0) for r in rss],
            "worker_peak_rss_bytes": [r.get("VmHWM", 0) for r in rss],
            "broker_rss_bytes": broker_rss.get("VmRSS", 0),
            "sizes_after_burst": sizes, "integrity": integrity,
            "published": total + paced["n"],
            "acked": burst["pubacks"] + paced["pubacks"],
            "connections_closed": paced["closed"],
        }
        return out
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        stop_broker(broker)


def per_device_day(sizes: dict[str, Any], devices: int, window_s: float) -> dict[str, float]:
    """Bytes a device adds to the database a day, and its steady state under the default
    retention (summaries and minute rollups 30 days, hour rollups 400 days)."""
    from fleet_server.config import DEFAULT_INGEST as c

    rows, by_width = sizes["rows"], sizes["rollups_by_width"]
    per_summary = sizes["bytes"]["summaries"] / rows["summaries"]
    per_rollup = sizes["bytes"]["rollups"] / rows["rollups"]
    windows_a_day = DAY / window_s
    fine = min(windows_a_day, DAY / c.levels[0])
    coarse = [DAY / w for w in c.levels[1:]]
    # fleet-wide rollups ("*" scope) are shared by all devices: spread over them
    day = windows_a_day * per_summary + (fine + sum(coarse)) * per_rollup * (1 + 1 / devices)
    steady = (c.retention_s / DAY) * (windows_a_day * per_summary + fine * per_rollup) + \
        (c.coarse_retention_s / DAY) * sum(coarse) * per_rollup
    return {"bytes_per_summary_row": per_summary, "bytes_per_rollup_row": per_rollup,
            "rollup_rows_by_width": by_width, "bytes_per_device_day": day,
            "steady_state_bytes_per_device": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=None,
                        help="summaries per device in the burst (default 10; 4 from 5,000 "
                             "devices)")
    parser.add_argument("--window-s", type=int, default=60, help="the devices' window")
    parser.add_argument("--rate", type=float, default=500.0, help="paced summaries/s")
    parser.add_argument("--paced-s", type=float, default=8.0)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per worker count (default 3; 1 from 5,000 devices)")
    parser.add_argument("--out", type=Path, default=None, help="write JSON here")
    parser.add_argument("--db", default=None, help="also run on this PostgreSQL server (a "
                        "fresh database beside the one named, per run)")
    parser.add_argument("--postgres", action="store_true",
                        help="also run on a private PostgreSQL 15 started here")
    args = parser.parse_args()
    if args.windows is None:
        args.windows = 10 if args.devices < 5000 else 4
    if args.repeats is None:
        args.repeats = 3 if args.devices < 5000 else 1
    worker_counts = [int(x) for x in args.workers.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.devices + 1024
    if soft < need:  # the publisher and the broker hold one socket per device
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    from fleet_server.store import Store
    from fleet_server.telemetry.broker import BrokerSetup, password_file_name, write_broker_config

    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    pg = None
    new_pg = None
    if args.postgres:
        from tests.pg import Postgres

        pg = Postgres(durable=True)
        try:
            pg.start()
        except BaseException:
            pg.cleanup()
            raise
        new_pg = pg.new_database
    elif args.db is not None:
        import psycopg

        counter = iter(range(10**6))

        def new_pg() -> str:
            base = args.db.rpartition("/")[0]
            name = f"fleet_sim_{os.getpid()}_{next(counter)}"
            with psycopg.connect(args.db, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            return f"{base}/{name}"
    engines = ["sqlite"] + (["postgresql"] if new_pg is not None else [])
    try:
        log(f"building the bundle and {PROFILES} window profiles")
        bundle, pub, profiles = _bundle_and_profiles(work)
        log(f"registering {args.devices:,} devices")
        template, secrets = _template(work, bundle, pub, args.devices)
        port = _free_port()
        password = os.urandom(16).hex()
        setup = BrokerSetup(out=work / "broker", port=port, bind="127.0.0.1",
                            server_user=SERVER_USER, server_password=password,
                            persistence=False, ingest_workers=max(worker_counts))
        with Store(template) as store:
            files = write_broker_config(setup, store)
        ingest = [(u, files[password_file_name(u, SERVER_USER)].read_text().strip())
                  for u in setup.ingest_users]
        accounts = sorted(secrets.items())
        runs = []
        for repeat in range(args.repeats):
            for engine in engines:
                for workers in worker_counts:
                    log(f"run: {engine}, {workers} worker(s), repeat {repeat + 1}/"
                        f"{args.repeats}")
                    runs.append(one_run(
                        work, template, files["mosquitto.conf"].parent, port, ingest, pub,
                        accounts, profiles, args, workers, repeat,
                        pg_url=new_pg() if engine == "postgresql" and new_pg else None))
        report(runs, args, worker_counts, time.time() - began, engines)
    finally:
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def report(runs: list[dict[str, Any]], args, worker_counts: list[int], elapsed: float,
           engines: list[str]) -> None:
    rows = []
    for engine, w in [(e, w) for e in engines for w in worker_counts]:
        these = [r for r in runs if r["workers"] == w and r["engine"] == engine]

        def med(_: int, fn, these=these) -> float:
            return statistics.median(fn(r) for r in these)

        base = statistics.median(r["burst_per_s"] for r in runs
                                 if r["workers"] == worker_counts[0] and r["engine"] == "sqlite")
        rate = med(w, lambda r: r["burst_per_s"])
        rows.append([
            f"{engine}, {w} worker{'s' if w > 1 else ''}",
            f"{rate:,.0f}", f"{rate / base:.2f}",
            f"{med(w, lambda r: r['lag_ms'].get(50, float('nan'))):.0f}",
            f"{med(w, lambda r: r['lag_ms'].get(99, float('nan'))):.0f}",
            f"{med(w, lambda r: r['paced']['late_ms'][99]):.0f}",
            f"{med(w, lambda r: sum(r['worker_rss_bytes'])) / 2**20:.0f}",
            f"{med(w, lambda r: r['broker_rss_bytes']) / 2**20:.0f}",
            f"{sum(r['published'] - r['integrity']['stored'] for r in these)}",
            f"{sum(r['integrity']['stored'] - r['integrity']['distinct'] + r['integrity']['duplicates_counted'] for r in these)}",  # noqa: E501
        ])
    print(f"\nfleet_sim: {args.devices:,} devices (one account and connection each), "
          f"burst {args.windows} x {args.window_s}-s windows a device, paced "
          f"{args.rate:.0f}/s for {args.paced_s:.0f} s; medians of {args.repeats} run(s)\n")
    print(table(["ingest", "stored/s (burst)", "vs SQLite, 1", "lag p50 ms", "lag p99 ms",
                 "of it publisher late p99 ms",
                 "worker RSS MiB", "broker RSS MiB", "lost", "duplicated"], rows))
    first = runs[0]
    growth = per_device_day(first["sizes_after_burst"], args.devices, args.window_s)
    print(f"\ndatabase: {growth['bytes_per_summary_row']:,.0f} B a summary row, "
          f"{growth['bytes_per_rollup_row']:,.0f} B a rollup row (indexes included); "
          f"{growth['bytes_per_device_day'] / 2**20:.2f} MiB per device-day at one summary "
          f"per {args.window_s} s; steady state at the default retention "
          f"{growth['steady_state_bytes_per_device'] / 2**20:.0f} MiB per device "
          f"({growth['steady_state_bytes_per_device'] * args.devices / 2**30:,.1f} GiB for "
          f"{args.devices:,} devices)")
    for r in runs:
        i = r["integrity"]
        print(f"  {r['engine']} w={r['workers']} r={r['repeat']}: published "
              f"{r['published']:,}, acked "
              f"{r['acked']:,}, stored {i['stored']:,} ({i['distinct']:,} distinct), "
              f"duplicates counted {i['duplicates_counted']}, dead letters "
              f"{i['dead_letters']}, unfolded {i['unfolded']}, split {r['per_worker']}, "
              f"publisher late p99 {r['paced']['late_ms'][99]:.1f} ms, connections closed "
              f"{r['connections_closed']}")
    info = machine(LIBRARIES)
    print(f"\nmachine: {info['cpu_model']}, {info['cores']} cores, "
          f"{(info['ram_bytes'] or 0) / 2**30:.1f} GiB, Python {info['python']}; "
          f"{_mosquitto_version()}; total {elapsed:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "runs": runs, "growth": growth, "machine": info,
                                        "elapsed_s": elapsed}, indent=2, default=str))
        print(f"wrote {args.out}")


def _mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "mosquitto ?"
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].strip() if first else "mosquitto ?"


if __name__ == "__main__":
    main()
