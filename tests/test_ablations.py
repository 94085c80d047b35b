"""lora_ablations.ipynb: run end to end on a tiny GPT-2, its definitions in isolation, and its sources vs the main one."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import papermill
import pytest
import torch
from conftest import MAIN_NOTEBOOK, TINY_BLOCK_SIZE, notebook_stdout
from transformers import AutoModelForCausalLM

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core, tagged_sources

RANKS, SUBSPACE_RANKS, SCALINGS = [1, 4, 32], [8, 32], ["alpha/r", "alpha/sqrt(r)"]


def run_ablations(folder: Path, model_dir: Path, text_path: Path, **overrides) -> str:
    """Execute the notebook in a fresh kernel; return everything it printed."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = {
        "MODEL_NAME": str(model_dir), "DATA_URL": "http://127.0.0.1:9/never-used", "DATA_PATH": str(text_path),
        "DATA_SHA256": None, "BLOCK_SIZE": TINY_BLOCK_SIZE, "BATCH_SIZE": 4, "STEPS_PER_RUN": 4, "LR": 1e-2,
        "FULL_FINETUNE_LR": 1e-3, "EVAL_BATCHES": 3, "SEEDS": [1, 2], "RANKS": RANKS,
        "SUBSPACE_RANKS": SUBSPACE_RANKS, "AMPLIFICATION_RANKS": [4, 32], "SAMPLE_TOKENS": 8, "OUTPUT_DIR": "out",
        "RUN_BASELINES": False, **overrides,
    }
    executed = folder / f"executed-{len(list(folder.glob('executed-*')))}.ipynb"
    papermill.execute_notebook(str(ABLATIONS_NOTEBOOK), str(executed), cwd=str(folder), parameters=parameters,
                               progress_bar=False, kernel_name="python3")
    return notebook_stdout(executed)


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory, tiny_model_dir, play_text_path):
    folder = tmp_path_factory.mktemp("ablations")
    first = run_ablations(folder, tiny_model_dir, play_text_path)
    return folder, first


@pytest.fixture(scope="module")
def results(ablation_run):
    folder, _ = ablation_run
    return json.loads((folder / "out" / "ablation_results.json").read_text())


@pytest.fixture(scope="module")
def ablations():
    return load_core(ABLATIONS_NOTEBOOK)


# --- end to end ----------------------------------------------------------------------------------------------


def test_results_have_the_agreed_structure(results):
    assert {"rank", "layers", "full_finetune", "qv", "subspace_similarity", "amplification", "findings"} <= set(results)
    for key in ("rank", "layers", "full_finetune", "qv"):
        assert results[key], key
        for record in results[key]:
            assert {"name", "config", "seed", "trainable_params", "val_loss", "seconds", "seconds_per_step",
                    "peak_memory_bytes"} <= set(record)
            assert record["val_loss"] > 0 and record["seconds"] > 0 and record["peak_memory_bytes"] > 0
            assert 0 < record["seconds_per_step"] <= record["seconds"]
    assert sorted((r["config"]["rank"], r["config"]["scaling"], r["seed"]) for r in results["rank"]) == sorted(
        (r, s, seed) for r in RANKS for s in SCALINGS for seed in (1, 2))
    assert len(results["layers"]) == 9 * 2 and len(results["full_finetune"]) == 2


def test_rank_sweep_runs_each_scaling_rule_from_the_same_start(results):
    by_rule = {s: {(r["config"]["rank"], r["seed"]): r for r in results["rank"] if r["config"]["scaling"] == s}
               for s in SCALINGS}
    for key, run in by_rule["alpha/r"].items():
        other = by_rule["alpha/sqrt(r)"][key]
        assert run["trainable_params"] == other["trainable_params"]
        if key[0] == 1:  # the same scale at r=1 and the same initial A: the same run
            assert run["val_loss"] == pytest.approx(other["val_loss"], abs=1e-6)
        else:
            assert run["val_loss"] != other["val_loss"]


