"""The planner's shared types: what the search asks (SearchRequest), what the ILP returns (Solution), a pipeline's
decisions (Layout) and a solved candidate (Candidate). They sit below every planner module: search drives, the ILP,
predict.py and staging.py are called, and all of them read these without importing each other's drivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.cost_models import Hardware
from autopar.plan import Prediction
from autopar.planner.cost import CostContext
from autopar.planner.graph import PlanGraph
from autopar.planner.memory import MemoryConfig
from autopar.planner.pipeline import Stage


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    model: str  # name recorded in the plan
    n_params: int
    hardware: Hardware
    devices: int
    batch: int  # global batch per optimizer step
    seq: int
    fix: dict[str, object] = field(default_factory=dict)  # parsed --fix: pp, dp, tp, mbs, zero, ac, schedule, v
    memory_budget_bytes: float | None = None  # default: capacity minus reserve
    time_limit_s: float = 30.0  # per ILP; the best incumbent is used when reached
    dtype: str = "float32"
    cp: int = 1  # > 1: the folded request of a cp plan (planner/cp_search.py): batch x cp at seq / cp, dp is dp x cp
    cp_searched: bool = False  # the fold of a cp degree searched beside cp = 1 (not pinned): see micro_batch_counts


@dataclass(frozen=True)
class Solution:
    choice: dict[str, int]  # owner node -> strategy index
    status: str
    objective_s: float
    solve_s: float
    variables: int
    constraints: int


@dataclass(frozen=True)
class Layout:
    """The pipeline decisions of a candidate and what they predict."""
    schedule: str
    v: int
    stages: list[Stage]
    step_s: float
    bubble_s: float
    p2p_s: float
    sync_exposed_s: float
    rank_s: list[float]  # forward + backward of one micro-batch per rank
    memory: list[dict[str, float]]  # per rank: the parts at its peak
    peak_at: list[str]
    optimizer_s: float = 0.0  # the slowest rank's optimizer step
    after_s: float = 0.0  # collectives after the optimizer step (ZeRO-1's broadcast), the slowest rank's


@dataclass
class Candidate:
    degrees: dict[str, int]
    micro_batches: int
    graph: PlanGraph
    ctx: CostContext
    solution: Solution

    prediction: Prediction | None = None  # filled once by `predicted`
    layout: Layout | None = None  # pp > 1: schedule, stage cut and their predictions (staging.py)

    @property
    def memory(self) -> MemoryConfig:
        return self.ctx.memory
