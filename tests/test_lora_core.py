"""Unit tests of the main notebook's lora-core definitions: the LoRA math, injection, saving, loading, merging."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import logits
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

RANK, ALPHA = 4, 8
TARGETS = ["attn.c_attn", "attn.c_proj"]


@pytest.fixture
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def randomize_b(core, model, seed=1):
    """Give every B a non-zero value, as training would, so the checks are not trivially true."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in core.lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.1)


# --- LoRALayer ------------------------------------------------------------------------------------------


def test_lora_layer_shapes_and_initialisation(core):
    torch.manual_seed(0)
    layer = core.LoRALayer(768, 2304, rank=4, alpha=8)
    assert layer.A.shape == (4, 768) and layer.B.shape == (2304, 4)  # A: down (r, in); B: up (out, r)
    assert torch.count_nonzero(layer.B) == 0
    assert abs(layer.A.std().item() - 1 / math.sqrt(768)) < 0.002
    assert layer.scaling == 2.0


def test_lora_layer_matches_the_paper_formula_with_nonzero_b(core):
    torch.manual_seed(0)
    w0, bias = torch.randn(48, 80), torch.randn(80)
    layer = core.LoRALayer(48, 80, rank=3, alpha=6)
    with torch.no_grad():
        layer.B.normal_()
    a, b = layer.A.detach(), layer.B.detach()
    adapted = layer(w0)
    torch.testing.assert_close(adapted, w0 + (b @ a).T * 2.0)  # W0^T + (alpha/r) (B A)^T
    x = torch.randn(5, 48)
    torch.testing.assert_close(x @ adapted + bias, x @ w0 + bias + 2.0 * x @ a.T @ b.T)
    assert (adapted - w0).abs().max() > 0.1


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4"])
def test_lora_layer_rejects_bad_rank(core, rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        core.LoRALayer(16, 32, rank=rank, alpha=8)


def test_lora_layer_rejects_rank_above_the_weight_size(core):
    with pytest.raises(ValueError, match=r"rank 17 exceeds min\(in, out\) = 16"):
        core.LoRALayer(16, 32, rank=17, alpha=8)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), None, "8"])
def test_lora_layer_rejects_bad_alpha(core, alpha):
    with pytest.raises(ValueError, match="alpha must be a finite positive number"):
        core.LoRALayer(16, 32, rank=4, alpha=alpha)


def test_lora_layer_accepts_numpy_numbers(core):
    np = pytest.importorskip("numpy")
    layer = core.LoRALayer(16, 32, rank=np.int64(4), alpha=np.float32(8.0))
    assert (type(layer.rank), type(layer.alpha), layer.scaling) == (int, float, 2.0)
    assert layer.A.shape == (4, 16)


@pytest.mark.parametrize(("scaling", "expected"), [("alpha/r", 8 / 16), ("alpha/sqrt(r)", 8 / 4)])
def test_lora_layer_scaling_rules(core, scaling, expected):
    layer = core.LoRALayer(32, 48, rank=16, alpha=8, scaling=scaling)
    assert layer.scaling == expected
    with torch.no_grad():
        layer.B.normal_()
    w0 = torch.randn(32, 48)
    torch.testing.assert_close(layer(w0), w0 + expected * (layer.B @ layer.A).T)


def test_lora_layer_default_scaling_is_the_papers(core):
    assert core.LoRALayer(16, 32, rank=4, alpha=8).scaling == 8 / 4


@pytest.mark.parametrize("scaling", ["alpha/sqrt", "rslora", None])
def test_lora_layer_rejects_unknown_scaling(core, scaling):
    with pytest.raises(ValueError, match="scaling must be one of"):
        core.LoRALayer(16, 32, rank=4, alpha=8, scaling=scaling)


def test_inject_lora_passes_the_scaling_rule_to_every_layer(core, tiny):
    core.inject_lora(tiny, TARGETS, rank=4, alpha=8, scaling="alpha/sqrt(r)")
    assert {layer.scaling for layer in core.lora_layers(tiny).values()} == {4.0}


