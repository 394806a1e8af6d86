"""One router per resource; :func:`fleet_server.api.create_app` includes them all."""