def test_findings_follow_the_contract(results):
    findings = results["findings"]
    assert {f["id"] for f in findings} == {"rank", "weights", "scaling", "full_finetune", "subspace", "amplification"}
    for f in findings:
        assert {"id", "claim", "paper", "measured", "margin", "verdict"} <= set(f)
        assert f["verdict"] in ("agrees", "disagrees", "inconclusive") and f["claim"] and f["paper"]
        assert f["margin"] is not None and f["margin"] >= 0  # two seeds everywhere
        outside = abs(f["measured"]) > f["margin"]
        assert (f["verdict"] != "inconclusive") == outside, f


def test_every_layer_row_has_the_same_budget(results, tiny_model_dir):
    n_layer, d = (json.loads((tiny_model_dir / "config.json").read_text())[k] for k in ("n_layer", "n_embd"))
    budgets = {r["trainable_params"] for r in results["layers"]}
    assert budgets == {n_layer * 4 * (4 * d + 2 * d)}  # c_attn + c_proj at r=4, the reference row
    rank4 = next(r for r in results["layers"] if r["plan"] == "c_attn+c_proj" and r["seed"] == 1)
    assert rank4["name"] == "rank-4-alpha-sqrt-r"  # the rank sweep's run under LAYER_SCALING, reused
    assert {r["config"]["scaling"] for r in results["layers"]} == {"alpha/sqrt(r)"}


def test_full_finetune_trains_everything(results):
    full = results["full_finetune"][0]
    lora_r4 = next(r for r in results["rank"] if r["config"]["rank"] == 4)
    assert full["trainable_params"] > 20 * lora_r4["trainable_params"]
    assert full["config"]["lr"] != results["rank"][0]["config"]["lr"]


def test_subspace_similarity_is_a_valid_phi_matrix_for_wq_and_wv(results):
    subspace = results["subspace_similarity"]
    assert subspace["ranks"] == SUBSPACE_RANKS and "block" in subspace
    for weight in ("Wq", "Wv"):
        phi, seeds = torch.tensor(subspace[weight]["phi"]), torch.tensor(subspace[weight]["seeds"])
        assert phi.shape == tuple(SUBSPACE_RANKS) and seeds.shape == (SUBSPACE_RANKS[1], SUBSPACE_RANKS[1])
        for matrix in (phi, seeds, torch.tensor(subspace[weight]["phi_random"])):
            assert matrix.min() >= 0 and matrix.max() <= 1 + 1e-9
    assert subspace["Wq"]["phi"] != subspace["Wv"]["phi"]  # two separate adapters
    qv = {(r["config"]["rank"], r["seed"]) for r in results["qv"]}
    assert qv == {(r, s) for r in (4, 8, 32) for s in (1, 2)}
    assert all(r["config"]["qkv"] == "qv" and r["config"]["scaling"] == "alpha/r" for r in results["qv"])


def test_amplification_table(results):
    assert [(a["rank"], a["seed"]) for a in results["amplification"]] == [(4, 1), (4, 2), (32, 1), (32, 2)]
    for entry in results["amplification"]:
        assert set(entry["projection_norm"]) == {"delta_w", "w", "random"}
        assert entry["amplification_factor"] == pytest.approx(entry["delta_w_norm"] / entry["projection_norm"]["delta_w"])


def test_figures_and_adapter_are_written(ablation_run):
    folder, printed = ablation_run
    for name in ("rank_comparison", "layer_selection", "subspace_similarity"):
        assert (folder / "out" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "out" / "adapter_wq_wv" / "adapter_model.safetensors").is_file()
    assert "every row has the same budget: True" in printed
    assert printed.count("phi(A, A, i, i) in [1.000000, 1.000000] (must be 1)") == 2  # Wq and Wv


