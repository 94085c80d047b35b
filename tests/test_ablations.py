"""lora_ablations.ipynb: run end to end on a tiny GPT-2, its definitions in isolation, and its sources vs the main one."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import papermill
import pytest
import torch
from conftest import MAIN_NOTEBOOK, TINY_BLOCK_SIZE, notebook_stdout
from transformers import AutoModelForCausalLM

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core, tagged_sources
from tools.sync_shared import copy_of, sync, top_level_names, without_form_title

RANKS, SUBSPACE_RANKS, SCALINGS = [1, 4, 32], [8, 32], ["alpha/r", "alpha/sqrt(r)"]


def run_ablations(folder: Path, model_dir: Path, text_path: Path, **overrides) -> str:
    """Execute the notebook in a fresh kernel; return everything it printed."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = {
        "MODEL_NAME": str(model_dir), "DATA_URL": "http://127.0.0.1:9/never-used", "DATA_PATH": str(text_path),
        "DATA_SHA256": None, "BLOCK_SIZE": TINY_BLOCK_SIZE, "BATCH_SIZE": 4, "STEPS_PER_RUN": 4, "LR": 1e-2,
        "FULL_FINETUNE_LR": 1e-3, "EVAL_BATCHES": 3, "SEEDS": [1, 2], "RANKS": RANKS,
        "SUBSPACE_RANKS": SUBSPACE_RANKS, "AMPLIFICATION_RANKS": [4, 32], "SAMPLE_TOKENS": 8, "OUTPUT_DIR": "out",
        "RUN_BASELINES": False, "RUN_BEYOND_PAPER": False, **overrides,  # beyond the paper: test_beyond_paper.py
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


def test_findings_quote_the_paper_apart_from_our_reading(results):
    by_id = {}
    for finding in results["findings"]:
        by_id.setdefault(finding["id"], []).append(finding)
        assert "note" in finding
        assert not re.search(r"\b(ties|beats|transfers?|judged|our reading|we read)\b", finding["paper"]), finding["paper"]
    assert [f["claim"] for f in by_id["amplification"]] == ["W projected on ΔW's top-4 directions is larger than on "
                                                            "random ones"]  # the factor ordering that cannot fail: gone
    assert "1.21 (2), 1.18 (4), 1.17 (8), 1.16 (16 to 512)" in by_id["rank"][0]["paper"]  # Table 18's row, any RANKS
    assert "Adapting both Wq and Wv gives the best performance overall." in by_id["weights"][0]["paper"]
    assert by_id["full_finetune"][0]["claim"].startswith("LoRA r=4 (c_attn + c_proj) reaches a lower validation loss")


def test_every_run_config_carries_the_model_fingerprint_of_its_setup(results):
    fingerprint = results["setup"]["model_fingerprint"]
    assert len(fingerprint) == 16
    assert {r["config"]["model_fingerprint"] for key in ("rank", "layers", "full_finetune", "qv") for r in results[key]} == {
        fingerprint}


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


def test_figures_are_written_and_nothing_strays(ablation_run):
    folder, printed = ablation_run
    for name in ("rank_comparison", "layer_selection", "subspace_similarity"):
        assert (folder / "out" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (folder / "out" / "adapter_wq_wv").exists()  # the PEFT export left with issue 15
    nb = nbformat.read(folder / "executed-0.ipynb", 4)
    errors = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"]
    assert errors == []  # no warning, no "Loading weights" bar, no loss_type message
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
    assert "ablation_results.json and the figures beside it come from another setup (data_fingerprint" in printed
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
    with pytest.raises(papermill.PapermillExecutionError, match=r"RANKS = \[1, 0\] is not valid"):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, RANKS=[1, 0])
    assert not (tmp_path / "out").exists()  # failed in seconds, before anything was written


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
        main, ablations = cell_defining(MAIN_NOTEBOOK, name), cell_defining(ABLATIONS_NOTEBOOK, name)
        assert ablations == copy_of(main, ablations)  # the main cell's text, under a collapsed form title at most
        assert without_form_title(ablations)[1] == without_form_title(main)[1]


