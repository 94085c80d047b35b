"""Our LoRALayer + inject_lora compute what Hugging Face PEFT computes: our exported adapter, loaded by PEFT.

PEFT is a test dependency only: the notebook writes PEFT's files with safetensors and json.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits
from peft import PeftModel

TOL = 1e-5


@pytest.fixture
def batch():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def ours_trained(core, fresh, targets, rank=4, alpha=8, scaling="alpha/r"):
    """Our parametrized model with non-zero B, as after training."""
    model = fresh()
    torch.manual_seed(0)
    core.inject_lora(model, targets, rank, alpha, scaling)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in core.lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("targets", [["attn.c_attn", "attn.c_proj"], ["attn.c_attn"]])
def test_our_exported_adapter_gives_the_same_logits_in_peft(core, fresh, batch, tmp_path, targets):
    ours = ours_trained(core, fresh, targets)
    folder = core.export_peft_adapter(ours, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["r"] == 4
    assert config["task_type"] == "CAUSAL_LM" and config["lora_alpha"] == 8

    peft_model = PeftModel.from_pretrained(fresh(), folder).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(core.lora_layers(ours))
    expected = logits(ours, batch)
    assert max_diff(logits(peft_model, batch), expected) <= TOL

    merged_peft = peft_model.merge_and_unload()
    core.merge_lora(ours)
    assert max_diff(logits(ours, batch), expected) <= TOL
    for name, param in ours.named_parameters():
        assert max_diff(param, merged_peft.get_parameter(name)) <= TOL, name


# --- rsLoRA: PEFT's use_rslora scales by alpha / sqrt(r), exactly our "alpha/sqrt(r)" rule -------------------


def test_our_rslora_export_is_a_peft_rslora_adapter_with_the_same_logits(core, fresh, batch, tmp_path):
    ours = ours_trained(core, fresh, ["attn.c_attn", "attn.c_proj"], rank=4, alpha=8, scaling="alpha/sqrt(r)")
    folder = core.export_peft_adapter(ours, tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
    peft_model = PeftModel.from_pretrained(fresh(), folder).eval()
    assert max_diff(logits(peft_model, batch), logits(ours, batch)) <= TOL
    # and not the alpha/r model: at r = 4 the two scales differ by 2x, so the logits must differ
    plain = fresh()
    core.inject_lora(plain, ["attn.c_attn", "attn.c_proj"], 4, 8)
    with torch.no_grad():
        for name, layer in core.lora_layers(plain).items():
            layer.A.copy_(core.lora_layers(ours)[name].A)
            layer.B.copy_(core.lora_layers(ours)[name].B)
    assert max_diff(logits(plain, batch), logits(ours, batch)) > 1e-3
