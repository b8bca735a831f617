"""Entry points of a worker: run one plan on the chosen stack, in this process or in a
spawned one that reports per-second counts and its summary through a queue."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from bsscihub.protocols.bssci.sim._plan import WorkerPlan

__all__ = ["main", "run_plan"]


def run_plan(
    plan: WorkerPlan,
    report: Callable[[dict[str, Any]], None] | None = None,
    *,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    if plan.options.stack == "twisted":
        from bsscihub.protocols.bssci.sim._tx import run_worker
    else:
        from bsscihub.protocols.bssci.sim._aio import run_worker  # type: ignore[assignment]
    return run_worker(plan, report, stop_on_signals=stop_on_signals)


def main(plan: WorkerPlan, queue: Any) -> None:
    """A spawned worker process: everything goes back to the parent through `queue`."""
    summary = run_plan(plan, lambda second: queue.put(("second", plan.worker, second)), stop_on_signals=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # run over: a late Ctrl-C must not cut the report
    queue.put(("summary", plan.worker, summary))
