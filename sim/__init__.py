"""The runner on top (``python -m sim.run``, the CLI checks, the engine adapter, the Flower apps,
checkpoints, results, plots, the report) and, in :mod:`sim.core`, the ground layer everything
else builds on. docs/architecture.md draws the layers.

Flower telemetry is off for every entry point (this package is imported first).
"""
import os as _os

_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