def test_other_knobs_or_data_keep_finished_runs_and_one_seed_is_inconclusive(ablation_run, tiny_model_dir,
                                                                              play_text_path, tmp_path):
    folder, _ = ablation_run
    runs = folder / "out" / "ablation_runs"
    before = {p.name: p.read_bytes() for p in runs.iterdir()}
    other_text = tmp_path / "other.txt"
    other_text.write_text(play_text_path.read_text().replace("king", "duke"))
    printed = run_ablations(folder, tiny_model_dir, other_text, SEEDS=[1], RANKS=[1], RUN_FULL_FINETUNE=False,
                            SUBSPACE_RANKS=[4, 8], AMPLIFICATION_RANKS=[4, 8])
    assert "runs left" in printed and "loaded from" not in printed  # other data: no saved run answers
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.name in before} == before  # nothing overwritten
    one_seed = json.loads((folder / "out" / "ablation_results.json").read_text())
    assert one_seed["findings"] and {f["verdict"] for f in one_seed["findings"]} == {"inconclusive"}
    assert all(f["margin"] is None for f in one_seed["findings"])
    assert "± n/a" in printed and "± 0.0000" not in printed
    assert one_seed["subspace_similarity"]["Wq"]["seeds"] is None


def test_broken_run_files_are_moved_aside_and_only_they_retrain(ablation_run, tiny_model_dir, play_text_path,
                                                                  results):
    folder, _ = ablation_run
    runs = folder / "out" / "ablation_runs"
    def first_run(pattern: str) -> Path:  # the fixture's run: other tests add runs with other knobs beside it
        return min((p for p in runs.glob(pattern) if p.with_suffix(".json").exists()), key=lambda p: p.stat().st_mtime)

    truncated = first_run("rank-4-alpha-r-seed2-*.json")
    truncated.write_bytes(truncated.read_bytes()[:100])  # a kill in the middle of a write without the rename
    mismatched = first_run("qv-r8-seed1-*.pt")
    mismatched.write_bytes(first_run("qv-r8-seed2-*.pt").read_bytes())  # a record paired with other tensors
    printed = run_ablations(folder, tiny_model_dir, play_text_path)
    assert truncated.name in printed and mismatched.with_suffix(".json").name in printed
    assert "not valid JSON" in printed and "its sha256 differs" in printed and printed.count("trains again") == 2
    assert printed.count("runs left") == 2 and "loaded from" in printed  # only the two broken runs trained again
    assert (runs / (truncated.name + ".broken")).exists() and (runs / (mismatched.name + ".broken")).exists()
    again = json.loads((folder / "out" / "ablation_results.json").read_text())
    key = lambda r: (r["name"], r["seed"])  # noqa: E731
    assert {key(r): r["val_loss"] for r in again["rank"]} == pytest.approx({key(r): r["val_loss"] for r in results["rank"]})


def test_checkpoint_sizes_count_only_what_a_checkpoint_needs(results):
    lora = next(r for r in results["rank"] if r["config"]["rank"] == 4)
    floats = lora["trainable_params"] * 4
    assert floats < lora["checkpoint_bytes"] < floats + 64 * 1024  # the A and B tensors plus pickle overhead
    assert results["full_finetune"][0]["checkpoint_bytes"] > 20 * lora["checkpoint_bytes"]


def test_a_bad_knob_fails_before_the_first_run(tmp_path, tiny_model_dir, play_text_path):
    with pytest.raises(papermill.PapermillExecutionError, match="RANKS holds 0"):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, RANKS=[1, 0])
    assert not list((tmp_path / "out" / "ablation_runs").iterdir())  # failed in seconds, nothing trained


# --- definitions in isolation --------------------------------------------------------------------------------


def _defined(notebook: Path) -> dict[str, str]:
    sources = {}
    for cell in tagged_sources(notebook):
        for node in ast.parse(cell).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                sources[node.name] = ast.get_source_segment(cell, node)
    return sources


def test_shared_definitions_are_identical_in_both_notebooks():
    main, ablation = _defined(MAIN_NOTEBOOK), _defined(ABLATIONS_NOTEBOOK)
    assert {"LoRALayer", "inject_lora"} <= set(main) & set(ablation)
    for name in set(main) & set(ablation):
        assert main[name] == ablation[name], f"{name} differs between the two notebooks"