def test_shared_cells_are_collapsed_and_the_copies_are_in_sync():
    assert sync(check=True) == []
    for source in tagged_sources(ABLATIONS_NOTEBOOK):
        names = top_level_names(source)
        if names and names[0] in {"cpu_has_fast_bf16", "LoRALayer", "adaptable_modules", "evaluate_loss", "merge_lora"}:
            assert without_form_title(source)[0], f"{names[0]}'s cell is not a collapsed form"
    ablation_code = "\n".join(tagged_sources(ABLATIONS_NOTEBOOK))
    assert "def export_peft_adapter" not in ablation_code and "def write_peft_adapter" not in ablation_code


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


@pytest.mark.parametrize("slices", ["", "x", "qq k"])
def test_bad_slices_are_a_clear_error(ablations, slices):
    with pytest.raises(ValueError, match="slices must be letters of 'qkv'"):
        ablations.QKVLoRA(16, 48, slices, rank=2, alpha=4)


# --- a live kernel: Run all, then one section rerun with other knobs ------------------------------------------


def section_cells(nb, heading: str) -> list:
    """The code cells from the markdown heading that starts with `heading` to the next heading."""
    start = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith(heading))
    cells = []
    for cell in nb.cells[start + 1 :]:
        if cell.cell_type == "markdown" and cell.source.startswith("#"):
            break
        if cell.cell_type == "code":
            cells.append(cell)
    return cells


@pytest.fixture(scope="module")
def live_kernel(tmp_path_factory, tiny_model_dir, play_text_path):
    """A kernel that ran the whole notebook on the tiny GPT-2 (no full fine-tuning, no baselines), kept open."""
    from nbclient import NotebookClient
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    folder = tmp_path_factory.mktemp("live")
    parameters = {
        "MODEL_NAME": str(tiny_model_dir), "DATA_URL": "http://127.0.0.1:9/never-used", "DATA_PATH": str(play_text_path),
        "DATA_SHA256": None, "BLOCK_SIZE": TINY_BLOCK_SIZE, "BATCH_SIZE": 4, "STEPS_PER_RUN": 3, "LR": 1e-2,
        "EVAL_BATCHES": 2, "SEEDS": [1, 2], "RANKS": [1, 4], "SUBSPACE_RANKS": [4, 8], "AMPLIFICATION_RANKS": [4, 8],
        "SAMPLE_TOKENS": 4, "OUTPUT_DIR": "out", "RUN_BASELINES": False, "RUN_FULL_FINETUNE": False,
        "RUN_BEYOND_PAPER": False,
    }
    nb = parameterize_notebook(load_notebook_node(str(ABLATIONS_NOTEBOOK)), parameters)
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(folder)}}, timeout=600)
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)

        def run(source: str) -> str:
            cell = nbformat.v4.new_code_cell(source)
            client.execute_cell(cell, 0)
            return "".join(o.get("text", "") for o in cell.outputs)

        def rerun(heading: str) -> str:
            printed = []
            for cell in section_cells(nb, heading):
                client.execute_cell(cell, nb.cells.index(cell))
                printed += [o.get("text", "") for o in cell.outputs]
            return "".join(printed)

        yield nb, run, rerun


def test_rerunning_the_rank_section_with_other_ranks_recomputes_it(live_kernel):
    _, run, rerun = live_kernel
    printed = rerun("## 2.")
    assert "8 runs: 8 saved, 0 to train" in printed  # everything from the store
    run("RANKS = [1, 8]")
    printed = rerun("## 2.")
    assert "8 runs: 4 saved, 4 to train" in printed  # r=1 loads, r=8 trains
    assert run("print(sorted({r['config']['rank'] for r in rank_runs}))").strip() == "[1, 8]"
    assert "on GPT-2 r=8 reaches a lower validation loss than r=1" in printed  # the finding, redrawn
    assert run("print([f['claim'][:12] for f in findings if f['id'] == 'rank'])").strip() == "['on GPT-2 r=8']"


