"""The outer search's space: the meshes, micro-batch counts and ZeRO x checkpointing configurations it may choose,
and the planning graph and cost context of one point of it (search.py drives, bounds.py prunes)."""

from __future__ import annotations

from autopar.capture import Captured
from autopar.cost_models import axis_links
from autopar.errors import MeshError
from autopar.planner.candidate import SearchRequest
from autopar.planner.cost import CostContext
from autopar.planner.graph import PlanGraph, build
from autopar.planner.memory import MemoryConfig
from autopar.planner.proxy import deepen
from autopar.runtime.checkpointing import AC_MODES


AXES = ("dp", "tp")


def mesh_candidates(req: SearchRequest, blocks: int = 1) -> list[dict[str, int]]:
    """pp x dp x tp factorisations: tp inside a node (unless pinned), pp at most the number of blocks (one block per stage);
    pipeline parallelism is only searched when the model has repeated blocks to cut between."""
    per_node = req.hardware.devices_per_node
    out = []
    for pp in divisors(req.devices):
        for tp in divisors(req.devices // pp):
            dp = req.devices // (pp * tp)
            spans_nodes = tp > per_node or per_node % tp  # allowed when pinned: a what-if across nodes
            if spans_nodes and "tp" not in req.fix or (pp > 1 and pp > blocks and "pp" not in req.fix):
                continue
            if pp == 1 and ("schedule" in req.fix or int(req.fix.get("v", 1)) > 1):
                continue
            if any(k in req.fix and req.fix[k] != v for k, v in (("pp", pp), ("dp", dp), ("tp", tp))):
                continue
            if dp % req.cp:  # a folded cp request (cp_search.py): its dp is dp x cp
                continue
            out.append({"pp": pp, "dp": dp, "tp": tp})
    if not out:
        raise MeshError(_no_mesh_message(req))
    return out


def _no_mesh_message(req: SearchRequest) -> str:
    pins = ",".join(f"{k}={req.fix[k]}" for k in ("pp", "dp", "tp") if k in req.fix)
    return (f"no mesh pp x dp x tp = {req.devices} devices matches {pins or 'the device count'} with tp inside "
            f"one {req.hardware.name} node ({req.hardware.devices_per_node} devices); make pp*dp*tp equal "
            "--devices and tp divide the devices per node")


def micro_batch_counts(req: SearchRequest, dp: int, pp: int = 1) -> list[int]:
    """Micro-batch counts m whose micro-step batch divides by dp. With pipeline parallelism, m >= pp (fewer leave
    ranks idle) and the micro-batch per data-parallel replica is 2 or 1 samples: more micro-batches shrink the
    bubble, and a larger micro-batch needs more memory while the cost model gains little from it once matmuls
    are large (Narayanan et al. 2021 Fig. 18 finds the best micro-batch at 1-2 for the 91B model).

    In the fold of a cp degree searched beside cp = 1 (req.cp_searched), a replica's micro-batch of k samples
    (req.batch // (m * dp), the fold's batch and dp being cp times the plan's) with k a multiple of cp is left out:
    the cp = 1 plan with dp x cp replicas of k / cp samples, same tp, pp and m, gives every rank the same tokens, the
    same matmuls, the same attention work (a rank's causal share S^2 / 2cp of k samples equals k / cp whole
    samples' S^2 / 2), activations and dp x cp gradient reduction, without the ring's exposed hops and buffers, so
    it is never slower and never larger, and the cp = 1 search has it among its candidates."""
    if "num_micro_batches" in req.fix:  # autopar.compile's default at pp = 1: the whole batch at once
        m = int(req.fix["num_micro_batches"])
        return [m] if req.batch % (m * dp) == 0 else []
    if "mbs" in req.fix:  # per data-parallel replica, as Megatron's --micro-batch-size: batch = mbs x dp x m
        mbs = int(req.fix["mbs"])
        if req.batch % (mbs * dp) and "dp" in req.fix:
            raise MeshError(f"--fix mbs={mbs} (per data-parallel replica) with dp={dp} needs a batch divisible by "
                            f"mbs x dp = {mbs * dp}, not {req.batch}; change --batch, mbs or dp")
        return [] if req.batch % (mbs * dp) else [req.batch // (mbs * dp)]
    counts = [m for m in divisors(req.batch) if (req.batch // m) % dp == 0]
    if req.cp > 1 and req.cp_searched:  # a fold whose replicas hold a multiple of cp samples is dominated (below)
        counts = [m for m in counts if (req.batch // (m * dp)) % req.cp]
    if pp > 1:
        counts = [m for m in counts if m >= pp and req.batch // (m * dp) in (2, 1)]
    return counts


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fmt_mesh(degrees: dict[str, int]) -> str:
    return " ".join(f"{a}={degrees[a]}" for a in ("pp", "dp", "tp") if a in degrees)


def memory_configs(req: SearchRequest, dp: int) -> list[MemoryConfig]:
    """ZeRO stage x checkpointing candidates (pins respected), cheapest first within each checkpointing mode."""
    precision = str(req.fix.get("precision") or ("bf16" if req.dtype in ("bfloat16", "float16") else "fp32"))
    # Unpinned, ZeRO-1 is left out: torch's ZeroRedundancyOptimizer adds an exposed broadcast after the step, so
    # ZeRO-2 (FSDP2, same traffic as DP, overlapped) is never slower and needs less memory.
    zeros = [int(req.fix["zero"])] if "zero" in req.fix else ([0, 2, 3] if dp > 1 else [0])
    acs = [str(req.fix["ac"])] if "ac" in req.fix else list(AC_MODES)
    # --fix fuse=on/off; unpinned, fuse where the kernels run as Triton: elsewhere (a CPU) their reference paths cost
    # step time that cost.py `fused` does not price
    fuse = req.fix.get("fuse", req.hardware.triton_kernels) is not False
    return [MemoryConfig(z, ac, precision, fuse) for ac in acs for z in zeros]


def frontier(configs: list[MemoryConfig], fits) -> list[MemoryConfig]:
    """The configurations worth solving: per checkpointing mode the lowest ZeRO stage that fits (stages 0 and 2
    cost the same time, ZeRO-1 more exposed time, ZeRO-3 more communication; checkpointing only adds recompute).
    A mode is dominated once a cheaper mode fits without ZeRO-3."""
    out: list[MemoryConfig] = []
    for ac in AC_MODES:
        first = next((c for c in configs if c.ac == ac and fits(c)), None)
        if first is None:
            continue
        out.append(first)
        if first.zero < 3:
            break
    return out


def settles(cfg: MemoryConfig) -> bool:
    """A pp = 1 mesh solved without checkpointing or ZeRO-3 needs no more micro-batches: they could not be faster."""
    return cfg.ac == "none" and cfg.zero < 3


def graph_for(req: SearchRequest, captured: Captured, degrees: dict[str, int],
           cfg: MemoryConfig = MemoryConfig()) -> tuple[PlanGraph, CostContext]:
    deg = tuple(degrees[a] for a in AXES)
    links = axis_links(req.hardware, list(zip(AXES, deg)))
    graphs = captured.__dict__.setdefault("_plan_graphs", {})  # one PlanGraph per mesh, whatever the memory config
    if deg not in graphs:
        depth = captured.__dict__.get("_deepen_to")
        graphs[deg] = deepen(build(captured, deg, AXES), depth) if depth else build(captured, deg, AXES)
    cp_link = axis_links(req.hardware, [("dp", deg[0] // req.cp), ("cp", req.cp), ("tp", deg[1])])["cp"] \
        if req.cp > 1 else None  # cp ranks inside the dp x cp block, tp innermost (planner/cp_search.py)
    return graphs[deg], CostContext(req.hardware, deg, tuple(links[a] for a in AXES), cfg,
                                    degrees.get("dp", 1), req.cp, cp_link)


def deepened_trace(proxy_trace, depth: int):
    """The proxy's traces, marked to be planned at the model's depth (`graph_for` deepens them)."""
    def trace(micro_batch: int) -> Captured:
        captured = proxy_trace(micro_batch)
        captured.__dict__["_deepen_to"] = depth
        return captured
    return trace


def no_batch_message(req: SearchRequest, meshes: list[dict[str, int]]) -> str:
    """Why no mesh takes the batch: dp must divide it, and a pipeline needs pp micro-batches of at least one sample
    per replica (batch >= pp x dp); the smallest batch some mesh takes, to say what to do."""
    mbs = int(req.fix.get("mbs", 0))
    if mbs and req.batch % mbs == 0:  # mbs is per data-parallel replica: the batch needs mbs x dp x micro-batches
        dps = "/".join(map(str, sorted({d["dp"] for d in meshes})))
        return (f"--fix mbs={mbs} (per replica) leaves no mesh whose dp={dps} x mbs divides batch {req.batch} "
                f"(pipelines also need pp micro-batches); use a batch that is a multiple of mbs x dp, or drop mbs "
                f"from --fix")
    smallest = min(d["dp"] * d["pp"] for d in meshes)
    dps = "/".join(map(str, sorted({d["dp"] for d in meshes})))
    why = f"batch {req.batch} is not divisible by dp={dps}"
    if any(req.batch % d["dp"] == 0 for d in meshes):  # dp divides it, but the pipelines have too few samples
        pps = "/".join(map(str, sorted({d["pp"] for d in meshes if req.batch % d["dp"] == 0})))
        why = (f"batch {req.batch} cannot fill {req.devices} devices: tp stops at one {req.hardware.name} node "
               f"({req.hardware.devices_per_node} devices) and the meshes dp divides need pp={pps}, whose pipeline "
               f"needs at least pp x dp samples (one per micro-batch and replica)")
    return f"{why}; use --batch {smallest} (or a multiple), or fewer --devices"


def memory_budget(req: SearchRequest) -> float:
    return req.memory_budget_bytes or (req.hardware.memory_bytes - req.hardware.memory_reserve_bytes)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


NO_LIMIT = 1e30  # bytes: a budget nothing reaches (the solver needs a finite bound)
