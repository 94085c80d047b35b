"""The GPU check behind benchmarks/gpu_check.sh: both notebooks and the benchmark on CUDA, offline, in minutes.

On a machine with an NVIDIA GPU and no internet it
  1. builds a GPT-2-small-shaped checkpoint (random weights) and a byte-level BPE tokenizer locally
     (tools/offline_gpt2.py, the same builder as the tests' tiny GPT-2), trained on data/tinyshakespeare.txt
     when that file is there, else on a synthetic play it writes;
  2. runs both notebooks with papermill, with small step counts, once per precision (default fp16, forced as a
     T4 runs it with a gradient scaler, and bf16);
  3. runs benchmarks/benchmark.py on the same device for each precision;
  4. prints seconds per step, tokens per second, peak memory and the steps the gradient scaler skipped.

Everything goes under --work (default runs/gpu_check/, git-ignored). `--device cpu --size tiny` runs the same
code on a tiny GPT-2 on a CPU (the tests do, so this script cannot rot); `--dry-run` builds and runs nothing
but checks every knob it would pass against the notebooks' parameters cells and the benchmark's options.
Every option and --work are checked before anything is built, and gpu_check.json is rewritten after each part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MAIN = REPO / "lora_from_scratch.ipynb"
ABLATIONS = REPO / "lora_ablations.ipynb"
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
# Knobs each notebook must have: the check passes them all, and stops with a clear error when one is gone.
MAIN_KNOBS = ["MODEL_NAME", "DATA_PATH", "DATA_SHA256", "MAX_STEPS", "EPOCHS", "EVAL_INTERVAL", "EVAL_BATCHES",
              "PRECISION", "DEVICE", "OUTPUT_DIR"]
ABLATION_KNOBS = ["MODEL_NAME", "DATA_PATH", "DATA_SHA256", "STEPS_PER_RUN", "SEEDS", "RANKS", "RUN_FULL_FINETUNE",
                  "EVAL_BATCHES", "PRECISION", "DEVICE", "OUTPUT_DIR"]
# Knobs that fit the tiny model (128 positions, 64 wide); passed only where the notebook has them.
TINY_MAIN = {"BLOCK_SIZE": 32, "BATCH_SIZE": 4, "MAX_NEW_TOKENS": 12, "LATENCY_TOKENS": 8}
TINY_ABLATIONS = {"BLOCK_SIZE": 32, "BATCH_SIZE": 4, "SUBSPACE_RANKS": [4, 8], "AMPLIFICATION_RANKS": [4, 8]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="small", choices=["small", "tiny"], help="GPT-2 small's shape, or tiny")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--notebooks", nargs="*", default=["main", "ablations"], choices=["main", "ablations"])
    parser.add_argument("--steps", type=int, default=30, help="MAX_STEPS of the main notebook, STEPS_PER_RUN")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--bench-steps", type=int, default=10, help="timed steps of each benchmark variant")
    parser.add_argument("--no-benchmark", action="store_true")
    parser.add_argument("--set-main", action="append", default=[], metavar="NAME=JSON",
                        help="one more knob for the main notebook, e.g. DROPOUT=0.1 (repeatable)")
    parser.add_argument("--set-ablations", action="append", default=[], metavar="NAME=JSON",
                        help='one more knob for the ablations, e.g. \'RANKS=[1,4]\' (repeatable)')
    parser.add_argument("--work", default=str(REPO / "runs" / "gpu_check"), help="where everything is written")
    parser.add_argument("--timeout", type=int, default=420, help="seconds allowed to each notebook run")
    parser.add_argument("--dry-run", action="store_true", help="check every knob and option; build and run nothing")
    args = parser.parse_args(argv)
    if problem := argument_problem(args):
        parser.error(problem)
    return args


# Knobs the check sets itself, and the option that sets them: a --set-main/--set-ablations of one is refused.
OWN_KNOBS = {"MAX_STEPS": "--steps", "STEPS_PER_RUN": "--steps", "EVAL_BATCHES": "--eval-batches",
             "PRECISION": "--precisions", "DEVICE": "--device", "OUTPUT_DIR": "--work",
             "MODEL_NAME": "--size (the check builds its own model)", "DATA_PATH": "nothing (the check writes the text)",
             "DATA_SHA256": "nothing (the check hashes the text)"}


def argument_problem(args) -> str | None:
    """What is wrong with the options, or None; builds, runs and writes nothing."""
    for name in ("steps", "eval_batches", "bench_steps", "timeout"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for name in ("precisions", "notebooks"):
        if repeated := sorted({v for v in getattr(args, name) if getattr(args, name).count(v) > 1}):
            return f"--{name} names {', '.join(repeated)} twice: each is run once, into the same folder"
    if not args.notebooks and args.no_benchmark:
        return "nothing to run: --notebooks is empty and --no-benchmark is set"
    for flag, pairs in (("--set-main", args.set_main), ("--set-ablations", args.set_ablations)):
        names = [pair.partition("=")[0].strip() for pair in pairs]
        for name in names:
            if not name:
                return f"{flag} needs NAME=VALUE, got an empty NAME"
            if name in OWN_KNOBS:
                return f"{flag} {name}: the check sets {name} itself; set it through {OWN_KNOBS[name]}"
            if names.count(name) > 1:
                return f"{flag} sets {name} twice: give it once"
    return work_problem(Path(args.work))


def work_problem(work: Path) -> str | None:
    """Why the check cannot write under work, or None. Writes nothing (a probe file is removed at once)."""
    folder = next(p for p in (work.absolute(), *work.absolute().parents) if p.exists())  # nearest that exists
    if not folder.is_dir():
        return f"--work {work}: {folder} is a file, not a folder: give a folder, e.g. --work {folder}.d"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".gpu-check-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        return f"--work {work}: cannot write in {folder} ({error.strerror}): pick a folder you can write to"
    return None


def extra_knobs(pairs: list[str], flag: str) -> dict:
    knobs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"{flag} {pair!r}: write NAME=VALUE, VALUE in JSON (e.g. DROPOUT=0.1, 'RANKS=[1,4]')")
        try:
            knobs[name.strip()] = json.loads(value)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{flag} {pair!r}: VALUE is not JSON ({error}); strings need quotes: 'NAME=\"x\"'") from None
    return knobs


def notebook_knobs(args, model_dir: Path, text: Path, sha256: str | None, precision: str, out: Path) -> dict:
    """The knobs of each notebook's run, checked against its parameters cell."""
    import papermill

    common = {"MODEL_NAME": str(model_dir), "DATA_PATH": str(text), "DATA_SHA256": sha256, "EVAL_BATCHES":
              args.eval_batches, "PRECISION": precision, "DEVICE": args.device}
    wanted = {
        "main": ({**common, "MAX_STEPS": args.steps, "EPOCHS": 1, "EVAL_INTERVAL": args.steps,
                  "OUTPUT_DIR": str(out / "main")}, MAIN, MAIN_KNOBS, TINY_MAIN,
                 extra_knobs(args.set_main, "--set-main")),
        "ablations": ({**common, "STEPS_PER_RUN": args.steps, "SEEDS": [1337], "RANKS": [4, 8],
                       "RUN_FULL_FINETUNE": True, "OUTPUT_DIR": str(out / "ablations")}, ABLATIONS, ABLATION_KNOBS,
                      TINY_ABLATIONS, extra_knobs(args.set_ablations, "--set-ablations")),
    }
    plans = {}
    for name in args.notebooks:
        knobs, notebook, required, tiny, extra = wanted[name]
        known = set(papermill.inspect_notebook(str(notebook)))
        missing = [k for k in [*required, *extra] if k not in known]
        if missing:
            raise SystemExit(f"{notebook.name} has no knob {', '.join(missing)} in its parameters cell: "
                             f"update benchmarks/gpu_check.py (it knows {', '.join(sorted(known))})")
        if name == "main" and extra:  # the main notebook's own rules, before anything runs
            from tools.nbcode import load_core

            try:
                core = load_core(MAIN)
                core.validate_knobs(extra, core.knob_rules())
            except ValueError as error:
                raise SystemExit(f"--set-main: {error}") from None
        if args.size == "tiny":
            knobs.update({k: v for k, v in tiny.items() if k in known})
        plans[name] = (notebook, {**knobs, **extra})
    return plans