def test_inject_lora_refuses_an_empty_target_list_and_leaves_the_model_untouched(core, tiny):
    with pytest.raises(ValueError, match="target_modules is empty"):
        core.inject_lora(tiny, [], RANK, ALPHA)
    assert all(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("shape", [(16,), (16, 32, 1), (32, 16)])
def test_lora_layer_rejects_weights_of_the_wrong_shape(core, shape):
    layer = core.LoRALayer(16, 32, rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"expects a 2-D \(in, out\) weight"):
        layer(torch.zeros(shape))


# --- inject_lora --------------------------------------------------------------------------------------


def test_inject_starts_exactly_at_the_base_model(core, tiny, batch):
    before = logits(tiny, batch)
    core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    assert torch.equal(logits(tiny, batch), before)


def test_inject_adapts_attention_only_and_trains_only_a_and_b(core, tiny):
    adapted = core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    assert adapted == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]
    for block in tiny.transformer.h:
        assert not parametrize.is_parametrized(block.mlp.c_proj)  # 'attn.c_proj' must not catch 'mlp.c_proj'
        assert not parametrize.is_parametrized(block.mlp.c_fc)
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert len(trainable) == 2 * len(adapted)


def test_bare_c_proj_matches_both_projections(core, tiny):
    adapted = core.inject_lora(tiny, ["c_proj"], RANK, ALPHA)
    assert {name.split(".", 3)[3] for name in adapted} == {"attn.c_proj", "mlp.c_proj"}


def test_parametrized_model_output_matches_the_formula_after_training_like_change(core, tiny, batch):
    core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    randomize_b(core, tiny)
    module = tiny.transformer.h[1].attn.c_attn
    layer = module.parametrizations.weight[0]
    w0 = module.parametrizations.weight.original
    x = torch.randn(3, w0.shape[0])
    with torch.no_grad():
        expected = x @ w0 + module.bias + layer.scaling * x @ layer.A.T @ layer.B.T
        torch.testing.assert_close(module(x), expected)


def test_gpt2_small_count_is_221184_of_124439808(core):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    assert core.count_parameters(model) == 124_439_808
    core.inject_lora(model, TARGETS, rank=4, alpha=8)
    assert core.count_parameters(model, trainable_only=True) == 221_184


def test_count_for_c_attn_only_at_full_size(core):
    model = GPT2LMHeadModel(GPT2Config())
    core.inject_lora(model, ["attn.c_attn"], rank=4, alpha=8)
    assert core.count_parameters(model, trainable_only=True) == 147_456


def test_unknown_target_names_the_adaptable_modules_and_changes_nothing(core, tiny):
    with pytest.raises(ValueError) as error:
        core.inject_lora(tiny, ["attn.c_attn", "attn.q_proj"], RANK, ALPHA)
    message = str(error.value)
    assert "'attn.q_proj'" in message and "attn.c_attn" in message and "mlp.c_proj" in message
    assert not core.lora_layers(tiny)
    assert all(p.requires_grad for p in tiny.parameters())


def test_bad_rank_in_inject_leaves_the_model_untouched(core, tiny):
    with pytest.raises(ValueError, match="rank"):
        core.inject_lora(tiny, TARGETS, rank=0, alpha=ALPHA)
    assert not core.lora_layers(tiny)
    assert all(p.requires_grad for p in tiny.parameters())


def test_injecting_twice_is_a_clear_error(core, tiny):
    core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    with pytest.raises(RuntimeError, match="already has LoRA layers"):
        core.inject_lora(tiny, TARGETS, RANK, ALPHA)


# --- training: frozen weights, determinism, precision ---------------------------------------------------


