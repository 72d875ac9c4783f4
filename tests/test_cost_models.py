"""Tier 0: cost models as pure functions: shipped hardware numbers, roofline, ring collectives, axis→link, and
the error a user sees for each kind of malformed hardware file."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from autopar.cost_models import (
    COLLECTIVES,
    Link,
    available_hardware,
    axis_links,
    collective_time_s,
    load_hardware,
    op_time_s,
)
from autopar.cost_models.hardware import HARDWARE_DIR, SCHEMA, UNIT_SUFFIXES
from autopar.errors import HardwareError, MeshError

A100, H100 = load_hardware("a100-80gb-sxm"), load_hardware("h100-80gb-sxm")

# ---------------------------------------------------------------- shipped files


def test_available_hardware_lists_the_three_shipped_files():
    assert available_hardware() == ["a100-80gb-sxm", "cpu", "h100-80gb-sxm"]


@pytest.mark.parametrize("name", ["a100-80gb-sxm", "cpu", "h100-80gb-sxm"])
def test_every_shipped_file_loads_by_name_and_by_path_and_names_itself(name):
    by_name = load_hardware(name)
    assert by_name == load_hardware(str(HARDWARE_DIR / f"{name}.toml"))
    assert by_name.name == name
    assert by_name.memory_reserve_bytes < by_name.memory_bytes
    # Fast links must be fast: a file that swapped the two sections would invert every plan.
    assert by_name.intra_node.bandwidth_bytes_per_s >= by_name.inter_node.bandwidth_bytes_per_s
    hash(by_name)  # usable as a cache key


def test_a100_numbers_match_the_datasheet():
    assert A100.peak_flops("bfloat16") == 312e12
    assert A100.peak_flops("float16") == 312e12
    assert A100.peak_flops("float32") == 19.5e12
    assert A100.memory_bandwidth_bytes_per_s == 2039e9
    assert A100.memory_bytes == 80_000_000_000 and isinstance(A100.memory_bytes, int)
    assert A100.devices_per_node == 8
    assert A100.intra_node == Link("intra_node", 5e-6, 230e9)
    assert A100.inter_node == Link("inter_node", 10e-6, 24e9)


def test_h100_numbers_match_the_datasheet():
    assert H100.peak_flops("bfloat16") == 989e12
    assert H100.memory_bandwidth_bytes_per_s == 3350e9
    assert H100.memory_bytes == 80_000_000_000
    assert H100.devices_per_node == 8
    assert H100.intra_node.bandwidth_bytes_per_s == 370e9
    assert H100.inter_node.bandwidth_bytes_per_s == 46e9


def test_cpu_plans_default_to_float32_training():
    # The profiled cpu file reports this host's bf16 matmul peak (AMX); training on CPU ranks stays fp32 unless
    # asked, because the parity tests compare against fp32 eager runs.
    from autopar.planning import make_plan

    plan = make_plan("gpt-tiny", devices=1, hardware="cpu", batch=2)
    assert plan.dtype == "float32" and plan.precision == "fp32"


def test_peak_flops_accepts_torch_dtypes_and_rejects_unknown_ones():
    torch = pytest.importorskip("torch")
    assert A100.peak_flops(torch.bfloat16) == A100.peak_flops("torch.bfloat16") == 312e12
    with pytest.raises(HardwareError, match=r"a100-80gb-sxm.*'int8'.*bfloat16, float16, float32"):
        A100.peak_flops("int8")


def test_every_dimensional_schema_field_names_its_unit():
    def fields(schema, prefix=""):
        for key, kind in schema.items():
            yield from fields(kind, f"{prefix}{key}.") if isinstance(kind, dict) else [(prefix + key, kind)]

    unitless = [name for name, kind in fields(SCHEMA) if kind.dimensional and not name.endswith(UNIT_SUFFIXES)]
    assert unitless == []


# ---------------------------------------------------------------- roofline


def test_big_matmul_is_compute_bound_at_peak_times_efficiency():
    m = n = k = 8192
    flops, nbytes = 2 * m * n * k, 2 * (m * k + k * n + m * n)
    t = op_time_s(A100, flops, nbytes, "bfloat16", unit="matmul")
    expected = flops / (312e12 * A100.matmul_efficiency) + A100.launch_overhead_s
    assert t == pytest.approx(expected)
    assert t > 10 * nbytes / (A100.memory_bandwidth_bytes_per_s * A100.memory_efficiency)


def test_matmul_time_depends_on_dtype_peak():
    flops, nbytes = 2 * 4096**3, 1e6
    fp32 = op_time_s(A100, flops, nbytes, "float32", unit="matmul") - A100.launch_overhead_s
    bf16 = op_time_s(A100, flops, nbytes, "bfloat16", unit="matmul") - A100.launch_overhead_s
    assert fp32 / bf16 == pytest.approx(312 / 19.5, rel=1e-3)


def test_elementwise_op_is_bandwidth_bound():
    numel = 64 * 2**20
    nbytes = 3 * 2 * numel  # bf16 add: two reads, one write
    t = op_time_s(A100, numel, nbytes, "bfloat16", unit="vector")
    expected = nbytes / (2039e9 * A100.memory_efficiency) + A100.launch_overhead_s
    assert t == pytest.approx(expected)


def test_non_matmul_ops_accept_integer_and_bool_dtypes():
    assert op_time_s(A100, 0, 8e6, "int64", unit="vector") > A100.launch_overhead_s


def test_zero_work_costs_nothing_and_tiny_work_costs_a_launch():
    assert op_time_s(A100, 0, 0, "bfloat16", unit="vector") == 0.0
    assert op_time_s(A100, 0, 0, "bfloat16", unit="matmul") == 0.0
    assert op_time_s(A100, 1, 4, "float32", unit="vector") == pytest.approx(A100.launch_overhead_s, rel=1e-3)


def test_negative_work_is_a_caller_bug():
    with pytest.raises(ValueError):
        op_time_s(A100, -1, 0, "float32", unit="vector")


# ---------------------------------------------------------------- collectives

NVLINK = Link("intra_node", 5e-6, 230e9)


def test_all_reduce_costs_twice_all_gather_for_large_messages():
    # Ring all-reduce = reduce-scatter + all-gather (Thakur et al. 2005), so 2x the bytes and 2x the steps.
    nbytes = 1e9
    ar = collective_time_s("all_reduce", nbytes, 8, NVLINK)
    ag = collective_time_s("all_gather", nbytes, 8, NVLINK)
    rs = collective_time_s("reduce_scatter", nbytes, 8, NVLINK)
    assert ar == pytest.approx(2 * ag) and ag == pytest.approx(rs)
    assert ar == pytest.approx(2 * 7 * 5e-6 + 2 * 7 / 8 * nbytes / 230e9)


def test_bandwidth_term_approaches_twice_bytes_over_bw_as_group_grows():
    ar_2 = collective_time_s("all_reduce", 1e9, 2, Link("x", 0.0, 1e9))
    ar_64 = collective_time_s("all_reduce", 1e9, 64, Link("x", 0.0, 1e9))
    assert ar_2 == pytest.approx(1.0) and ar_64 == pytest.approx(2 * 63 / 64)


def test_single_rank_or_empty_collective_is_free():
    for kind in COLLECTIVES:
        assert collective_time_s(kind, 1e9, 1, NVLINK) == 0.0
        assert collective_time_s(kind, 0, 8, NVLINK) == 0.0


def test_latency_dominates_tiny_messages():
    t = collective_time_s("all_reduce", 4, 8, NVLINK)
    latency = 2 * 7 * NVLINK.latency_s
    assert latency <= t < 1.001 * latency


def test_send_recv_is_one_hop_and_all_to_all_keeps_one_nth():
    assert collective_time_s("send_recv", 46e9, 2, H100.inter_node) == pytest.approx(1 + 10e-6)
    assert collective_time_s("all_to_all", 8e9, 8, Link("x", 0.0, 1e9)) == pytest.approx(7.0)


def test_a_collective_fitted_alone_uses_its_own_latency_and_bandwidth():
    """gloo runs all-gather 2-4x slower per byte than all-reduce; a profile's per-collective fit prices it so."""
    link = Link("x", 1e-4, 2e9, kinds={"all_gather": (4e-4, 0.5e9)})
    assert collective_time_s("all_gather", 8e9, 2, link) == pytest.approx(4e-4 + 0.5 * 8e9 / 0.5e9)
    assert collective_time_s("all_reduce", 8e9, 2, link) == pytest.approx(2 * 1e-4 + 8e9 / 2e9)  # the link's
    assert collective_time_s("all_gather", 8e9, 2, link.without_latency()) == pytest.approx(0.5 * 8e9 / 0.5e9)


