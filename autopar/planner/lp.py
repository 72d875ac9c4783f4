"""The ILP as HiGHS takes it: columns, rows of (variable, coefficient) pairs with bounds, a linear objective.

ShardingILP (ilp.py) builds tens of thousands of columns and rows per candidate, several candidates per plan. As pulp
expressions, each variable, expression and constraint is a Python object with names, hashes and registration, and
handing the model to HiGHS walks them again: about a third of the ILP's building time on Llama-3-8B. Here a
variable is a small slot object and a row a list, loaded into HiGHS in three array calls; `to_pulp` writes the same
model as a pulp problem, which CBC solves where highspy is missing (DESIGN decision 5) and which tests load into
HiGHS through pulp's own loader to check that both give HiGHS the same arrays. The model follows pulp's conventions
so the two stay the same problem: columns sorted by name, rows in the order added, a constant moved into the row's
bounds, and a row given the same variable twice keeps the later coefficient (as a pulp expression built from a
list of pairs does).

The solve (`solve`) takes the LP relaxation first: where its optimal vertex is integral it is the MIP's optimum (no
integral point is cheaper than the relaxation's optimum, and this one is integral), proven with no gap, and branch
and bound is skipped; where a cutoff (an incumbent's objective) is given and the relaxation cannot beat it, no
integral point can either; otherwise the MIP runs. The sharding ILPs' relaxations are often integral (u and y are
defined by the x's; the memory row is what makes them fractional), and HiGHS's MIP spends seconds in presolve,
probing and heuristics before it sees that.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from autopar.errors import PlanError

RELAXATION_FIRST = True  # tests turn it off to compare with the plain MIP


class Var:
    """A column: name, bounds (None: unbounded), integrality; `varValue` once solved."""

    __slots__ = ("name", "lowBound", "upBound", "integer", "varValue", "index")

    def __init__(self, name: str, low: float | None, up: float | None, integer: bool) -> None:
        self.name, self.lowBound, self.upBound, self.integer = name, low, up, integer
        self.varValue: float | None = None
        self.index = -1

    def value(self) -> float | None:
        return self.varValue

    def isBinary(self) -> bool:
        return self.integer and self.lowBound == 0 and self.upBound == 1

    def __repr__(self) -> str:
        return self.name


class Model:
    """Columns (`variable`), rows (`add`: lb <= sum c x <= ub, a term's variable may be the constant 1) and a
    minimised objective (`minimise`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.vars: list[Var] = []
        self.rows: list[tuple[dict, float | None, float | None, str | None]] = []
        self.objective: dict[Var, float] = {}
        self.constant = 0.0  # the objective's constant (not handed to HiGHS, as pulp does not)
        self._columns: list[Var] | None = None

    def variable(self, name: str, lowBound: float | None = None, upBound: float | None = None,
                 cat: str = "Continuous") -> Var:
        integer = cat in ("Binary", "Integer")
        if cat == "Binary":
            lowBound, upBound = 0, 1
        v = Var(name, lowBound, upBound, integer)
        self.vars.append(v)
        self._columns = None
        return v

    def add(self, terms, lb: float | None = None, ub: float | None = None, name: str | None = None) -> None:
        """The row lb <= sum(c x) <= ub over `terms` ((variable or the constant 1, coefficient) pairs, or a dict)."""
        items = terms.items() if isinstance(terms, dict) else terms
        constant, row = 0.0, {}
        for x, c in items:
            if isinstance(x, Var):
                row[x] = c
            else:
                constant += x * c
        self.rows.append((row, None if lb is None else lb - constant, None if ub is None else ub - constant, name))

    def minimise(self, terms: dict) -> None:
        self.objective = {x: c for x, c in terms.items() if isinstance(x, Var)}
        self.constant = float(sum(x * c for x, c in terms.items() if not isinstance(x, Var)))

    def columns(self) -> list[Var]:
        """The columns in pulp's order (by name), each with its `index`."""
        if self._columns is None:
            self._columns = sorted(self.vars, key=lambda v: v.name)
            for k, v in enumerate(self._columns):
                v.index = k
        return self._columns

    def numVariables(self) -> int:
        return len(self.vars)

    def numConstraints(self) -> int:
        return len(self.rows)

    def objective_value(self) -> float:
        total = self.constant  # summed in pulp's order (LpAffineExpression.value), to the last bit
        for x, c in self.objective.items():
            total += (x.varValue or 0.0) * c
        return total

    def to_pulp(self):
        """The same model as a pulp problem (the same variable names, rows, bounds and objective)."""
        import pulp

        prob = pulp.LpProblem(self.name, pulp.LpMinimize)
        new = prob.add_variable if hasattr(prob, "add_variable") else pulp.LpVariable  # PuLP >= 3.3: the former
        made = {v: new(v.name, v.lowBound, v.upBound, pulp.LpInteger if v.integer else pulp.LpContinuous)
                for v in self.vars}
        prob.setObjective(pulp.LpAffineExpression([(made[x], c) for x, c in self.objective.items()],
                                                  constant=self.constant))
        for row, lb, ub, name in self.rows:
            expr = pulp.LpAffineExpression([(made[x], c) for x, c in row.items()])
            if lb is not None and lb == ub:
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintEQ, rhs=lb), name)
            elif lb is not None:
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintGE, rhs=lb), name)
            else:
                prob.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintLE, rhs=ub), name)
        return prob, made


