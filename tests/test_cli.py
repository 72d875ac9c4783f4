"""`autopar plan` as a user meets it: what it prints and saves, and the one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from autopar.cli.main import main
from autopar.cli.report import groups, reading, seconds
from autopar.errors import AutoparError
from autopar.fixspec import parse_fix, parse_memory, parse_mesh, planner_fix
from autopar.plan import NodeDecision, Plan, Prediction

TINY = ["plan", "gpt-tiny", "--hardware", "cpu", "--batch", "8"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_the_mesh_and_step_time_it_saves(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, err = _run(capsys, *TINY, "--devices", "4", "--json", str(path))
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert {"degrees", "predicted"} <= saved.keys()
    predicted = saved["predicted"]
    assert {"step_time_s", "memory_bytes_per_device", "tokens_per_s"} <= predicted.keys()
    degrees = saved["degrees"]
    assert degrees["pp"] * degrees["dp"] * degrees["tp"] == 4
    # The printed numbers are the saved ones, not a second computation.
    pipeline = f"pp={degrees['pp']} " if degrees["pp"] > 1 else ""
    assert f"{pipeline}dp={degrees['dp']} tp={degrees['tp']}" in out
    assert seconds(predicted["step_time_s"]) in out
    assert f"{predicted['tokens_per_s']:,.0f}" in out
    assert f"wrote the plan to {path}" in out
    assert "blocks.* ×2" in out  # gpt-tiny's two identical blocks print as one table
    assert err == ""  # no spinner or progress off a terminal


def test_mesh_pins_the_degrees_and_implies_the_device_count(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, err = _run(capsys, *TINY, "--mesh", "dp=2,tp=2", "--json", str(path))
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["devices"] == 4
    assert (saved["degrees"]["dp"], saved["degrees"]["tp"]) == (2, 2)
    assert "meshes evaluated" not in out  # a pinned mesh is evaluated, not searched


@pytest.mark.parametrize("argv, says", [
    (["--devices", "4", "--hardware", "tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["--devices", "4", "--model-args", "foo=1"], "no field foo"),
    (["--devices", "4", "--mesh", "dp=3,tp=2"], "multiplies to 6 devices but --devices is 4"),
    (["--devices", "4", "--fix", "cp=4", "--seq", "12"], "seq 12 is not divisible by 2 x cp = 8"),
    (["--devices", "4", "--fix", "pp=4"], "pp=4 cuts the model into more stages than its 2 blocks"),
    (["--devices", "4", "--fix", "pp=1,schedule=1f1b"], "a pipeline schedule needs pp > 1"),
    (["--devices", "4", "--fix", "zero=7"], "zero (ZeRO stage) must be one of 0, 1, 2, 3"),
    (["--devices", "4", "--fix", "banana=1"], "no key 'banana'; valid keys: dp, tp, pp, cp, zero, ac, precision, mbs"),
    (["--devices", "4", "--memory", "lots"], "--memory 'lots' is not a size"),
    (["--mesh", "dp=4,tp=1", "--batch", "6"], "batch 6 is not divisible by dp=4; use --batch 4"),
    (["--devices", "4", "--mesh", "dp=2,tp=2", "--fix", "dp=4"], "--mesh dp=2 and --fix dp=4 disagree"),
    ([], "give --devices N"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    code, out, err = _run(capsys, "plan", "gpt", "--hardware", "cpu", "--batch", "8", *argv)  # last flag wins
    assert code == 2
    assert err.startswith("autopar: error: ") and err.count("\n") == 1, err
    assert says in err
    assert "Traceback" not in err and out == ""


def test_model_file_without_the_factory(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text("import torch\n\ndef other():\n    return torch.nn.Linear(2, 2)\n")
    code, _, err = _run(capsys, "plan", f"{model}:build", "--devices", "2", "--hardware", "cpu", "--batch", "4")
    assert code == 2
    assert err == f"autopar: error: {model} has no function 'build'; define it or name another after the ':'\n"


@pytest.mark.parametrize("argv", [["plan", "gpt"], ["plan", "gpt", "--batch", "0", "--hardware", "cpu"],
                                  ["plan", "gpt", "--batch", "8", "--hardware", "cpu", "--dtype", "fp8"], []])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "usage: autopar" in err


def test_help_and_profile(capsys):
    assert main(["--help"]) == 0
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--fix" in out and "gpt3-175b" in out and "a100-80gb-sxm" in out
    code, _, err = _run(capsys, "profile")
    assert code == 2 and "--out" in err  # the output file is required


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autopar.cli.plan_cmd.make_plan", interrupted)
    code, out, err = _run(capsys, *TINY, "--devices", "4")
    assert code == 130 and out == "" and err == ""


@pytest.mark.parametrize("module", ["autopar.cli", "autopar.cli.main"])
def test_console_script_exit_codes_and_stderr(tmp_path, module):
    cmd = [sys.executable, "-m", module, *TINY]
    bad = subprocess.run([*cmd, "--devices", "4", "--fix", "tp=2,tp=4"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == "autopar: error: --fix gives tp twice (tp=2 and tp=4); give it once\n"
    path = tmp_path / "plan.json"
    ok = subprocess.run([*cmd, "--devices", "2", "--json", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(path.read_text())["devices"] == 2 and "predicted step time" in ok.stdout


def test_the_command_plans_what_the_planner_plans_in_process(tmp_path, capsys):
    """`autopar plan` as a command keeps triton from being imported (torch's dynamo imports it at start-up, and
    planning never runs a kernel: cli/command.py) and runs without garbage collection: the plan it writes is the
    one the planner makes in a process with both, fused kernels priced (an H100)."""
    argv = ["plan", "llama-tiny", "--hardware", "h100-80gb-sxm", "--batch", "8", "--devices", "4"]
    proc = subprocess.run([sys.executable, "-m", "autopar.cli", *argv, "--json", str(tmp_path / "command.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert main([*argv, "--json", str(tmp_path / "here.json")]) == 0
    capsys.readouterr()
    command, here = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("command", "here"))
    for plan in (command, here):
        for key in ("seconds", "solve_s"):
            plan["solver"].pop(key)
    assert command["fusions"] and command == here


def test_the_command_sets_up_before_torch_is_imported():
    """The `autopar` command's module imports neither torch nor the planner (cli/command.py turns garbage
    collection off for `autopar plan` before they are imported); `autopar.make_plan` and `autopar.Plan` still
    resolve."""
    code = ("import sys, autopar.cli.command\nassert 'torch' not in sys.modules, 'torch imported'\n"
            "import autopar\nassert autopar.make_plan.__module__ == 'autopar.planning'\n"
            "assert autopar.Plan.__name__ == 'Plan'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the flag languages


def test_fix_values_are_typed_and_neutral_keys_accepted():
    fix = parse_fix("dp=2, tp=4,mbs=8,pp=1,cp=1,zero=0,ac=none,v=1")
    assert fix == {"dp": 2, "tp": 4, "mbs": 8, "pp": 1, "cp": 1, "zero": 0, "ac": "none", "v": 1}
    assert planner_fix(fix) == {"dp": 2, "tp": 4, "cp": 1, "mbs": 8, "pp": 1, "zero": 0, "ac": "none", "v": 1}
    assert planner_fix(parse_fix("zero=3,ac=selective,precision=bf16")) == {"zero": 3, "ac": "selective",
                                                                            "precision": "bf16"}
    assert parse_fix("") == {}
    assert parse_mesh("tp=8") == {"dp": 1, "tp": 8, "pp": 1, "cp": 1}


@pytest.mark.parametrize("text", ["cp=2", "cp=4"])
def test_fix_cp_reaches_the_planner(text):
    assert planner_fix(parse_fix(text)) == {"cp": int(text[3:])}


@pytest.mark.parametrize("text, says", [("tp=0", "positive integer"), ("ac=some", "none, selective, full"),
                                        ("schedule=fast", "gpipe, 1f1b, interleaved, zero-bubble"),
                                        ("tp", "malformed"), ("mbs=2.5", "positive integer")])
def test_fix_names_the_key_and_the_allowed_values(text, says):
    with pytest.raises(AutoparError, match=says):
        parse_fix(text)


@pytest.mark.parametrize("text, size", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("1.5TiB", 1.5 * 2**40),
                                        ("512MiB", 512 * 2**20), ("4096", 4096), ("8e10", 8 * 10**10),
                                        ("80 gib", 80 * 2**30)])
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "80GiBs", "-1GB", "0", ""])
def test_memory_garbage(text):
    with pytest.raises(AutoparError, match="--memory"):
        parse_memory(text)


# ---------------------------------------------------------------- grouping and reading, on a hand-made plan


def _plan(strategies: dict[str, NodeDecision], params: dict[str, str], degrees=(2, 4)) -> Plan:
    prediction = Prediction(step_time_s=1.0, compute_s=1.0, exposed_comm_s=0.0, grad_sync_s=0.0,
                            grad_sync_exposed_s=0.0, memory_bytes_per_device=1.0, memory_parts={}, tokens_per_s=1.0,
                            tflops_per_device=1.0, model_flops_per_step=1.0)
    return Plan(model="m", n_params=1, graph_fingerprint="x", hardware="cpu", devices=degrees[0] * degrees[1],
                axis_names=["dp", "tp"], degrees={"dp": degrees[0], "tp": degrees[1]}, batch=8, seq=4,
                micro_batch_size=8 // degrees[0], num_micro_batches=1, memory_budget_bytes=1.0, params=params,
                strategies=strategies, predicted=prediction)


def _linear(module: str, weight: str, out: str) -> NodeDecision:
    return NodeDecision(op="aten.linear.default", module=module, outs=[out], ins=["S0/R", weight])


def _blocks(n: int, odd: int | None = None) -> Plan:
    strategies, params = {}, {}
    for i in range(n):
        fc_weight = "R/S1" if i == odd else "R/S0"
        strategies[f"ln{i}"] = NodeDecision(op="aten.layer_norm.default", module=f"h.{i}.ln", outs=["S0/S1"],
                                            ins=["S0/S1"])
        strategies[f"fc{i}"] = _linear(f"h.{i}.fc", fc_weight, "S0/S2")
        strategies[f"proj{i}"] = _linear(f"h.{i}.proj", "R/S1", "S0/P")
        params |= {f"h.{i}.fc.weight": fc_weight, f"h.{i}.proj.weight": "R/S1", f"h.{i}.ln.weight": "R/R"}
    return _plan(strategies, params)


def test_identical_blocks_fold_into_one_table():
    (group,) = groups(_blocks(24))
    assert (group.title, group.count) == ("h.*", 24)
    assert [row.module for row in group.rows] == ["ln", "fc", "proj"]


def test_a_block_that_differs_gets_its_own_table():
    assert [(g.title, g.count) for g in groups(_blocks(5, odd=3))] == [("h.0-2", 3), ("h.3", 1), ("h.4", 1)]


def test_reading_names_megatron_tp_sp_and_dp():
    ln, fc, proj = groups(_blocks(2))[0].rows
    assert ln.reading == "data-parallel, sequence-parallel (tp)"
    assert fc.reading == "data-parallel, column-parallel (tp)"
    assert proj.reading == "data-parallel, row-parallel (tp)"
    assert fc.weights == "weight R/S0"
    zero3 = _plan({"l": _linear("l", "R/R", "S0/R")}, {"l.weight": "S0/R"})
    assert reading(zero3, "l", [zero3.strategies["l"]], {"weight": "S0/R"}) == \
        "data-parallel, ZeRO-3-like (dp)"


# ---------------------------------------------------------------- conventions users bring (issue 17)


def test_mbs_is_per_data_parallel_replica_and_json_dash_writes_the_plan_to_stdout(capsys):
    """Megatron's --micro-batch-size / DeepSpeed's train_micro_batch_size_per_gpu: batch 8 = mbs 2 x dp 2 x 2."""
    code, out, err = _run(capsys, *TINY, "--mesh", "dp=2", "--fix", "mbs=2", "--json", "-")
    assert code == 0, err
    plan = json.loads(out)  # stdout is the plan alone, for scripts
    assert (plan["batch"], plan["micro_batch_size"], plan["num_micro_batches"]) == (8, 2, 2)
    assert "global batch 8 = mbs 2 per replica × dp 2 × 2 micro-batches (gradient accumulation)" in err
    assert "predicted step time" in err  # the tables went to stderr


def test_mbs_that_does_not_divide_the_batch_per_replica_names_mbs_x_dp(capsys):
    code, _, err = _run(capsys, *TINY, "--mesh", "dp=2", "--fix", "mbs=3")
    assert code == 2
    assert "mbs=3 (per data-parallel replica) with dp=2 needs a batch divisible by mbs x dp = 6, not 8" in err


def test_family_models_take_their_positions_from_seq(capsys):
    from autopar.models import build_model

    assert build_model("gpt", seq=2048, device="meta")[1].seq == 2048
    assert build_model("llama", {"seq": 4096}, seq=2048, device="meta")[1].seq == 4096  # model-args override
    assert build_model("gpt-tiny", seq=16, device="meta")[1].seq == 32  # a preset keeps its own
    code, out, err = _run(capsys, "plan", "gpt", "--model-args", "layers=2,hidden=64,heads=4", "--devices", "1",
                          "--hardware", "cpu", "--batch", "2", "--seq", "256", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["seq"] == 256