def test_per_collective_tables_load_from_a_hardware_file(tmp_path):
    text = (HARDWARE_DIR / "a100-80gb-sxm.toml").read_text() + textwrap.dedent("""
        [links.intra_node.reduce_scatter]
        latency_s = 3e-5
        latency_s_source = "a profile run"
        bandwidth_bytes_per_s = 1e11
        bandwidth_bytes_per_s_source = "a profile run"
        """)
    path = tmp_path / "hw.toml"
    path.write_text(text)
    hw = load_hardware(path)
    assert hw.intra_node.alpha_beta("reduce_scatter") == (3e-5, 1e11)
    assert hw.intra_node.alpha_beta("all_reduce") == (A100.intra_node.latency_s, A100.intra_node.bandwidth_bytes_per_s)
    assert hw.inter_node.kinds == {}


def test_unknown_collective_is_a_value_error():
    with pytest.raises(ValueError, match="broadcast.*all_reduce"):
        collective_time_s("broadcast", 1e6, 8, NVLINK)


# ---------------------------------------------------------------- axis -> link


def test_tp_inside_node_dp_across_nodes():
    links = axis_links(A100, [("dp", 4), ("tp", 8)])
    assert links == {"dp": A100.inter_node, "tp": A100.intra_node}


def test_pure_dp_over_four_nodes_is_inter_node():
    assert axis_links(A100, [("dp", 32), ("tp", 1)]) == {"dp": A100.inter_node, "tp": A100.intra_node}


