"""Our LoRALayer + inject_lora compute what Hugging Face PEFT computes, and adapters move both ways.

PEFT is a test dependency only: the notebook writes and reads PEFT's files with safetensors and json.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits
from peft import LoraConfig, PeftModel, get_peft_model

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


def peft_trained(fresh, targets, rank=4, alpha=8, **extra):
    """A PEFT LoRA model with non-zero lora_B, as after training."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True, **extra)
    model = get_peft_model(fresh(), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


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


@pytest.mark.parametrize("targets", [["attn.c_attn", "attn.c_proj"], ["attn.c_attn"]])
def test_a_peft_adapter_imported_by_us_gives_peft_logits(core, fresh, batch, tmp_path, targets):
    peft_model = peft_trained(fresh, targets)
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = fresh()
    adapted = core.import_peft_adapter(ours, tmp_path / "peft")
    assert len(adapted) == 2 * len(targets)
    assert max_diff(logits(ours, batch), expected) <= TOL

    merged_peft = peft_model.merge_and_unload()
    core.merge_lora(ours)
    for name, param in ours.named_parameters():
        assert max_diff(param, merged_peft.get_parameter(name)) <= TOL, name


def test_a_bare_c_proj_target_imports_the_mlp_projection_too(core, fresh, batch, tmp_path):
    peft_model = peft_trained(fresh, ["c_attn", "c_proj"])  # PEFT's bare "c_proj" catches mlp.c_proj as well
    expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fresh()
    adapted = core.import_peft_adapter(ours, tmp_path / "peft")
    assert {name.split(".", 3)[3] for name in adapted} == {"attn.c_attn", "attn.c_proj", "mlp.c_proj"}
    assert max_diff(logits(ours, batch), expected) <= TOL


def test_an_adapter_trained_with_dropout_loads(core, fresh, batch, tmp_path):
    peft_model = peft_trained(fresh, ["attn.c_attn"], lora_dropout=0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fresh()
    core.import_peft_adapter(ours, tmp_path / "peft")
    assert max_diff(logits(ours, batch), logits(peft_model, batch)) <= TOL


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"bias": "lora_only"}, "trained biases"),
        ({"rank_pattern": {"attn.c_proj": 2}}, "per-module ranks"),
    ],
)
def test_unsupported_peft_features_are_named_and_load_nothing(core, fresh, tmp_path, extra, named):
    peft_trained(fresh, ["attn.c_attn", "attn.c_proj"], **extra).save_pretrained(tmp_path / "peft")
    ours = fresh()
    with pytest.raises(ValueError, match=named):
        core.import_peft_adapter(ours, tmp_path / "peft")
    assert not core.lora_layers(ours)


def test_an_embedding_adapter_is_named_and_loads_nothing(core, fresh, tmp_path):
    peft_trained(fresh, ["wte"]).save_pretrained(tmp_path / "peft")  # an Embedding: PEFT supports it, we do not
    ours = fresh()
    with pytest.raises(ValueError, match="lora_embedding_A.*plain LoRA adapter does not have"):
        core.import_peft_adapter(ours, tmp_path / "peft")
    assert not core.lora_layers(ours)


def test_a_target_that_is_not_conv1d_is_named(core, fresh, tmp_path):
    ours = fresh()
    pairs = {"lm_head": (torch.zeros(4, 64), torch.zeros(ours.config.vocab_size, 4))}  # an nn.Linear, not Conv1D
    core.write_peft_adapter(tmp_path / "peft", pairs, 4, 8, None)
    with pytest.raises(ValueError, match="'lm_head', which this model does not have as a Conv1D"):
        core.import_peft_adapter(ours, tmp_path / "peft")
    assert not core.lora_layers(ours)


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


def test_a_peft_rslora_adapter_imports_with_our_sqrt_rule(core, fresh, batch, tmp_path):
    peft_model = peft_trained(fresh, ["attn.c_attn"], rank=4, alpha=8, use_rslora=True)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fresh()
    core.import_peft_adapter(ours, tmp_path / "peft")
    layer = next(iter(core.lora_layers(ours).values()))
    assert layer.scaling_rule == "alpha/sqrt(r)" and layer.scaling == 8 / 2
    assert max_diff(logits(ours, batch), logits(peft_model, batch)) <= TOL
    # our own file keeps the rule: save_lora then load_lora gives the same model
    path = core.save_lora(ours, tmp_path / "lora.pt")
    again = fresh()
    core.load_lora(again, path)
    assert torch.equal(logits(again, batch), logits(ours, batch))