@dataclass
class Outcome:
    status: str  # "Optimal", "Not Solved" (stopped with or without an incumbent), "Infeasible", "Unbounded"
    has_incumbent: bool  # values were found (an optimum, or an incumbent when stopped early)
    relaxation_integral: bool = False  # solved by the LP relaxation alone
    outpriced_at: float | None = None  # the relaxation's objective, where it proved the cutoff unbeatable


def preload() -> None:
    """Import HiGHS now, where it is installed: the search forks processes that solve ILPs, and each would import
    it again (~35 ms apiece on a 2-core host)."""
    with contextlib.suppress(ImportError):
        importlib.import_module("highspy")


def solve(model: Model, time_limit_s: float, threads: int, gap: float, cutoff: float | None = None) -> Outcome:
    """Solve with HiGHS (CBC through pulp where highspy is missing); columns get their values. `cutoff`: an
    objective (without the constant) no solution of interest reaches.

    One thread by default: HiGHS's thread pool does not survive fork, and the search forks workers per mesh. The
    time limit is wall clock, so a loaded machine can stop a solve early ("Not Solved", with its incumbent); a
    deterministic limit exists (mip_max_nodes / mip_max_leaves count work), but HiGHS then ends with
    kSolutionLimit, which `_run` would first have to map."""
    try:
        import highspy
    except ImportError:
        return _solve_cbc(model, time_limit_s, gap)
    with _quiet_stdout():
        h = highspy.Highs()
        for key, value in (("output_flag", False), ("mip_rel_gap", gap), ("threads", threads),
                           ("time_limit", float(time_limit_s))):
            h.setOptionValue(key, value)
        integer = load(h, model)
        out = _run(h, integer, cutoff)
    if out.outpriced_at is None:
        values = h.getSolution().col_value
        for v in model.columns():
            v.varValue = values[v.index]
    return out


