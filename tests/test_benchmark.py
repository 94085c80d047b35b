"""The benchmark runs as documented (on a tiny model, one short round) and writes the agreed JSON shape.

Speed goals are never asserted here: timings on a shared machine are noise. They are printed as ratios by
the benchmark itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_writes_the_agreed_json(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--model", str(tiny_model_dir), "--device", "cpu",
         "--block-size", "16", "--rounds", "1", "--warmup", "1", "--steps", "2", "--gen-tokens", "3",
         "--forward-repeats", "2", "--precision", "fp16", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
