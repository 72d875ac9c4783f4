"""The `autopar` command (console script) and `python -m autopar.cli`. Kept free of heavy imports: `autopar plan`
turns the cyclic garbage collector off before torch and the planner are imported, and exits without tearing the
interpreter down; everything else is `autopar.cli.main.main`."""

from __future__ import annotations

import gc
import os
import sys


def entry() -> None:
    """Run the command line. `autopar plan` runs without cyclic garbage collection from the start (importing torch
    with it on costs ~0.15 s; re-enabled after planning, plan_cmd._planning_only, its first pass would walk every
    object the planner made, ~0.15 s more) and, once it has printed and saved everything, ends with os._exit:
    freeing the traced graphs of a large model one object at a time takes ~1 s and serves nothing. It also keeps
    triton out: torch's dynamo (which torch.export needs) imports it at start-up only to register a type, ~0.15 s
    on a 2-core host, and planning prices kernels without running one (torch then sees no triton). Other commands
    (which launch ranks and own files until the end) run and exit normally."""
    planning = sys.argv[1:2] == ["plan"]
    if planning:
        gc.disable()
        sys.modules.setdefault("triton", None)  # an import of it fails: torch carries on without it
    from autopar.cli.main import main

    code = main()
    if planning:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:  # `autopar plan ... | head`: the reader left; nothing more to say
            pass
        os._exit(code)
    sys.exit(code)