def test_lora_layer_and_inject_cells_are_identical_text():
    def cell_defining(notebook, name):
        return next(c for c in tagged_sources(notebook) if f"class {name}(" in c or f"def {name}(" in c)

    for name in ("LoRALayer", "inject_lora"):
        assert cell_defining(MAIN_NOTEBOOK, name) == cell_defining(ABLATIONS_NOTEBOOK, name)


def _randomize_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_only_q_and_v_leaves_the_k_slice_exactly_unchanged(ablations, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = ablations.inject_plan(model, [], "qv", rank=6, alpha=8)
    assert adapted == ["transformer.h.0.attn.c_attn[qv]", "transformer.h.1.attn.c_attn[qv]"]
    _randomize_lora(model)
    module = model.transformer.h[0].attn.c_attn
    delta = (module.weight - module.parametrizations.weight.original).detach()
    width = delta.shape[1] // 3
    q, k, v = delta[:, :width], delta[:, width : 2 * width], delta[:, 2 * width :]
    assert torch.count_nonzero(k) == 0
    assert q.abs().max() > 0 and v.abs().max() > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)


@pytest.mark.parametrize(("whole", "qkv", "rank"), [([], "q", 12), (["attn.c_proj"], "qkv", 3), ([], "qv", 6),
                                                    (["attn.c_attn"], "", 6), (["attn.c_attn", "attn.c_proj"], "", 4)])
def test_layer_plans_have_equal_budgets(ablations, tiny_model_dir, whole, qkv, rank):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ablations.inject_plan(model, whole, qkv, rank, alpha=8)
    d, n_layer = model.config.n_embd, model.config.n_layer
    assert ablations.count_parameters(model, trainable_only=True) == n_layer * 4 * (4 * d + 2 * d)


def test_subspace_similarity_bounds_and_identity(ablations):
    generator = torch.Generator().manual_seed(0)
    a8, a64 = torch.randn(8, 100, generator=generator), torch.randn(64, 100, generator=generator)
    phi = ablations.subspace_similarity(a8, a64)
    assert phi.shape == (8, 64) and phi.min() >= 0 and phi.max() <= 1 + 1e-12
    assert torch.allclose(ablations.subspace_similarity(a8, a8).diagonal(), torch.ones(8, dtype=torch.float64))
    nested = ablations.subspace_similarity(a8, torch.cat([a8, a64[:8]]))  # a8's row space lies inside the other's
    assert nested[-1, -1] == pytest.approx(1.0)
    disjoint = ablations.subspace_similarity(torch.eye(100)[:4], torch.eye(100)[4:12])
    assert disjoint.abs().max() < 1e-12


def test_sliced_qv_adapter_exports_as_a_rank_2r_peft_adapter(ablations, tiny_model_dir, tmp_path):
    from peft import PeftModel

    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    ablations.inject_plan(ours, [], "qv", rank=6, alpha=8)
    _randomize_lora(ours)
    folder = ablations.export_qkv_peft_adapter(ours, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 16)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    batch = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(batch).logits - peft_model(batch).logits).abs().max().item() <= 1e-5
        merged = peft_model.merge_and_unload().transformer.h[0].attn.c_attn.weight
        assert (merged - ours.transformer.h[0].attn.c_attn.weight).abs().max().item() <= 1e-5


def test_export_refuses_a_mixed_plan(ablations, tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ablations.inject_plan(model, ["attn.c_proj"], "qkv", rank=3, alpha=8)
    with pytest.raises(ValueError, match="QKV slices only"):
        ablations.export_qkv_peft_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("slices", ["", "x", "qq k"])
def test_bad_slices_are_a_clear_error(ablations, slices):
    with pytest.raises(ValueError, match="slices must be letters of 'qkv'"):
        ablations.QKVLoRA(16, 48, slices, rank=2, alpha=4)
