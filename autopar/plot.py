"""`autopar plan --plot FILE.png`: the predicted memory per device at its peak, part by part, against the budget."""

from __future__ import annotations

from pathlib import Path

from autopar.errors import AutoparError
from autopar.plan import Plan


def plot_memory(plan: Plan, path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise AutoparError("--plot needs matplotlib; install it with `python3 -m pip install matplotlib`") from None
    peak = plan.predicted.memory_bytes_per_device
    unit, scale = ("GiB", 2**30) if peak >= 2**30 else ("MiB", 2**20)
    parts = {k: v / scale for k, v in plan.predicted.memory_parts.items() if v > 0}
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for name, size in parts.items():
        ax.barh(0, size, left=left, label=f"{name.replace('_', ' ')} {size:.3g} {unit}")
        left += size
    budget = plan.memory_budget_bytes / scale
    if budget <= 3 * left:  # a budget far beyond the peak would squash the bar: named in the legend only
        ax.axvline(budget, color="black", linestyle="--", label=f"budget {budget:.3g} {unit}")
    else:
        ax.plot([], [], " ", label=f"budget {budget:.3g} {unit} (off the scale)")
    ax.set_yticks([])
    ax.set_xlabel(f"{unit} per device")
    mesh = " ".join(f"{a}={plan.degrees[a]}" for a in plan.axis_names)
    ax.set_title(f"{plan.model} on {plan.devices} x {plan.hardware} ({mesh}, ZeRO-{plan.zero}, checkpointing "
                 f"{plan.ac}): peak at {plan.predicted.memory_peak_at or 'backward'}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise AutoparError(f"--plot {path}: cannot write it ({err.strerror}); choose a writable path") from None
    finally:
        plt.close(fig)
