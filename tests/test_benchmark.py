"""The benchmark runs as documented (on a tiny model, one short round) and writes the agreed JSON shape.

Speed goals are never asserted here: timings on a shared machine are noise. They are printed as ratios by
the benchmark itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def benchmark_run(tiny_model_dir, tmp_path_factory):
    """One short benchmark run on the tiny model, with the mixed variant forced to fp16 (a T4's path)."""
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--model", str(tiny_model_dir), "--device", "cpu",
         "--block-size", "16", "--rounds", "1", "--warmup", "1", "--steps", "2", "--gen-tokens", "3",
         "--forward-repeats", "2", "--precision", "fp16", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_benchmark_writes_the_agreed_json(benchmark_run):
    out, done = benchmark_run
    result = json.loads(out.read_text())
    assert {"cpu", "torch_threads", "device"} <= set(result["machine"])
    assert [r["variant"] for r in result["train"]] == ["full_finetune", "lora_fp32", "lora_mixed", "peft_fp32"]
    for row in result["train"]:
        assert {"variant", "step_seconds", "tokens_per_second", "peak_memory_bytes", "trainable_params"} <= set(row)
        assert row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0
    precision = {r["variant"]: r["precision"] for r in result["train"]}
    assert precision == {"full_finetune": "fp32", "lora_fp32": "fp32", "lora_mixed": "fp16", "peft_fp32": "fp32"}
    for row in result["train"]:  # only the fp16 variant has a gradient scaler that can skip a step
        assert 0 <= row["skipped_steps"] <= row["steps_taken"] == 3
        assert row["skipped_steps"] == 0 or row["precision"] == "fp16"
    assert result["config"]["dropout"] == 0.0 and result["config"]["precision"] == "fp16"
    trainable = {r["variant"]: r["trainable_params"] for r in result["train"]}
    assert trainable["lora_fp32"] == trainable["lora_mixed"] == trainable["peft_fp32"] == 2 * 4 * (256 + 128)
    assert trainable["full_finetune"] > 10 * trainable["lora_fp32"]
    assert [r["variant"] for r in result["generate"]] == ["base", "unmerged", "cached", "merged"]
    assert all(r["new_tokens"] == 3 and r["seconds"] > 0 for r in result["generate"])
    assert [r["variant"] for r in result["forward"]] == ["base", "merged"]
    assert result["same_tokens"] is True
    assert "| goal | measured |" in done.stdout


def test_help_lists_precision_and_dropout_defaults_to_the_notebooks():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--precision {auto,fp32,bf16,fp16}" in done.stdout and "default 0.0" in done.stdout


def test_a_dropout_out_of_range_is_refused_before_any_work():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--dropout", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--dropout must be in [0, 1)" in done.stderr


# --- benchmarks/gpu_check.sh: its Python parts on a CPU, so the script cannot rot before a GPU runs it -----------


def gpu_check(*args, timeout=600):
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_gpu_check_dry_run_finds_every_knob_and_benchmark_option(tmp_path):
    done = gpu_check("--dry-run", "--work", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for precision in ("fp16", "bf16"):  # the defaults: fp16 forced (a T4's path) and bf16, both notebooks
        assert f"would run lora_from_scratch.ipynb in {precision}" in done.stdout
        assert f"would run lora_ablations.ipynb in {precision}" in done.stdout
        assert f"--device cuda --precision {precision}" in done.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_gpu_check_names_a_knob_the_notebook_lacks(tmp_path):
    done = gpu_check("--dry-run", "--work", str(tmp_path), "--set-main", "NO_SUCH_KNOB=1")
    assert done.returncode != 0 and "has no knob NO_SUCH_KNOB" in done.stderr


def test_gpu_check_runs_the_main_notebook_on_a_tiny_gpt2_on_cpu(tmp_path):
    done = gpu_check("--device", "cpu", "--size", "tiny", "--precisions", "fp16", "--notebooks", "main", "--steps", "2",
                     "--eval-batches", "1", "--no-benchmark", "--work", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    [row] = summary["rows"]
    assert row["status"] == "ok" and row["precision"] == "fp16" and row["seconds_per_step"] > 0
    assert (tmp_path / "fp16" / "main" / "results.json").is_file() and (tmp_path / "play.txt").is_file()
    assert "| main notebook | LoRA training | fp16 | ok |" in done.stdout


def test_gpu_check_reports_the_benchmark_rows_with_skipped_steps(benchmark_run):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check as check

    out, _ = benchmark_run
    rows = check.benchmark_rows(out, "ok", 1.0)
    assert [r["what"] for r in rows] == ["full_finetune", "lora_fp32", "lora_mixed", "peft_fp32"]
    mixed = rows[2]
    assert mixed["precision"] == "fp16" and mixed["skipped_steps"].endswith("of 3") and mixed["seconds_per_step"] > 0
    table = check.report(rows)
    assert table.count("\n") == len(rows) + 1 and "| benchmark | lora_mixed | fp16 | ok |" in table
