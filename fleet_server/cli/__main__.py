"""``python -m fleet_server.cli``: the ``fleet`` command."""

from fleet_server.cli.main import main

if __name__ == "__main__":
    main()
