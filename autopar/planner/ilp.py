"""The inner problem: one strategy per node on a fixed mesh, minimising predicted step time under a memory budget.

Redistribution is priced as codegen emits it (codegen/emit.py, DESIGN decision 12): one move per (producing node,
output, target placement), shared by every consumer that reads the value in that placement (q, k and v read one
all-gathered input), forward and transposed backward priced once. Moves are counted per edge group g (moves.py):
a producer owner's output with the consumer classes c (consumer owner, input position) one producing node feeds,
n_g producing nodes alike.

Variables (owners of repeated layers only; w = how many nodes share an owner):
    x[n,s] in {0,1}     node n uses strategy s;  x_n(o) = sum_{s: out(s)=o} x[n,s], sel_c(t) = sum_{s: in_c(s)=t} x[c,s]
    u[g,t] in [0,1]     the value exists in placement t: u >= sel_c(t) for each reader c of g, u <= sum_c sel_c(t)
                        (a single reader's sel_c(t) itself, the constant 1 where a reader has a single strategy)
    y[g,o,t] >= 0       the producer is at o and the move o -> t exists: sum_o y[g,o,t] = u[g,t], y[g,o,t] <= x_p(o)
                        (one reader class: the transport sum_t y = x_p(o), sum_o y = sel_c(t), which is tighter;
                        several: the cut sum_{t in targets(c)} y[g,o,t] >= x_p(o) per reader c, its row sums)
    z >= 0              gradient synchronisation left exposed after overlapping with backward
Minimise
    m * ( sum w_n c[n,s] x[n,s] + sum n_g r_g(o,t) y[g,o,t] )  +  G  -  (G - z)        (m micro-batches)
where c = forward + backward + exposed collectives of one micro-batch (+ the optimizer step of a parameter, once),
r = redistribution cost (forward and its transposed backward), G = parameter-gradient all-reduces (once per step)
and z >= G - f B, z >= (1 - f) G, B the backward compute of one micro-batch the runtime overlaps them with and f
the share of it that hides communication (the hardware's comm_overlap; 1 on GPUs). What only some readers of a
shared move ask for is priced on the OR (another u, y pair) of those readers: the forward move again when a reader
is recomputed in backward, and the copies a reader that saves its input keeps (the most any reader keeps).
Constraints
    sum_s x[n,s] = 1                                            add_choice_constraints
    the u, y definitions above                                  add_edge_constraints
    states + activations of one micro-batch <= budget           add_memory_constraint
      (pipeline stages: each term weighted by what one rank holds of it, planner/pipeline.py)
    z >= G - f B,  z >= (1 - f) G                               add_overlap_constraint
    x[n,s] = 0 for s outside a per-module pin (planner/pins.py)  add_pin_constraints
Edges whose producer has a single placement need no y (their price sits on u); a view takes its input as produced
(equal placements, no move). The prediction (predict.py) prices the chosen moves from the same groups.
"""

from __future__ import annotations

import time
from collections import defaultdict

from autopar.placement import R
from autopar.planner import lp
from autopar.planner.candidate import Solution
from autopar.planner.cost import (CostContext, NodeCost, edge_price, owner_costs, recomputed, saved_kinds,
                                  zero_sync)
from autopar.planner.footprint import Term, phases
from autopar.planner.footprint import terms as footprint_terms
from autopar.planner.graph import PlanGraph, PNode
from autopar.planner.moves import EdgeGroup, Role, Target, edge_groups, role, takes_as_produced, target

MIP_GAP = 1e-3  # stop within 0.1% of the optimum: far below the cost model's own accuracy
OUTPRICED = "Outpriced"  # Solution.status of a solve its cutoff ended (ShardingILP.solve)


