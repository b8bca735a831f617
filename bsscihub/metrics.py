"""The Prometheus collectors every hub exports next to its components' own: process, Python,
and build information (`bsscihub_build_info{version=...} 1`)."""

from __future__ import annotations

import platform

from prometheus_client import (
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.registry import CollectorRegistry

import twisted

__all__ = ["register_standard_collectors"]


def register_standard_collectors(registry: CollectorRegistry, version: str) -> None:
    """Adds process (CPU, memory, file descriptors, start time), Python (version, garbage
    collector) and build-info metrics to one hub's registry."""
    # `_created` series double every counter's lines and no dashboard of ours reads them.
    disable_created_metrics()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info("bsscihub_build", "The running hub's version", registry=registry).info(
        {"version": version, "python": platform.python_version(), "twisted": twisted.__version__}
    )
