"""The simulation engine: data, fleet, Flower wiring, metrics, results and plots."""
import os as _os

_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
