"""``make demo``: the whole story on one machine, in about three minutes.

1. **Package.** Train a predictive-maintenance model on a synthetic sensor data set (no
   downloads) in three versions and package each with ``edgepack``: v1 (logistic
   regression), v2 (a small MLP), v3 (a faulty build trained on inverted labels: it passes
   its own smoke test, but its answers disagree with the fleet's).
2. **Start the fleet.** A Mosquitto broker configured by ``fleet broker-config`` (one
   account per device, ACLs), the fleet server (REST API, ingest, drift evaluator, rollout
   engine, dashboard), and 20 edge agents in two sites, each with its own outbox, slots and
   local endpoint, streaming sensor rows through ``Agent.predict``.
3. **Roll out v1** to every device in stages.
4. **Drift.** Site B's humidity sensors start reading 25 points high; the server sees it
   in the summaries, raises an alert and calls the retraining webhook.
5. **Roll out v2** through canary stages to all: the gates pass. v2 carries a model card (a
   slice by temperature, fairness across sites, an approver's signature and review date):
   ``fleet bundle show`` answers the six questions, and one device explains one prediction
   (``POST /explain`` on its local endpoint).
6. **Roll out v3**: the canaries disagree with the control devices, the prediction-drift
   gate fails, the rollout aborts and every touched device goes back to v2.
7. **Ground truth.** The apps keep their prediction ids; the true labels come later, for
   two devices through their local ``POST /outcomes``, for the rest uploaded centrally
   (``fleet outcomes upload``) and routed to each device over MQTT. v2's realized accuracy
   (with its interval and n) is shown beside its label-free estimate and its packaged
   accuracy; from then on labels keep arriving every few seconds.
8. **The model heals itself.** The labelling rule flips for high-vibration machines
   (concept drift: the inputs do not move): v2's realized accuracy falls, a
   ``performance_drop`` alert calls the webhook while the estimate and the drift monitors
   see nothing; one tick of the retraining watcher (``edgepack retrain --watch``) answers
   the alert: it trains on the fresh labelled rows, proves the challenger better than v2 on
   the newest held-out rows (McNemar), uploads it and rolls it out through canaries; every
   device runs it, realized accuracy recovers, and ``fleet retrain show`` prints the
   lineage from the alert to the rollout.
9. **A retrain that loses.** The same recipe run by hand on shuffled labels (a broken join
   in the label pipeline): the challenger loses to the champion, the run is recorded
   ``rejected`` with the comparison's reason, and nothing is uploaded or rolled out.

It prints each step and the dashboard URL, then keeps running for you to look around
until Ctrl-C (``--exit`` stops at the end instead). Everything it writes goes to
``demo-out/``. Timings are compressed (2-second windows, seconds-long soaks) so the story
fits in minutes; the defaults of a real deployment are in ``deploy/`` and the README.

The acts live in their own modules: :mod:`demo.packaging` (1), :mod:`demo.stage` (2: the
fleet and its agents, and the plumbing every act shares), :mod:`demo.rollouts` (3 to 6),
:mod:`demo.labels` (7) and :mod:`demo.healing` (8 and 9); :mod:`demo.lines` prints what
the fleet says. This module runs them in order and owns the command line.
"""


from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

from demo.healing import a_retrain_that_loses, heal
from demo.labels import ground_truth
from demo.lines import banner, say
from demo.packaging import package
from demo.rollouts import roll_out_v1, roll_out_v2, roll_out_v3, site_b_drifts
from demo.stage import OUT, Demo, StoryFailed


def story(demo: Demo, bundles: dict[str, Path]) -> None:
    """Acts 3 to 9, in order, on the fleet act 2 started."""
    roll_out_v1(demo)
    site_b_drifts(demo)
    roll_out_v2(demo)
    roll_out_v3(demo)
    ground_truth(demo)
    heal(demo)
    a_retrain_that_loses(demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit", action="store_true",
                        help="stop when the story is told (default: keep serving until Ctrl-C)")
    parser.add_argument("--port", type=int, default=8000,
                        help="dashboard and API port (a free one if it is taken; 0: any)")
    args = parser.parse_args(argv)
    _quiet_and_reproducible()
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "bundles").mkdir(parents=True)

    banner("1. package v1, v2 and a faulty v3 of a predictive-maintenance model")
    bundles = package(OUT)
    demo = Demo(OUT, _free_or_any(args.port))
    _stop_on_signals()
    failed = None
    try:
        failed = _tell(demo, bundles)
        say(f"dashboard: {demo.url}/  (sign in with the operator token in "
            f"{OUT / 'operator.token'})")
        say(f"CLI:       FLEET_SERVER={demo.url} FLEET_TOKEN=$(cat {OUT}/operator.token) "
            ".venv/bin/fleet rollout status")
        if not args.exit:
            say("the fleet keeps running; Ctrl-C stops everything")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        say("\ninterrupted")
    finally:
        say("stopping: agents, fleet server, broker ...")
        demo.stop()
        say("stopped")
    return 1 if failed else 0


def _tell(demo: Demo, bundles: dict[str, Path]) -> str | None:
    """Acts 2 to 9; the reason the story stopped, or None when it was told to the end."""
    banner("2. start the fleet: Mosquitto, the fleet server, 20 agents")
    try:
        demo.start_fleet(bundles)
        story(demo, bundles)
        banner("done")
        return None
    except StoryFailed as exc:  # keep the fleet up: the dashboard and logs say why
        banner("the story stopped")
        say(f"demo: {exc}")
        say("the fleet is still up so you can look at why (dashboard, fleet CLI); "
            f"logs in {OUT}")
        return str(exc)


def _quiet_and_reproducible() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the story prints alerts itself
    logging.getLogger("fleet_server.monitoring.alerts").setLevel(logging.ERROR)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # reproducible bundles
    np.seterr(all="ignore")


def _free_or_any(port: int) -> int:
    """``port`` if it is free, else 0 (any): the dashboard's port."""
    if port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                say(f"port {port} is in use: the dashboard takes a free port instead")
                port = 0
    return port


def _stop_on_signals() -> None:
    def interrupt(*_: object) -> None:
        # Ctrl-C or SIGTERM: unwind to the cleanup below, once; a second signal during the
        # cleanup is ignored so that every process still gets stopped
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
