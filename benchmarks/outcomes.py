"""Outcomes uploaded centrally → applied on their devices → receipted: time and rate.

Run from the repository root::

    .venv/bin/python benchmarks/outcomes.py [--outcomes 100000] [--devices 4] [--repeats 3]
        [--kind both|stand-ins|agents] [--out benchmarks/out/outcomes.json]

A real Mosquitto (``tests/broker.py``: its own port, password file and the production ACL),
one ``FleetServer`` (SQLite, HTTP on a free port, the outcome router as its engine runs
it), and the devices in a child process: one paho client per device under its own
account, applying batch ``n`` only after ``n - 1`` and receipting the highest applied, as
the protocol asks of the agent. Each repeat uploads ``--outcomes`` fresh outcomes spread
over the devices as one CSV file streamed to ``POST /api/v1/outcomes`` (the CLI's client),
and times the upload (until the server answers: parsed, checked, queued) and the whole
path (until the server has every receipt). The devices count what they applied; a run is
reported only if they applied every outcome exactly once.

``--kind agents`` (and ``both``, the default, side by side in one run) does the same with
real ``AgentDaemon``\\ s in the child process, each under its device's broker account with
a real signed bundle (``sensor@1.0.0``, downloaded from the server and verified): they
first serve ``--outcomes`` rows in all with known ids (stored in each device's prediction
store), then the true labels of those rows are uploaded, and the run ends when the
server's realized metrics (``PerformanceService.report``, merged from the summaries the
agents sent) count every uploaded outcome. A run is reported only if the realized n is
exactly the number uploaded (nothing lost, nothing counted twice), each agent joined every
one of its outcomes (none unknown or duplicate), and the realized accuracy equals
scikit-learn's on those rows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path
                              if Path(p or ".").resolve() != _ROOT / "benchmarks"]

from benchmarks.common import finish, table  # noqa: E402

SERVER_PASSWORD = "bench-server-pw"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _devices(host: str, port: int, devices: list[str], conn) -> None:
    """The child process: every device's protocol side; answers ``count`` on the pipe."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from edgefleet.contract.messages import Receipt, Status, decode, encode, topic

    lock = threading.Lock()
    applied: dict[str, dict[str, int]] = {d: {} for d in devices}
    top = dict.fromkeys(devices, 0)
    clients = []

    def on_connect(client, device, flags, reason, properties):
        client.subscribe(topic(device, "outcomes"), qos=1)
        client.publish(topic(device, "status"), encode(Status(device, "online",
                                                              time=time.time())),
                       qos=1, retain=True)

    def on_message(client, device, msg):
        batch = decode(msg.topic, msg.payload)
        with lock:
            if batch.batch == top[device] + 1:
                seen = applied[device]
                for o in batch.outcomes:
                    seen[o.id] = seen.get(o.id, 0) + 1
                top[device] = batch.batch
            upto = top[device]
        client.publish(topic(device, "receipt"), encode(Receipt(device, upto, time.time())),
                       qos=1)

    for device in devices:
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device,
                        protocol=MQTTProtocolVersion.MQTTv5, userdata=device)
        c.username_pw_set(device, f"pw-{device}")
        c.on_connect, c.on_message = on_connect, on_message
        c.connect(host, port, keepalive=60)
        c.loop_start()
        clients.append(c)
    conn.send("ready")
    while (ask := conn.recv()) != "stop":
        assert ask == "count"
        with lock:
            conn.send({d: (len(v), sum(v.values())) for d, v in applied.items()})
    for c in clients:
        c.disconnect()
        c.loop_stop()


