"""`autopar plan --plot FILE.png`: the predicted memory per device at its peak, part by part, against the budget;
with pipeline parallelism, also the schedule's timeline per rank (compute, stage-boundary sends, bubble)."""

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
    piped = bool(plan.predicted.stages)
    fig, axes = plt.subplots(2 if piped else 1, 1, figsize=(8, 5.6 if piped else 2.6))
    ax = axes[0] if piped else axes
    _memory_bar(plan, ax)
    if piped:
        _timeline(plan, axes[1])
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise AutoparError(f"--plot {path}: cannot write it ({err.strerror}); choose a writable path") from None
    finally:
        plt.close(fig)


def _timeline(plan: Plan, ax) -> None:
    """One row per pipeline rank over the predicted step: its micro-batches' forward and backward (1:2, cost.py),
    a send after each, and the bubble split between fill (ranks further down wait for the first micro-batch)
    and drain. Drawn from the predicted times, not from a trace."""
    p, m, pp = plan.predicted, plan.num_micro_batches, plan.degrees["pp"]
    unit, scale = ("s", 1.0) if p.step_time_s >= 1 else ("ms", 1e-3)
    per_rank = {}
    for st in p.stages:
        per_rank[st["rank"]] = per_rank.get(st["rank"], 0.0) + st["time_s"]
    send = p.exposed_comm_s / max(1, m * plan.virtual_stages + pp - 1) / 2
    for r in range(pp):
        t = per_rank.get(r, 0.0)
        idle = max(0.0, p.step_time_s - m * (t + 2 * send))
        clock = idle * r / max(1, pp - 1) / 2  # fill: rank r starts once r stages ahead have run a forward
        ax.barh(r, clock, color="lightgrey", label="bubble" if r == pp - 1 else None)
        for i in range(m):
            for part, share, color in (("forward", 1 / 3, "tab:blue"), ("backward", 2 / 3, "tab:orange")):
                ax.barh(r, t * share / scale, left=clock / scale, color=color,
                        label=part if r == 0 and i == 0 else None)
                clock += t * share
                ax.barh(r, send / scale, left=clock / scale, color="tab:red",
                        label="send" if r == 0 and i == 0 and part == "forward" else None)
                clock += send
        ax.barh(r, max(0.0, p.step_time_s - clock) / scale, left=clock / scale, color="lightgrey")
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} (predicted step {p.step_time_s / scale:.3g} {unit})")
    ax.set_title(f"{plan.schedule} schedule, pp={pp}, {m} micro-batches, v={plan.virtual_stages}: bubble "
                 f"{p.bubble_s / p.step_time_s:.1%} of the step", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)


def _memory_bar(plan: Plan, ax) -> None:
    peak = plan.predicted.memory_bytes_per_device
    unit, scale = ("GiB", 2**30) if peak >= 2**30 else ("MiB", 2**20)
    parts = {k: v / scale for k, v in plan.predicted.memory_parts.items() if v > 0}
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
    mesh = " ".join(f"{a}={plan.degrees[a]}" for a in ["pp", *plan.axis_names] if a in plan.degrees and
                    (a != "pp" or plan.degrees[a] > 1))
    ax.set_title(f"{plan.model} on {plan.devices} x {plan.hardware} ({mesh}, ZeRO-{plan.zero}, checkpointing "
                 f"{plan.ac}): peak at {plan.predicted.memory_peak_at or 'backward'}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
