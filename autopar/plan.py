"""The plan is data: every decision and prediction, serialisable to JSON (schema versioned) and back.

`autopar plan --json plan.json` writes one; `autopar.compile(model, mesh, plan="plan.json")` runs it. Per-node
strategies are keyed by the traced node name; `graph_fingerprint` refuses a plan made for another model or shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autopar.errors import PlanError

SCHEMA_VERSION = 3  # 3: degrees["cp"] may exceed 1 (context parallelism; 2 had cp = 1 always, so it loads as is);
# 2: micro_batch_size is per data-parallel replica (1: global per micro-step)


@dataclass(frozen=True, kw_only=True)
class Prediction:
    step_time_s: float  # one optimizer step (all micro-batches)
    compute_s: float  # forward + backward compute
    exposed_comm_s: float  # collectives on the critical path (activations, resharding)
    grad_sync_s: float  # parameter-gradient collectives, before overlap
    grad_sync_exposed_s: float  # the part backward could not hide
    bubble_s: float = 0.0  # pipeline bubble: time the slowest stage's device waits, fill and drain (pp > 1)
    recompute_s: float = 0.0  # activation recomputation (forward re-run in backward), part of compute_s
    optimizer_s: float = 0.0  # the optimizer step over the states this device updates (+ FSDP2's host work)
    memory_bytes_per_device: float  # peak, the sum of the parts below
    memory_parts: dict[str, float]  # the parts present at the peak (planner/footprint.py), summing to it
    memory_peak_at: str = ""  # the moment of the peak: "backward start" (activations) or "backward end" (gradients)
    memory_binding: str = ""  # what limits memory: the largest part, and whether the budget binds
    stages: list[dict[str, Any]] = field(default_factory=list)  # pp > 1: per stage, its layers, time and memory
    tokens_per_s: float
    tflops_per_device: float  # model FLOPs (6N-style, from the traced graph) per second per device
    model_flops_per_step: float


@dataclass(frozen=True, kw_only=True)
class NodeDecision:
    op: str
    module: str
    outs: list[str]  # placements per output, e.g. "S0/R"
    ins: list[str]  # placements per tensor input


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: int = SCHEMA_VERSION
    model: str
    n_params: int
    graph_fingerprint: str
    hardware: str
    devices: int
    axis_names: list[str]  # mesh axes in order, outermost first
    degrees: dict[str, int]  # pp, dp, cp, tp. With cp > 1 the placements' "dp" axis is dp x cp: the plan runs
    # as its fold (planner/cp_search.py), each cp rank a data-parallel rank of cp x the batch at seq / cp
    batch: int  # global batch per optimizer step
    seq: int
    micro_batch_size: int  # samples per micro-batch per data-parallel replica (Megatron's --micro-batch-size)
    num_micro_batches: int  # micro-batches per optimizer step (gradient accumulation steps)
    zero: int = 0  # ZeRO stage along dp: 0 replicated, 1 optimizer state, 2 + gradients, 3 + parameters sharded
    ac: str = "none"  # activation checkpointing of every block not named in ac_layers: none | selective | full
    ac_layers: dict[str, str] = field(default_factory=dict)  # block ("blocks.3") -> mode, where it differs from ac
    precision: str = "fp32"  # fp32, or bf16: bf16 parameters/compute, fp32 master weights and gradient reduction
    schedule: str | None = None  # pp > 1: gpipe | 1f1b | interleaved | zero-bubble
    virtual_stages: int = 1  # pipeline stages per pp rank (interleaved and zero-bubble schedules)
    # pp > 1: the blocks ("blocks.0", ...) of each pipeline stage, pp * virtual_stages lists in pipeline order;
    # stage c runs on pp rank c % pp; the first stage also runs the code before the first block (embeddings), the
    # last the code after the last block (head, loss)
    stages: list[list[str]] = field(default_factory=list)
    dtype: str = "float32"
    memory_budget_bytes: float
    params: dict[str, str]  # parameter FQN -> placement
    strategies: dict[str, NodeDecision]  # fx node name -> decision
    predicted: Prediction
    solver: dict[str, Any] = field(default_factory=dict)  # status, seconds, variables, constraints, candidates
    fallback_ops: dict[str, int] = field(default_factory=dict)  # op without a rule -> count (replicated)
    fallback_seconds: dict[str, float] = field(default_factory=dict)  # op without a rule -> its time per step
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # other degrees evaluated, with predictions
    notes: list[str] = field(default_factory=list)  # how the model was built (weights loaded, eager attention)
    fuse: bool = True  # fused kernels in the generated program (planner/fusion.py, autopar/kernels)
    fusions: list[dict[str, Any]] = field(default_factory=list)  # per kind: count, time_saved_s, memory_saved_bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plan":
        if d.get("schema_version") == 1:
            d = _from_schema_1(d)
        if d.get("schema_version") == 2:  # the same fields; cp was always 1
            d = {**d, "schema_version": SCHEMA_VERSION}
        if d.get("schema_version") != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {d.get('schema_version')!r} is not {SCHEMA_VERSION}; "
                            "re-create the plan with this version of `autopar plan`")
        d = dict(d)
        d["predicted"] = Prediction(**d["predicted"])
        d["strategies"] = {k: NodeDecision(**v) for k, v in d["strategies"].items()}
        return Plan(**d)

    @staticmethod
    def load(path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise TypeError(f"the top level is a JSON {type(data).__name__}, not an object")
            return Plan.from_dict(data)
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; create one with `autopar plan ... --json {path}`") \
                from None
        except OSError as e:  # a directory, no permission, ...
            raise PlanError(f"plan file {path} cannot be read ({e.strerror}); give the path of a plan JSON file") \
                from None
        except PlanError as e:
            raise PlanError(f"plan file {path}: {e}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # ValueError: not JSON, not UTF-8
            raise PlanError(f"plan file {path} is malformed ({type(e).__name__}: {e}); re-create it with "
                            "`autopar plan ... --json`") from None


def _from_schema_1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 counted micro_batch_size in global samples per micro-step; schema 2 per data-parallel replica
    (Megatron's --micro-batch-size). The same plan, so it is migrated: divide by dp."""
    dp = (d.get("degrees") or {}).get("dp", 1)
    mbs = d.get("micro_batch_size")
    if not isinstance(mbs, int) or not isinstance(dp, int) or dp < 1 or mbs % dp:
        raise PlanError(f"plan schema_version 1 has micro_batch_size {mbs!r} (global samples per micro-step) that "
                        f"dp={dp!r} does not divide, so it cannot be migrated to schema {SCHEMA_VERSION} (samples per "
                        "data-parallel replica); re-create the plan with `autopar plan ... --json`")
    return {**d, "schema_version": SCHEMA_VERSION, "micro_batch_size": mbs // dp}
