"""``fleet``: run the fleet server, and operate a fleet through its REST API.

Server side, on the database directly: ``fleet serve``, ``fleet ingest``, ``fleet token
create|list|revoke``, ``fleet device add --db`` (and ``device passwd-file``), ``fleet db
migrate`` (SQLite to PostgreSQL). Everything else talks HTTP to a running server:
``--server URL`` and ``--token`` (or the environment variables ``FLEET_SERVER`` and
``FLEET_TOKEN``).

Commands only parse, call the library or the API, and print: readable tables for people,
``--json`` for scripts. A refusal prints one line, ``fleet: error: <message>`` (the server's
message for HTTP errors), and exits with a status by its kind (:mod:`edgefleet.cli`).
"""

from __future__ import annotations

import logging

import click

from edgefleet import __version__
from edgefleet.cli import EXIT_CODES_HELP
from fleet_server.cli.admin import device, token
from fleet_server.cli.audit import audit
from fleet_server.cli.broker import broker_config
from fleet_server.cli.dataset import dataset
from fleet_server.cli.db import db
from fleet_server.cli.operate import (
    alerts,
    bundle,
    desired,
    device_list,
    device_remove,
    device_show,
    drift,
    group,
)
from fleet_server.cli.outcomes import outcomes
from fleet_server.cli.performance import performance
from fleet_server.cli.retrain import retrain
from fleet_server.cli.rollout import rollout
from fleet_server.cli.serve import ingest, serve

__all__ = ["main"]

SERVER_COMMANDS = ("serve", "ingest")


@click.group(help="The edgefleet fleet server and its operator CLI.",
             context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="fleet")
@click.option("--log-level", default=None,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Logging level: INFO for the server commands (serve, ingest: every "
                   "rollout transition, alert and webhook delivery), WARNING for the rest.")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    if log_level is None:
        log_level = "INFO" if ctx.invoked_subcommand in SERVER_COMMANDS else "WARNING"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level)
    if log_level != "DEBUG":  # one line per HTTP request is the API client's, not news
        logging.getLogger("httpx").setLevel(logging.WARNING)


# Every command is registered here, one way, so this list is the whole CLI.
for _command in (serve, ingest, token, device, group, bundle, desired, drift, performance,
                 alerts, rollout, broker_config, audit, db, retrain, outcomes, dataset):
    main.add_command(_command)
main.add_command(device_list, "devices")
device.add_command(device_list, "list")
device.add_command(device_show, "show")
device.add_command(device_remove, "remove")

if __name__ == "__main__":
    main()