def load(h, model: Model) -> list[int]:
    """Hand the model to HiGHS `h` in three calls (columns, integrality, rows); the integer columns."""
    import highspy

    inf = highspy.kHighsInf
    columns = model.columns()
    n = len(columns)
    cost = np.array([model.objective.get(v, 0.0) for v in columns], dtype=np.float64)
    lower = np.array([-inf if v.lowBound is None else v.lowBound for v in columns], dtype=np.float64)
    upper = np.array([inf if v.upBound is None else v.upBound for v in columns], dtype=np.float64)
    h.addCols(n, cost, lower, upper, 0, np.zeros(n, dtype=np.int32), np.zeros(0, dtype=np.int32), np.zeros(0))
    integer = [v.index for v in columns if v.integer]
    if integer:
        h.changeColsIntegrality(len(integer), np.array(integer, dtype=np.int32),
                                np.full(len(integer), highspy.HighsVarType.kInteger.value, dtype=np.uint8))
    starts, index, value, row_lower, row_upper = [], [], [], [], []
    for row, lb, ub, _ in model.rows:
        starts.append(len(index))
        for v, a in row.items():
            if a != 0:
                index.append(v.index)
                value.append(a)
        row_lower.append(-inf if lb is None else lb)
        row_upper.append(inf if ub is None else ub)
    h.addRows(len(row_lower), np.array(row_lower, dtype=np.float64), np.array(row_upper, dtype=np.float64),
              len(index), np.array(starts, dtype=np.int32), np.array(index, dtype=np.int32),
              np.array(value, dtype=np.float64))
    return integer


def _run(h, integer: list[int], cutoff: float | None) -> Outcome:
    import highspy

    ms = highspy.HighsModelStatus
    if RELAXATION_FIRST and integer:
        h.setOptionValue("solve_relaxation", True)
        h.setOptionValue("presolve", "off")  # the relaxation's simplex alone is ~4x faster than with presolve here
        h.run()
        h.setOptionValue("presolve", "choose")
        h.setOptionValue("solve_relaxation", False)
        status = h.getModelStatus()
        if status == ms.kOptimal and _integral(h, integer):
            return Outcome("Optimal", True, relaxation_integral=True)
        bound = h.getInfo().objective_function_value
        if status == ms.kOptimal and cutoff is not None and bound >= cutoff * (1 + 1e-9):
            return Outcome("Optimal", False, outpriced_at=bound)  # no integral point beats the incumbent
        if status == ms.kInfeasible:  # no fractional point fits: no integral one
            return Outcome("Infeasible", False)
    h.run()
    status = h.getModelStatus()
    if status == ms.kOptimal:
        return Outcome("Optimal", True)
    if status in (ms.kInfeasible, ms.kUnboundedOrInfeasible):
        return Outcome("Infeasible", False)
    if status == ms.kUnbounded:
        return Outcome("Unbounded", False)
    found = h.getObjectiveValue() != float("inf") and \
        status in (ms.kObjectiveBound, ms.kObjectiveTarget, ms.kInterrupt, ms.kTimeLimit, ms.kIterationLimit)
    return Outcome("Not Solved", found)  # stopped early (a time limit): an incumbent, not proven optimal


def _integral(h, integer: list[int], tol: float = 1e-6) -> bool:
    """Every integer column of HiGHS's current solution within `tol` of an integer (HiGHS's own
    mip_feasibility_tolerance is 1e-6)."""
    values = h.getSolution().col_value
    return all(abs(values[k] - round(values[k])) <= tol for k in integer)


def _solve_cbc(model: Model, time_limit_s: float, gap: float) -> Outcome:
    import pulp

    prob, made = model.to_pulp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3.3 deprecates its bundled CBC (PuLP 4: COIN_CMD)
        solvers = [getattr(pulp, name) for name in ("PULP_CBC_CMD", "COIN_CMD") if hasattr(pulp, name)]
        cbc = next((s for s in solvers if s(msg=False).available()), None)
        if cbc is None:
            raise PlanError("no MIP solver: install highspy (pip install highspy), or CBC (pip install 'pulp[cbc]')")
        prob.solve(cbc(msg=False, timeLimit=time_limit_s, gapRel=gap))
    for v in model.vars:
        v.varValue = made[v].varValue
    status = pulp.LpStatus[prob.status]
    if status == "Optimal" and prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return Outcome("Not Solved", True)  # CBC's time limit with an incumbent
    return Outcome(status, status == "Optimal")


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints its banner to file descriptor 1 when it is created, before `output_flag` can turn logging
    off; the planner's output (and JSON piped from it) should not carry it."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
