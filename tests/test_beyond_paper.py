"""lora_ablations.ipynb beyond the paper (issue 16): the mirrored init, LoRA+ and intruder dimensions, on a tiny GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits
from test_ablations import run_ablations

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core

TARGETS = ["attn.c_attn", "attn.c_proj"]
# The cheapest notebook that still runs every comparison of the section: two seeds, two ranks, full fine-tuning on.
KNOBS = {"RANKS": [1, 4], "SUBSPACE_RANKS": [4, 8], "AMPLIFICATION_RANKS": [4, 8], "STEPS_PER_RUN": 3,
         "EVAL_BATCHES": 2, "INIT_LR_FACTORS": [1, 3], "LORAPLUS_RATIOS": [1, 4]}


@pytest.fixture(scope="module")
def beyond():
    """The ablations notebook's lora-core definitions: run_experiment's helpers and the intruder count among them."""
    return load_core(ABLATIONS_NOTEBOOK)


def _adapted(beyond, fresh, init: str):
    model = fresh()
    beyond.inject_lora(model, TARGETS, rank=4, alpha=8)
    beyond.set_init(model, init)
    return model


# --- which factor starts at zero -----------------------------------------------------------------------------


def test_mirrored_init_computes_w0_exactly_and_zeroes_a_not_b(beyond, fresh, batch):
    model = _adapted(beyond, fresh, "mirrored")
    layers = beyond.lora_layers(model)
    assert len(layers) == 2 * model.config.n_layer
    for name, layer in layers.items():
        module = model.get_submodule(name)
        assert torch.equal(module.weight, module.parametrizations.weight.original)  # W0, bit for bit
        assert torch.count_nonzero(layer.A) == 0 and torch.count_nonzero(layer.B) == layer.B.numel()
    b = torch.cat([layer.B.detach().flatten() for layer in layers.values()])
    assert b.std().item() == pytest.approx(4**-0.5, rel=0.1)  # 1/sqrt(fan-in), and B's fan-in is r = 4
    assert torch.equal(logits(model, batch), logits(fresh(), batch))


@pytest.mark.parametrize(("init", "moves", "still"), [("mirrored", "A", "B"), ("paper", "B", "A")])
def test_the_first_gradient_reaches_only_the_factor_that_is_not_zero(beyond, fresh, batch, init, moves, still):
    model = _adapted(beyond, fresh, init)
    model(input_ids=batch, labels=batch).loss.backward()
    for layer in beyond.lora_layers(model).values():
        assert getattr(layer, moves).grad.abs().max() > 0
        assert torch.count_nonzero(getattr(layer, still).grad) == 0


# --- LoRA+ ---------------------------------------------------------------------------------------------------


def test_loraplus_gives_the_optimizer_two_groups_with_the_stated_rates(beyond, fresh, monkeypatch):
    model = _adapted(beyond, fresh, "paper")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = beyond.make_optimizer(model, 1e-3, 0.0, 16).param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1.6e-2)]
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups[0]["params"]} == {"A"}
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups[1]["params"]} == {"B"}
    assert sum(len(g["params"]) for g in groups) == 4 * model.config.n_layer  # A and B of c_attn and c_proj
    single = beyond.make_optimizer(model, 1e-3, 0.0).param_groups
    assert len(single) == 1 and len(single[0]["params"]) == 4 * model.config.n_layer

    built = []  # the optimizer train_for_steps builds, and what one step of it does

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    beyond.train_for_steps(model, blocks, 1, 2, 1e-3, 0.0, 0, torch.device("cpu"), "fp32", "test", lr_ratio=16)
    assert [g["lr"] for g in built[0].param_groups] == [1e-3, pytest.approx(1.6e-2)]
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert max(v for n, v in step.items() if n.endswith(".B")) == pytest.approx(1.6e-2, rel=1e-3)  # Adam: lr x 1
    assert max(v for n, v in step.items() if n.endswith(".A")) == 0  # B was zero: A had no gradient yet


# --- intruder dimensions ---------------------------------------------------------------------------------------


def _w0(rows: int = 60, cols: int = 20):
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    s = torch.linspace(10, 1, cols, dtype=torch.float64)
    return u, s, v, u[:, :cols] @ torch.diag(s) @ v.T


def test_rescaling_w0s_own_singular_values_adds_no_intruder(beyond):
    u, s, v, w0 = _w0()
    assert beyond.intruder_count(w0, w0, 10, 0.5) == 0
    rescaled = u[:, :20] @ torch.diag(s * torch.linspace(3, 0.2, 20, dtype=torch.float64)) @ v.T  # reorders them too
    assert beyond.intruder_count(w0, rescaled, 10, 0.5) == 0
    assert beyond.intruder_count(w0, 5 * w0, 10, 0.5) == 0


def test_a_large_rank_one_spike_orthogonal_to_w0_adds_exactly_one(beyond):
    u, s, v, w0 = _w0()
    spike = 50 * torch.outer(u[:, 30], v[:, 0])  # u[:, 30] is orthogonal to every left singular vector of W0
    assert beyond.intruder_count(w0, w0 + spike, 10, 0.5) == 1
    assert beyond.intruder_count(w0, w0 + spike + 50 * torch.outer(u[:, 40], v[:, 1]), 10, 0.5) == 2
    small = 0.01 * torch.outer(u[:, 30], v[:, 0])  # too small to reach the top 10
    assert beyond.intruder_count(w0, w0 + small, 10, 0.5) == 0
    counts = beyond.count_intruders(w0, w0 + spike, 10, 0.5, (0, 1))
    assert counts["count"] == 1 and counts["delta_norm"] == pytest.approx(50)
    assert len(counts["random_count"]) == 2 and all(0 <= c <= 10 for c in counts["random_count"])


def test_random_perturbations_have_the_norm_of_the_update(beyond, monkeypatch):
    _, _, _, w0 = _w0()
    seen, count = [], beyond.intruder_count

    def spy(w0, tuned, k, epsilon):
        seen.append(torch.linalg.matrix_norm(tuned - w0).item())
        return count(w0, tuned, k, epsilon)

    monkeypatch.setitem(beyond.count_intruders.__globals__, "intruder_count", spy)
    beyond.count_intruders(w0, w0 + 0.3 * torch.ones_like(w0), 10, 0.5, (0, 1))
    assert seen[:2] == pytest.approx([0.3 * (60 * 20) ** 0.5] * 2)


# --- the knobs, by the notebook's rules table ------------------------------------------------------------------


GOOD = {"RUN_BEYOND_PAPER": True, "INIT_LR_FACTORS": [1, 3, 10], "LORAPLUS_RATIOS": [1, 4, 16], "INTRUDER_K": 10,
        "INTRUDER_EPSILON": 0.5}


@pytest.mark.parametrize(("knob", "value", "message"), [
    ("RUN_BEYOND_PAPER", "false", r"set RUN_BEYOND_PAPER to True or False \('false' is text: use -y \"RUN_BEYOND_PAPER: false\""),
    ("INIT_LR_FACTORS", [1, 2.5], "set INIT_LR_FACTORS to a list of distinct positive plain integers"),
    ("INIT_LR_FACTORS", 3, "set INIT_LR_FACTORS to a list of"),
    ("LORAPLUS_RATIOS", [4, 16], "set LORAPLUS_RATIOS to .* that holds 1 and a larger ratio"),
    ("LORAPLUS_RATIOS", [1], "set LORAPLUS_RATIOS to .* that holds 1 and a larger ratio"),
    ("INTRUDER_K", 0, "set INTRUDER_K to a positive plain integer up to 64"),
    ("INTRUDER_K", 65, "set INTRUDER_K to a positive plain integer up to 64"),
    ("INTRUDER_EPSILON", 1.5, "set INTRUDER_EPSILON to a cosine between 0 and 1"),
])
def test_a_bad_section_knob_is_refused_by_name(beyond, knob, value, message):
    rules = beyond.ablation_rules(max_rank=64)
    beyond.validate_knobs(GOOD, rules)
    with pytest.raises(ValueError, match=rf"{knob} = .* is not valid: {message}"):
        beyond.validate_knobs(dict(GOOD, **{knob: value}), rules)


# --- end to end: the switch off, then on, in one run store -------------------------------------------------------


@pytest.fixture(scope="module")
def switched(tmp_path_factory, tiny_model_dir, play_text_path):
    folder = tmp_path_factory.mktemp("beyond")
    off = run_ablations(folder, tiny_model_dir, play_text_path, RUN_BEYOND_PAPER=False, **KNOBS)
    off_results = json.loads((folder / "out" / "ablation_results.json").read_text())
    on = run_ablations(folder, tiny_model_dir, play_text_path, RUN_BEYOND_PAPER=True, **KNOBS)
    on_results = json.loads((folder / "out" / "ablation_results.json").read_text())
    return folder, off, off_results, on, on_results


def test_switched_off_the_section_trains_and_writes_nothing(switched):
    _, off, results, _, _ = switched
    assert results["init_orientation"] == [] and results["loraplus"] == [] and results["intruders"] == []
    assert not {"init", "loraplus", "intruders"} & {f["id"] for f in results["findings"]}
    assert "W + B @ A" not in off and "intruders" not in off and "init-mirrored" not in off


def test_switched_on_only_the_sections_new_runs_train(switched):
    folder, _, _, on, _ = switched
    section = on[on.index("W + B @ A"):]
    assert section.count("runs left") == 2 * 3 + 2 * 1  # (mirrored 1x, 3x; paper 3x) and lambda=4, two seeds each
    assert "8 runs: 2 saved, 6 to train" in section and "4 runs: 2 saved, 2 to train" in section
    assert "6 runs: 6 saved, 0 to train" in section  # the intruder count: LoRA r=1, r=4 and full fine-tuning, loaded
    assert (folder / "out" / "figures" / "beyond_paper.png").read_bytes()[:4] == b"\x89PNG"
    assert "max |diff| 0.0e+00; so B = zeros(" in section  # the tutorial pattern's W + B @ A, exactly our LoRALayer


def test_init_and_loraplus_records_follow_the_contract(switched):
    *_, results = switched
    rank_keys = set(results["rank"][0])
    for key in ("init_orientation", "loraplus"):
        assert results[key] and all(set(r) == rank_keys for r in results[key])
    lr = results["rank"][0]["config"]["lr"]
    init = {(r["config"]["init"], round(r["config"]["lr"] / lr, 6), r["seed"]) for r in results["init_orientation"]}
    assert init == {(i, f, s) for i in ("paper", "mirrored") for f in (1, 3) for s in (1, 2)}
    assert {r["config"]["lr_ratio"] for r in results["init_orientation"]} == {1.0}
    sweep = {r["seed"]: r for r in results["rank"] if r["config"]["rank"] == 4 and r["config"]["scaling"] == "alpha/r"}
    for seed in (1, 2):
        paper = next(r for r in results["init_orientation"] if r["config"]["init"] == "paper" and r["seed"] == seed
                     and r["config"]["lr"] == sweep[seed]["config"]["lr"])
        mirrored = next(r for r in results["init_orientation"] if r["config"]["init"] == "mirrored"
                        and r["seed"] == seed and r["config"]["lr"] == sweep[seed]["config"]["lr"])
        assert paper["val_loss"] == sweep[seed]["val_loss"] and paper["name"] == "rank-4-alpha-r"  # reused
        assert mirrored["val_loss"] != paper["val_loss"]
    ratios = sorted((r["config"]["lr_ratio"], r["seed"]) for r in results["loraplus"])
    assert ratios == [(1.0, 1), (1.0, 2), (4.0, 1), (4.0, 2)]
    plus = {(r["config"]["lr_ratio"], r["seed"]): r["val_loss"] for r in results["loraplus"]}
    assert plus[4.0, 1] != plus[1.0, 1] and {r["config"]["init"] for r in results["loraplus"]} == {"paper"}
    assert {r["config"]["init"] for r in results["rank"]} == {"paper"}
    assert all(r["config"]["init"] is None and r["config"]["lr_ratio"] is None for r in results["full_finetune"])


def test_intruder_records_and_the_findings(switched, tiny_model_dir):
    *_, results = switched
    n_layer = json.loads((tiny_model_dir / "config.json").read_text())["n_layer"]
    intruders = results["intruders"]
    assert {(x["run"], x["seed"], x["weight"]) for x in intruders} == {
        (run, s, w) for run in ("LoRA r=1", "LoRA r=4", "full fine-tuning") for s in (1, 2) for w in TARGETS}
    for x in intruders:
        assert {"run", "seed", "weight", "k", "epsilon", "count", "random_count"} <= set(x)
        assert (x["k"], x["epsilon"], x["block"]) == (10, 0.5, n_layer // 2)
        assert 0 <= x["count"] <= 10 and len(x["random_count"]) == 2 and x["delta_norm"] > 0
    findings = [f for f in results["findings"] if f["id"] in ("init", "loraplus", "intruders")]
    assert [f["id"] for f in findings] == ["init", "init", "loraplus", "intruders", "intruders"]
    for f in findings:
        assert f["n"] == [2, 2] and f["margin"] is not None and f["paper"] and f["claim"]
        assert (f["verdict"] != "inconclusive") == (abs(f["measured"]) > f["margin"]), f
    low = [sum(x["count"] for x in intruders if x["run"] == "LoRA r=1" and x["seed"] == s) for s in (1, 2)]
    full = [sum(x["count"] for x in intruders if x["run"] == "full fine-tuning" and x["seed"] == s) for s in (1, 2)]
    assert findings[3]["measured"] == pytest.approx(sum(low) / 2 - sum(full) / 2)


def test_full_fine_tuning_keeps_the_analysis_blocks_two_weights(switched, tiny_model_dir):
    folder, *_, results = switched
    n_layer = json.loads((tiny_model_dir / "config.json").read_text())["n_layer"]
    full = results["full_finetune"][0]
    assert full["config"]["kept_block"] == n_layer // 2
    record = json.loads(next((folder / "out" / "ablation_runs").glob("full-finetune-seed1-*.json")).read_text())
    kept = torch.load(folder / "out" / "ablation_runs" / record["tensors_file"], weights_only=True)["kept"]
    assert sorted(kept) == [f"transformer.h.{n_layer // 2}.{w}.weight" for w in TARGETS]
