"""Pipeline parallelism: stage cuts, schedules and their bubble, per-stage memory.

The sharding ILP runs on one stage's (dp, tp) mesh over the whole model (repeated blocks share decisions, so each
block's cost is the same wherever it is cut); here its priced pieces are split by where they run: `pre` (the code
before the first block: embeddings), `block` (one block), `post` (the code after the last block: head, loss).
A pipeline of p ranks and v virtual stages per rank cuts the L blocks into S = p*v contiguous stages, stage c on
rank c % p (torch.distributed.pipelining's loop placement).

Step time of m micro-batches, t the slowest rank's forward+backward of one micro-batch (its stages together):
  GPipe, 1F1B        (m - 1) t + sum_s t_s          = (m + p - 1) t when balanced  (Narayanan et al. 2021, Sec. 2.2)
  interleaved        m t + (p - 1) t / v                                          (ibid., Sec. 2.2.2)
  zero-bubble        m t + (p - 1) t_F / v    backward split into input and weight gradients, the weight half
                     filling the bubble: ZB-H1's (p-1)(T_F + T_B - T_W) with T_B = T_W (Qi et al. 2023, Sec. 3)
plus the point-to-point sends of stage boundaries (forward activation and backward gradient per micro-batch and
per boundary; interleaving multiplies them by v, ibid.).
Activation memory: a rank holds the activations of the micro-batches in flight at its peak: GPipe all m; 1F1B
p - r on rank r (the first rank p, Korthikanti et al. 2022 Sec. 4.2.3); interleaved (p - r - 1)*2 + (v - 1)*p + 1
stage-micro-batches of its v stages (Megatron-LM's warm-up count), so the first rank holds p + (p-1)/v layer-sets,
Korthikanti's 1 + (p-1)/(p v) factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble")
INTERLEAVED = ("interleaved", "zero-bubble")  # v >= 2 stages per rank
STATE = ("params", "optimizer_state", "grads", "buckets", "autocast")  # parts that scale with the parameters held
ONE_BLOCK = ("gathered", "recompute", "block_grads")  # the block at work: once per rank, whatever it holds
SIDES = ("pre", "block", "post")


@dataclass(frozen=True)
class Pieces:
    """A solved candidate split by where it runs, per micro-batch (times) and per device (memory parts)."""
    time_s: dict[str, float]  # side -> forward + backward (+ recompute, exposed collectives); block: one block
    fwd_s: dict[str, float]  # side -> forward only (zero-bubble's bubble)
    recompute_s: dict[str, float]  # side -> forward rerun by checkpointing (part of time_s)
    sync_s: dict[str, float]  # side -> gradient collectives per step (one block for "block")
    memory: dict[str, dict[str, float]]  # side -> part -> bytes (one block for "block")
    p2p_bytes: float  # what crosses one stage boundary per micro-batch, each way
    blocks: int  # L
    optimizer_s: dict[str, float] = field(default_factory=dict)  # side -> optimizer step (one block for "block")
    after_s: dict[str, float] = field(default_factory=dict)  # side -> collectives after the step (ZeRO-1 broadcast)


@dataclass(frozen=True)
class Stage:
    index: int
    rank: int
    blocks: list[int]  # block indices
    first: bool
    last: bool


def in_flight(schedule: str, p: int, m: int, v: int, rank: int) -> float:
    """Micro-batches of activations rank `rank` holds at its peak, in units of all its blocks' activations."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - rank))
    chunks = (p - rank - 1) * 2 + (v - 1) * p + 1
    return min(m * v, chunks) / v


