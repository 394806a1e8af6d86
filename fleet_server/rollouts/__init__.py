"""Staged rollouts: the values, the pure state machine, and the engine around it.

``values`` (plans, state, observations, decisions, the rollout errors), ``machine`` (the
pure rules: values in, values out, ``now`` a parameter), ``engine`` (the shell: store,
desired state, gate metrics from stored summaries, the ticking thread). Only the engine
does I/O.
"""

__all__ = ["engine", "machine", "values"]