def benchmark_command(args, model_dir: Path | None, precision: str, out: Path) -> list[str]:
    """benchmark.py on the check's device: GPT-2 small's shape at random init, or the tiny model."""
    command = [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--device", args.device, "--precision",
               precision, "--steps", str(args.bench_steps), "--out", str(out)]
    if args.size == "tiny":
        command += ["--model", str(model_dir), "--block-size", "16", "--warmup", "1", "--rounds", "1",
                    "--gen-tokens", "3", "--forward-repeats", "2"]
    else:
        command += ["--warmup", "3"]
    if precision != args.precisions[0]:
        command += ["--only", "train"]  # generation latency does not depend on the training precision
    return command


def check_benchmark_options(command: list[str]) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchmark

    benchmark.parse_args(command[2:])  # exits with argparse's message when an option is gone


def training_text(work: Path, size: str) -> tuple[Path, str | None]:
    """data/tinyshakespeare.txt when it is there, else a synthetic play written into work."""
    from tools.offline_gpt2 import make_play_text

    if SHAKESPEARE.is_file():
        return SHAKESPEARE, hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest()
    text = work / "play.txt"
    if not text.is_file():
        text.write_text(make_play_text(1500 if size == "tiny" else 20000), encoding="utf-8")
    return text, hashlib.sha256(text.read_bytes()).hexdigest()


