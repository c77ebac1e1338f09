"""The simulation engine: data, fleet, Flower wiring, metrics, results and plots.

Flower telemetry is off for every entry point (this package is imported first).
"""
import os as _os

_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
