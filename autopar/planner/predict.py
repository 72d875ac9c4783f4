"""Predictions of a solved plan, recomputed from the chosen strategies (not read off the solver's objective), and
the conversion of a search result into a `Plan`."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from autopar.placement import fmt, shard_factor
from autopar.plan import NodeDecision, Plan, Prediction
from autopar.planner.cost import edge_price, node_cost, saved_kinds
from autopar.planner.ilp import edge_classes
from autopar.strategies import grad_partial_axes

if TYPE_CHECKING:
    from autopar.planner.search import Candidate, SearchRequest


def chosen(c: "Candidate", name: str):
    p = c.graph.nodes[name]
    return p.strategies[c.solution.choice[p.owner]]


def predict(req: "SearchRequest", c: "Candidate") -> Prediction:
    """Step time and memory of the chosen strategies, priced afresh (the solver's objective is not trusted)."""
    pg, m, ctx = c.graph, c.micro_batches, c.ctx
    compute = bwd = act = states = inputs = flops = param_bytes = 0.0
    for owner in pg.owners():
        cost = node_cost(ctx, owner, chosen(c, owner.node.name))
        n = pg.counts[owner.node.name]
        compute += n * m * (cost.fwd_s + cost.bwd_s)
        bwd += n * cost.bwd_s
        act += n * cost.activation_bytes if owner.kind == "op" else 0.0
        inputs += n * cost.activation_bytes if owner.kind != "op" else 0.0
        states += n * cost.state_bytes
    for p in pg.nodes.values():
        if p.kind == "param" and p.node.users:
            param_bytes += states_to_param_bytes(p, c)
        if p.kind == "op" and p.rule is not None and p.info.out_shapes:
            flops += p.rule.flops(p.info.in_shapes, p.info.out_shapes, p.info)
    exposed = sync = 0.0
    moves: dict[tuple, tuple[int, bool]] = {}  # consumers needing the same placement share one move (emit.py)
    for (prod, k, cons, j), mult in edge_classes(pg).items():
        pp, s_c = pg.nodes[prod], chosen(c, cons)
        partial = tuple(grad_partial_axes(s_c, j)) if pp.requires_grad else ()
        key = (prod, k, s_c.ins[j], partial)
        seen, kept = moves.get(key, (0, False))
        moves[key] = (max(seen, mult), kept or "inputs" in saved_kinds(pg.nodes[cons]))
    for (prod, k, dst, partial), (mult, kept) in moves.items():
        pp = pg.nodes[prod]
        e, s, held = edge_price(ctx, pp.info.out_shapes[k], pp.info.out_dtypes[k], pp.requires_grad,
                                pp.kind == "param", chosen(c, prod).outs[k], dst, partial, kept)
        exposed, sync, act = exposed + m * mult * e, sync + mult * s, act + mult * held
    sync_exposed = max(0.0, sync - bwd)
    step = compute + exposed + sync_exposed
    model_flops = 3.0 * flops * m  # forward + backward (2x)
    grads = param_bytes
    parts = {"params": param_bytes, "grads": grads, "optimizer_state": states - param_bytes - grads,
             "activations": act, "inputs": inputs}
    return Prediction(step_time_s=step, compute_s=compute, exposed_comm_s=exposed, grad_sync_s=sync,
                      grad_sync_exposed_s=sync_exposed, memory_bytes_per_device=states + act + inputs,
                      memory_parts=parts, tokens_per_s=req.batch * req.seq / step if step else math.inf,
                      tflops_per_device=model_flops / step / req.devices / 1e12 if step else 0.0,
                      model_flops_per_step=model_flops)


def states_to_param_bytes(p, c: "Candidate") -> float:
    """Bytes of the (local) parameter itself, in its dtype, out of the 16 per parameter of model state."""
    s = chosen(c, p.node.name)
    local = math.prod(p.info.out_shapes[0]) / shard_factor(s.outs[0], c.graph.degrees)
    return local * p.info.out_dtypes[0].itemsize



def to_plan(req: "SearchRequest", best: "Candidate", budget: float, stats: dict, others: list[dict]) -> Plan:
    pg = best.graph
    decisions, params, fallbacks = {}, {}, Counter()
    for name, p in pg.nodes.items():
        if p.kind == "output":
            continue
        s = chosen(best, name)
        decisions[name] = NodeDecision(op=str(p.node.target) if p.kind == "op" else p.kind, module=p.module,
                                       outs=[fmt(o) for o in s.outs], ins=[fmt(i) for i in s.ins])
        if p.kind == "param":
            params[p.fqn] = fmt(s.outs[0])
        if p.fallback:
            fallbacks[str(p.node.target)] += 1
    return Plan(model=req.model, n_params=req.n_params, graph_fingerprint=fingerprint(pg), hardware=req.hardware.name,
                devices=req.devices, axis_names=list(pg.axis_names),
                degrees={**dict(zip(pg.axis_names, pg.degrees)), "pp": 1, "cp": 1}, batch=req.batch,
                seq=req.seq, micro_batch_size=req.batch // best.micro_batches,
                num_micro_batches=best.micro_batches, dtype=req.dtype, zero=int(req.fix.get("zero", 0)),
                ac=str(req.fix.get("ac", "none")), precision=str(req.fix.get("precision", "fp32")), memory_budget_bytes=budget, params=params,
                strategies=decisions, predicted=predict(req, best), solver=stats, fallback_ops=dict(fallbacks),
                alternatives=others)


def fingerprint(pg) -> str:
    """Stable hash of the traced graph's ops and shapes: a plan only applies to the graph it was made for."""
    import hashlib

    h = hashlib.sha256()
    for name, p in pg.nodes.items():
        h.update(f"{name}|{p.node.target}|{p.info.out_shapes}|{p.info.in_shapes}\n".encode())
    return h.hexdigest()[:16]