def test_small_mesh_inside_one_node_is_all_intra_node():
    assert axis_links(A100, [("dp", 2), ("tp", 4)]) == {"dp": A100.intra_node, "tp": A100.intra_node}


def test_pipeline_outermost_crosses_nodes():
    links = axis_links(A100, [("pp", 2), ("dp", 4), ("tp", 2)])
    assert links == {"pp": A100.inter_node, "dp": A100.intra_node, "tp": A100.intra_node}


def test_group_that_straddles_a_node_boundary_is_inter_node():
    # tp=3 groups are ranks 0-2, 3-5, 6-8: the third crosses from node 0 into node 1.
    assert axis_links(A100, [("dp", 4), ("tp", 3)])["tp"] == A100.inter_node
    # With a single node (world 6 <= 8) no group can straddle.
    assert axis_links(A100, [("dp", 2), ("tp", 3)])["tp"] == A100.intra_node


def test_bad_degrees_are_mesh_errors():
    with pytest.raises(MeshError, match="'tp'.*>= 1"):
        axis_links(A100, [("dp", 2), ("tp", 0)])
    with pytest.raises(MeshError, match="distinct"):
        axis_links(A100, [("dp", 2), ("dp", 4)])


# ---------------------------------------------------------------- malformed files

GOOD = (HARDWARE_DIR / "a100-80gb-sxm.toml").read_text()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(HardwareError) as info:
        load_hardware(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_a_copy_of_a_shipped_file_loads_from_a_user_path(tmp_path):
    assert load_hardware(_write(tmp_path, GOOD)) == A100


def test_toml_syntax_error_names_the_line(tmp_path):
    line = GOOD.splitlines().index("devices_per_node = 8") + 1
    message = _error(tmp_path, GOOD.replace("devices_per_node = 8", "devices_per_node = = 8"))
    assert "not valid TOML" in message and f"line {line}" in message


def test_missing_field_is_named_with_its_section(tmp_path):
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith("matmul_efficiency"))
    assert "missing field 'compute.matmul_efficiency'" in _error(tmp_path, text)


def test_missing_link_section_is_named(tmp_path):
    text = GOOD[: GOOD.index("[links.inter_node]")]
    assert "missing field 'links.inter_node'" in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("old", "new", "field", "need"),
    [
        ("bandwidth_bytes_per_s = 230e9", "bandwidth_bytes_per_s = 0", "links.intra_node.bandwidth_bytes_per_s", "> 0"),
        ("latency_s = 10e-6", "latency_s = -1e-6", "links.inter_node.latency_s", ">= 0"),
        ("efficiency = 0.8", "efficiency = 1.5", "memory.efficiency", "(0, 1]"),
        ("devices_per_node = 8", 'devices_per_node = "8"', "devices_per_node", "whole number"),
        ("capacity_bytes = 80_000_000_000", "capacity_bytes = 80.5", "memory.capacity_bytes", "whole number"),
        ("matmul_efficiency = 0.5", "matmul_efficiency = true", "compute.matmul_efficiency", "(0, 1]"),
        ("peak_float32_flops_per_s = 19.5e12", "peak_float32_flops_per_s = nan", "compute.peak_float32", "> 0"),
    ],
)
def test_invalid_value_names_field_and_what_is_expected(tmp_path, old, new, field, need):
    assert old in GOOD
    message = _error(tmp_path, GOOD.replace(old, new, 1))
    assert f"field '{field}" in message and need in message


def test_typo_in_a_key_is_rejected_with_a_suggestion(tmp_path):
    message = _error(tmp_path, GOOD.replace("launch_overhead_s", "launch_overhed_s"))
    assert "unknown field 'compute.launch_overhed_s'" in message and "did you mean 'launch_overhead_s'" in message


def test_unknown_top_level_key_is_rejected(tmp_path):
    message = _error(tmp_path, "frequency = 1.4e9\n" + GOOD)
    assert "unknown field 'frequency' in the top level" in message


def test_unknown_link_section_lists_the_known_links(tmp_path):
    text = GOOD + "\n[links.infiniband]\nlatency_s = 1e-6\nbandwidth_bytes_per_s = 1e9\n"
    message = _error(tmp_path, text)
    assert "unknown field 'links.infiniband' in [links]" in message
    assert "inter_node" in message and "intra_node" in message


def test_unsupported_schema_version(tmp_path):
    assert "schema_version = 2 is not supported" in _error(tmp_path, GOOD.replace("schema_version = 1", "schema_version = 2"))


def test_unknown_hardware_name_lists_available_names():
    with pytest.raises(HardwareError, match=r"unknown hardware 'a100'; available: a100-80gb-sxm, cpu, h100-80gb-sxm"):
        load_hardware("a100")


def test_missing_file_path_says_so(tmp_path):
    with pytest.raises(HardwareError, match="does not exist"):
        load_hardware(str(tmp_path / "nope.toml"))


def test_loaded_numbers_are_finite():
    for name in available_hardware():
        hw = load_hardware(name)
        assert all(math.isfinite(v) and v > 0 for v in hw.peak_flops_per_s.values())