def test_rerunning_the_subspace_section_with_other_ranks_recomputes_it(live_kernel):
    _, run, rerun = live_kernel
    run("SUBSPACE_RANKS = [4, 16]")
    printed = rerun("### 2b.")  # issue 15: this raised KeyError: (16, 1) when the plan was computed cells earlier
    assert "phi(A r=4, A r=16)" in printed and "4 runs: 2 saved, 2 to train" in printed  # qv-r4 is section 3's
    assert run("print(tuple(phi['Wq'].shape), tuple(phi_seeds['Wq'].shape))").strip() == "(4, 16) (16, 16)"
    run("SUBSPACE_RANKS = [16, 4]")
    with pytest.raises(Exception, match=r"SUBSPACE_RANKS = \[16, 4\] is not valid"):  # checked again at the start
        rerun("### 2b.")
    run("SUBSPACE_RANKS = [4, 16]")


def test_rerunning_the_weights_section_with_one_seed_recomputes_it(live_kernel):
    _, run, rerun = live_kernel
    run("SEEDS = [2]")
    printed = rerun("## 1.")
    assert "runs: 9 saved, 0 to train" in printed
    assert run("print(sorted({r['seed'] for r in layer_runs}))").strip() == "[2]"
    assert run("print({f['verdict'] for f in findings if f['id'] == 'weights'})").strip() == "{'inconclusive'}"
    assert "± n/a" in printed
    run("SEEDS = [1, 2]")


def test_after_run_all_the_knobs_are_exactly_the_rules_names(live_kernel):
    _, run, _ = live_kernel
    assert run("print(sorted(set(knob_values()) ^ set(ablation_rules())))").strip() == "[]"


def test_run_experiment_stores_the_init_and_lr_ratio_of_issue_16s_hooks(live_kernel):
    _, run, _ = live_kernel
    printed = run(
        "mirrored = run_experiment('hook-mirrored', RANK_TARGETS, '', 4, 1, init='mirrored', lr_ratio=4.0)\n"
        "plain = run_experiment(rank_name(4, 'alpha/r'), RANK_TARGETS, '', 4, 1)\n"
        "tensors = load_trained(mirrored)\n"
        "a0 = max(t.abs().max().item() for t in tensors['initial_A'].values())\n"
        "b0 = min(t.abs().max().item() for t in tensors['initial_B'].values())\n"
        "print(mirrored['config']['init'], mirrored['config']['lr_ratio'], plain['config']['init'], "
        "plain['config']['lr_ratio'], a0, b0 > 0, mirrored['val_loss'] != plain['val_loss'])"
    )
    assert printed.split()[-7:] == ["mirrored", "4.0", "paper", "1.0", "0.0", "True", "True"]
    with pytest.raises(Exception, match="init must be 'paper' or 'mirrored'"):
        run("run_experiment('x', RANK_TARGETS, '', 4, 1, init='zeros')")


def _knob_state(run) -> tuple[str, str]:
    """What a refused rerun must leave alone: the run files (names and sizes) and the rank sweep's records."""
    files = run("print(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in runs_dir.iterdir()))")
    return files, run("print([(r['name'], r['seed'], r['val_loss']) for r in rank_runs])")