def run_notebook(notebook: Path, knobs: dict, executed: Path, log: Path, timeout: int) -> tuple[str, float]:
    """papermill in a subprocess (a hung run cannot stop the check); returns the status and the wall seconds."""
    import yaml

    command = [sys.executable, "-m", "papermill", str(notebook), str(executed), "--kernel", "python3",
               "--cwd", str(executed.parent), "-y", yaml.safe_dump(knobs)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        log.write_text(done.stdout + done.stderr)
    except subprocess.TimeoutExpired as expired:
        status = f"TIMED OUT after {timeout} s"
        log.write_text(f"{expired.stdout or ''}{expired.stderr or ''}")
    return status, time.perf_counter() - started


def find(record: dict, *words: str):
    """The first value whose key holds one of words (the notebooks may add keys such as skipped steps)."""
    for key, value in record.items():
        if any(word in key for word in words) and isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def written_since(path: Path, since: float | None) -> bool:
    """path is a file written at or after since (a time.time()); a file from an earlier run is not this run's."""
    return path.is_file() and (since is None or path.stat().st_mtime >= since - 1)  # 1 s: coarse file clocks


def notebook_rows(name: str, precision: str, out: Path, knobs: dict, status: str, wall: float,
                  since: float | None = None) -> list[dict]:
    base = {"source": f"{name} notebook", "precision": precision, "status": status, "wall_seconds": wall}
    if name == "main":
        path = out / "main" / "results.json"
        if not written_since(path, since):
            return [{**base, "what": "LoRA training"}]
        results = json.loads(path.read_text())
        seconds = results.get("train_seconds")  # MAX_STEPS steps: the check's runs are shorter than an epoch
        return [{**base, "what": "LoRA training", "device_name": results.get("device"),
                 "precision": results.get("precision", precision),
                 "seconds_per_step": seconds / knobs["MAX_STEPS"] if seconds else None,
                 "tokens_per_second": results.get("tokens_per_second"),
                 "peak_memory_bytes": find(results, "peak"), "skipped_steps": find(results, "skipped")}]
    path = out / "ablations" / "ablation_results.json"
    if not written_since(path, since):
        return [{**base, "what": "every run"}]
    results = json.loads(path.read_text())
    rows = []
    for section in ("rank", "full_finetune"):
        for record in results.get(section, []):
            steps = knobs["STEPS_PER_RUN"]
            rows.append({**base, "what": record.get("name", section),
                         "seconds_per_step": record["seconds"] / steps if record.get("seconds") else None,
                         "peak_memory_bytes": record.get("peak_memory_bytes"),
                         "skipped_steps": find(record, "skipped")})
    return rows or [{**base, "what": "every run"}]


def benchmark_rows(path: Path, status: str, wall: float, since: float | None = None) -> list[dict]:
    result = json.loads(path.read_text()) if written_since(path, since) else {}
    if not result.get("train"):  # not run, or stopped before its training rows (its JSON keeps what it measured)
        return [{"source": "benchmark", "what": "training variants", "status": status, "wall_seconds": wall}]
    return [{"source": "benchmark", "what": row["variant"], "precision": row["precision"], "status": status,
             "wall_seconds": wall, "device_name": result["machine"].get("gpu") or result["machine"].get("cpu"),
             "seconds_per_step": row["step_seconds"], "tokens_per_second": row["tokens_per_second"],
             "peak_memory_bytes": row["peak_memory_bytes"],
             "skipped_steps": f"{row['skipped_steps']} of {row['steps_taken']}" if row["precision"] == "fp16" else "-"}
            for row in result["train"]]


def show(value, fmt: str) -> str:
    if value is None:
        return "n/r"
    return format(value, fmt) if isinstance(value, int | float) else str(value)


def report(rows: list[dict]) -> str:
    lines = ["| source | what | precision | status | s/step | tokens/s | peak memory (GB) | scaler skipped | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = r.get("peak_memory_bytes")
        lines.append(f"| {r['source']} | {r['what']} | {r.get('precision', '')} | {r['status']} | "
                     f"{show(r.get('seconds_per_step'), '.4f')} | {show(r.get('tokens_per_second'), ',.0f')} | "
                     f"{show(memory / 1e9 if memory else None, '.2f')} | {show(r.get('skipped_steps'), 'd')} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work).resolve()
    model_dir = work / f"gpt2-{args.size}-random"
    if args.device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU: run on a machine with an NVIDIA GPU, "
                             "or pass --device cpu --size tiny to try the check on a CPU")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    plans = {p: notebook_knobs(args, model_dir, work / "text.txt", None, p, work / p) for p in args.precisions}
    benches = {p: benchmark_command(args, model_dir, p, work / f"benchmark-{p}.json") for p in args.precisions}
    for command in benches.values():
        check_benchmark_options(command)
    if args.dry_run:
        for precision, plan in plans.items():
            for notebook, knobs in plan.values():
                print(f"would run {notebook.name} in {precision}: {json.dumps(knobs)}")
            if not args.no_benchmark:
                print(f"would run: {' '.join(benches[precision][1:])}")
        print("dry run: every knob and benchmark option exists, and --work can be written")
        return 0

    work.mkdir(parents=True, exist_ok=True)
    text, sha256 = training_text(work, args.size)
    if not (model_dir / "config.json").is_file():
        from tools.offline_gpt2 import save_gpt2_small_shaped, save_tiny_gpt2

        build = save_tiny_gpt2 if args.size == "tiny" else save_gpt2_small_shaped
        build(model_dir, text.read_text(encoding="utf-8"))
    print(f"model: {model_dir} (random weights); text: {text} ({text.stat().st_size:,} bytes)", flush=True)

    rows, failed = [], False

    def summary(complete: bool, **extra) -> float:  # written after each part: a later failure loses nothing
        total = time.perf_counter() - started
        write_json(work / "gpu_check.json", {"device": args.device, "size": args.size, "seconds_total": total,
                                              "complete": complete, **extra, "rows": rows})
        return total

    sigterm = signal.signal(signal.SIGTERM, stopped_by_signal)  # `timeout`, `kill`: handled like Ctrl-C below
    try:
        for precision in args.precisions:
            out = work / precision
            out.mkdir(parents=True, exist_ok=True)
            for name, (notebook, knobs) in notebook_knobs(args, model_dir, text, sha256, precision, out).items():
                since = time.time()
                status, wall = run_notebook(notebook, knobs, out / f"{name}.ipynb", out / f"{name}.log", args.timeout)
                failed |= status != "ok"
                print(f"{name} notebook, {precision}: {status} in {wall:.0f} s (log: {out / f'{name}.log'})", flush=True)
                rows += notebook_rows(name, precision, out, knobs, status, wall, since)
                summary(False)
            if not args.no_benchmark:
                since, bench_started = time.time(), time.perf_counter()
                done = subprocess.run(benches[precision], capture_output=True, text=True)
                (work / f"benchmark-{precision}.log").write_text(done.stdout + done.stderr)
                status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
                failed |= done.returncode != 0
                wall = time.perf_counter() - bench_started
                print(f"benchmark, {precision}: {status} in {wall:.0f} s", flush=True)
                rows += benchmark_rows(work / f"benchmark-{precision}.json", status, wall, since)
                summary(False)
    except BaseException as error:  # Ctrl-C included: the finished parts' rows are on disk, and printed
        summary(False, stopped_by=f"{type(error).__name__}: {error}")
        print("\n" + report(rows))
        print(f"\nStopped by {type(error).__name__}: {error}. The finished parts are in {work / 'gpu_check.json'} "
              '("complete": false).', file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    total = summary(True)
    print("\n" + report(rows))
    print(f"\nn/r: not reported by this version of the notebook. {total:.0f} s in all "
          f"({'within' if total <= 480 else 'OVER'} the 8-minute goal); summary in {work / 'gpu_check.json'}")
    return 1 if failed else 0


def stopped_by_signal(signum, frame) -> None:
    raise SystemExit(f"gpu_check.py stopped by {signal.Signals(signum).name}")


def write_json(path: Path, data: dict) -> None:
    """Write data to path through a temporary file: path is always a whole JSON document."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.exit(main())
