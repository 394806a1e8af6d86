"""What every benchmark script shares: machine description, timing blocks, tables.

Import it as ``from benchmarks.common import ...`` after putting the repository root first
on ``sys.path`` (each script does). Not part of the test run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["blocks", "finish", "machine", "rss_kib", "stats", "table"]


def stats(ns: list[int]) -> dict[str, float]:
    """Nanosecond samples → microsecond median, p10, p90, mean and count."""
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "median_us": float(np.median(us)),
        "p10_us": float(np.percentile(us, 10)),
        "p90_us": float(np.percentile(us, 90)),
        "mean_us": float(us.mean()),
        "n": len(ns),
    }


def blocks(
    contenders: dict[str, Callable[[int], Any]], warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Time each contender in warm blocks, two rounds, the second in reverse order.

    Blocks, not round-robin: a slow contender evicts the caches, and whichever ran next
    paid for it. The reversed second round spreads slow drift of a shared machine over
    all contenders.
    """
    times: dict[str, list[int]] = {name: [] for name in contenders}
    clock = time.perf_counter_ns
    halves = (repeats - repeats // 2, repeats // 2)
    for order, count in zip((list(contenders), list(reversed(contenders))), halves, strict=True):
        for name in order:
            fn = contenders[name]
            for i in range(warmup):
                fn(i)
            for i in range(count):
                start = clock()
                fn(i)
                times[name].append(clock() - start)
    return {name: stats(t) for name, t in times.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _git() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine(libraries: Iterable[str]) -> dict[str, Any]:
    """Platform, CPU, memory, Python and the installed versions of ``libraries``."""
    from packager.build import library_versions

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _ram_bytes(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": library_versions(tuple(libraries)),
        "git_revision": _git(),
    }
    try:
        from threadpoolctl import threadpool_info

        info["native_threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "version", "num_threads")}
            for p in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def rss_kib() -> dict[str, int]:
    """This process's resident memory now and at its peak (Linux ``/proc``), in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_kib": out.get("VmRSS", 0), "peak_kib": out.get("VmHWM", 0)}


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(head) + " |", sep, *(line(r) + " |" for r in rows)])


def finish(doc: dict[str, Any], out: Path, libraries: Iterable[str], clock: float, cpu: float,
           load_before: tuple[float, ...], report: Callable[[dict[str, Any]], str]) -> None:
    """Record time, load and machine in ``doc``, write it to ``out`` as JSON, and print the
    machine line, the load and ``report(doc)``: the common end of a benchmark run."""
    doc["elapsed_s"] = time.perf_counter() - clock
    doc["cpu_s"] = time.process_time() - cpu
    doc["load_average_1_5_15"] = {"before": list(load_before), "after": list(os.getloadavg())}
    doc["machine"] = machine(libraries)
    doc["machine"]["this_process"] = rss_kib()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    m = doc["machine"]
    print(f"{m['cpu_model']}, {m['cores']} cores, {(m['ram_bytes'] or 0) / 2**30:.1f} GiB, "
          f"{m['platform']}; python {m['python']}, onnxruntime "
          f"{m['versions'].get('onnxruntime')}; single-threaded sessions")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / "
          f"{doc['load_average_1_5_15']['after'][0]:.2f}\n")
    print(report(doc))
    print(f"\n{doc['elapsed_s']:.0f} s wall, {doc['cpu_s']:.0f} s CPU; JSON in {out}")


def performance_blocks(spec: Any, rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    """A realized and an estimated performance block (wire form) of ``n`` synthetic
    labelled rows of a classifier: 85 % right, top-class confidence 0.6-0.99."""
    from edgefleet.contract.performance import Estimated, Realized

    k = spec.k
    truth = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.85, truth, rng.integers(0, k, n))
    conf = rng.uniform(0.6, 0.99, n)
    scores = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
    scores[np.arange(n), pred] = conf
    real, est = Realized(spec), Estimated(spec)
    real.add(pred, truth, scores)
    est.add(scores[:, 1] if k == 2 else conf, pred)
    return real.to_wire(), est.to_wire()