@pytest.mark.parametrize(("knob", "value", "message"), [
    ("RERUN", "'false'", r"RERUN = 'false' is not valid: .*use -y \\?\"RERUN: false"),
    ("LR", "0", r"LR = 0 is not valid: set LR to a positive number"),
    ("DROPOUT", "1.0", r"DROPOUT = 1.0 is not valid"),
    ("RANK", "[1, 8]", r"RANK is not a knob of this notebook: did you mean RANKS\?"),
    ("EVAL_BATCHES", "1", r"EVAL_BATCHES is now 1, but section 0's reference cell ran with 2: .*Rerun from section 0"),
    ("DATA_PATH", "'other.txt'", r"DATA_PATH is now 'other.txt', but section 0's data cell ran with .*Rerun from section 0"),
    ("PRECISION", "'fp16'", r"PRECISION is now 'fp16', but section 0's device cell ran with 'auto'"),
    ("MODEL_NAME", "'openai-community/gpt2'", r"MODEL_NAME is now 'openai-community/gpt2', but section 0's data cell"),
])
def test_live_a_careless_knob_refuses_a_section_rerun_and_changes_nothing(live_kernel, knob, value, message):
    _, run, rerun = live_kernel
    before, previous = _knob_state(run), run(f"print(repr(globals().get({knob!r}, '<unset>')))").strip()
    run(f"{knob} = {value}")
    try:
        with pytest.raises(Exception, match=message):
            rerun("## 2.")
        with pytest.raises(Exception, match=message):  # a direct call checks the same, before it builds a model
            run("run_experiment(rank_name(2, 'alpha/r'), RANK_TARGETS, '', 2, 1)")
    finally:
        run(f"del {knob}" if previous == "'<unset>'" else f"{knob} = {previous}")
    assert _knob_state(run) == before  # nothing trained, nothing written, the records as they were
    assert "8 runs: 8 saved, 0 to train" in rerun("## 2.")  # and the knob set back, the section reruns


def test_live_a_run_name_that_cannot_name_a_file_fails_before_training(live_kernel):
    _, run, _ = live_kernel
    before = _knob_state(run)
    with pytest.raises(Exception, match=r"run_experiment: name 'a/b' names the run's files"):
        run("run_experiment('a/b', RANK_TARGETS, '', 2, 1)")
    assert _knob_state(run) == before


def test_live_sections_2b_and_3_keep_their_own_analysis_block(live_kernel):
    _, run, rerun = live_kernel
    middle = int(run("print(model_shape['n_layer'] // 2)"))
    run("ANALYSIS_BLOCK = 0")
    try:
        rerun("## 3.")  # section 3 moves to block 0; section 2b's results stay those of the middle block
        rerun("## 6.")
        printed = run("print(subspace_block, amplification_block, {a['block'] for a in amplification}, "
                      "json.loads((output_dir / 'ablation_results.json').read_text())['subspace_similarity']['block'])")
        assert printed.split() == [str(middle), "0", "{0}", str(middle)]
    finally:
        run("ANALYSIS_BLOCK = None")
        rerun("## 3.")


def test_live_rebuild_refuses_a_model_folder_whose_weights_changed(live_kernel):
    _, run, _ = live_kernel
    assert run("print(type(rebuild(rank_runs[0], device)).__name__)").strip() == "GPT2LMHeadModel"
    with pytest.raises(Exception, match=r"is not the one run .* trained on \(its config or weights changed since\): "
                                         r"rerun from section 0"):
        run("rebuild(dict(rank_runs[0], config=dict(rank_runs[0]['config'], model_fingerprint='0' * 16)), device)")


def test_live_section_5_shows_full_fine_tuning_only_under_the_knobs_of_now(live_kernel):
    _, run, _ = live_kernel
    run("full = run_experiment('full-finetune', [], '', 0, 1, full_finetune=True)")
    current = "print(len(runs_now([full], whole=[], qkv='', rank=0, full_finetune=True)))"
    assert run(current).strip() == "1"
    for knob, other, back in (("STEPS_PER_RUN", "4", "3"), ("SEEDS", "[2]", "[1, 2]"), ("FULL_FINETUNE_LR", "1e-4", "5e-5")):
        run(f"{knob} = {other}")
        try:
            assert run(current).strip() == "0", knob  # section 4's run is not the one section 5 would show now
        finally:
            run(f"{knob} = {back}")
    assert run(current).strip() == "1"