class ShardingILP:
    def __init__(self, pg: PlanGraph, ctx: CostContext, budget_bytes: float, micro_batches: int = 1,
                 pinned: dict[str, list[int]] | None = None, objective: str = "time", weight=None):
        self.pg, self.ctx, self.budget, self.m = pg, ctx, budget_bytes, micro_batches
        self.weight = weight or _unit  # (owner, part) -> share of that memory term one device holds
        self.objective = objective  # "time" (step time), or "memory": the least memory any plan needs
        self.pinned = pinned or {}  # owner -> the strategy indices its pins allow
        for p in pg.owners():  # a tensor's unused second name (a tied weight) costs nothing anywhere: replicated,
            if p.kind in ("param", "buffer") and not p.node.users and len(p.strategies) > 1:  # not a solver's tie
                whole = [k for k, s in enumerate(p.strategies) if all(t == R for t in s.outs[0])]
                self.pinned = {**self.pinned, p.node.name: whole} if whole else self.pinned
        self.prob = lp.Model("autopar_sharding")
        self.costs: dict[str, list[NodeCost]] = {}
        self.x: dict[str, list] = {}
        self.time_terms: dict = defaultdict(float)  # variable (or constant 1) -> seconds, per step
        self.sync_terms: dict = defaultdict(float)  # same, parameter-gradient collectives (overlappable)
        self.memory_terms: dict = defaultdict(float)  # same, bytes per device
        self.n_y = 0
        self._ids: dict = {}  # edge signature or placement -> small int (keys of _raw_prices)
        self._raw_prices: dict = {}  # (signature, out, in) -> edge_price and zero_sync's split, unscaled
        self._price_nodes()
        self.terms = footprint_terms(pg, ctx, self.costs)
        self.add_choice_constraints()
        self.add_edge_constraints()
        self.add_memory_constraint()
        self.add_overlap_constraint()
        self.add_pin_constraints()

    # -- variables ------------------------------------------------------------------------------------------
    def _price_nodes(self) -> None:
        costs = owner_costs(self.pg, self.ctx)
        for p in self.pg.owners():
            name = p.node.name
            self.costs[name] = costs[name]
            self.x[name] = [self._var(f"x_{i}_{k}", cat="Binary") if len(p.strategies) > 1 else 1
                            for k in range(len(p.strategies)) for i in [len(self.x)]]

    def _var(self, name: str, lowBound: float | None = None, cat: str = "Continuous", upBound: float | None = None):
        return self.prob.variable(name, lowBound=lowBound, upBound=upBound, cat=cat)

    # -- constraints ----------------------------------------------------------------------------------------
    def add_choice_constraints(self) -> None:
        for owner, xs in self.x.items():
            if len(xs) > 1:
                self.prob.add([(x, 1.0) for x in xs], 1.0, 1.0, f"one_{owner}")
        for owner, cs in self.costs.items():
            w = self.pg.counts[owner] * self.m
            self._add_time(owner, [w * (c.fwd_s + c.bwd_s) + self.pg.counts[owner] * c.step_s for c in cs])
        for t in self.terms:
            if t.part == "recompute_s":  # checkpointed blocks run their forward again in backward
                self._add_time(t.owner, [self.m * v for v in t.values])

    def _add_time(self, owner: str, values: list[float], terms: dict | None = None) -> None:
        terms = self.time_terms if terms is None else terms
        for v, x in zip(values, self.x[owner]):
            if v:
                terms[x] += v  # x may be the constant 1 for single-strategy nodes

    def add_edge_constraints(self) -> None:
        pg = self.pg
        for prod, k, cons, j in edge_classes(pg):
            if takes_as_produced(pg, prod, k, cons):
                outs = [s.outs[k] for s in pg.nodes[prod].strategies]
                self._add_equal_placement(prod, outs, cons, [s.ins[j] for s in pg.nodes[cons].strategies])
        for g in edge_groups(pg):
            if len(g.readers) == 1:
                self._add_edge(g)
            else:
                self._add_shared(g)

    def _add_edge(self, g: EdgeGroup) -> None:
        """One reader class: a transport between the producer's and the consumer's placements (y's), or the price
        folded into the other node's x's where one side has a single placement."""
        (cons, j), pp = g.readers[0], self.pg.nodes[g.producer]
        outs = [s.outs[g.k] for s in pp.strategies]
        ins = [target(pp, s, j) for s in self.pg.nodes[cons].strategies]
        uo, ui = list(dict.fromkeys(outs)), list(dict.fromkeys(ins))
        r = role(self.pg, self.ctx, g, cons, j)
        held_mult = r.held * self.weight(cons, "activations")
        price = self._edge_prices(pp, g.k, uo, ui, g.count, r.held > 0, held_mult, r.rerun)  # [a][b]: uo[a] -> ui[b]
        at_out = _positions(outs, uo)  # strategy of the producer -> index of its placement in uo
        at_in = _positions(ins, ui)
        for part, terms in enumerate((self.time_terms, self.sync_terms, self.memory_terms)):
            if len(uo) == 1:
                self._add_time(cons, [price[0][b][part] for b in at_in], terms)
            elif len(ui) == 1:
                self._add_time(g.producer, [price[a][0][part] for a in at_out], terms)
        if len(uo) > 1 and len(ui) > 1:
            self._add_transport(g.producer, at_out, cons, at_in, price)

    def _add_shared(self, g: EdgeGroup) -> None:
        """Several reader classes: per target placement t, the move into t exists when any reader chooses t
        (u_t = OR of their choices) and is priced once. Parts that only some readers ask for (the recomputed
        readers' second forward move, the copies a saving reader keeps) are priced on the OR of those readers."""
        pp = self.pg.nodes[g.producer]
        outs = [s.outs[g.k] for s in pp.strategies]
        uo = list(dict.fromkeys(outs))
        wanted: dict[Target, list[tuple[list, Role, str]]] = defaultdict(list)
        asks: dict[str, list[Target]] = {}  # reader class -> the targets it can choose
        for cons, j in g.readers:
            xs, r = self.x[cons], role(self.pg, self.ctx, g, cons, j)
            ts = [target(pp, s, j) for s in self.pg.nodes[cons].strategies]
            asks[(cons, j)] = list(dict.fromkeys(ts))
            for t in asks[(cons, j)]:
                wanted[t].append(([(x, 1.0) for x, mine in zip(xs, ts) if mine == t], r, cons))
        split = {}  # target -> its y's per source placement, where the move is priced through y's
        for t, readers in wanted.items():
            rerun = [sel for sel, r, _ in readers if r.rerun]
            levels = sorted({r.held for _, r, _ in readers})
            base, again, kept = (self._edge_prices(pp, g.k, uo, [t], g.count, keep, 1.0, rr) if need else None
                                 for keep, rr, need in ((False, False, True), (False, True, bool(rerun)),
                                                        (True, False, levels[-1] > 0)))
            extra = [(a[0][0] - b[0][0], 0.0, 0.0) for a, b in zip(again or base, base)]  # the recomputation's move
            w = self.weight(max(readers, key=lambda r: r[1].held)[2], "activations")
            held = [k[0][2] * w for k in kept] if kept else [0.0] * len(uo)  # bytes of one kept copy, per source
            first = [(b[0][0] + (e[0] if len(rerun) == len(readers) else 0.0), b[0][1], levels[0] * h)
                     for b, e, h in zip(base, extra, held)]
            split[t] = self._add_move([sel for sel, _, _ in readers], first, g.producer, outs, uo)
            if rerun and len(rerun) < len(readers):
                self._add_move(rerun, extra, g.producer, outs, uo)
            for below, level in zip(levels, levels[1:]):  # max over readers of copies kept, level by level
                self._add_move([sel for sel, r, _ in readers if r.held >= level],
                               [(0.0, 0.0, (level - below) * h) for h in held], g.producer, outs, uo)
        # Each reader reads one of its targets: from wherever the producer is, the moves into its targets add up to
        # at least the producer's placement (the transport's row sums, a valid cut that tightens the relaxation).
        picked = _grouped(self.x[g.producer], _positions(outs, uo), len(uo))
        for ts in asks.values():
            if all(split.get(t) for t in ts):
                for a, xs in enumerate(picked):
                    self.prob.add([(split[t][a], 1.0) for t in ts] + [(x, -1.0) for x in xs], lb=0.0)

    def _add_move(self, sels: list[list[tuple]], price: list[tuple], prod: str, outs: list, uo: list) -> list | None:
        """A move into one target, made when any of `sels` is chosen, priced price[a] from placement uo[a]:
        y_a = (producer at uo[a]) AND (some reader chose the target), as sum_a y_a = u, y_a <= x_p(uo[a]); the y's
        (None where the price needs none: one source placement, the same price from each, or no price)."""
        if not any(any(v) for v in price):
            return None
        u = self._any(sels)
        parts = (self.time_terms, self.sync_terms, self.memory_terms)
        at_out = _positions(outs, uo)
        if len(uo) == 1 or all(v == price[0] for v in price):
            priced, ys = [(u, price[0])], None
        elif isinstance(u[0][0], int):  # a reader with a single strategy: the move always exists
            for part, terms in enumerate(parts):
                self._add_time(prod, [price[a][part] for a in at_out], terms)
            return None
        else:
            priced, ys = [], []
            for a, xs in enumerate(_grouped(self.x[prod], at_out, len(uo))):
                y = self._var(f"y_{self.n_y}", lowBound=0)
                self.n_y += 1
                self.prob.add([(y, 1.0)] + [(x, -1.0) for x in xs], ub=0.0)
                priced.append(([(y, 1.0)], price[a]))
                ys.append(y)
            self._add_balance([(y, 1.0) for y in ys] + [(x, -c) for x, c in u])
        for selected, values in priced:
            for part, terms in enumerate(parts):
                for x, c in selected:
                    if values[part]:
                        terms[x] += c * values[part]
        return ys

    def _any(self, sels: list[list[tuple]]) -> list[tuple]:
        """Terms equal to 1 when any selection holds: a selection itself, the constant 1, or u in [0, 1] with
        u >= each selection and u <= their sum."""
        if any(isinstance(x, int) for sel in sels for x, _ in sel):
            return [(1, 1.0)]
        sels = list({tuple(id(x) for x, _ in sel): sel for sel in sels}.values())
        if len(sels) == 1:
            return sels[0]
        u = self._var(f"u_{self.n_y}", lowBound=0, upBound=1)
        self.n_y += 1
        for sel in sels:
            self.prob.add([(u, 1.0)] + [(x, -c) for x, c in sel], lb=0.0)
        self.prob.add([(u, 1.0)] + [(x, -c) for sel in sels for x, c in sel], ub=0.0)
        return [(u, 1.0)]

    def _add_equal_placement(self, prod, outs, cons, ins) -> None:
        """A view costs nothing and moves no data, so resharding is never needed right before it: the view takes
        its input as produced, and any redistribution happens on the view's output instead. Equality constraints
        replace the edge's transport variables (the largest share of the ILP otherwise); on Llama-3-8B this costs
        at most ~2% of predicted step time and saves ~40% of planning time."""
        uo = list(dict.fromkeys(outs))
        for o in uo:
            terms = _indicator(self.x[prod], outs, o, 1.0) + [(x, -1.0) for x, inp in zip(self.x[cons], ins)
                                                             if inp == o]
            self.prob.add(terms, 0.0, 0.0)
        allowed = set(uo)
        for x, inp in zip(self.x[cons], ins):
            if inp not in allowed and not isinstance(x, int):
                self.prob.add([(x, 1.0)], 0.0, 0.0)

    def _edge_prices(self, pp: PNode, k: int, uo: list, ui: list, mult: int, kept: bool, held_mult: float,
                     rerun: bool = False) -> list[list[tuple[float, float, float]]]:
        """(exposed seconds, gradient-sync seconds, bytes kept) per step for one edge class, for every producer
        placement uo[a] (rows) and consumer (placement, partial axes) ui[b] (columns). Edge classes repeat the same
        tensor between the same placements (q, k and v read one input): edge_price is looked up once per distinct
        pair, by small integer keys, rather than by hashing the cost context and placements for each class."""
        shape, dtype = pp.info.out_shapes[k], pp.info.out_dtypes[k]
        sig = self._ids.setdefault((shape, dtype, pp.requires_grad, pp.kind == "param", kept, rerun), len(self._ids))
        o_ids = [self._ids.setdefault(("out", o), len(self._ids)) for o in uo]
        i_ids = [self._ids.setdefault(("in", i), len(self._ids)) for i in ui]
        raw, ctx, m = self._raw_prices, self.ctx, self.m
        rows = []
        for o, oid in zip(uo, o_ids):
            row = []
            for i, iid in zip(ui, i_ids):
                got = raw.get((sig, oid, iid))
                if got is None:
                    exposed, sync, held = edge_price(ctx, shape, dtype, pp.requires_grad, pp.kind == "param", o,
                                                     i[0], i[1], kept, rerun)
                    got = raw[(sig, oid, iid)] = (exposed, *zero_sync(ctx, sync), held)
                exposed, sync, after_step, held = got
                row.append((m * mult * exposed + mult * after_step, mult * sync, held_mult * held))
            rows.append(row)
        return rows

    def _add_transport(self, prod: str, at_out: list[int], cons: str, at_in: list[int], price: list[list]) -> None:
        """y[a][b] >= 0 moves the tensor from placement a to b; the y's of row a sum to the producer's x's at a, of
        column b to the consumer's x's at b. Built as plain (variable, coefficient) lists: this is most of the ILP."""
        y = []
        for row in price:
            ys = []
            for values in row:
                v = self._var(f"y_{self.n_y}", lowBound=0)
                self.n_y += 1
                if values[0]:
                    self.time_terms[v] = values[0]
                if values[1]:
                    self.sync_terms[v] = values[1]
                if values[2]:
                    self.memory_terms[v] = values[2]
                ys.append(v)
            y.append(ys)
        picked_out = _grouped(self.x[prod], at_out, len(y))
        picked_in = _grouped(self.x[cons], at_in, len(y[0]))
        for ys, xs in zip(y, picked_out):  # sum_b y[a,b] - sum_{s: out(s)=a} x[p,s] == 0
            self._add_balance([(v, 1.0) for v in ys] + [(x, -1.0) for x in xs])
        for b, xs in enumerate(picked_in):
            self._add_balance([(ys[b], 1.0) for ys in y] + [(x, -1.0) for x in xs])

    def _add_balance(self, terms: list[tuple]) -> None:
        self.prob.add(terms, 0.0, 0.0)

    def memory_exprs(self) -> dict[str, dict]:
        """Bytes per device at backward start and at backward end (footprint.py); parameters kept gathered for a
        consumer's backward (edge terms, already in memory_terms) count at the start."""
        at = {"start": self.memory_terms, "end": defaultdict(float)}
        for t in self.terms:
            w = self.weight(t.owner, t.part)
            for phase in phases(t.part, self.m):
                self._add_time(t.owner, [w * v for v in t.values], at[phase])
        return at

    def memory_lower_bound(self) -> float:
        return memory_lower_bound(self.pg, self.ctx, self.terms, self.weight, micro_batches=self.m)

    def add_memory_constraint(self) -> None:
        self.peak = self._var("peak_bytes", lowBound=0)
        for phase, terms in self.memory_exprs().items():
            self.prob.add(terms, ub=self.budget, name=f"memory_{phase}")
            self.prob.add([(self.peak, 1.0)] + [(x, -v) for x, v in terms.items()], lb=0.0, name=f"peak_{phase}")

    def add_pin_constraints(self) -> None:
        for owner, keep in self.pinned.items():
            for k, x in enumerate(self.x[owner]):
                if k not in keep and not isinstance(x, int):
                    self.prob.add([(x, 1.0)], 0.0, 0.0, f"pin_{owner}_{k}")

    def add_overlap_constraint(self) -> None:
        bwd: dict = defaultdict(float)
        for owner, cs in self.costs.items():
            self._add_time(owner, [self.pg.counts[owner] * c.bwd_s for c in cs], bwd)
        self.z = self._var("z_exposed_sync", lowBound=0)
        f = self.ctx.hw.comm_overlap  # cost_models.comm.exposed_s, linearised: z >= G - f B and z >= (1 - f) G
        hidden = dict(self.sync_terms)  # G - f B, summed per variable
        for x, v in bwd.items():
            hidden[x] = hidden.get(x, 0.0) - f * v
        self.prob.add([(self.z, 1.0)] + [(x, -v) for x, v in hidden.items()], lb=0.0, name="overlap")
        if f < 1.0:
            self.prob.add([(self.z, 1.0)] + [(x, -(1.0 - f) * v) for x, v in self.sync_terms.items()], lb=0.0,
                          name="overlap_share")
        self.prob.minimise({**self.time_terms, self.z: 1.0} if self.objective == "time" else {self.peak: 1.0})

    # -- solve ----------------------------------------------------------------------------------------------
    def solve(self, time_limit_s: float = 30.0, threads: int = 1, cutoff_s: float | None = None) -> Solution | None:
        """The optimal strategies (None: nothing fits the budget). `cutoff_s`, optional, is the objective of a plan
        already found (an incumbent, where this objective is the plan's predicted step time): when the LP relaxation
        proves that no solution here is faster, branch and bound is skipped and the status is OUTPRICED, with the
        relaxation's bound as objective_s. Exact: the bound is below every integral solution."""
        cutoff = None if cutoff_s is None else cutoff_s - self.prob.constant
        t0 = time.perf_counter()
        out = lp.solve(self.prob, time_limit_s, threads, MIP_GAP, cutoff)
        elapsed = time.perf_counter() - t0
        size = (self.prob.numVariables(), self.prob.numConstraints())
        if out.outpriced_at is not None:
            return Solution({}, OUTPRICED, out.outpriced_at + self.prob.constant, elapsed, *size)
        self.relaxation_integral = out.relaxation_integral  # solved without branching
        timed_out_with_incumbent = out.status == "Not Solved" and out.has_incumbent and _has_values(self.x)
        if out.status != "Optimal" and not timed_out_with_incumbent:  # infeasible (memory), or nothing in time
            return None
        choice = {}
        for owner, xs in self.x.items():
            vals = [x if isinstance(x, int) else (x.value() or 0.0) for x in xs]
            choice[owner] = max(range(len(vals)), key=vals.__getitem__)
        return Solution(choice, out.status, self.prob.objective_value(), elapsed, *size)


