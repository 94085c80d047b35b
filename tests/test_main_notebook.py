"""Run lora_from_scratch.ipynb top to bottom with papermill on a tiny GPT-2, offline, and check what it produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import papermill
import pytest
import torch
from conftest import MAIN_NOTEBOOK, TINY_BLOCK_SIZE, notebook_stdout

STEPS = 40
EXPECTED_RESULT_KEYS = {
    "base_params", "lora_params", "trainable_fraction", "val_loss_before", "val_loss_after", "val_ppl_before",
    "val_ppl_after", "lora_file_bytes", "full_model_file_bytes", "merge_max_abs_diff", "reload_max_abs_diff",
    "train_seconds", "tokens_per_second", "device", "precision", "val_loss_best", "adapter_off_max_abs_diff",
    "unmerge_max_abs_diff", "swap_seconds", "reload_seconds", "scaler_skipped_steps",
}
FP16_STEPS = 6


def tiny_parameters(model_dir: Path, text_path: Path, text_sha256: str) -> dict:
    return {
            "MODEL_NAME": str(model_dir),
            "DATA_URL": "http://127.0.0.1:9/never-used",  # the file is present: nothing is downloaded
            "DATA_PATH": str(text_path),
            "DATA_SHA256": text_sha256,
            "BLOCK_SIZE": TINY_BLOCK_SIZE,
            "BATCH_SIZE": 4,
            "EPOCHS": 1,
            "MAX_STEPS": STEPS,
            "LR": 5e-3,  # 2e-2 overshoots under bf16 autocast on a CPU with native bf16: the loss rises after step 10
            "EVAL_INTERVAL": 10,
            "EVAL_BATCHES": 5,
            "MAX_NEW_TOKENS": 12,
            "LATENCY_TOKENS": 8,
            "SECOND_ADAPTER_STEPS": 5,
            "OUTPUT_DIR": "out",
    }


def run_main_notebook(folder: Path, model_dir: Path, text_path: Path, text_sha256: str, **overrides) -> Path:
    """Execute the notebook in a fresh kernel, in an empty folder, with the tiny model and text."""
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / "executed.ipynb"
    papermill.execute_notebook(
        str(MAIN_NOTEBOOK), str(executed), cwd=str(folder), progress_bar=False, kernel_name="python3",
        parameters=tiny_parameters(model_dir, text_path, text_sha256) | overrides,
    )
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, play_text_path, play_text_sha256):
    """Two runs with the same seed, each in its own folder and kernel."""
    base = tmp_path_factory.mktemp("notebook-runs")
    return [run_main_notebook(base / f"run{i}", tiny_model_dir, play_text_path, play_text_sha256) for i in (1, 2)]


@pytest.fixture(scope="module")
def run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def results(run):
    return json.loads((run / "out" / "results.json").read_text())


def printed(run: Path) -> str:
    return notebook_stdout(run / "executed.ipynb")


def test_the_notebook_writes_every_artifact(run):
    out = run / "out"
    for name in ["results.json", "training_losses.json", "lora_weights.pt", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "figures/training_curve.png", "figures/c_attn_to_scale.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_have_the_agreed_keys_and_consistent_values(results):
    assert set(results) == EXPECTED_RESULT_KEYS
    assert results["trainable_fraction"] == pytest.approx(results["lora_params"] / results["base_params"])
    assert results["val_ppl_after"] == pytest.approx(torch.tensor(results["val_loss_after"]).exp().item(), rel=1e-5)
    assert results["device"] == "cpu" and results["precision"] in {"fp32", "bf16"}
    assert results["train_seconds"] > 0 and results["tokens_per_second"] > 0


def test_lora_params_match_the_formula_for_the_tiny_config(results, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    d, rank = config["n_embd"], 4
    per_block = rank * ((d + 3 * d) + (d + d))  # c_attn (d -> 3d) and attn.c_proj (d -> d)
    assert results["lora_params"] == config["n_layer"] * per_block


def test_validation_loss_drops_on_a_learnable_text(results):
    assert results["val_loss_after"] < results["val_loss_before"] - 0.1


def test_merge_and_reload_reproduce_the_trained_model(results):
    assert results["merge_max_abs_diff"] <= 1e-5
    assert results["reload_max_abs_diff"] <= 1e-5
    assert 0 < results["lora_file_bytes"] < results["full_model_file_bytes"]


def test_loss_history_covers_every_step_and_every_evaluation(run):
    history = json.loads((run / "out" / "training_losses.json").read_text())
    assert history["train_step"] == list(range(1, STEPS + 1)) and len(history["train_loss"]) == STEPS
    assert history["val_step"] == [0, 10, 20, 30, 40]


def test_the_printed_checks_hold(run):
    text = printed(run)
    assert "max |logits(LoRA at init) - logits(GPT-2)| = 0.0" in text
    assert "every trainable tensor is an A or a B: True" in text
    assert "mlp.c_proj adapted: False" in text
    assert "pretrained weights bit-identical: True" in text
    assert "max |grad A| = 0.00e+00" in text  # only B gets a gradient at initialisation
    assert "the three LoRA variants generate the same tokens: True" in text


def test_the_saved_weights_load_into_a_fresh_model(core, run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = core.load_lora(model, run / "out" / "lora_weights.pt")
    assert len(adapted) == 4 and any(layer.B.abs().sum() > 0 for layer in core.lora_layers(model).values())


def test_same_seed_gives_the_same_losses(runs):
    first, second = (json.loads((r / "out" / "training_losses.json").read_text()) for r in runs)
    assert first["train_loss"] == second["train_loss"]
    assert first["val_loss"] == second["val_loss"]


def test_the_exported_peft_adapter_reproduces_the_saved_lora(core, run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run / "out" / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    core.load_lora(ours, run / "out" / "lora_weights.pt")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(batch).logits - peft_model(batch).logits).abs().max().item() <= 1e-5


def test_validation_reports_best_and_last_and_says_it_is_partial(run, results):
    history = json.loads((run / "out" / "training_losses.json").read_text())
    assert results["val_loss_after"] == history["val_loss"][-1]
    assert results["val_loss_best"] == min(history["val_loss"]) <= results["val_loss_after"]
    text = printed(run)
    assert "partial validation loss (5 of " in text  # EVAL_BATCHES 5 covers only part of the split
    assert re.search(rf"best \(step {history['val_step'][history['val_loss'].index(min(history['val_loss']))]}\)", text)


def test_task_switching_checks(run, results, core):
    assert results["adapter_off_max_abs_diff"] == 0.0  # switched off, the model is GPT-2 exactly
    assert 0.0 <= results["unmerge_max_abs_diff"] <= 1e-5  # W0 back after merge and subtract, to float rounding
    assert results["swap_seconds"] > 0 and results["reload_seconds"] > 0
    text = printed(run)
    swapped_in = float(re.search(r"swapped in: max \|logits - second's\| = (\S+)", text).group(1))
    swapped_back = float(re.search(r"swapped back: max \|logits - trained's\| = (\S+)", text).group(1))
    assert swapped_in <= 1e-5 and swapped_back <= 1e-5
    apart = float(re.search(r"max \|logits\(first\) - logits\(second\)\| = (\S+)", text).group(1))
    assert apart > 1e-3  # the adapters differ, so a swap that did nothing would fail the rows above
    first = core.read_lora_file(run / "out" / "lora_weights.pt")["tensors"]
    second = core.read_lora_file(run / "out" / "lora_weights_second.pt")["tensors"]
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)


def test_the_run_prints_no_stray_values_warnings_or_progress_widgets(run):
    import nbformat

    nb = nbformat.read(run / "executed.ipynb", as_version=4)
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        kinds = {o.output_type for o in cell.outputs}
        assert "execute_result" not in kinds, cell.source[:60]  # a cell ends with a statement, not a value
        widgets = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" not in o.data]
        assert not widgets or "tqdm(" in cell.source, cell.source[:60]  # only our own progress bars
        stderr = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stderr")
        assert "loss_type" not in stderr and "Warning" not in stderr, stderr


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, tiny_model_dir, play_text_path, play_text_sha256):
    """The T4's path (fp16 autocast with a gradient scaler), forced on the CPU for a few steps."""
    folder = tmp_path_factory.mktemp("notebook-fp16") / "run"
    return run_main_notebook(folder, tiny_model_dir, play_text_path, play_text_sha256, PRECISION="fp16",
                             MAX_STEPS=FP16_STEPS, EVAL_INTERVAL=FP16_STEPS, SECOND_ADAPTER_STEPS=2)


