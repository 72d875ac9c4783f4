"""`autopar profile`: measure the machine and process group it runs on, and write a hardware file.

    measure (microbench.py: matmuls, streams, tiny ops; collectives.py: the five collectives per link class)
      -> fit (fit.py: least squares through the cost model's own formulas)
      -> write (write.py: the shipped TOML schema, every number with its source)

`launch.py` starts the ranks (torchrun or spawned) and ties the steps together; `measure.py` runs the phases on
one rank. The pieces take the device and process group as arguments, so other commands can reuse the timers.
"""

from .launch import ProfileRequest, run_profile
from .measure import ProfileConfig

__all__ = ["ProfileConfig", "ProfileRequest", "run_profile"]