def _stand_in_runs(args: argparse.Namespace, work: Path) -> list[dict]:
    """The stand-in devices: the protocol alone, timed; each outcome applied once."""
    from fleet_server.cli.client import FleetClient
    from fleet_server.config import BrokerConfig, ServerConfig
    from fleet_server.server import FleetServer
    from tests.broker import SERVER_USER, Mosquitto

    devices = [f"bench-{i}" for i in range(args.devices)]
    broker = Mosquitto()
    broker.add_user(SERVER_USER, SERVER_PASSWORD)
    for d in devices:
        broker.add_user(d, f"pw-{d}")
    broker.start()
    server = FleetServer(ServerConfig(
        db=work / "fleet.db", evaluate=False,
        broker=BrokerConfig(host=broker.host, port=broker.port, username=SERVER_USER,
                            password=SERVER_PASSWORD)))
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_devices, args=(
        broker.host, broker.port, devices, child), daemon=True)
    runs = []
    try:
        server.start()
        base = server.start_http()
        s = server.services
        for d in devices:
            s.registry.add_device(d, {}, "bench", time.time())
        token = s.auth.create_token("bench", "operator", "bench", time.time()).secret
        proc.start()
        assert parent.poll(60) and parent.recv() == "ready"
        deadline = time.monotonic() + 60
        while not all(s.registry.get(d).online for d in devices):
            assert time.monotonic() < deadline, "devices did not come online"
            time.sleep(0.05)
        per_device = args.outcomes // args.devices
        for r in range(args.repeats):
            csv_file = work / f"upload-{r}.csv"
            with csv_file.open("w") as fh:
                fh.write("device,id,label\n")
                for i in range(per_device):
                    fh.writelines(f"{d},r{r}-{i:07d},{i % 3}\n" for d in devices)
            want = per_device * (r + 1)
            started = time.perf_counter()
            with FleetClient(base, token, timeout=600) as api:
                done = api.upload_outcomes(csv_file, "text/csv")
            uploaded = time.perf_counter()
            assert done["outcomes"] == per_device * len(devices)
            while not all(q.receipted == want for q in s.outcomes.status()):
                assert time.perf_counter() - started < 600, "receipts did not all come"
                time.sleep(0.01)
            receipted = time.perf_counter()
            parent.send("count")
            counts = parent.recv()
            assert all(c == (want, want) for c in counts.values()), counts  # each once
            total = per_device * len(devices)
            runs.append({"outcomes": total, "upload_s": uploaded - started,
                         "receipted_s": receipted - started,
                         "rate_per_s": total / (receipted - started),
                         "load_1min": os.getloadavg()[0]})
            log(f"stand-ins, repeat {r + 1}: {total} outcomes, upload "
                f"{uploaded - started:.2f} s, receipted {receipted - started:.2f} s")
    finally:
        if proc.is_alive():
            parent.send("stop")
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        server.stop()
        broker.cleanup()
    return runs


# --------------------------------------------------------------------------- real agents


def _agents(configs: list[str], conn) -> None:
    """The child process: one real ``AgentDaemon`` per config (its own broker account,
    prediction store and outbox). Answers on the pipe: ``("serve", version, repeat, n)``
    -> every device's predicted labels of the ``n`` rows of ``rows_of(device, repeat)``
    under the ids ``ids_of(...)``; ``"count"`` -> every device's outcome counts since it
    started; ``"stop"``."""
    from edge_agent.config import load_config
    from edge_agent.daemon import AgentDaemon
    from tests.bundles import FEATURES

    daemons = [AgentDaemon(load_config(Path(c))) for c in configs]
    for d in daemons:
        d.start()
    conn.send("ready")
    try:
        while (ask := conn.recv()) != "stop":
            if ask == "count":
                conn.send({d.device: d.store.totals.to_dict() for d in daemons})
                continue
            _, version, repeat, n = ask
            deadline = time.monotonic() + 120
            while not all(d.agent.model is not None and d.agent.model.ref.version == version
                          for d in daemons):
                assert time.monotonic() < deadline, f"agents did not load {version}"
                time.sleep(0.05)
            predicted = {}
            for d in daemons:
                rows = rows_of(d.device, repeat, n)[list(FEATURES)].to_numpy()
                ids = ids_of(repeat, n)
                labels = []
                for lo in range(0, n, 1000):  # as an app would call: batches
                    labels += d.agent.predict(rows[lo:lo + 1000], ids=ids[lo:lo + 1000]) \
                        .labels.astype(int).tolist()
                predicted[d.device] = labels
            for d in daemons:  # every prediction stored before any outcome is sent
                assert d.agent.flush(60), f"{d.device}: predictions not stored"
            conn.send(predicted)
    finally:
        for d in daemons:
            d.stop(flush_timeout=5)


