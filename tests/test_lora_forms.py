"""The activation-space form of LoRA against the parametrized layer, and the task-switching helpers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D


def adapted_conv1d(core, d_in=24, d_out=40, rank=3, alpha=6.0):
    """A Conv1D with a LoRALayer whose B is non-zero (with B = 0 every comparison would hold trivially)."""
    torch.manual_seed(0)
    layer = Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.bias.normal_()
    frozen = layer.weight.detach().clone()
    lora = core.LoRALayer(d_in, d_out, rank=rank, alpha=alpha)
    with torch.no_grad():
        lora.B.normal_()
    parametrize.register_parametrization(layer, "weight", lora)
    return layer, frozen, lora


def test_activation_form_equals_the_parametrized_layer_without_dropout(core):
    layer, frozen, lora = adapted_conv1d(core)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = layer(x)
        assert torch.allclose(core.lora_activation_form(x, frozen, layer.bias, lora), expected, atol=1e-5)
        # Dropout only acts in training: in eval the form ignores it.
        assert torch.allclose(core.lora_activation_form(x, frozen, layer.bias, lora, 0.5, training=False), expected,
                              atol=1e-5)


def test_lora_dropout_touches_only_the_lora_branch(core):
    layer, frozen, lora = adapted_conv1d(core)
    x = torch.randn(4, 24)
    with torch.no_grad():
        dropped = core.lora_activation_form(x, frozen, layer.bias, lora, dropout=1.0, training=True)
        assert torch.allclose(dropped, x @ frozen + layer.bias)  # every LoRA input dropped: only x W0 + b is left
        assert not torch.allclose(layer(x), dropped, atol=1e-3)  # which no adapted weight reproduces here


@pytest.fixture()
def trained_pair(core, tiny_model_dir, tmp_path):
    """Two LoRA files with the same config and different tensors, and the models they came from."""
    files, models = [], []
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        torch.manual_seed(seed)
        core.inject_lora(model, ["attn.c_attn"], rank=2, alpha=4)
        with torch.no_grad():
            for layer in core.lora_layers(model).values():
                layer.B.normal_(std=0.05)
        files.append(core.save_lora(model, tmp_path / f"lora{seed}.pt"))
        models.append(model)
    return files, models


def logits(model, seed=0):
    batch = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(batch).logits


def test_lora_disabled_is_the_base_model_exactly_and_restores_the_scale(core, tiny_model_dir, trained_pair):
    _, (model, _) = trained_pair
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapted = logits(model)
    with core.lora_disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)
    with pytest.raises(KeyError), core.lora_disabled(model):
        raise KeyError("inside the block")
    assert torch.equal(logits(model), adapted)  # restored after an error too


def test_swap_lora_gives_the_other_adapters_model(core, trained_pair):
    (first_file, second_file), (first, second) = trained_pair
    assert not torch.allclose(logits(first), logits(second), atol=1e-3)
    assert core.swap_lora(first, second_file) == list(core.lora_layers(first))
    assert torch.allclose(logits(first), logits(second), atol=1e-6)
    core.swap_lora(first, first_file)
    assert not torch.allclose(logits(first), logits(second), atol=1e-3)


def test_swap_lora_refuses_what_does_not_fit(core, tiny_model_dir, trained_pair, tmp_path):
    (first_file, _), (first, _) = trained_pair
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="no LoRA layers"):
        core.swap_lora(plain, first_file)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    core.inject_lora(other, ["attn.c_attn"], rank=3, alpha=4)
    other_file = core.save_lora(other, tmp_path / "rank3.pt")
    before = logits(first)
    with pytest.raises(ValueError, match="another rank or alpha"):
        core.swap_lora(first, other_file)
    checkpoint = core.read_lora_file(first_file)
    name = next(iter(checkpoint["tensors"]))
    checkpoint["tensors"][name] = checkpoint["tensors"][name] * float("nan")
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="holds NaN, inf or non-float values"):
        core.swap_lora(first, tmp_path / "nan.pt")
    assert torch.equal(logits(first), before)  # a refused swap leaves the model as it was


def test_merge_then_subtract_recovers_w0_and_adding_another_update_switches_task(core, trained_pair):
    _, (first, second) = trained_pair
    layers = core.lora_layers(first)
    w0 = {name: first.get_submodule(name).parametrizations.weight.original.detach().clone() for name in layers}
    core.merge_lora(first)
    largest = max(first.get_submodule(name).weight.abs().max().item() for name in w0)
    core.add_lora_update(first, layers, sign=-1.0)
    for name, weight in w0.items():
        diff = (first.get_submodule(name).weight - weight).abs().max().item()
        assert diff <= 2 * torch.finfo(torch.float32).eps * largest
    core.add_lora_update(first, core.lora_layers(second), sign=1.0)
    assert torch.allclose(logits(first), logits(second), atol=1e-5)
