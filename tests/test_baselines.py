"""Section 3b of lora_ablations.ipynb: the §5.1 baselines and Table 1's latency, offline and on small models."""

from __future__ import annotations

import json
import re
import statistics

import papermill
import pytest
import torch
from conftest import TINY_BLOCK_SIZE
from test_ablations import run_ablations
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core

LORA_R4_GPT2_SMALL = 221_184  # 12 blocks x 4 x ((768 + 2304) + (768 + 768)), PAPER_FACTS


@pytest.fixture(scope="module")
def nb():
    return load_core(ABLATIONS_NOTEBOOK)


def gpt2_small_shape():
    """GPT-2 small's architecture (GPT2Config defaults) on the meta device: shapes only, no weights, no download."""
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


# --- parameter counts on GPT-2 small's shape -----------------------------------------------------------------


def test_lora_r4_budget_is_the_papers_count(nb):
    model = gpt2_small_shape()
    nb.inject_lora(model, ["attn.c_attn", "attn.c_proj"], rank=4, alpha=8)
    assert nb.count_parameters(model, trainable_only=True) == LORA_R4_GPT2_SMALL == nb.lora_budget(12, 768)


@pytest.mark.parametrize(("kind", "per_adapter", "adapters_per_block"), [
    ("adapter_h", lambda m: 2 * 768 * m + m + 768, 2),  # down (768 m + m) and up (m 768 + 768)
    ("adapter_l", lambda m: 2 * 768 * m + m + 768 + 2 * 768, 1),  # plus the LayerNorm's weight and bias
])
def test_adapters_are_as_close_as_possible_to_lora_r4(nb, kind, per_adapter, adapters_per_block):
    model = gpt2_small_shape()
    nb.apply_baseline(model, kind)
    bottlenecks = {m.down.out_features for m in model.modules() if isinstance(m, nb.Adapter)}
    assert len(bottlenecks) == 1
    (m,) = bottlenecks
    count = nb.count_parameters(model, trainable_only=True)
    assert count == 12 * adapters_per_block * per_adapter(m)
    neighbours = [12 * adapters_per_block * per_adapter(n) for n in (m - 1, m + 1)]
    assert all(abs(count - LORA_R4_GPT2_SMALL) <= abs(other - LORA_R4_GPT2_SMALL) for other in neighbours)


def test_bitfit_and_ft_top2_counts_on_gpt2_small(nb):
    bitfit = gpt2_small_shape()
    nb.apply_baseline(bitfit, "bitfit")
    per_block_biases = 768 + 2304 + 768 + 768 + 3072 + 768  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj
    assert nb.count_parameters(bitfit, trainable_only=True) == 12 * per_block_biases + 768  # + ln_f
    top2 = gpt2_small_shape()
    nb.apply_baseline(top2, "ft_top2")
    per_block = 2 * 768 * 2 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
    assert nb.count_parameters(top2, trainable_only=True) == 2 * per_block


# --- behaviour on a tiny GPT-2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adapter_h", "adapter_l"])
def test_adapters_at_initialisation_leave_the_logits_unchanged(nb, tiny_model_dir, kind):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch).logits
        nb.apply_baseline(model, kind)
        after = model(batch).logits
    assert torch.equal(before, after)
    assert sum(isinstance(m, nb.Adapter) for m in model.modules()) == model.config.n_layer * (2 if kind == "adapter_h" else 1)