def step_time(schedule: str, p: int, m: int, v: int, stage_s: list[float], rank_s: list[float],
              rank_fwd_s: list[float]) -> tuple[float, float]:
    """(pipeline time of one step without p2p, bubble) from per-stage and per-rank micro-batch times."""
    t = max(rank_s)
    if p == 1:
        return m * t, 0.0
    if schedule in ("gpipe", "1f1b"):
        total = (m - 1) * t + sum(stage_s)
    elif schedule == "interleaved":
        total = m * t + (p - 1) * t / v
    else:
        total = m * t + (p - 1) * max(rank_fwd_s) / v
    return total, total - m * t


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Bubble over ideal time for balanced stages: (p-1)/m, and (1/v)(p-1)/m interleaved (the formulas of
    Narayanan et al. 2021 that `step_time` reproduces)."""
    t = 1.0
    stages = [t / v] * (p * v)
    _, bubble = step_time(schedule, p, m, v, stages, [t] * p, [t / 3] * p)
    return bubble / (m * t)


def partition(blocks: int, stages: int, cost_row) -> list[int] | None:
    """Blocks per stage (contiguous, in order) minimising the largest stage cost; `cost_row(s)` prices stage s
    holding n = 0..blocks blocks (an array; inf where it does not fit its memory). Every stage holds at least
    one block (the runtime builds a stage module per stage; an empty one would only pass tensors on). Dynamic
    programming over (stage, blocks so far): best[s][j] = min over n >= 1 of max(best[s-1][j-n], cost(s-1, n)),
    vectorised over j. None when no cut fits."""
    best = np.full(blocks + 1, np.inf)
    best[0] = 0.0
    cuts = np.zeros((stages, blocks + 1), dtype=np.int64)
    for s in range(stages):
        row = np.asarray(cost_row(s), dtype=float)
        new = np.full(blocks + 1, np.inf)
        for n in np.flatnonzero(np.isfinite(row[1:])) + 1:
            cand = np.maximum(best[: blocks + 1 - n], row[n])
            better = cand < new[n:]
            new[n:][better] = cand[better]
            cuts[s, n:][better] = n
        best = new
    if not np.isfinite(best[blocks]):
        return None
    sizes, j = [], blocks
    for s in range(stages - 1, -1, -1):
        sizes.append(int(cuts[s, j]))
        j -= sizes[-1]
    return sizes[::-1]


def stages_of(sizes: list[int], p: int) -> list[Stage]:
    out, start = [], 0
    for c, n in enumerate(sizes):
        out.append(Stage(c, c % p, list(range(start, start + n)), c == 0, c == len(sizes) - 1))
        start += n
    return out


def stage_time(pieces: Pieces, stage: Stage) -> float:
    t = len(stage.blocks) * pieces.time_s["block"]
    return t + (pieces.time_s["pre"] if stage.first else 0.0) + (pieces.time_s["post"] if stage.last else 0.0)


def stage_fwd(pieces: Pieces, stage: Stage) -> float:
    t = len(stage.blocks) * pieces.fwd_s["block"]
    return t + (pieces.fwd_s["pre"] if stage.first else 0.0) + (pieces.fwd_s["post"] if stage.last else 0.0)


def rank_memory(pieces: Pieces, stages: list[Stage], flight: float, m: int = 1) -> dict[str, float]:
    """Bytes per part on the rank holding `stages`, with `flight` micro-batches of activations in flight, of m."""
    n = sum(len(s.blocks) for s in stages)
    sides = [("block", n)] + [("pre", 1)] * any(s.first for s in stages) + [("post", 1)] * any(s.last for s in stages)
    parts: dict[str, float] = {}
    for side, count in sides:
        for part, v in pieces.memory[side].items():
            scale = 1.0 if part in STATE or part in ONE_BLOCK else flight
            times = (1 if n else 0) if side == "block" and part in ONE_BLOCK else count
            parts[part] = parts.get(part, 0.0) + v * scale * times
    parts.update({k: v for k, v in p2p_memory(pieces.p2p_bytes, stages, flight, m).items() if v})
    return parts


def p2p_memory(boundary: float, stages: list[Stage], flight: float, m: int) -> dict[str, float]:
    """What torch.distributed.pipelining holds for the stage boundaries (`boundary` bytes per micro-batch, each way).

    p2p_buffers: a receive buffer per micro-batch, allocated once and kept by the stage: activations into every
    stage but the first (stage.py `_prepare_forward_infra`: `args_recv_info[chunk]` for chunk in range(m)), output
    gradients into every stage but the last (`_setup_backward_recv_info`). A received activation is the stage's
    input, saved by its first operator: for the `flight` micro-batches in flight it is already in `activations`.
    p2p_grads: backward leaves each received activation's gradient on its buffer after sending it (autograd
    accumulates into the leaf); the runtime frees them after the step (autopar/runtime/pipeline.py), so all m exist at
    backward end."""
    receives = sum(not s.first for s in stages)
    buffers = boundary * (receives * (m - min(flight, m)) + sum(not s.last for s in stages) * m)
    return {"p2p_buffers": buffers, "p2p_grads": boundary * receives * m}


def rank_sync(pieces: Pieces, stages: list[Stage]) -> float:
    return _rank_sum(pieces.sync_s, stages)


def rank_after(pieces: Pieces, stages: list[Stage]) -> float:
    return _rank_sum(pieces.after_s, stages)


def rank_optimizer(pieces: Pieces, stages: list[Stage]) -> float:
    return _rank_sum(pieces.optimizer_s, stages)


def _rank_sum(per_side: dict[str, float], stages: list[Stage]) -> float:
    """A per-step quantity of the sides one rank runs (its blocks, the embedding if first, the head if last)."""
    n = sum(len(s.blocks) for s in stages)
    first, last = any(s.first for s in stages), any(s.last for s in stages)
    return n * per_side.get("block", 0.0) + first * per_side.get("pre", 0.0) + last * per_side.get("post", 0.0)