def _unit(owner: str, part: str) -> float:
    return 1.0


def memory_lower_bound(pg: PlanGraph, ctx: CostContext, all_terms: list[Term], weight=_unit,
                       micro_batches: int = 1) -> float:
    """No plan needs less: at each moment of the peak (footprint.py), every node at its least-memory strategy,
    and every parameter at the storage that minimises its state plus the copies its consumers keep gathered.
    `weight(owner, part)` scales a term (a pipeline rank's share; an extrapolation from a shallow copy)."""
    users: dict[str, list[tuple[PNode, int]]] = defaultdict(list)
    for u in pg.owners():
        for j, (prod, _) in enumerate(u.inputs):
            if pg.nodes[prod].kind == "param":
                users[prod].append((u, j))
    best = 0.0
    for phase in ("start", "end"):
        per: dict[str, list[float]] = {}
        for t in all_terms:
            if phase not in phases(t.part, micro_batches):
                continue
            p = pg.nodes[t.owner]
            w = weight(t.owner, t.part)
            row = per.setdefault(t.owner, [0.0] * len(p.strategies))
            for k, v in enumerate(t.values):
                row[k] += w * v
        total = sum(_least(pg, ctx, owner, row, weight, users[owner]) if phase == "start" else min(row)
                    for owner, row in per.items())
        best = max(best, total)
    return best