def train_a_few_steps(core, model, steps, precision="fp32", seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    data = torch.randint(0, 300, (steps, 4, 16), generator=torch.Generator().manual_seed(seed))
    model.train()
    losses = [core.train_step(model, data[i], optimizer, scaler, torch.device("cpu"), precision).item()
              for i in range(steps)]
    model.eval()
    return losses


def test_training_keeps_the_pretrained_weights_bit_identical(core, tiny):
    checksum = core.frozen_weights_checksum(tiny)
    core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    b_before = {n: layer.B.detach().clone() for n, layer in core.lora_layers(tiny).items()}
    train_a_few_steps(core, tiny, steps=5)
    assert core.frozen_weights_checksum(tiny) == checksum
    assert all(not torch.equal(layer.B, b_before[n]) for n, layer in core.lora_layers(tiny).items())


def test_same_seed_gives_the_same_losses(core, tiny_model_dir):
    runs = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(1337)
        core.inject_lora(model, TARGETS, RANK, ALPHA)
        runs.append(train_a_few_steps(core, model, steps=6, seed=3))
    assert runs[0] == runs[1]


def test_bf16_and_fp32_paths_reach_similar_losses(core, tiny_model_dir):
    final = {}
    for precision in ("fp32", "bf16"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(1337)
        core.inject_lora(model, TARGETS, RANK, ALPHA)
        losses = train_a_few_steps(core, model, steps=30, precision=precision)
        final[precision] = sum(losses[-5:]) / 5
        assert final[precision] < losses[0]
    assert abs(final["bf16"] - final["fp32"]) < 0.05 * final["fp32"], final


def test_evaluate_loss_is_the_model_loss_and_restores_the_mode(core, tiny, batch):
    tiny.train()
    loss = core.evaluate_loss(tiny, batch, batch_size=1, device=torch.device("cpu"))
    assert tiny.training
    tiny.eval()
    with torch.no_grad():
        expected = tiny(input_ids=batch, labels=batch).loss.item()
    assert loss == pytest.approx(expected, rel=1e-5)
    first_only = core.evaluate_loss(tiny, batch, 1, torch.device("cpu"), max_batches=1)
    with torch.no_grad():
        assert first_only == pytest.approx(tiny(input_ids=batch[:1], labels=batch[:1]).loss.item(), rel=1e-5)


def test_choose_precision(core, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setitem(core.choose_precision.__globals__, "cpu_has_fast_bf16", lambda: False)
    assert core.choose_precision("auto", cpu) == "fp32"
    monkeypatch.setitem(core.choose_precision.__globals__, "cpu_has_fast_bf16", lambda: True)
    assert core.choose_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert core.choose_precision("auto", cuda) == "fp16"  # the T4: no fast bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert core.choose_precision("auto", cuda) == "bf16"
    assert core.choose_precision("fp32", cuda) == "fp32"
    with pytest.raises(ValueError, match="^PRECISION = 'float16' is not valid"):  # the knob check refuses it first
        core.validate_knobs({"PRECISION": "float16"}, core.knob_rules())
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'fp16'"):  # and training, if it slipped by
        core.autocast_for(cpu, core.choose_precision("float16", cpu))


def test_generate_text_is_reproducible_and_leaves_the_global_rng_alone(core, tiny, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = core.generate_text(tiny, tokenizer, "KING:", max_new_tokens=10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == core.generate_text(tiny, tokenizer, "KING:", max_new_tokens=10, seed=7)
    assert len(tokenizer(first)["input_ids"]) >= 10


# --- saving, loading, merging -------------------------------------------------------------------------


@pytest.fixture
def trained_file(core, tiny, tmp_path):
    core.inject_lora(tiny, TARGETS, RANK, ALPHA)
    randomize_b(core, tiny)
    return tiny, core.save_lora(tiny, tmp_path / "lora_weights.pt")


def test_save_then_load_into_a_fresh_base_gives_the_same_logits(core, trained_file, tiny_model_dir, batch):
    tiny, path = trained_file
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["config"]) == {"rank", "alpha", "scaling", "target_modules", "adapted_modules", "base_model"}
    assert checkpoint["config"]["scaling"] == "alpha/r"
    assert checkpoint["config"]["target_modules"] == TARGETS
    assert all(key.endswith((".A", ".B")) for key in checkpoint["tensors"])  # no frozen weights in the file
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert core.load_lora(fresh, path) == list(core.lora_layers(tiny))
    assert torch.equal(logits(fresh, batch), logits(tiny, batch))


def _save_variant(path, change):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["tensors"].pop("transformer.h.1.attn.c_proj.B"), "no tensor 'transformer.h.1.attn.c_proj.B'"),
        (lambda c: c["config"].update(rank=8), r"shape \(4, 64\) but this model at rank 8 needs \(8, 64\)"),
        (lambda c: c["config"]["adapted_modules"].append("transformer.h.5.attn.c_attn"), "does not have"),
        (lambda c: c["tensors"].update({"transformer.h.0.mlp.c_fc.A": torch.zeros(4, 64)}), "does not list"),
        (lambda c: c.update(format="something else"), "not a file written by save_lora"),
    ],
)
def test_a_file_that_does_not_fit_is_a_clear_error_and_loads_nothing(core, trained_file, tiny_model_dir, change,
                                                                     message):
    _, path = trained_file
    _save_variant(path, change)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=message):
        core.load_lora(fresh, path)
    assert not core.lora_layers(fresh)


