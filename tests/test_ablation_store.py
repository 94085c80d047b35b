"""The ablations notebook's verdict rule, scaling rules, run store and knob validation, on their own (no training)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core


@pytest.fixture(scope="module")
def nb():
    return load_core(ABLATIONS_NOTEBOOK)


# --- the verdict rule ------------------------------------------------------------------------------------------


def test_margin_is_twice_the_pooled_sample_std(nb):
    a, b = [1.0, 1.2, 1.1], [0.5, 0.9, 0.7]
    gap, margin = nb.seed_gap(a, b)
    assert gap == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert margin == pytest.approx(2 * math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2))


@pytest.mark.parametrize(("a", "b", "sign", "expected"), [
    ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], 1, "agrees"),  # gap 1.0, margin 0.2
    ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], -1, "disagrees"),
    ([1.0, 1.5, 0.5], [0.9, 1.4, 0.4], 1, "inconclusive"),  # gap 0.1 inside a margin of 1.0
    ([5.0], [1.0], 1, "inconclusive"),  # one seed: no margin, whatever the gap
    ([5.0, 5.0], [1.0], 1, "inconclusive"),
])
def test_verdict_on_synthetic_records(nb, a, b, sign, expected):
    gap, margin = nb.seed_gap(a, b)
    assert nb.verdict(gap, margin, sign) == expected
    finding = nb.make_finding("rank", "claim", "paper", a, b, sign, "detail")
    assert {"id", "claim", "paper", "measured", "margin", "verdict"} <= set(finding)
    assert (finding["measured"], finding["margin"], finding["verdict"]) == (gap, margin, expected)
    json.dumps(finding)  # goes into ablation_results.json as is


def test_one_seed_has_no_margin_and_a_gap_on_the_margin_is_inconclusive(nb):
    assert nb.seed_gap([1.0], [2.0, 3.0]) == (-1.5, None)
    assert nb.verdict(0.2, 0.2, 1) == "inconclusive" and nb.verdict(-0.3, 0.2, 1) == "disagrees"
    with pytest.raises(ValueError, match="expected_sign"):
        nb.verdict(1.0, 0.1, 0)
    with pytest.raises(ValueError, match="at least one value"):
        nb.seed_gap([], [1.0])


# --- scaling rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "scale"), [("alpha/r", 8 / 16), ("alpha/sqrt(r)", 8 / 4)])
def test_each_rule_gives_its_exact_scale(nb, rule, scale):
    assert nb.LoRALayer(64, 64, 16, 8, rule).scaling == scale
    assert nb.LoRALayer(64, 64, 1, 8, rule).scaling == 8.0  # the two rules meet at r=1


@pytest.mark.parametrize("rule", ["alpha/r", "alpha/sqrt(r)"])
def test_sliced_adapters_apply_the_rule(nb, tiny_model_dir, rule):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nb.inject_plan(model, [], "qv", rank=4, alpha=8, scaling=rule)
    module = model.transformer.h[0].attn.c_attn
    qkv = module.parametrizations.weight[0]
    with torch.no_grad():
        for layer in qkv.lora.values():
            layer.B.normal_()
        delta = module.weight - module.parametrizations.weight.original
        q = qkv.lora["q"]
        expected = (8 / 4 if rule == "alpha/r" else 8 / 2) * (q.B @ q.A).T
        assert torch.allclose(delta[:, : qkv.width], expected, atol=1e-5)
        assert torch.count_nonzero(delta[:, qkv.width : 2 * qkv.width]) == 0


def test_whole_module_plans_apply_the_rule(nb, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nb.inject_plan(model, ["attn.c_proj"], "", rank=4, alpha=8, scaling="alpha/sqrt(r)")
    assert {layer.scaling for layer in nb.lora_layers(model).values()} == {4.0}


# --- the run store -----------------------------------------------------------------------------------------------


def _config(**changes):
    return {"rank": 4, "scaling": "alpha/r", "lr": 2e-4, "data": "abc", **changes}


def _save(nb, runs, config, seed=1, value=0.5):
    record = {"name": "rank-4", "config": config, "seed": seed, "val_loss": 3.0, "trainable_params": 8}
    tensors = {"trained": {"x.A": torch.full((2, 2), value), "x.B": torch.zeros(2, 2)}, "initial_A": {}}
    path = nb.run_file(runs, "rank-4", seed, config)
    return path, nb.save_run(record, tensors, path)


def test_a_saved_run_loads_with_its_tensors(nb, tmp_path):
    path, saved = _save(nb, tmp_path, _config())
    loaded = nb.load_run(path, _config())
    assert loaded == saved and loaded["tensors_file"] == path.with_suffix(".pt").name
    assert torch.equal(nb.load_trained(loaded, tmp_path)["trained"]["x.A"], torch.full((2, 2), 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".pt").name])  # no temp


def test_other_knobs_get_other_files_and_keep_the_old_ones(nb, tmp_path):
    old, _ = _save(nb, tmp_path, _config())
    new, _ = _save(nb, tmp_path, _config(lr=1e-3), value=0.9)
    assert old != new and nb.load_run(old, _config()) is not None and nb.load_run(new, _config(lr=1e-3)) is not None
    assert nb.load_run(nb.run_file(tmp_path, "rank-4", 1, _config(rank=8)), _config(rank=8)) is None  # never run


def test_a_truncated_record_is_moved_aside_and_named(nb, tmp_path, capsys):
    path, _ = _save(nb, tmp_path, _config())
    path.write_bytes(path.read_bytes()[:20])
    assert nb.load_run(path, _config()) is None
    message = capsys.readouterr().out
    assert str(path) in message and "not valid JSON" in message and "trains again" in message
    assert not path.exists() and (tmp_path / (path.name + ".broken")).exists()
    assert (tmp_path / (path.with_suffix(".pt").name + ".broken")).exists()


def test_truncated_or_mismatched_tensors_are_moved_aside(nb, tmp_path, capsys):
    path, _ = _save(nb, tmp_path, _config())
    other, _ = _save(nb, tmp_path, _config(lr=1e-3), value=0.9)
    tensors = path.with_suffix(".pt")
    tensors.write_bytes(other.with_suffix(".pt").read_bytes())  # a record paired with another run's tensors
    assert nb.load_run(path, _config()) is None
    assert "sha256 differs" in capsys.readouterr().out
    path2, _ = _save(nb, tmp_path, _config())  # trained again: a fresh pair
    path2.with_suffix(".pt").write_bytes(path2.with_suffix(".pt").read_bytes()[:-10])  # truncated
    assert nb.load_run(path2, _config()) is None
    assert (tmp_path / (tensors.name + ".broken1")).exists()  # the earlier .broken is never overwritten


def test_a_record_under_another_configs_name_is_moved_aside(nb, tmp_path, capsys):
    path, _ = _save(nb, tmp_path, _config())
    impostor = nb.run_file(tmp_path, "rank-4", 1, _config(lr=1e-3))
    path.rename(impostor)
    assert nb.load_run(impostor, _config(lr=1e-3)) is None
    assert "not the one its file name stands for" in capsys.readouterr().out


def test_a_kill_between_the_two_writes_leaves_no_record(nb, tmp_path, monkeypatch):
    config = _config()
    path = nb.run_file(tmp_path, "rank-4", 1, config)
    real = nb.atomic_write
    calls = []

    def killed_after_tensors(target, data):
        calls.append(target)
        if target.suffix == ".json":
            raise KeyboardInterrupt  # the kernel dies before the record is written
        real(target, data)

    monkeypatch.setitem(nb.save_run.__globals__, "atomic_write", killed_after_tensors)
    with pytest.raises(KeyboardInterrupt):
        nb.save_run({"name": "rank-4", "config": config, "seed": 1}, {"trained": {}}, path)
    monkeypatch.undo()
    assert [c.suffix for c in calls] == [".pt", ".json"] and not path.exists()
    assert nb.load_run(path, config) is None  # so the run trains again; the orphan .pt is replaced atomically
    _save(nb, tmp_path, config)
    assert nb.load_run(path, config) is not None


def test_atomic_write_leaves_the_old_file_when_interrupted(nb, tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")

    with pytest.raises(TypeError):
        nb.atomic_write(target, object())  # fails inside the write
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --- knob validation (the rules table; papermill's kinds of careless input are in test_ablation_bad_inputs.py) ---

GOOD = {
    "SEEDS": [0, 1, 2], "RANKS": [1, 4, 16, 64], "SCALINGS": ["alpha/r", "alpha/sqrt(r)"],
    "RANK_TARGETS": ["attn.c_attn", "attn.c_proj"], "SUBSPACE_RANKS": [8, 64], "AMPLIFICATION_RANKS": [4, 64],
    "LAYER_SCALING": "alpha/sqrt(r)", "ANALYSIS_BLOCK": None, "STEPS_PER_RUN": 400,
}
MODULES = [f"transformer.h.{i}.{m}" for i in range(12) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
SHAPE = {"max_rank": 768, "n_layer": 12, "n_positions": 1024, "module_names": MODULES}


def test_the_defaults_pass(nb):
    nb.validate_knobs(GOOD, nb.ablation_rules(**SHAPE))


@pytest.mark.parametrize(("change", "message"), [
    ({"RANKS": []}, r"RANKS = \[\] is not valid: set RANKS to a list of distinct plain positive integers"),
    ({"RANKS": [4, 4]}, r"RANKS = \[4, 4\] is not valid: set RANKS to a list of distinct"),
    ({"SEEDS": [1, 1]}, r"SEEDS = \[1, 1\] is not valid: set SEEDS to a list of distinct plain integers"),
    ({"SCALINGS": ["alpha/r", "alpha/r"]}, r"SCALINGS = .* set SCALINGS to a list of distinct \['alpha/r', 'alpha/sqrt\(r\)'\]"),
    ({"RANKS": [1, 1024]}, r"RANKS = \[1, 1024\] is not valid: .* up to 768"),
    ({"RANKS": [1, 0]}, r"RANKS = \[1, 0\] is not valid"),
    ({"RANKS": "1, 4"}, r"RANKS = '1, 4' is not valid: .* pass lists with -y"),
    ({"SCALINGS": ["alpha"]}, r"SCALINGS = \['alpha'\] is not valid"),
    ({"RANK_TARGETS": ["c_attention"]}, r"RANK_TARGETS = \['c_attention'\] is not valid: .* module name ends"),
    ({"SUBSPACE_RANKS": [8]}, r"SUBSPACE_RANKS = \[8\] is not valid: .* \[smaller, larger\]"),
    ({"SUBSPACE_RANKS": [64, 8]}, r"SUBSPACE_RANKS = \[64, 8\] is not valid: .* \[smaller, larger\]"),
    ({"AMPLIFICATION_RANKS": [4, 2048]}, r"AMPLIFICATION_RANKS = \[4, 2048\] is not valid"),
    ({"ANALYSIS_BLOCK": 12}, r"ANALYSIS_BLOCK = 12 is not valid: set ANALYSIS_BLOCK to None or a block from 0 to 11"),
    ({"ANALYSIS_BLOCK": -1}, r"ANALYSIS_BLOCK = -1 is not valid"),
    ({"LAYER_SCALING": "r"}, r"LAYER_SCALING = 'r' is not valid: set LAYER_SCALING to one of"),
    ({"STEPS_PER_RUN": 0}, r"STEPS_PER_RUN = 0 is not valid: set STEPS_PER_RUN to a plain integer of at least 2"),
])
def test_a_bad_knob_is_named_with_its_fix(nb, change, message):
    with pytest.raises(ValueError, match=message):
        nb.validate_knobs(GOOD | change, nb.ablation_rules(**SHAPE))


def test_before_the_model_is_loaded_only_its_shape_is_unchecked(nb):
    nb.validate_knobs(GOOD | {"RANKS": [1, 1024], "ANALYSIS_BLOCK": 40}, nb.ablation_rules())  # no shape yet
    with pytest.raises(ValueError, match="RANKS = "):
        nb.validate_knobs(GOOD | {"RANKS": [1, 1024]}, nb.ablation_rules(**SHAPE))


# --- optimizer groups and the initialisation (issue 16's hooks) --------------------------------------------------


def test_lr_ratio_gives_b_its_own_learning_rate(nb, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nb.inject_plan(model, ["attn.c_attn"], "", rank=2, alpha=4)
    one = nb.make_optimizer(model, 1e-3, 0.01)
    assert [g["lr"] for g in one.param_groups] == [1e-3]
    two = nb.make_optimizer(model, 1e-3, 0.01, lr_ratio=16)
    b_ids = {id(p) for n, p in model.named_parameters() if n.endswith(".B")}
    a_ids = {id(p) for n, p in model.named_parameters() if n.endswith(".A")}
    groups = sorted(two.param_groups, key=lambda g: g["lr"])
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1.6e-2])
    assert {id(p) for p in groups[0]["params"]} == a_ids and {id(p) for p in groups[1]["params"]} == b_ids


def test_mirrored_init_starts_at_gpt2_with_a_zero(nb, tiny_model_dir):
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = model(batch).logits
    nb.inject_plan(model, [], "qv", rank=2, alpha=4)
    nb.set_init(model, "mirrored")
    layers = [m for m in model.modules() if isinstance(m, nb.LoRALayer)]
    assert layers and all(torch.count_nonzero(m.A) == 0 and torch.count_nonzero(m.B) > 0 for m in layers)
    assert all(abs(m.B.std().item() - 2**-0.5) < 0.2 for m in layers)  # std 1/sqrt(r), r = 2
    with torch.no_grad():
        assert torch.equal(model(batch).logits, before)  # A = 0: the update is exactly zero
    model.train()
    model(batch, labels=batch).loss.backward()
    assert all(m.A.grad.abs().max() > 0 and torch.count_nonzero(m.B.grad) == 0 for m in layers)  # A moves first


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak-RSS reset is Linux's")
def test_peak_memory_on_a_cpu_counts_what_is_allocated_after_a_reset(nb):
    cpu = torch.device("cpu")
    nb.reset_peak_memory(cpu)
    before = nb.peak_memory_bytes(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
    assert nb.peak_memory_bytes(cpu) - before >= 48 * 2**20
    del block


def test_a_rerun_finding_keeps_its_place_and_remembers_its_seeds_and_steps():
    """After a section reruns with other SEEDS, the summary can tell which findings ran under which knobs."""
    from tools.nbcode import ABLATIONS_NOTEBOOK, load_core

    core = load_core(ABLATIONS_NOTEBOOK)
    space = core.record_findings.__globals__
    space.update(findings=[], SEEDS=[0, 1], STEPS_PER_RUN=10)

    def finding(finding_id, a):
        return core.make_finding(finding_id, "claim", "paper", a, [1.0, 1.0], 1, "detail")

    core.record_findings({"a"}, [finding("a", [2.0, 2.0])])
    core.record_findings({"b"}, [finding("b", [3.0, 3.0])])
    space["SEEDS"] = [1]
    core.record_findings({"a"}, [finding("a", [2.5])])
    assert [f["id"] for f in space["findings"]] == ["a", "b"]
    assert [f["knobs"]["SEEDS"] for f in space["findings"]] == [[1], [0, 1]]
    assert space["findings"][0]["measured"] == 1.5