def _least(pg: PlanGraph, ctx: CostContext, owner: str, row: list[float], weight, users) -> float:
    """A node's least bytes; a parameter's with the copies its consumers keep gathered: at least the largest any
    one consumer keeps (consumers reading the same placement share one copy, moves.py), one per parameter, or one
    at a time inside checkpointed blocks."""
    p = pg.nodes[owner]
    if p.kind != "param":
        return min(row)
    n = pg.counts[owner] * weight(owner, "params")
    return min(row[k] + max((0.0, *((1 if recomputed(ctx, user) else n) *
                                    min(edge_price(ctx, p.info.out_shapes[0], p.info.out_dtypes[0], False, True,
                                                   s.outs[0], t.ins[j], (), "inputs" in saved_kinds(user))[2]
                                        for t in user.strategies) for user, j in users)))
               for k, s in enumerate(p.strategies))


def edge_classes(pg: PlanGraph) -> dict[tuple, int]:
    """(producer owner, output index, consumer owner, input position) -> multiplicity."""
    classes: dict[tuple, int] = defaultdict(int)
    for p in pg.nodes.values():
        for j, (prod, k) in enumerate(p.inputs):
            classes[(pg.nodes[prod].owner, k, p.owner, j)] += 1
    return classes


def _positions(keys: list, unique: list) -> list[int]:
    """For each key, its index in `unique` (its distinct values, in order)."""
    index = {key: n for n, key in enumerate(unique)}
    return [index[key] for key in keys]


def _grouped(xs: list, at: list[int], n: int) -> list[list]:
    """xs split by position: group a holds the x's (in order) whose key is unique[a]."""
    groups: list[list] = [[] for _ in range(n)]
    for x, a in zip(xs, at):
        groups[a].append(x)
    return groups


def _indicator(xs: list, keys: list, key, coef: float) -> list[tuple]:
    """Terms selecting the strategies whose placement is `key` (constant 1 for single-strategy nodes)."""
    return [(x, coef) for x, k in zip(xs, keys) if k == key]


def _has_values(x: dict[str, list]) -> bool:
    return all(any(not isinstance(v, int) and v.value() for v in xs) for xs in x.values() if len(xs) > 1)
