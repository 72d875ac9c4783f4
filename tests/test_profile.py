"""`autopar profile`: the fits recover known parameters from synthetic timings (tier 0), the file it writes is the
shipped schema with a source on every number, and a real --quick run on 2 gloo ranks writes a file that plans."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from autopar.cli.main import main
from autopar.cost_models import COLLECTIVES, Link, collective_time_s, load_hardware, op_time_s
from autopar.cost_models.hardware import numeric_fields
from autopar.profile.collectives import CommSample, OverlapSample, message_bytes
from autopar.profile.fit import FIT_FLOOR_BYTES, _roofline_hardware, fit_alpha_beta, fit_compute, merge_ranks
from autopar.profile.measure import ProfileConfig, RankMeasurements, link_layout
from autopar.profile import microbench
from autopar.profile.microbench import FAMILY_OF, SHAPED_MATMULS, ComputeSample
from autopar.profile.write import build_profile, render_toml, write_profile

ROOT = Path(__file__).resolve().parents[1]
GLOO = Link("intra_node", 150e-6, 1.2e9)
SIZES = [4**k for k in range(1, 14)]


def _comm(link: Link, group_sizes=(2, 4), noise: float = 0.0, seed: int = 0) -> list[CommSample]:
    rng = np.random.default_rng(seed)
    return [CommSample(link.name, kind, n, nbytes,
                       collective_time_s(kind, nbytes, n, link) * (1 + noise * rng.standard_normal()))
            for kind in COLLECTIVES for n in group_sizes for nbytes in SIZES]


# ---------------------------------------------------------------- alpha-beta


def test_fit_recovers_alpha_and_beta_exactly_from_model_timings():
    fit = fit_alpha_beta(_comm(GLOO))
    assert fit.latency_s == pytest.approx(150e-6, rel=1e-9)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1.2e9, rel=1e-9)
    large = [n for n in SIZES if n >= FIT_FLOOR_BYTES]  # what training sends; the small ones scatter on gloo
    assert fit.rms_rel_error < 1e-9 and fit.samples == len(COLLECTIVES) * 2 * len(large)


def test_small_messages_do_not_bend_the_fit_of_the_sizes_training_sends():
    # latency-bound messages measured 2x their model time (a busy host's wake-ups) leave the fit unchanged ...
    noisy = [replace(s, seconds=2 * s.seconds) if s.nbytes < FIT_FLOOR_BYTES else s for s in _comm(GLOO)]
    fit = fit_alpha_beta(noisy)
    assert (fit.latency_s, fit.bandwidth_bytes_per_s) == pytest.approx((150e-6, 1.2e9), rel=1e-9)
    # ... unless fewer than 3 sizes reach the floor: then every sample counts
    few = [s for s in _comm(GLOO) if s.nbytes <= 4 * FIT_FLOOR_BYTES]
    assert fit_alpha_beta(few).samples == len(few)


def test_fit_recovers_nvlink_like_numbers_through_5_percent_noise():
    nvlink = Link("intra_node", 5e-6, 230e9)
    fit = fit_alpha_beta(_comm(nvlink, group_sizes=(8,), noise=0.05))
    assert fit.latency_s == pytest.approx(5e-6, rel=0.05)
    assert fit.bandwidth_bytes_per_s == pytest.approx(230e9, rel=0.05)
    assert 0.02 < fit.rms_rel_error < 0.08  # the noise, not a model misfit


def test_zero_latency_fits_as_zero_not_negative():
    fit = fit_alpha_beta(_comm(Link("x", 0.0, 1e9), noise=0.01))
    assert fit.latency_s >= 0.0
    assert fit.bandwidth_bytes_per_s == pytest.approx(1e9, rel=0.02)


def test_times_that_do_not_grow_with_size_are_refused():
    flat = [CommSample("intra_node", "all_reduce", 2, nbytes, 1e-3) for nbytes in SIZES]
    with pytest.raises(ValueError, match="do not grow with message size"):
        fit_alpha_beta(flat[:1] + [replace(flat[-1], seconds=1e-9)])


def test_message_sizes_give_every_rank_whole_float32_elements():
    assert message_bytes(4, 2) == 8 and message_bytes(100, 4) == 112 and message_bytes(64, 4) == 64


# ---------------------------------------------------------------- compute


def _compute_samples(hw, sizes=(256, 512, 1024, 2048)) -> list[ComputeSample]:
    out = [ComputeSample("tiny_add", "float32", 1, 1.0, 12.0, hw.launch_overhead_s)]
    for dtype in ("float32", "bfloat16", "float16"):
        for n in sizes:
            flops, nbytes = 2.0 * n**3, 3.0 * n * n * 4
            out.append(ComputeSample("matmul", dtype, n, flops, nbytes, op_time_s(hw, flops, nbytes, dtype, "matmul")))
    for numel in (2**21, 2**23):
        out.append(ComputeSample("copy", "float32", numel, 0.0, 8.0 * numel,
                                 op_time_s(hw, 0.0, 8.0 * numel, "float32", "vector")))
    return out


def test_compute_fit_reproduces_timings_made_by_the_roofline():
    true = replace(_roofline_hardware({"float32": 150e9, "bfloat16": 1.2e12, "float16": 150e9}, 16e9, 2e-6),
                   matmul_efficiency=0.9, memory_efficiency=0.8)
    fit = fit_compute(_compute_samples(true))
    assert fit.launch_overhead_s == 2e-6
    # Peak and efficiency are confounded (only their product is observable): the fit puts the best measured
    # throughput in the peak, so the efficiency comes out ~1 and the product is the true one.
    assert fit.peak_flops_per_s["float32"] * fit.matmul_efficiency == pytest.approx(150e9 * 0.9, rel=0.01)
    assert fit.memory_bandwidth_bytes_per_s * fit.memory_efficiency == pytest.approx(16e9 * 0.8, rel=0.01)
    assert fit.matmul_rms_rel_error < 0.01 and fit.stream_rms_rel_error < 0.01


def test_matmul_efficiency_and_per_call_overhead_are_recovered_from_layer_shaped_timings():
    # t = F / (peak * 0.8) + 90 us, as on a CPU: small matmuls run at a lower share of the peak than large ones
    peaks = {"float32": 100e9, "bfloat16": 100e9, "float16": 100e9}
    samples = [ComputeSample("tiny_add", "float32", 1, 1.0, 12.0, 0.0),
               ComputeSample("copy", "float32", 2**23, 0.0, 2**26, 2**26 / 10e9)]
    for dtype in peaks:
        for m, k, n in [(n, n, n) for n in (256, 512, 1024)] + list(SHAPED_MATMULS):
            samples.append(ComputeSample("matmul", dtype, m, 2.0 * m * k * n, 0.0, 2.0 * m * k * n / 80e9 + 90e-6))
    fit = fit_compute(samples)
    assert fit.peak_flops_per_s["float32"] * fit.matmul_efficiency == pytest.approx(80e9, rel=0.01)
    assert fit.matmul_overhead_s == pytest.approx(90e-6, rel=0.05) and fit.matmul_rms_rel_error < 0.01
    # and a matmul the profile never ran is priced through both
    hw = replace(_roofline_hardware(fit.peak_flops_per_s, 10e9, 0.0), matmul_efficiency=fit.matmul_efficiency,
                 matmul_overhead_s=fit.matmul_overhead_s)
    flops = 2.0 * 128 * 256 * 768
    assert op_time_s(hw, flops, 0.0, "float32", "matmul") == pytest.approx(flops / 80e9 + 90e-6, rel=0.02)


def test_matmul_times_without_a_fixed_cost_fit_no_overhead():
    # Throughput falling with size (the opposite of a fixed cost) cannot be explained by one: the overhead clips
    # at 0 and the efficiency is the closed-form least-squares fraction.
    peaks = {"float32": 100e9, "bfloat16": 100e9, "float16": 100e9}
    samples = [ComputeSample("tiny_add", "float32", 1, 1.0, 12.0, 0.0),
               ComputeSample("copy", "float32", 2**23, 0.0, 2**26, 2**26 / 10e9)]
    for dtype in peaks:
        for n, e in ((256, 1.0), (512, 0.8), (1024, 0.5)):
            samples.append(ComputeSample("matmul", dtype, n, 2.0 * n**3, 0.0, 2.0 * n**3 / (100e9 * e)))
    # Minimise sum(((x k - y) / y)^2) over k = 1/eff, with x = F/peak and y = t: k = sum(x/y) / sum((x/y)^2).
    # Here x/y is e_n (the fitted peak is the best throughput, 100e9), so eff = 1/k = sum(e^2) / sum(e).
    ratios = np.array([1.0, 0.8, 0.5] * 3)
    fit = fit_compute(samples)
    assert fit.matmul_overhead_s == 0.0
    assert fit.matmul_efficiency == pytest.approx((ratios**2).sum() / ratios.sum(), abs=1e-3)


def test_attention_and_transcendental_rates_are_recovered_from_roofline_timings():
    true = replace(_roofline_hardware({"float32": 100e9, "bfloat16": 200e9, "float16": 100e9}, 40e9, 2e-6),
                   matmul_efficiency=0.9, memory_efficiency=0.7, attention_efficiency=0.3,
                   special_per_s={"exp": 1.5e9, "tanh": 0.3e9, "erf": 0.5e9})
    samples = _compute_samples(true)
    for s in (128, 256, 512):
        flops, nbytes = 4.0 * 16 * s * s * 64 * 0.5, 4.0 * 16 * s * 64 * 4
        samples.append(ComputeSample("attention", "float32", s, flops, nbytes,
                                     op_time_s(true, flops, nbytes, "float32", "attention")))
    for op, per in (("gelu", 1.0), ("gelu_tanh", 1.0), ("silu", 1.0), ("softmax", 5.0)):
        n = 2.0**20
        family = FAMILY_OF[op]
        samples.append(ComputeSample(op, "float32", int(n), per * n, 8.0 * n,
                                     op_time_s(true, per * n, 8.0 * n, "float32", "transcendental", n, family), n))
    fit = fit_compute(samples)
    peak = fit.peak_flops_per_s["float32"]
    assert fit.attention_efficiency * peak == pytest.approx(0.3 * 100e9, rel=0.01)
    assert fit.per_s == pytest.approx({"exp": 1.5e9, "tanh": 0.3e9, "erf": 0.5e9}, rel=0.01)  # grid 1% apart
    assert fit.attention_rms_rel_error < 0.01 and max(fit.per_s_rms_rel_error.values()) < 0.01


def test_transcendental_rate_that_never_binds_is_the_least_that_does_not():
    # A GPU-like device: memory bounds gelu long before its special-function units do.
    true = _roofline_hardware({"float32": 60e12, "bfloat16": 900e12, "float16": 900e12}, 3e12, 3e-6)
    samples = _compute_samples(true)
    n = 2.0**20
    samples.append(ComputeSample("gelu", "float32", int(n), n, 8.0 * n,
                                 op_time_s(true, n, 8.0 * n, "float32", "vector"), n))
    fit = fit_compute(samples)
    memory_time = 8.0 * n / (fit.memory_bandwidth_bytes_per_s * fit.memory_efficiency)
    assert n / fit.per_s["erf"] <= memory_time <= 1.02 * n / fit.per_s["erf"] and "exp" not in fit.per_s


@pytest.mark.parametrize("compute_s, comm_s, both_s, fraction", [
    (0.020, 0.020, 0.020, 1.0),  # together as long as either: all hidden
    (0.020, 0.020, 0.040, 0.0),  # the sum: nothing hidden
    (0.020, 0.010, 0.025, 0.5),  # half of the shorter hidden
    (0.020, 0.020, 0.050, 0.0),  # slower than the sum (contention): clamped
])
def test_overlap_fraction_is_the_hidden_share_of_the_shorter(compute_s, comm_s, both_s, fraction):
    assert OverlapSample("intra_node", 2**24, compute_s, comm_s, both_s).fraction == pytest.approx(fraction)


@pytest.mark.parametrize("per_param, per_byte", [(150e-6, 1e-9), (200e-6, 0.0)])
def test_fsdp_host_work_splits_into_per_parameter_and_per_byte(monkeypatch, per_param, per_byte):
    # FSDP2's toy timed at two widths (each Linear: a w x w weight and a w bias, bytes their mean)
    def toy(mesh, reshard, budget_s, width):
        return per_param + per_byte * (width * width + width) * 4 / 2

    monkeypatch.setattr(microbench, "fsdp_overhead_s", toy)
    got = microbench.fsdp_overhead_fit(None, True, 0.1)
    assert got == pytest.approx((per_param, per_byte), rel=1e-9, abs=1e-15)


def test_fsdp_host_work_that_shrinks_with_size_clips_to_no_per_byte_cost(monkeypatch):
    monkeypatch.setattr(microbench, "fsdp_overhead_s", lambda mesh, reshard, budget_s, width: 1e-4 * 64 / width)
    per_param, per_byte = microbench.fsdp_overhead_fit(None, False, 0.1)
    assert per_byte == 0.0 and per_param == pytest.approx(1e-4)


def test_ranks_merge_by_median_per_measurement():
    s = ComputeSample("matmul", "float32", 256, 1.0, 1.0, 1.0)
    merged = merge_ranks([[s], [replace(s, seconds=3.0)], [replace(s, seconds=2.0)]])
    assert merged == [replace(s, seconds=2.0)]


# ---------------------------------------------------------------- layout and file


def test_one_host_measures_intra_node_only_and_two_hosts_measure_both():
    assert link_layout(["a", "a"]) == {"intra_node": [[0, 1]]}
    assert link_layout(["a", "a", "b", "b"]) == {"intra_node": [[0, 1], [2, 3]], "inter_node": [[0, 2], [1, 3]]}
    assert link_layout(["a", "b"]) == {"inter_node": [[0, 1]]}


def _synthetic_profile(tmp_path: Path):
    true = replace(_roofline_hardware({"float32": 150e9, "bfloat16": 1.2e12, "float16": 150e9}, 16e9, 2e-6),
                   matmul_efficiency=0.9, memory_efficiency=0.8)
    ranks = [RankMeasurements(r, "host-a", "Test CPU", _compute_samples(true), _comm(GLOO, group_sizes=(2,)),
                              25_000_000_000, 23_000_000_000) for r in range(2)]
    provenance = {"date": "2026-01-02T03:04:05+00:00", "host": "host-a", "torch_version": "2.13.0",
                  "backend": "gloo", "world_size": 2, "command": "autopar profile --out x.toml"}
    return build_profile(ranks, "test-cpu", 8, "--devices-per-node 8", ProfileConfig(), provenance)


def test_written_file_loads_with_a_source_on_every_number(tmp_path):
    out = tmp_path / "x.toml"
    profile = _synthetic_profile(tmp_path)
    write_profile(profile, out)
    hw = load_hardware(out)
    assert hw.name == "test-cpu" and hw.devices_per_node == 8
    assert hw.intra_node.latency_s == pytest.approx(150e-6, rel=1e-3)
    assert hw.inter_node == replace(hw.intra_node, name="inter_node")  # one host: a copy, and it says so
    per_collective = {f"links.{link}.{kind}.{f}" for link in ("intra_node", "inter_node") for kind in COLLECTIVES
                      for f in ("latency_s", "bandwidth_bytes_per_s")}
    assert set(hw.sources) == set(numeric_fields()) | per_collective | {"compute.matmul_overhead_s"}
    assert all(s.startswith("autopar profile 2026-01-02 host-a") for s in hw.sources.values())
    assert "not measured (one host)" in hw.sources["links.inter_node.bandwidth_bytes_per_s"]
    assert hw.memory_bytes == 25_000_000_000 and hw.memory_reserve_bytes == 2_000_000_000
    assert hw.provenance["world_size"] == 2
    assert "all_gather alone: latency" in render_toml(profile)
    assert "triton_kernels = false" in render_toml(profile) and not hw.triton_kernels  # gloo ranks: CPUs
    for kind, fit in profile.per_kind["intra_node"].items():  # each collective priced with its own fit
        assert hw.intra_node.alpha_beta(kind) == pytest.approx((fit.latency_s, fit.bandwidth_bytes_per_s), rel=1e-3)


def test_a_collective_whose_times_do_not_grow_takes_the_links_joint_fit(tmp_path):
    true = _roofline_hardware({"float32": 150e9, "bfloat16": 1.2e12, "float16": 150e9}, 16e9, 2e-6)
    comm = [replace(s, seconds=1e-3) if s.kind == "send_recv" else s for s in _comm(GLOO, group_sizes=(2,))]
    ranks = [RankMeasurements(r, "host-a", "Test CPU", _compute_samples(true), comm, 25_000_000_000,
                              23_000_000_000) for r in range(2)]
    provenance = {"date": "2026-01-02T03:04:05+00:00", "host": "host-a", "torch_version": "2.13.0",
                  "backend": "gloo", "world_size": 2}
    profile = build_profile(ranks, "test-cpu", 8, "--devices-per-node 8", ProfileConfig(), provenance)
    joint = profile.links["intra_node"]
    assert profile.per_kind["intra_node"]["send_recv"].latency_s == joint.latency_s
    assert "send_recv alone: latency" in render_toml(profile) and "the link's joint fit" in render_toml(profile)
    write_profile(profile, tmp_path / "x.toml")
    assert load_hardware(tmp_path / "x.toml").intra_node.alpha_beta("send_recv")[0] == pytest.approx(
        joint.latency_s, rel=1e-3)


# ---------------------------------------------------------------- the command


def test_profile_refuses_one_rank_and_a_non_toml_out(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["profile", "--out", str(tmp_path / "x.toml"), "--nproc", "1"]) == 2
    assert "needs at least 2: pass --nproc 2" in capsys.readouterr().err
    assert main(["profile", "--out", str(tmp_path / "x.json"), "--nproc", "2"]) == 2
    assert "must end in .toml" in capsys.readouterr().err
    assert main(["profile", "--out", str(tmp_path / "no" / "x.toml"), "--nproc", "2"]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "autopar.cli.main", "profile"],
    "spawn": [sys.executable, "-m", "autopar.cli.main", "profile", "--nproc", "2"],
}


@pytest.mark.dist
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_quick_profile_on_two_gloo_ranks_writes_a_file_that_plans(tmp_path, capsys, launcher):
    out = tmp_path / "here.toml"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*LAUNCHERS[launcher], "--out", str(out), "--quick", "--name", "here"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[4/5] intra_node collectives" in proc.stdout and f"wrote {out}" in proc.stdout
    hw = load_hardware(out)
    assert hw.name == "here" and hw.provenance["world_size"] == 2 and hw.provenance["backend"] == "gloo"
    assert set(hw.intra_node.kinds) == set(COLLECTIVES)  # each collective fitted alone
    per_collective = {f"links.{link}.{kind}.{f}" for link in ("intra_node", "inter_node") for kind in COLLECTIVES
                      for f in ("latency_s", "bandwidth_bytes_per_s")}
    measured = {f"compute.{f}" for f in ("matmul_overhead_s", "attention_efficiency", "exp_per_s", "tanh_per_s",
                                         "erf_per_s", "comm_overlap")}
    measured |= {f"runtime.zero{z}_per_{u}_s" for z in (2, 3) for u in ("param", "byte")}
    assert set(hw.sources) == set(numeric_fields()) | per_collective | measured == hw.fields
    assert hw.intra_node.bandwidth_bytes_per_s > 1e6 and hw.peak_flops("float32") > 1e9
    assert 0 < hw.attention_efficiency <= 1 and 0 <= hw.comm_overlap <= 1 and hw.matmul_overhead_s >= 0
    # the peak's comment names the cubes it was measured over, the layer shapes' M not among them
    assert "float32 matmul throughput over n x n x n, n = 256..1024 and [M, K] @ [K, N] layer shapes" in \
        out.read_text()
    assert set(hw.special_per_s) == {"exp", "tanh", "erf"} and min(hw.special_per_s.values()) > 1e6
    assert set(hw.zero_per_param_s) == set(hw.zero_per_byte_s) == {2, 3}
    assert all(v >= 0 for v in [*hw.zero_per_param_s.values(), *hw.zero_per_byte_s.values()])
    assert main(["plan", "gpt-tiny", "--devices", "2", "--batch", "2", "--hardware", str(out)]) == 0
    assert "predicted step time" in capsys.readouterr().out
