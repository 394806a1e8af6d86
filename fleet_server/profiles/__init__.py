"""Pure profile maths: drift statistics and verdicts, and the packed rollups they merge.

``drift`` compares a live profile with a base one (PSI, KS, Wasserstein, Jensen-Shannon,
missing/unseen rates) and turns the statistics into verdicts under ``thresholds`` (the
rules' settings); ``rollups`` is the flat, bytes-packed layout of a bundle's profile that
the store keeps per device and time bucket;
``performance`` judges realized and estimated performance against the packaged metrics.
Nothing here touches the store, a clock or a socket: values in, values out.
"""

__all__ = ["drift", "performance", "rollups", "statistics", "thresholds"]
