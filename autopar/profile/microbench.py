"""Single-device microbenchmarks: matmul throughput, streaming memory bandwidth and the per-op launch floor.

Each benchmark returns `ComputeSample`s (what ran, its FLOPs and bytes, its median seconds) and knows nothing about
fitting or files, so `autopar validate` can time a step with `measure_s` the same way. Every rank measures its own
device at the same time as the others, as in training: on a CPU host the ranks share cores and memory bandwidth,
and the numbers say so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from autopar.planner.cost import BACKWARD_FACTOR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ComputeSample:
    op: str  # "matmul" | "layer_matmul" | "copy" | "add" | "tiny_add" | "attention" | one of TRANSCENDENTAL_OPS
    dtype: str  # "float32" | "bfloat16" | "float16"
    size: int  # n of an n x n x n matmul; M of a layer matmul; elements of a stream
    flops: float
    bytes_moved: float  # to and from device memory, counted as the roofline counts them
    seconds: float  # median wall time of one call (forward-equivalent for forward + backward samples)
    transcendentals: float = 0.0  # exp, tanh or erf evaluations among the flops (FAMILY_OF[op])


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes queued work finish: CUDA kernels run asynchronously, CPU ops are done when they return."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_s(fn: Callable[[], object], sync: Callable[[], None], budget_s: float, repeats: int = 3) -> float:
    """Median seconds per call of `fn`, over `repeats` timed batches that together take about `budget_s`.

    One untimed call warms caches and allocators (and picks cuBLAS/oneDNN kernels); its time sizes the batches so
    that a fast op is timed over many calls, well above the timer's resolution and the sync cost.
    """
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    calls = max(1, int(budget_s / repeats / max(first, 1e-9)))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


MAX_CALL_S = 0.5  # a matmul size whose single call would take longer is not measured (see matmul_samples)
FLUSH_BYTES = 128 * 2**20  # written before each cold call: more than any CPU's last-level cache or a GPU's L2


def measure_cold_s(fn: Callable[[], object], sync: Callable[[], None], flush: torch.Tensor, budget_s: float,
                   max_calls: int = 20) -> float:
    """Median seconds of single calls of `fn`, each after writing `flush` so that its operands come from memory,
    as in a training step, where other ops ran since a matmul's operands were last touched (the weights, since
    the previous step). On this kind of host that is ~10% slower than a loop whose operands stay in cache."""
    start = time.perf_counter()
    fn()
    sync()
    calls = max(3, min(max_calls, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    times = []
    for i in range(calls):
        flush.fill_(i)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_samples(device: torch.device, dtypes: list[str], sizes: list[int], budget_s: float) -> list[ComputeSample]:
    """n x n @ n x n per dtype and size (_mm_sample). A dtype the host has no fast path for (float16 on a CPU
    without it: ~3 GFLOP/s, a 2048^3 matmul 44 s) stops before the size whose call would take more than MAX_CALL_S,
    judged from the last size by its n^3 work: its peak is its best throughput at the sizes measured, and the
    profile keeps to its time budget."""
    sync, out = synchronizer(device), []
    flush = torch.empty(FLUSH_BYTES // 4, device=device)
    for name in dtypes:
        last = None
        for n in sizes:
            if last is not None and last[1] * (n / last[0]) ** 3 > MAX_CALL_S:
                break
            out.append(_mm_sample("matmul", device, name, (n, n, n), sync, flush, budget_s))
            last = (n, out[-1].seconds)
    return out


# Activation-shaped matmuls, [M, K] @ [K, N]: rows of tokens against a layer's weight, as training runs them. Cubes
# alone cannot tell a fixed cost per call (operand packing, cold caches) from a lower efficiency; these can, so
# the fit prices a small micro-batch's or a tensor-parallel shard's matmuls (fit.py: matmul_overhead_s).
SHAPED_MATMULS = tuple((m, k, n) for m in (128, 512, 2048) for k, n in ((256, 1024), (1024, 256)))


def shaped_matmul_samples(device: torch.device, dtype: str, budget_s: float,
                          shapes: tuple[tuple[int, int, int], ...] = SHAPED_MATMULS) -> list[ComputeSample]:
    """[M, K] @ [K, N] in the training dtype (_mm_sample; op "layer_matmul", size M)."""
    sync = synchronizer(device)
    flush = torch.empty(FLUSH_BYTES // 4, device=device)
    return [_mm_sample("layer_matmul", device, dtype, shape, sync, flush, budget_s) for shape in shapes]


def _mm_sample(op: str, device: torch.device, dtype: str, shape: tuple[int, int, int], sync, flush,
               budget_s: float) -> ComputeSample:
    """[M, K] @ [K, N], cache-cold (measure_cold_s): 2MKN FLOPs, MK + KN + MN elements read or written."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(DTYPES[dtype])
    b = torch.randn(k, n, device=device).to(DTYPES[dtype])
    seconds = measure_cold_s(lambda: torch.mm(a, b), sync, flush, budget_s)
    return ComputeSample(op, dtype, m, 2.0 * m * k * n, (m * k + k * n + m * n) * a.element_size(), seconds)


def stream_samples(device: torch.device, numels: list[int], budget_s: float) -> list[ComputeSample]:
    """float32 copy (1 read + 1 write) and out-of-place add (2 reads + 1 write) over buffers far larger than L2."""
    sync, out = synchronizer(device), []
    for numel in numels:
        x, y = torch.rand(numel, device=device), torch.rand(numel, device=device)
        z = torch.empty_like(x)
        copy_s = measure_s(lambda: z.copy_(x), sync, budget_s)
        add_s = measure_s(lambda: torch.add(x, y, out=z), sync, budget_s)
        out.append(ComputeSample("copy", "float32", numel, 0.0, 2.0 * 4 * numel, copy_s))
        out.append(ComputeSample("add", "float32", numel, float(numel), 3.0 * 4 * numel, add_s))
    return out


