"""HF transformers models (`hf:<model_type>`): they plan with a real rule for every op they emit, and train under
dp=2 and tp=2 on real gloo ranks with the losses and gradients of one eager process.

Acceptance (project issue 5): GPT-2 and Llama at tiny dims, batch 4, seq 16, 10 steps: losses within 1e-5
relative of `--reference` for dp=2 and tp=2.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

from autopar.cli.main import main
from autopar.placement import P, R
from autopar.strategies import rule_for
from tests.dist_utils import grad_mismatches, max_rel_diff, run_train
from tests.test_rules import _Fn, op_info

pytest.importorskip("transformers")

aten = torch.ops.aten
MODELS = {
    "hf:gpt2": "n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=64",
    "hf:llama": "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,"
                "num_key_value_heads=2,vocab_size=128",
}
COMMON = ["--steps", "10", "--seed", "0", "--batch", "4", "--seq", "16"]


def _args(model: str) -> list[str]:
    return ["--model", model, "--model-args", MODELS[model], *COMMON]


# ---------------------------------------------------------------- planning


@pytest.mark.parametrize("model", list(MODELS))
def test_hf_model_plans_on_4_devices_with_a_rule_for_every_op(model, tmp_path, capsys):
    path = tmp_path / "plan.json"
    code = main(["plan", model, "--model-args", MODELS[model], "--devices", "4", "--hardware", "cpu",
                 "--batch", "4", "--seq", "16", "--json", str(path)])
    _, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(path.read_text())
    assert plan["degrees"]["pp"] * plan["degrees"]["dp"] * plan["degrees"]["tp"] == 4
    # The mask ops HF emits (index, cumsum, diff, new_ones, __and__) are sharded by rules, not replicated.
    assert plan["fallback_ops"] == {}
    ops = {d["op"] for d in plan["strategies"].values()}
    assert "aten.scaled_dot_product_attention.default" in ops  # SDPA attention, one node per layer


def test_hf_model_is_built_for_training_from_the_config_alone():
    from autopar.models import build_model

    model, info = build_model("hf:gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64,
                                          "n_positions": 16, "resid_pdrop": 0.5}, device="meta")
    config = model.lm.config
    assert (info.vocab, info.seq, info.layers, info.hidden, info.heads) == (64, 16, 1, 32, 2)
    assert config.use_cache is False and config.embd_pdrop == 0.0 and config.attn_pdrop == 0.0
    assert config.resid_pdrop == 0.5  # a value the user set is kept
    assert next(model.parameters()).device.type == "meta"


# ---------------------------------------------------------------- rules for the ops HF emits, checked numerically


def _shards(x: torch.Tensor, placement, gen: torch.Generator) -> list[torch.Tensor]:
    """Two ranks' local values of a global tensor under one placement (P: two random addends)."""
    if placement == R:
        return [x, x]
    if placement == P:
        part = torch.randint(-3, 4, x.shape, generator=gen).to(x.dtype)
        return [part, x - part]
    return list(x.chunk(2, placement.dim))


def _combine(outs: list[torch.Tensor], placement) -> torch.Tensor:
    if placement == R:
        assert torch.equal(outs[0], outs[1])
        return outs[0]
    return outs[0] + outs[1] if placement == P else torch.cat(outs, placement.dim)


def _check_every_strategy(fn, *inputs: torch.Tensor, op) -> int:
    """Run the op on 2 simulated ranks under each single-axis strategy of its rule; the combined local outputs
    must equal the global result. Returns how many strategies were checked."""
    info = op_info(_Fn(fn), *inputs, op=op)
    values = _input_values(info, inputs)
    want = _run(info.node, values)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for s in rule_for(info.node.target).strategies(info):
        if any(p.is_shard and v.shape[p.dim] % 2 for p, v in zip(s.ins + s.outs, values + [want])):
            continue
        per_input = [_shards(v, p, gen) for v, p in zip(values, s.ins)]
        outs = [_run(info.node, [shards[r] for shards in per_input]) for r in range(2)]
        torch.testing.assert_close(_combine(outs, s.outs[0]), want, msg=f"strategy {s}")
        checked += 1
    return checked


