"""Reference models and the MODEL-spec registry: numbers at init, parameter counts, export, and user errors."""

import math
import time
from pathlib import Path

import pytest
import torch

from autopar.errors import ModelError
from autopar.models import build_model, n_params, parse_model_args, sample_inputs
from autopar.models.llama import apply_rope, rope_tables

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _export_targets(name: str, device: str = "cpu", **overrides):
    model, info = build_model(name, overrides, device=device)
    ep = torch.export.export(model, sample_inputs(info, 2, 16, device=device))
    return ep, {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def _module_paths(ep) -> set[str]:
    return {path for n in ep.graph.nodes for path, _ in n.meta.get("nn_module_stack", {}).values()}


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_loss_at_init_is_near_ln_vocab_and_backward_reaches_every_weight(name):
    torch.manual_seed(0)
    model, info = build_model(name)
    loss = model(*sample_inputs(info, 2, 16))
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(info.vocab)) < 0.1  # std-0.02 init gives near-uniform logits
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_init_is_deterministic_under_manual_seed(name):
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        weights.append(build_model(name)[0].state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_meta_build_materializes_with_init_weights(name):
    model, info = build_model(name, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()  # fills weights and rebuilds the non-persistent RoPE tables
    reference, _ = build_model(name)
    assert all(torch.equal(b, reference.get_buffer(k)) for k, b in model.named_buffers())
    loss = model(*sample_inputs(info, 2, 16))
    assert abs(loss.item() - math.log(info.vocab)) < 0.1


def test_logits_when_no_targets():
    model, info = build_model("llama-tiny")
    tokens, _ = sample_inputs(info, 3, 8)
    assert model(tokens).shape == (3, 8, info.vocab)


def test_gpt_lm_head_is_tied_to_wte():
    model, _ = build_model("gpt-tiny")
    assert model.lm_head.weight is model.wte.weight
    untied, _ = build_model("gpt-tiny", {"tie_embeddings": False})
    assert n_params(untied) - n_params(model) == 128 * 64


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(16, 8, 10000.0, torch.float32)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda x, pos: apply_rope(x, cos[pos], sin[pos])  # noqa: E731
    assert torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 12) @ rot(k, 10), atol=1e-5)
    assert torch.allclose(rot(q, 5).norm(), q.norm(), atol=1e-5)


def test_gpt3_175b_on_meta_is_175b_params_and_fast():
    start = time.perf_counter()
    model, info = build_model("gpt3-175b", device="meta")
    assert time.perf_counter() - start < 2.0
    assert next(model.parameters()).is_meta
    assert abs(n_params(model) - 175e9) / 175e9 < 0.02
    assert (info.layers, info.hidden, info.heads, info.seq) == (96, 12288, 96, 2048)


def test_llama3_8b_on_meta_is_8b_params_in_bf16():
    model, _ = build_model("llama3-8b", device="meta", dtype=torch.bfloat16)
    assert abs(n_params(model) - 8.0e9) / 8.0e9 < 0.03
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build restored the process default


def test_export_gpt_tiny_keeps_sdpa_and_block_paths():
    ep, targets = _export_targets("gpt-tiny")
    assert "aten.scaled_dot_product_attention.default" in targets
    assert {"blocks.0", "blocks.1.attn"} <= _module_paths(ep)


def test_export_llama_tiny_has_decomposed_rmsnorm_and_gqa():
    ep, targets = _export_targets("llama-tiny")
    assert {"aten.scaled_dot_product_attention.default", "aten.rsqrt.default", "aten.expand.default"} <= targets
    assert {"layers.0", "layers.1.attn"} <= _module_paths(ep)


def test_export_two_layer_llama3_8b_on_meta():
    ep, targets = _export_targets("llama3-8b", device="meta", layers=2)
    assert "aten.scaled_dot_product_attention.default" in targets
    assert "layers.1.ffn" in _module_paths(ep)


def test_parse_model_args_types():
    assert parse_model_args("layers=24, hidden=2304,rope_theta=1e4,tie_embeddings=False") == {
        "layers": 24, "hidden": 2304, "rope_theta": 1e4, "tie_embeddings": False,
    }
    assert parse_model_args("") == {}


@pytest.mark.parametrize("text, bad", [("layers", "layers"), ("layers=24,=3", "=3"), ("act=gelu", "act=gelu")])
def test_parse_model_args_names_the_bad_item(text, bad):
    with pytest.raises(ModelError, match=f"'{bad}'.*key=value"):
        parse_model_args(text)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ModelError, match="no field layer;.*layers, hidden, heads"):
        build_model("gpt", {"layer": 4})


def test_bad_override_values_are_model_errors():
    with pytest.raises(ModelError, match="layers=2.5.*positive integer"):
        build_model("gpt", {"layers": 2.5})
    with pytest.raises(ModelError, match="not divisible by heads=5"):
        build_model("gpt", {"heads": 5})


def test_unknown_model_lists_presets():
    with pytest.raises(ModelError, match="unknown model 'gpt4'.*gpt3-175b.*llama3-8b"):
        build_model("gpt4")


def test_sample_inputs_shapes_and_seq_limit():
    _, info = build_model("gpt-tiny", device="meta")
    tokens, targets = sample_inputs(info, 4, 32)
    assert tokens.shape == targets.shape == (4, 32) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < info.vocab
    assert sample_inputs(info, 4, 32, device="meta")[0].is_meta
    with pytest.raises(ModelError, match="seq=33 exceeds.*32"):
        sample_inputs(info, 4, 33)


def test_example_factory_builds_with_overrides():
    model, info = build_model(f"{EXAMPLES / 'gpt.py'}:tiny", {"layers": 3})
    assert len(model.blocks) == 3 and info.vocab == 128 and info.seq == 32


def test_user_factory_on_meta(tmp_path):
    path = tmp_path / "mlp.py"
    path.write_text("import torch\ndef make(width=8):\n    return torch.nn.Linear(width, width)\n")
    model, info = build_model(f"{path}:make", {"width": 16}, device="meta")
    assert model.weight.is_meta and n_params(model) == 16 * 16 + 16
    assert info.vocab is None and info.config is None
    with pytest.raises(ModelError, match="does not say its vocab"):
        sample_inputs(info, 1, 4)


@pytest.mark.parametrize(
    "source, factory, match",
    [
        (None, "make", "does not exist"),
        ("x = 1\n", "make", "has no function 'make'"),
        ("def make():\n    raise RuntimeError('boom')\n", "make", "raised RuntimeError: boom"),
        ("def make():\n    return 3\n", "make", "returned int, not an nn.Module"),
        ("import nonexistent_pkg_xyz\n", "make", "importing .* failed: ModuleNotFoundError"),
    ],
)
def test_user_factory_errors(tmp_path, source, factory, match):
    path = tmp_path / "model.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ModelError, match=match):
        build_model(f"{path}:{factory}")