def test_a_file_from_another_base_model_names_the_first_mismatch(core, trained_file, tmp_path, play_text_path):
    from conftest import save_tiny_gpt2

    _, path = trained_file
    wider = save_tiny_gpt2(tmp_path / "wider", play_text_path.read_text(), n_embd=32)
    other = AutoModelForCausalLM.from_pretrained(wider)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.A has shape \(4, 64\).*needs \(4, 32\)"):
        core.load_lora(other, path)
    assert not core.lora_layers(other)


def test_a_corrupt_or_missing_file_is_a_clear_error(core, trained_file, tiny_model_dir, tmp_path):
    _, path = trained_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        core.load_lora(fresh, path)
    with pytest.raises(FileNotFoundError, match="No LoRA file"):
        core.load_lora(fresh, tmp_path / "missing.pt")
    assert not core.lora_layers(fresh)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_weights_file_cannot_run_code(core, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "lora-from-scratch/1", "payload": _RunsCode()}, f)
    with pytest.raises(ValueError, match="Could not read"):
        core.load_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    assert "this must never run" not in capsys.readouterr().out


def test_load_needs_a_plain_base_model(core, trained_file):
    tiny, path = trained_file
    with pytest.raises(ValueError, match="already has LoRA layers"):
        core.load_lora(tiny, path)


def test_merge_matches_unmerged_and_removes_the_parametrization(core, trained_file, batch):
    tiny, _ = trained_file
    module = tiny.transformer.h[0].attn.c_attn
    expected_weight = module.weight.detach().clone()
    unmerged = logits(tiny, batch)
    assert core.merge_lora(tiny) == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]
    assert not core.lora_layers(tiny) and not parametrize.is_parametrized(module)
    assert torch.equal(module.weight, expected_weight)
    assert (logits(tiny, batch) - unmerged).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="already merged"):
        core.merge_lora(tiny)


def test_save_without_lora_is_a_clear_error(core, tiny, tmp_path):
    with pytest.raises(ValueError, match="call inject_lora first"):
        core.save_lora(tiny, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_no_network_for_the_model_says_what_to_do(core, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    loader_globals = core.load_base_model.__globals__
    monkeypatch.setattr(loader_globals["AutoModelForCausalLM"], "from_pretrained", offline)
    monkeypatch.setattr(loader_globals["AutoTokenizer"], "from_pretrained", offline)
    for load in (lambda: core.load_base_model("openai-community/gpt2", torch.device("cpu")),
                 lambda: core.load_tokenizer("openai-community/gpt2")):
        with pytest.raises(OSError, match="needs internet; offline, set MODEL_NAME to a local folder"):
            load()