def _input_values(info, inputs) -> list[torch.Tensor]:
    """The node's tensor inputs as real tensors, by re-running the exported module's graph up to the node."""
    env: dict[str, torch.Tensor] = {}
    placeholders = iter(inputs)
    for n in info.node.graph.nodes:
        if n is info.node:
            break
        if n.op == "placeholder":
            env[n.name] = next(placeholders)
        elif n.op == "call_function":
            env[n.name] = _run(n, None, env)
    found: list[torch.Tensor] = []
    fx.node.map_arg((info.node.args, info.node.kwargs), lambda n: found.append(env[n.name]) or n)
    return found


def _run(node: fx.Node, local: list[torch.Tensor] | None, env: dict | None = None) -> torch.Tensor:
    it = iter(local or [])
    swap = (lambda n: env[n.name]) if env is not None else (lambda n: next(it))
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), swap)
    return node.target(*args, **kwargs)


def test_index_rule_gathers_with_sharded_indices_or_sharded_rows():
    x = torch.randn(6, 4, 8)
    idx = torch.tensor([[0, 5], [2, 3]])
    assert _check_every_strategy(lambda m, a, i: a[i], x, idx, op=aten.index) == 6  # R, P, S0, S1 of i, S1, S2 of a
    # HF's causal mask: cumsum[batch_idx, kv_idx] with index tensors that broadcast against each other
    c = torch.arange(64.0).reshape(4, 16)
    b, k = torch.arange(4).view(4, 1, 1, 1), torch.arange(16).view(1, 1, 16, 1)
    assert _check_every_strategy(lambda m, a, i, j: a[i, j], c, b, k, op=aten.index) == 4  # R, P, S0 of i, S2 of j


def test_scan_rules_keep_the_scanned_dim_whole_and_are_linear_where_the_op_is():
    x = torch.randn(4, 6)
    assert _check_every_strategy(lambda m, a: a.cumsum(1), x, op=aten.cumsum) == 3  # R, S0, P
    assert _check_every_strategy(lambda m, a: a.cumprod(0), x, op=aten.cumprod) == 2  # R, S1
    pre = torch.randn(4, 1)
    assert _check_every_strategy(lambda m, a, p: torch.diff(a, dim=1, prepend=p), x, pre, op=aten.diff) == 3


def test_new_ones_reads_no_values_and_mask_and_is_pointwise():
    x = torch.randint(0, 5, (4, 6))
    assert _check_every_strategy(lambda m, a: a.new_ones((3, 5)), x, op=aten.new_ones) == 4  # R, P, S0, S1 in; R out
    a, b = torch.rand(4, 1, 6) > 0.5, torch.rand(4, 2, 6) > 0.5  # a broadcasts along dim 1
    assert _check_every_strategy(lambda m, p, q: p & q, a, b, op=aten.__and__) == 4  # R, S0, S1 (a whole), S2


# ---------------------------------------------------------------- training parity on real gloo ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(model: str):
        if model not in cache:
            dump = tmp_path_factory.mktemp("ref") / "ref.pt"
            rc, losses, err = run_train([*_args(model), "--reference"], None, dump)
            assert rc == 0, err[-3000:]
            cache[model] = (losses, dump)
        return cache[model]

    return get


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS), ids=["gpt2", "llama"])
@pytest.mark.parametrize("fix", ["dp=2", "tp=2"], ids=["dp2", "tp2"])
def test_hf_parity_world2(model, fix, reference, tmp_path):
    ref_losses, ref_dump = reference(model)
    dump = tmp_path / "par.pt"
    rc, losses, err = run_train([*_args(model), "--fix", fix], 2, dump)
    assert rc == 0, err[-3000:]
    assert len(losses) == 10
    assert max_rel_diff(ref_losses, losses) <= 1e-5, (ref_losses, losses)
    assert grad_mismatches(ref_dump, dump) == []