def rows_of(device: str, repeat: int, n: int):
    """The rows a device serves in a repeat, and their true labels (``fault``)."""
    from tests.bundles import sensor_data

    return sensor_data(n, seed=1000 * repeat + int(device.rsplit("-", 1)[1]))


def ids_of(repeat: int, n: int) -> list[str]:
    return [f"r{repeat}-{i:07d}" for i in range(n)]


def _agent_runs(args: argparse.Namespace, work: Path) -> list[dict]:
    """Real agents: predictions served and stored on the devices, their labels uploaded
    centrally, routed, joined, reported in summaries and merged into realized metrics;
    a run counts only if the server's realized n is every uploaded outcome and its
    accuracy is scikit-learn's on those rows."""
    import numpy as np
    from sklearn.metrics import accuracy_score

    from fleet_server.cli.client import FleetClient
    from fleet_server.config import BrokerConfig, ServerConfig
    from fleet_server.server import FleetServer
    from fleet_server.services import build_services
    from tests.broker import SERVER_USER, Mosquitto
    from tests.bundles import BundleFactory, make_keys
    from tests.edge_agent.agent_helpers import write_config

    keys = make_keys(work / "keys")
    bundle = BundleFactory(work / "bundles", keys).build("1.0.0")
    devices = [f"agent-{i}" for i in range(args.devices)]
    config = ServerConfig(db=work / "fleet-agents.db", evaluate=False,
                          trust=tuple(keys.trust_specs()))
    s = build_services(config)  # no broker yet: register first, then make the accounts
    now = time.time()
    secrets = {d: s.registry.add_device(d, {"site": "bench"}, "bench", now)[1].secret
               for d in devices}
    s.bundles.upload(bundle.read_bytes(), "bench", now)
    users = s.store.mosquitto_users()
    s.close()
    broker = Mosquitto()
    broker.add_user(SERVER_USER, SERVER_PASSWORD)
    for device, hashed in users:
        broker.add_hashed_user(device, hashed)
    broker.start()
    server = FleetServer(ServerConfig(
        db=config.db, evaluate=False, trust=config.trust,
        broker=BrokerConfig(host=broker.host, port=broker.port, username=SERVER_USER,
                            password=SERVER_PASSWORD)))
    parent, child = mp.Pipe()
    runs = []
    proc = None
    try:
        server.start()
        base = server.start_http()
        s = server.services
        token = s.auth.create_token("bench", "operator", "bench", time.time()).secret
        paths = [str(write_config(work / d, device=d, broker=broker, password=secrets[d],
                                  trust=keys.trust_specs(), server_url=base, seconds=1.0,
                                  http_port=0))
                 for d in devices]
        proc = mp.get_context("spawn").Process(target=_agents, args=(paths, child),
                                               daemon=True)
        proc.start()
        assert parent.poll(120) and parent.recv() == "ready"
        for d in devices:
            s.desired.assign(d, "sensor@1.0.0", actor="bench")
        per_device = args.outcomes // args.devices
        truth_all: list[int] = []
        pred_all: list[int] = []
        for r in range(args.repeats):
            parent.send(("serve", "1.0.0", r, per_device))
            assert parent.poll(600), "the agents did not answer"
            predicted = parent.recv()
            csv_file = work / f"agents-upload-{r}.csv"
            with csv_file.open("w") as fh:
                fh.write("device,id,label\n")
                for d in devices:
                    truth = rows_of(d, r, per_device)["fault"].astype(int).tolist()
                    fh.writelines(f"{d},{i},{y}\n"
                                  for i, y in zip(ids_of(r, per_device), truth, strict=True))
                    truth_all += truth
                    pred_all += predicted[d]
            want = per_device * (r + 1)
            total = per_device * len(devices)
            started = time.perf_counter()
            with FleetClient(base, token, timeout=600) as api:
                done = api.upload_outcomes(csv_file, "text/csv")
            uploaded = time.perf_counter()
            assert done["outcomes"] == total
            while not all(q.receipted == want for q in s.outcomes.status()):
                assert time.perf_counter() - started < 600, "receipts did not all come"
                time.sleep(0.05)
            receipted = time.perf_counter()
            while (report := s.performance.report("sensor@1.0.0", since="1d",
                                                  now=time.time())).total.labelled \
                    < total * (r + 1):
                assert time.perf_counter() - started < 600, "realized n did not reach it"
                time.sleep(0.1)
            realized = time.perf_counter()
            parent.send("count")
            counts = parent.recv()
            assert report.total.labelled == total * (r + 1), report.total.labelled  # no double
            assert all(c["joined"] == want and c["duplicate"] == 0 and c["unknown"] == 0
                       for c in counts.values()), counts
            accuracy = report.total.realized["accuracy"]["value"]
            assert accuracy == accuracy_score(np.asarray(truth_all), np.asarray(pred_all))
            runs.append({"outcomes": total, "upload_s": uploaded - started,
                         "receipted_s": receipted - started, "realized_s": realized - started,
                         "rate_per_s": total / (realized - started),
                         "realized_n": report.total.labelled, "accuracy": accuracy,
                         "load_1min": os.getloadavg()[0]})
            log(f"agents, repeat {r + 1}: {total} outcomes, upload {uploaded - started:.2f} s, "
                f"receipted {receipted - started:.2f} s, in realized metrics "
                f"{realized - started:.2f} s (n={report.total.labelled}, "
                f"accuracy {accuracy:.4f} = scikit-learn's)")
    finally:
        if proc is not None and proc.is_alive():
            parent.send("stop")
            proc.join(60)
            if proc.is_alive():
                proc.kill()
        server.stop()
        broker.cleanup()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outcomes", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kind", choices=("both", "stand-ins", "agents"), default="both",
                        help="the devices: protocol stand-ins, real agents, or both")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/outcomes.json"))
    args = parser.parse_args()
    clock, cpu, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="outcomes-bench-"))
    kinds = {}
    if args.kind in ("both", "stand-ins"):
        kinds["stand-ins"] = _stand_in_runs(args, work)
    if args.kind in ("both", "agents"):
        kinds["agents"] = _agent_runs(args, work)
    keys = ("upload_s", "receipted_s", "realized_s", "rate_per_s")
    doc = {"benchmark": "outcomes", "devices": args.devices, "repeats": args.repeats,
           "kinds": {k: {"runs": runs,
                         "median": {m: statistics.median(r[m] for r in runs)
                                    for m in keys if m in runs[0]}}
                     for k, runs in kinds.items()}}

    def report(d: dict) -> str:
        rows = []
        for kind, got in d["kinds"].items():
            m, runs = got["median"], got["runs"]
            rows.append([f"{runs[0]['outcomes']:,} over {d['devices']} {kind} (median of "
                         f"{len(runs)})", f"{m['upload_s']:.2f}", f"{m['receipted_s']:.2f}",
                         f"{m['realized_s']:.2f}" if "realized_s" in m else "-",
                         f"{m['rate_per_s']:,.0f}"])
        return table(["outcomes → devices", "upload (s)", "upload → all receipted (s)",
                      "upload → all in realized metrics (s)", "outcomes/s (end to end)"],
                     rows)

    finish(doc, args.out, ["paho-mqtt", "fastapi", "uvicorn", "httpx", "onnxruntime"], clock,
           cpu, load_before, report)


if __name__ == "__main__":
    main()