def launch_sample(device: torch.device, budget_s: float) -> ComputeSample:
    """A one-element add: no work to speak of, so its time is the per-op floor (dispatch, and launch on CUDA).

    The input requires grad, so the time includes recording the autograd graph, as every forward op in training
    does (on CPU that is about half the floor). On CUDA the batch is synchronised once at its end, so this is the
    launch throughput a stream of small kernels sees, which is what a training step's many small ops pay.
    """
    x = torch.ones(1, device=device, requires_grad=True)
    seconds = measure_s(lambda: torch.add(x, x), synchronizer(device), budget_s)
    return ComputeSample("tiny_add", "float32", 1, 1.0, 12.0, seconds)


# The planner prices a backward at BACKWARD_FACTOR (2) times its forward; samples of forward and backward together
# are stored as the forward that model implies, (fwd + bwd) / 3, so fitting them through the roofline gives the
# rates a training step sees, whatever the true split.
FWD_SHARE = 1.0 / (1.0 + BACKWARD_FACTOR)
# transcendental samples: what each evaluates
FAMILY_OF = {"gelu": "erf", "gelu_tanh": "tanh", "silu": "exp", "softmax": "exp"}
TRANSCENDENTAL_OPS = tuple(FAMILY_OF)


def attention_samples(device: torch.device, dtype: str, budget_s: float, batch_heads: tuple[int, int] = (4, 4),
                      seqs: tuple[int, ...] = (128, 256, 512), head_dim: int = 64) -> list[ComputeSample]:
    """Causal scaled-dot-product attention, forward and backward, [batch, heads, s, head_dim] at GPT-like shapes.
    FLOPs as strategies/nn_ops.py counts them (QK^T and PV, halved by the causal mask); bytes: q, k, v, out."""
    sync, out = synchronizer(device), []
    for s in seqs:
        q, k, v = (torch.randn(*batch_heads, s, head_dim, device=device, dtype=DTYPES[dtype], requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(*batch_heads, s, head_dim, device=device, dtype=DTYPES[dtype])

        def step():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(y, (q, k, v), grad)

        seconds = measure_s(step, sync, budget_s)
        flops = 4.0 * batch_heads[0] * batch_heads[1] * s * s * head_dim * 0.5
        out.append(ComputeSample("attention", dtype, s, flops, 4.0 * q.numel() * q.element_size(),
                                 seconds * FWD_SHARE))
    return out


def transcendental_samples(device: torch.device, budget_s: float, numel: int = 2**20) -> list[ComputeSample]:
    """GELU (erf), GELU's tanh approximation, SiLU (exp) and a row softmax over 1024 columns (exp), forward and
    backward, on a float32 activation-sized tensor; one transcendental per element. FLOPs as the strategies count
    them (softmax 5 per element), bytes one read and one write."""
    sync, out = synchronizer(device), []
    x = torch.randn(numel // 1024, 1024, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    ops = {"gelu": (F.gelu, 1.0), "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), 1.0),
           "silu": (F.silu, 1.0), "softmax": (lambda t: torch.softmax(t, -1), 5.0)}
    for name in TRANSCENDENTAL_OPS:
        fn, flops = ops[name]
        seconds = measure_s(lambda: torch.autograd.grad(fn(x), x, grad), sync, budget_s)
        out.append(ComputeSample(name, "float32", numel, flops * numel, 2.0 * 4 * numel, seconds * FWD_SHARE,
                                 transcendentals=float(numel)))
    return out


def fsdp_overhead_fit(mesh, reshard_after_forward: bool, budget_s: float,
                      widths: tuple[int, int] = (64, 256)) -> tuple[float, float]:
    """(seconds per parameter tensor, seconds per parameter byte) FSDP2 adds per step: `fsdp_overhead_s` at two
    layer widths, the line through them (each Linear holds a weight and a bias; bytes are their mean). Its copies
    in and out of the all-gather and reduce-scatter buffers grow with a parameter's size: at width 256 (gpt-tiny's
    size) it costs ~1.5x what it does at 64 on a CPU. Both clipped at 0."""
    sizes = [(w * w + w) * 4 / 2 for w in widths]
    times = [fsdp_overhead_s(mesh, reshard_after_forward, budget_s, width=w) for w in widths]
    per_byte = max(0.0, (times[1] - times[0]) / (sizes[1] - sizes[0]))
    return max(0.0, times[0] - per_byte * sizes[0]), per_byte


def fsdp_overhead_s(mesh, reshard_after_forward: bool, budget_s: float, units: int = 4, per_unit: int = 8,
                    width: int = 64) -> float:
    """Host seconds FSDP2 (autopar/runtime/zero.py's ZeRO-2/3) adds per parameter tensor per step, beyond its collectives:
    a toy of `units` blocks of `per_unit` small Linear layers trained (forward, backward, AdamW) plain and under
    `fully_shard` per block and root on `mesh`, a one-rank mesh, so the collectives move nothing and the
    difference is FSDP's own work (copies in and out of its buffers, DTensor dispatch in the optimizer). On a CPU
    it is ~0.2 ms per parameter, on the critical path; gpt-tiny has 68 parameters."""
    import copy

    from torch.distributed.fsdp import fully_shard

    plain = torch.nn.Sequential(*[torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(per_unit)])
                                  for _ in range(units)])
    sharded = copy.deepcopy(plain)
    for block in sharded:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=reshard_after_forward)
    x = torch.randn(16, width)
    times = []
    for model in (plain, sharded):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times.append(measure_s(step, lambda: None, budget_s))
    return max(0.0, times[1] - times[0]) / (2 * units * per_unit)
