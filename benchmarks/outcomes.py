"""Outcomes uploaded centrally → applied on their devices → receipted: time and rate.

Run from the repository root::

    .venv/bin/python benchmarks/outcomes.py [--outcomes 100000] [--devices 4] [--repeats 3]
        [--out benchmarks/out/outcomes.json]

A real Mosquitto (``tests/broker.py``: its own port, password file and the production ACL),
one ``FleetServer`` (SQLite, HTTP on a free port, the outcome router as its engine runs
it), and the devices in a child process: one paho client per device under its own
account, applying batch ``n`` only after ``n - 1`` and receipting the highest applied, as
the protocol asks of the agent. Each repeat uploads ``--outcomes`` fresh outcomes spread
over the devices as one CSV file streamed to ``POST /api/v1/outcomes`` (the CLI's client),
and times the upload (until the server answers: parsed, checked, queued) and the whole
path (until the server has every receipt). The devices count what they applied; a run is
reported only if they applied every outcome exactly once.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outcomes", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/outcomes.json"))
    args = parser.parse_args()
    clock, cpu, load_before = time.perf_counter(), time.process_time(), os.getloadavg()

    from fleet_server.cli.client import FleetClient
    from fleet_server.config import BrokerConfig, ServerConfig
    from fleet_server.server import FleetServer
    from tests.broker import SERVER_USER, Mosquitto

    devices = [f"bench-{i}" for i in range(args.devices)]
    work = Path(tempfile.mkdtemp(prefix="outcomes-bench-"))
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
            log(f"repeat {r + 1}: {total} outcomes, upload {uploaded - started:.2f} s, "
                f"receipted {receipted - started:.2f} s")
    finally:
        if proc.is_alive():
            parent.send("stop")
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        server.stop()
        broker.cleanup()

    doc = {"benchmark": "outcomes", "devices": args.devices, "repeats": args.repeats,
           "runs": runs,
           "median": {k: statistics.median(r[k] for r in runs)
                      for k in ("upload_s", "receipted_s", "rate_per_s")}}

    def report(d: dict) -> str:
        m = d["median"]
        return table(["outcomes → devices", "upload (s)", "upload → all receipted (s)",
                      "outcomes/s"],
                     [[f"{runs[0]['outcomes']:,} over {d['devices']} devices (median of "
                       f"{len(runs)})", f"{m['upload_s']:.2f}", f"{m['receipted_s']:.2f}",
                       f"{m['rate_per_s']:,.0f}"]])

    finish(doc, args.out, ["paho-mqtt", "fastapi", "uvicorn", "httpx"], clock, cpu,
           load_before, report)


if __name__ == "__main__":
    main()
