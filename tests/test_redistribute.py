"""Tier 0: redistribution steps between placements, their forward collectives, their transposed backward, and
that applying them in order passes only through legal placements and ends at the target."""

from __future__ import annotations

import itertools

import pytest

from autopar.placement import P, R, S, Placement, fmt, parse
from autopar.redistribute import Step, steps


def apply(src, plan: list[Step]) -> list[list[Placement]]:
    """Every state a tensor passes through, checking that each step's forward makes sense where it runs."""
    state = list(src)
    states = [list(state)]
    for st in plan:
        here = state[st.axis]
        if st.kind == "all_gather":
            assert here == S(st.dim), f"{st} on {fmt(state)}"
            state[st.axis] = R
        elif st.kind == "slice":
            assert here == R, f"{st} on {fmt(state)}"
            state[st.axis] = S(st.dim)
        elif st.kind == "all_reduce":
            assert here == P, f"{st} on {fmt(state)}"
            state[st.axis] = R
        elif st.kind == "reduce_scatter":
            assert here == P, f"{st} on {fmt(state)}"
            state[st.axis] = S(st.dim)
        elif st.kind == "keep_one":
            assert here == R, f"{st} on {fmt(state)}"
            state[st.axis] = P
        else:
            assert st.kind == "identity", st
        states.append(list(state))
    return states


def legal(placements) -> bool:
    dims = [p.dim for p in placements if p.is_shard]
    return len(dims) == len(set(dims))


def kinds(plan: list[Step]) -> list[tuple[str, str | None]]:
    return [(st.kind, st.bwd) for st in plan]


# ---------------------------------------------------------------- one axis


@pytest.mark.parametrize("src, dst, expected", [
    ("S0", "R", [Step("all_gather", 0, 0, None)]),  # backward: take this rank's slice of the whole gradient
    ("R", "S1", [Step("slice", 0, 1, "all_gather")]),
    ("P", "R", [Step("all_reduce", 0)]),  # backward: the R gradient is already the gradient of every addend
    ("P", "S0", [Step("reduce_scatter", 0, 0, "all_gather")]),
    ("S1", "S0", [Step("all_gather", 0, 1, None), Step("slice", 0, 0, "all_gather")]),
    ("R", "P", [Step("keep_one", 0)]),
    ("S0", "P", [Step("all_gather", 0, 0, None), Step("keep_one", 0)]),
    ("S0", "S0", []),
    ("P", "P", []),
])
def test_single_axis_steps(src, dst, expected):
    assert steps(parse(src), parse(dst)) == expected


def test_shard_to_shard_gathers_before_it_slices():
    plan = steps((S(1),), (S(0),))
    assert [st.kind for st in plan] == ["all_gather", "slice"]
    assert apply((S(1),), plan)[1] == [R]


def test_replicated_input_whose_gradient_is_partial_gets_identity_forward_all_reduce_backward():
    # Megatron's f operator: x feeds a column-parallel linear, each rank's dx is a partial sum.
    assert steps((R,), (R,), [0]) == [Step("identity", 0, bwd="all_reduce")]


def test_gather_into_a_partial_gradient_consumer_fuses_to_reduce_scatter_backward():
    # Sequence parallelism's g-bar (Korthikanti et al. 2022): all-gather forward, reduce-scatter backward, one step.
    assert steps((S(1),), (R,), [0]) == [Step("all_gather", 0, 1, "reduce_scatter")]


def test_partial_gradient_axis_other_than_the_gathered_one_stays_a_separate_all_reduce():
    plan = steps((S(1), R), (R, R), [1])
    assert plan == [Step("all_gather", 0, 1, None), Step("identity", 1, bwd="all_reduce")]


def test_partial_input_reduced_to_replicated_with_a_partial_gradient_consumer():
    # P -> R all-reduce forward (identity backward), then the consumer's partial gradient needs its own all-reduce.
    assert kinds(steps((P,), (R,), [0])) == [("all_reduce", None), ("identity", "all_reduce")]


# ---------------------------------------------------------------- two axes


def test_swapping_a_shard_between_axes_gathers_before_slicing():
    src, dst = (S(0), R), (R, S(0))
    plan = steps(src, dst)
    assert plan == [Step("all_gather", 0, 0, None), Step("slice", 1, 0, "all_gather")]
    states = apply(src, plan)
    assert all(legal(s) for s in states), [fmt(s) for s in states]
    assert states[-1] == list(dst)


def test_2d_partial_and_shard_changes_together():
    src, dst = (P, S(1)), (S(1), R)  # reduce-scatter dim 1 on axis 0 needs axis 1 gathered first
    plan = steps(src, dst)
    assert [(st.kind, st.axis) for st in plan] == [("all_gather", 1), ("reduce_scatter", 0)]
    states = apply(src, plan)
    assert all(legal(s) for s in states) and states[-1] == list(dst)


def _legal_placements(rank: int, axes: int) -> list[tuple[Placement, ...]]:
    one = [R, P] + [S(d) for d in range(rank)]
    return [c for c in itertools.product(one, repeat=axes) if legal(c)]


@pytest.mark.parametrize("axes", [2, 3])
def test_every_legal_pair_reaches_its_target_through_legal_states_only(axes):
    placements = _legal_placements(3, axes)
    for src, dst in itertools.product(placements, repeat=2):
        for partial in ([], [a for a in range(axes) if dst[a] == R]):
            plan = steps(src, dst, partial)
            states = apply(src, plan)
            assert all(legal(s) for s in states), (fmt(src), fmt(dst), [fmt(s) for s in states])
            assert states[-1] == list(dst), (fmt(src), fmt(dst))
            changed = {a for a in range(axes) if src[a] != dst[a]}
            assert {st.axis for st in plan if st.kind != "identity"} == changed
            # every requested partial-gradient axis gets exactly one all-reduce-like backward
            grad = sorted(st.axis for st in plan if st.bwd in ("all_reduce", "reduce_scatter"))
            assert grad == sorted(partial), (fmt(src), fmt(dst), partial, plan)


def test_backward_of_each_forward_collective_is_its_transpose():
    transposes = {"all_gather": {None, "reduce_scatter"}, "slice": {"all_gather"}, "all_reduce": {None},
                  "reduce_scatter": {"all_gather"}, "keep_one": {None}, "identity": {"all_reduce"}}
    placements = _legal_placements(2, 2)
    seen = set()
    for src, dst in itertools.product(placements, repeat=2):
        for st in steps(src, dst, [a for a in range(2) if dst[a] == R]):
            assert st.bwd in transposes[st.kind], st
            seen.add(st.kind)
    assert seen == set(transposes)
