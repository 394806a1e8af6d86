"""Staged rollouts: the values, the pure state machine, and the engine around it.

``values`` (plans, state, decisions; ``observations``, what the shell observes, beside
it), ``errors`` (the rollout errors),
``machine`` (the pure rules: values in, values out, ``now`` a parameter) with ``gates``
(its pure judgement of a window's numbers), ``metrics`` (those numbers, read from stored
summaries) and ``engine`` (the shell: store, desired state, the ticking thread). Only
``metrics`` and ``engine`` do I/O.
"""

__all__ = ["engine", "errors", "gates", "machine", "metrics", "observations", "values"]
