"""The benchmark runs as documented (on a tiny model, one short round) and writes the agreed JSON shape;
careless options are refused before anything is built, and nothing measured is lost when a run stops.

Speed goals are never asserted here: timings on a shared machine are noise. They are printed as ratios by
the benchmark itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import benchmark  # noqa: E402
import gpu_check as check  # noqa: E402

BENCHMARK = REPO / "benchmarks" / "benchmark.py"
# Options that fit the tiny model (128 positions, 64 wide: tools/offline_gpt2.py), for the quickest real runs.
TINY = ["--device", "cpu", "--block-size", "8", "--batch-size", "1", "--rounds", "1", "--warmup", "0", "--steps", "1",
        "--gen-tokens", "3", "--forward-repeats", "1"]


@pytest.fixture(scope="module")
def benchmark_run(tiny_model_dir, tmp_path_factory):
    """One short benchmark run on the tiny model, with the mixed variant forced to fp16 (a T4's path)."""
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--model", str(tiny_model_dir), "--device", "cpu",
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
    assert result["complete"] is True and "measured_so_far" not in result and "stopped_by" not in result
    verdicts = {g["what"]: g["verdict"] for g in result["goals"]}  # fp16 on a CPU: the speed-up goal cannot apply
    assert verdicts["LoRA fp32 step / LoRA fp16 step (speed-up)"].startswith("n/a: a CPU has no fast fp16")
    assert "| goal | measured |" in done.stdout and "n/a: a CPU has no fast fp16" in done.stdout


def test_help_lists_precision_and_dropout_defaults_to_the_notebooks():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--precision {auto,fp32,bf16,fp16}" in done.stdout and "default 0.0" in done.stdout


def test_a_dropout_out_of_range_is_refused_before_any_work():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--dropout", "1.5"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--dropout must be in [0, 1)" in done.stderr


# --- careless options: refused before anything is built or measured ---------------------------------------------


def _writable(folder) -> bool:
    try:
        (Path(folder) / ".probe").touch()
    except OSError:
        return False
    (Path(folder) / ".probe").unlink()
    return True


@pytest.fixture
def places(tmp_path):
    """A plain file, a folder, and a folder this user cannot write in (root writes anywhere: then /sys, if so)."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if _writable(locked):
        locked = "/sys" if os.path.isdir("/sys") and not _writable("/sys") else None
    yield {"tmp": str(tmp_path), "file": str(tmp_path / "afile"), "dir": str(tmp_path / "adir"), "locked": locked}
    (tmp_path / "locked").chmod(0o700)


def _fill(argv: list[str], places: dict) -> list[str]:
    if any("{locked}" in a for a in argv) and places["locked"] is None:
        pytest.skip("no folder here that this user cannot write in")
    return [a.format(**places) for a in argv]


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be at least 1 (timed steps: the median needs one), got 0"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--gen-tokens", "0"], "--gen-tokens must be at least 1"),
    (["--forward-repeats", "0"], "--forward-repeats must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--block-size", "1"], "--block-size must be at least 2 (tokens per sequence: a next-token loss needs two)"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--alpha", "0"], "--alpha must be a finite positive number"),
    (["--alpha", "nan"], "--alpha must be a finite positive number"),
    (["--alpha", "inf"], "--alpha must be a finite positive number"),
    (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
    (["--precision", "bf32"], "argument --precision: invalid choice: 'bf32'"),
    (["--precision", "BF16"], "argument --precision: invalid choice: 'BF16'"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["--model", ""], "--model is empty"),
    (["--model", "{tmp}/no-such-folder"], "no-such-folder does not exist: give a folder written by save_pretrained"),
    (["--model", "{file}"], "afile is a file: give a folder written by save_pretrained"),
    (["--out", "{dir}"], "adir is a folder: name the JSON file, e.g. --out {dir}/bench.json"),
    (["--out", "{file}/bench.json"], "{file} is a file, not a folder"),
    (["--out", "{file}/deeper/bench.json"], "{file} is a file, not a folder"),
    (["--out", "{tmp}/results"], "does not end in .json: name the JSON file, e.g. --out {tmp}/results.json"),
    (["--out", "{locked}/bench.json"], "cannot write there (Permission denied): pick a folder you can write to"),
])
def test_careless_options_are_refused_before_the_notebook_is_even_loaded(argv, message, places, monkeypatch, capsys):
    def too_late():
        raise AssertionError("the notebook's code was loaded before the option was refused")

    monkeypatch.setattr(benchmark, "load_notebook_core", too_late)
    before = sorted(os.listdir(places["tmp"]))
    with pytest.raises(SystemExit) as stop:
        benchmark.main(_fill(argv, places))
    assert stop.value.code == 2 and message.format(**places) in capsys.readouterr().err
    assert sorted(os.listdir(places["tmp"])) == before  # nothing written, not even the probe file


@pytest.mark.parametrize("argv", [["--out", "{file}/bench.json"], ["--steps", "0"]])
def test_the_issues_two_cases_stop_at_once_on_the_command_line(argv, places):
    """`--out DIR/bench.json` with DIR a file, and `--steps 0`: they used to fail after the measurements."""
    done = subprocess.run([sys.executable, str(BENCHMARK), *_fill(argv, places)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "benchmark.py: error: --" in done.stderr and not done.stdout
    assert "step 1/" not in done.stderr  # no training step, no memory worker


def _refuse_to_build(monkeypatch) -> None:
    def too_late(*args, **kwargs):
        raise AssertionError("a model was built (or a memory worker started) before the option was refused")

    monkeypatch.setattr(benchmark, "build_model", too_late)
    monkeypatch.setattr(benchmark, "run_memory_worker", too_late)


@pytest.mark.parametrize(("argv", "message"), [
    (["--block-size", "129"], "--block-size 129 exceeds the model's 128 positions: use --block-size <= 128"),
    (["--gen-tokens", "121"], "--gen-tokens 121 after the 8-token prompt exceeds the model's 128 positions: "
                              "use --gen-tokens <= 120"),
    (["--rank", "65"], "--rank 65 exceeds 64, the width of the model's attention weights"),
    (["--rank", "100000", "--only", "inference"], "--rank 100000 exceeds 64"),
])
def test_options_too_large_for_the_model_are_refused_before_any_model_is_built(
        argv, message, tiny_model_dir, tmp_path, core, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "load_notebook_core", lambda: core)
    _refuse_to_build(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--model", str(tiny_model_dir), *TINY, "--out", str(tmp_path / "b.json"), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gen_tokens_beyond_the_model_are_fine_when_nothing_is_generated(tiny_model_dir, core):
    args = benchmark.parse_args(["--model", str(tiny_model_dir), *TINY, "--gen-tokens", "500", "--only", "train"])
    assert benchmark.check_model_fits(args, core) is None  # --only train generates nothing


def test_a_model_that_is_not_gpt2_and_a_missing_gpu_are_refused_before_any_model_is_built(
        tmp_path, core, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "load_notebook_core", lambda: core)
    _refuse_to_build(monkeypatch)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["--model", str(bert), "--device", "cpu", "--out", str(tmp_path / "b.json")])
    assert stop.value.code == 2 and "is a bert model, not GPT-2-family" in capsys.readouterr().err
    if not core.torch.cuda.is_available():
        with pytest.raises(SystemExit) as stop:
            benchmark.main(["--device", "cuda", "--out", str(tmp_path / "b.json")])
        assert stop.value.code == 2 and "--device cuda but torch" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


# --- what a run measured, and what it says about goals that cannot apply ------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's, known
def test_without_native_bf16_the_speed_up_goal_says_it_does_not_apply(tiny_model_dir, tmp_path, core, monkeypatch,
                                                                       capsys):
    """A CPU without AMX or AVX-512 BF16: "auto" gives fp32, and the bf16 speed-up goal is n/a, not MISSED."""
    monkeypatch.setitem(core.choose_precision.__globals__, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(core, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(benchmark, "load_notebook_core", lambda: core)
    out = tmp_path / "bench.json"
    benchmark.main(["--model", str(tiny_model_dir), *TINY, "--only", "train", "--precision", "auto", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["cpu_native_bf16"] is False and result["config"]["mixed_precision"] == "fp32"
    assert {r["variant"]: r["precision"] for r in result["train"]}["lora_mixed"] == "fp32"  # its worker's too
    [speed_up] = [g for g in result["goals"] if "(speed-up)" in g["what"]]
    assert speed_up["verdict"] == "n/a: no native bf16 here, the mixed variant ran in fp32"
    line = next(x for x in capsys.readouterr().out.splitlines() if "(speed-up)" in x)
    assert line.endswith("| n/a: no native bf16 here, the mixed variant ran in fp32 |") and "MISSED" not in line
    others = [g["verdict"] for g in result["goals"] if g is not speed_up]
    assert len(others) == 3 and all(v.startswith("goal ") for v in others)  # the goals that apply are judged


@pytest.mark.parametrize("stop", ["error", "SIGTERM"])
def test_a_run_stopped_after_measuring_keeps_every_figure(stop, tiny_model_dir, tmp_path, core, monkeypatch, capsys):
    """Whatever stops a run after its last measurement (an error; `timeout` or `kill`), its JSON has them all."""
    def fails_after_measuring(result):
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        raise RuntimeError("simulated failure after the last measurement")

    monkeypatch.setattr(benchmark, "load_notebook_core", lambda: core)
    monkeypatch.setattr(benchmark, "goal_rows", fails_after_measuring)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError if stop == "error" else SystemExit):
        benchmark.main(["--model", str(tiny_model_dir), *TINY, "--only", "inference", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is False
    assert result["stopped_by"] == ("RuntimeError: simulated failure after the last measurement" if stop == "error"
                                    else "SystemExit: benchmark.py stopped by SIGTERM")
    assert [r["variant"] for r in result["generate"]] == ["base", "unmerged", "cached", "merged"]
    assert [r["variant"] for r in result["forward"]] == ["base", "merged"]
    raw = result["measured_so_far"]
    assert all(len(v) == 1 for v in [*raw["generate_seconds"].values(), *raw["forward_seconds"].values()])
    assert f"What was measured before is in {out}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not benchmark.stopped_by_signal  # the handler is put back


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


def test_gpu_check_refuses_a_main_knob_value_by_the_notebooks_own_rule(tmp_path):
    with pytest.raises(SystemExit, match="--set-main: DROPOUT = 5 is not valid: set DROPOUT to None"):
        check.main(["--dry-run", "--work", str(tmp_path), "--set-main", "DROPOUT=5"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("argv", "message"), [
    (["--timeout", "0"], "--timeout must be at least 1, got 0"),
    (["--steps", "-1"], "--steps must be at least 1, got -1"),
    (["--precisions", "fp16", "fp16"], "--precisions names fp16 twice"),
    (["--precisions", "bf32"], "argument --precisions: invalid choice: 'bf32'"),
    (["--notebooks", "main", "main"], "--notebooks names main twice"),
    (["--notebooks", "--no-benchmark"], "nothing to run: --notebooks is empty and --no-benchmark is set"),
    (["--set-main", "MAX_STEPS=5"], "--set-main MAX_STEPS: the check sets MAX_STEPS itself; set it through --steps"),
    (["--set-ablations", 'OUTPUT_DIR="x"'], "the check sets OUTPUT_DIR itself; set it through --work"),
    (["--set-main", "=1"], "--set-main needs NAME=VALUE, got an empty NAME"),
    (["--set-main", "DROPOUT=0.1", "--set-main", "DROPOUT=0.2"], "--set-main sets DROPOUT twice"),
    (["--work", "{file}"], "--work {file}: {file} is a file, not a folder"),
    (["--work", "{file}/run"], "--work {file}/run: {file} is a file, not a folder"),
    (["--work", "{locked}/run"], "cannot write in {locked} (Permission denied)"),
])
def test_gpu_check_refuses_careless_options_before_it_builds_anything(argv, message, places, capsys):
    before = sorted(os.listdir(places["tmp"]))
    with pytest.raises(SystemExit) as stop:
        check.parse_args(_fill(argv, places))
    assert stop.value.code == 2 and message.format(**places) in capsys.readouterr().err
    assert sorted(os.listdir(places["tmp"])) == before


def test_gpu_check_reads_a_relative_work_folder_from_where_it_is_called(places):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--work", "afile"],
                          capture_output=True, text=True, timeout=120, cwd=places["tmp"])
    assert done.returncode == 2 and f"{places['file']} is a file, not a folder" in done.stderr


def test_gpu_check_never_reports_an_earlier_runs_figures(benchmark_run, tmp_path):
    """A part that failed this time shows no figures, even where an earlier run left its files."""
    out, _ = benchmark_run
    old = tmp_path / "benchmark-fp16.json"
    old.write_text(out.read_text())
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    [row] = check.benchmark_rows(old, "FAILED (exit 1)", 1.0, since=time.time())
    assert row["status"] == "FAILED (exit 1)" and "seconds_per_step" not in row
    assert len(check.benchmark_rows(old, "ok", 1.0, since=hour_ago)) == 4  # the same file, as this run's
    partial = tmp_path / "partial.json"  # a benchmark stopped before its training rows: raw figures, no rows
    partial.write_text(json.dumps({"complete": False, "measured_so_far": {"peak_memory": {}}}))
    [row] = check.benchmark_rows(partial, "FAILED (exit 1)", 1.0, since=hour_ago)
    assert "seconds_per_step" not in row
    (tmp_path / "fp16" / "main").mkdir(parents=True)
    results = tmp_path / "fp16" / "main" / "results.json"
    results.write_text(json.dumps({"train_seconds": 3.0, "tokens_per_second": 10.0}))
    os.utime(results, (hour_ago, hour_ago))
    [row] = check.notebook_rows("main", "fp16", tmp_path / "fp16", {"MAX_STEPS": 2}, "FAILED (exit 1)", 1.0,
                                since=time.time())
    assert "seconds_per_step" not in row


def test_gpu_check_runs_the_main_notebook_on_a_tiny_gpt2_on_cpu_and_keeps_it_when_stopped_later(
        tmp_path, monkeypatch, capsys):
    """The main notebook for real; then the check is stopped (SIGTERM, as `timeout` sends) before the ablations."""
    real_run = check.run_notebook

    def run_or_stop(notebook, *args):
        if notebook == check.ABLATIONS:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        return real_run(notebook, *args)

    monkeypatch.setattr(check, "run_notebook", run_or_stop)
    with pytest.raises(SystemExit, match="gpu_check.py stopped by SIGTERM"):
        check.main(["--device", "cpu", "--size", "tiny", "--precisions", "fp16", "--notebooks", "main", "ablations",
                    "--steps", "2", "--eval-batches", "1", "--no-benchmark", "--work", str(tmp_path)])
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["complete"] is False and summary["stopped_by"] == "SystemExit: gpu_check.py stopped by SIGTERM"
    [row] = summary["rows"]
    assert row["status"] == "ok" and row["precision"] == "fp16" and row["seconds_per_step"] > 0
    assert (tmp_path / "fp16" / "main" / "results.json").is_file() and (tmp_path / "play.txt").is_file()
    printed = capsys.readouterr()
    assert "| main notebook | LoRA training | fp16 | ok |" in printed.out and '"complete": false' in printed.err


def test_gpu_check_reports_the_benchmark_rows_with_skipped_steps(benchmark_run):
    out, _ = benchmark_run
    rows = check.benchmark_rows(out, "ok", 1.0)
    assert [r["what"] for r in rows] == ["full_finetune", "lora_fp32", "lora_mixed", "peft_fp32"]
    mixed = rows[2]
    assert mixed["precision"] == "fp16" and mixed["skipped_steps"].endswith("of 3") and mixed["seconds_per_step"] > 0
    table = check.report(rows)
    assert table.count("\n") == len(rows) + 1 and "| benchmark | lora_mixed | fp16 | ok |" in table