def test_fp16_counts_the_steps_the_scaler_skipped(fp16_run):
    results = json.loads((fp16_run / "out" / "results.json").read_text())
    assert results["precision"] == "fp16"
    skipped = results["scaler_skipped_steps"]
    assert isinstance(skipped, int) and 0 <= skipped <= FP16_STEPS
    match = re.search(r"steps skipped by the fp16 gradient scaler: (\d+) \(scale now (\S+)\)", printed(fp16_run))
    assert match and int(match.group(1)) == skipped
    # Each skipped step halves the scale (65536 at the start; it grows only after 2000 good steps).
    assert float(match.group(2)) == 65536.0 * 0.5**skipped
    assert results["adapter_off_max_abs_diff"] == 0.0


def test_an_old_python_gets_a_clear_error_before_anything_else():
    import types

    import nbformat

    cells = [c for c in nbformat.read(MAIN_NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    imports = next(c.source for c in cells if "sys.version_info" in c.source)
    check = imports.split("\nimport contextlib")[0].replace("import sys\n", "")
    assert "raise RuntimeError" in check  # the check comes before any other import
    for version, fails in (((3, 9, 18), True), ((3, 10, 0), False), ((3, 12, 1), False)):
        fake_sys = types.SimpleNamespace(version_info=version, version=".".join(map(str, version)) + " (main)")
        if fails:
            with pytest.raises(RuntimeError, match=r"Python 3\.10 or newer; this is 3\.9\.18"):
                exec(check, {"sys": fake_sys})
        else:
            exec(check, {"sys": fake_sys})


def test_changing_lr_and_rank_and_rerunning_from_the_training_section_needs_no_restart(
        core, tmp_path, tiny_model_dir, play_text_path, play_text_sha256):
    """As a learner reruns: Run all, then set LR and RANK and rerun from the training section's first cell on."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(MAIN_NOTEBOOK, as_version=4)
    knobs = tiny_parameters(tiny_model_dir, play_text_path, play_text_sha256) | {"MAX_STEPS": 10}
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in knobs.items())))
    training = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "model = fresh_lora_model(SEED)" in c.source)
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        first = json.loads((tmp_path / "out" / "results.json").read_text())
        nb.cells.append(nbformat.v4.new_code_cell("LR, RANK = 2e-3, 2"))  # the learner's edit
        client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
        for index in range(training, len(nb.cells) - 1):
            client.execute_cell(nb.cells[index], index)
        again = json.loads((tmp_path / "out" / "results.json").read_text())
        nb.cells.append(nbformat.v4.new_code_cell("BLOCK_SIZE = 16"))  # a knob the data section read
        client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
        with pytest.raises(CellExecutionError, match="changed since an earlier cell read them: BLOCK_SIZE; "
                                                     "rerun from section 4's first cell"):
            client.execute_cell(nb.cells[training], training)
        nb.cells.append(nbformat.v4.new_code_cell(f"BLOCK_SIZE, RANK = {knobs['BLOCK_SIZE']}, 8"))
        client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
        after = next(i for i, c in enumerate(nb.cells) if "val_loss_after =" in c.source)
        with pytest.raises(CellExecutionError, match="read them: RANK; rerun from section 8's first cell"):
            client.execute_cell(nb.cells[after], after)  # section 9 would show the r = 2 run as r = 8
    assert (first["lora_params"], again["lora_params"]) == (4 * 768, 2 * 768)  # 2 blocks x ((64 + 192) + (64 + 64)) x r
    assert core.read_lora_file(tmp_path / "out" / "lora_weights.pt")["config"]["rank"] == 2
    assert again["val_loss_before"] == first["val_loss_before"]  # both runs start from GPT-2 itself
    assert again["reload_max_abs_diff"] <= 1e-5 and again["adapter_off_max_abs_diff"] == 0.0
