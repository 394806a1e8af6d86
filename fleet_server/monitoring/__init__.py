"""Judging what devices reported: drift reports, the periodic evaluator, alerts, the webhook.

``drift`` answers a drift report over a bundle, scope and time range; ``evaluator`` judges
every window on a timer and raises or resolves ``alerts``; ``webhook`` delivers new alerts
(the retraining trigger). The statistics themselves are in :mod:`fleet_server.profiles`.
"""

__all__ = ["alerts", "drift", "evaluator", "webhook"]
