"""Cost models: hardware descriptions (TOML data), roofline op time, alpha-beta collective time.

The planner prices every candidate strategy with these three functions and nothing else, so a new machine is a
new TOML file under `cost_models/hardware/`, not new code.
"""

from .comm import COLLECTIVES, axis_links, collective_time_s, exposed_s, latency_s
from .compute import op_time_s
from .hardware import Hardware, Link, available_hardware, load_hardware

__all__ = [
    "COLLECTIVES",
    "Hardware",
    "Link",
    "available_hardware",
    "axis_links",
    "collective_time_s",
    "exposed_s",
    "latency_s",
    "load_hardware",
    "op_time_s",
]