def _trained_once(nb, tiny_model_dir, kind):
    """A tiny GPT-2 with a baseline applied, after a few AdamW steps; with its tensors before, keyed by object."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}
    nb.apply_baseline(model, kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        nb.train_step(model, batch, optimizer, scaler, torch.device("cpu"), "fp32")
    return model, original


@pytest.mark.parametrize("kind", ["bitfit", "ft_top2", "adapter_h", "adapter_l"])
def test_only_the_intended_tensors_train(nb, tiny_model_dir, kind):
    model, original = _trained_once(nb, tiny_model_dir, kind)
    n_layer = model.config.n_layer
    intended = {
        "bitfit": lambda n: n.endswith(".bias"),
        "ft_top2": lambda n: n.startswith((f"transformer.h.{n_layer - 2}.", f"transformer.h.{n_layer - 1}.")),
        "adapter_h": lambda n: ".adapter." in n,
        "adapter_l": lambda n: ".adapter." in n,
    }[kind]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if intended(n)}
    changed = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in original:
            old_name, before = original[id(parameter)]
            if torch.equal(before, parameter.detach()):
                continue
            changed.add(name)
            assert name in trainable, f"{old_name} is frozen but changed"
        else:
            assert name in trainable, f"{name} is new but frozen"
    if kind in ("bitfit", "ft_top2"):
        assert changed == trainable  # every intended pretrained tensor moved
    else:
        assert not changed and any(n.endswith("up.weight") for n, p in model.named_parameters() if p.abs().sum() > 0)


def test_frozen_gpt2_weights_stay_bit_identical_under_adapters(nb, tiny_model_dir):
    model, original = _trained_once(nb, tiny_model_dir, "adapter_h")
    now = {id(p): p for p in model.parameters()}
    assert set(original) <= set(now)  # every pretrained tensor is still in the model, in the forward path
    assert all(torch.equal(before, now[key].detach()) for key, (_, before) in original.items())


def test_unknown_baseline_and_bad_knobs_are_clear_errors(nb, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"Unknown baseline 'lora'.*bitfit"):
        nb.apply_baseline(model, "lora")
    rules = nb.ablation_rules(n_positions=128)
    with pytest.raises(ValueError, match=r"BASELINES = \['bitfit', 'bitfit'\] is not valid: set BASELINES to a list of distinct"):
        nb.validate_knobs({"BASELINES": ["bitfit", "bitfit"]}, rules)
    with pytest.raises(ValueError, match=r"LATENCY_SHAPES_CPU = \[\[1, 512\]\] is not valid: .* tokens <= 128"):
        nb.validate_knobs({"LATENCY_SHAPES_CPU": [[1, 512]]}, rules)
    with pytest.raises(ValueError, match=r"set LATENCY_REPEATS to a plain integer of at least 2"):
        nb.validate_knobs({"LATENCY_REPEATS": 1}, rules)
    nb.apply_baseline(model, "adapter_l")
    with pytest.raises(RuntimeError, match="already wrapped"):
        nb.apply_baseline(model, "adapter_l")


def test_latency_table_structure_on_a_tiny_gpt2(nb, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    nb.inject_lora(lora, ["attn.c_attn"], rank=2, alpha=4)
    adapter = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    nb.apply_baseline(adapter, "adapter_h")
    variants = {"base": (base, False), "lora_unmerged": (lora, False), "lora_cached": (lora, True), "adapter_h": (adapter, False)}
    shapes = [(2, 16), (1, 8)]
    times = {s: nb.time_forward_passes(variants, s, 4, 1, torch.device("cpu"), "fp32", base.config.vocab_size) for s in shapes}
    assert all(len(t) == 4 and min(t) > 0 for by_variant in times.values() for t in by_variant.values())
    table = nb.latency_table(times)
    assert [(r["batch_size"], r["seq_len"], r["variant"]) for r in table] == [(*s, v) for s in shapes for v in variants]
    for record in table:
        assert record["times"] == times[(record["batch_size"], record["seq_len"])][record["variant"]]
        assert record["seconds"] == pytest.approx(statistics.median(record["times"]))
        if record["variant"] == "base":
            assert record["overhead_percent"] == 0
        base_seconds = next(r["seconds"] for r in table if r["variant"] == "base" and r["seq_len"] == record["seq_len"])
        assert record["overhead_percent"] == pytest.approx(100 * (record["seconds"] / base_seconds - 1))


def test_temporary_verdict_copy_follows_issue_8s_rule(nb):
    gap, margin = nb.seed_gap([1.0, 1.2], [0.0, 0.2])
    assert gap == pytest.approx(1.0) and margin == pytest.approx(2 * 0.02**0.5)  # both sample variances 0.02
    assert nb.verdict(gap, margin, +1) == "agrees" and nb.verdict(gap, margin, -1) == "disagrees"
    assert nb.verdict(0.1, margin, +1) == "inconclusive"
    assert nb.seed_gap([1.0], [0.0, 0.1])[1] is None and nb.verdict(5.0, None, +1) == "inconclusive"


# --- end to end: the Contract of issue 11 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_results(tmp_path_factory, tiny_model_dir, play_text_path):
    folder = tmp_path_factory.mktemp("baselines")
    printed = run_ablations(
        folder, tiny_model_dir, play_text_path, SEEDS=[1, 2], RANKS=[4], SUBSPACE_RANKS=[4, 8],
        AMPLIFICATION_RANKS=[4, 8], RUN_FULL_FINETUNE=False, RUN_BASELINES=True, LATENCY_SHAPES=[[2, TINY_BLOCK_SIZE], [1, 128]],
        LATENCY_SHAPES_CPU=[[2, TINY_BLOCK_SIZE], [1, 128]], LATENCY_REPEATS=3, LATENCY_WARMUP=1,
    )
    return folder, printed, json.loads((folder / "out" / "ablation_results.json").read_text())


def test_results_carry_the_baselines_and_latency_contract(baseline_results):
    folder, printed, results = baseline_results
    assert sorted((r["name"], r["seed"]) for r in results["baselines"]) == sorted(
        (k, s) for k in ("bitfit", "ft_top2", "adapter_h", "adapter_l") for s in (1, 2))
    full_fields = {"name", "config", "seed", "trainable_params", "val_loss", "seconds", "peak_memory_bytes", "checkpoint_bytes"}
    for record in results["baselines"]:
        assert full_fields <= set(record) and record["config"]["baseline"] == record["name"]
        assert record["val_loss"] > 0 and record["seconds"] > 0 and record["peak_memory_bytes"] > 0
        floats = record["trainable_params"] * 4
        assert floats < record["checkpoint_bytes"] < floats + 64 * 1024  # the trained tensors only
    variants = {"base", "lora_merged", "lora_unmerged", "lora_cached", "adapter_h", "adapter_l"}
    shapes = {(2, TINY_BLOCK_SIZE), (1, 128)}  # 1 x 128 is a shape of the paper's Table 1
    assert {(r["batch_size"], r["seq_len"], r["variant"]) for r in results["latency"]} == {(*s, v) for s in shapes for v in variants}
    for record in results["latency"]:
        assert record["seconds"] > 0 and isinstance(record["overhead_percent"], float)
    ids = {f["id"]: f for f in results["findings"]}
    assert {"latency", "baselines"} <= set(ids)
    for finding in (ids["latency"], ids["baselines"]):
        assert {"id", "claim", "paper", "measured", "margin", "verdict"} <= set(finding)
        assert finding["verdict"] in ("agrees", "disagrees", "inconclusive") and finding["margin"] is not None
    assert "merged vs unmerged LoRA r=4: max |Δ logits|" in printed
    assert "+20.7%" in printed and "+30.3%" in printed  # the paper's figures beside ours at its own shape
    assert re.search(r"bitfit .*: not judged, no GPT-2 baseline in the paper", printed)
    assert re.search(r"ft_top2 .*: not judged, \d+x LoRA r=4's trainable parameters", printed)  # not comparable
    assert re.search(r"than the strongest baseline of comparable size here, adapter_[hl] ", ids["baselines"]["claim"])
    assert "mean over the timed passes" in ids["latency"]["detail"]  # what seed_gap computes, named


def test_adapter_runs_match_lora_r4_budget_on_the_tiny_model(baseline_results, tiny_model_dir):
    _, printed, results = baseline_results
    d, n_layer = (json.loads((tiny_model_dir / "config.json").read_text())[k] for k in ("n_embd", "n_layer"))
    lora = n_layer * 4 * (4 * d + 2 * d)
    for kind in ("adapter_h", "adapter_l"):
        count = next(r["trainable_params"] for r in results["baselines"] if r["name"] == kind)
        assert abs(count - lora) < 0.25 * lora, (kind, count, lora)
    assert f"LoRA r=4 on attn.c_attn + attn.c_proj: {lora:,} trainable" in printed


def test_one_switch_turns_the_section_off(tmp_path, tiny_model_dir, play_text_path):
    run_ablations(tmp_path, tiny_model_dir, play_text_path, SEEDS=[1], RANKS=[4], SUBSPACE_RANKS=[4, 8],
                  AMPLIFICATION_RANKS=[4, 8], RUN_FULL_FINETUNE=False, RUN_BASELINES=False)
    results = json.loads((tmp_path / "out" / "ablation_results.json").read_text())
    assert results["baselines"] == [] and results["latency"] == []
    assert not {"latency", "baselines"} & {f["id"] for f in results["findings"]}
    assert not list((tmp_path / "out" / "ablation_runs").glob("adapter*"))


def test_a_bad_baseline_knob_fails_before_the_first_run(tmp_path, tiny_model_dir, play_text_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"BASELINES = \['bitfit', 'nope'\] is not valid"):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, RUN_BASELINES=True, BASELINES=["bitfit", "nope"])
    assert not (tmp_path / "out").exists()  # failed in seconds, before anything was written
