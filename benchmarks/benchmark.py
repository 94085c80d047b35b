"""Benchmark LoRA from scratch against full fine-tuning and Hugging Face PEFT, and merged vs unmerged inference.

    python benchmarks/benchmark.py                  # GPT-2 small shape, random init, batch 2 x 256
    python benchmarks/benchmark.py --device cuda --steps 20 --out results.json
    python benchmarks/benchmark.py --device cuda --precision fp16   # a T4's path (fp16 + gradient scaler) anywhere

Our LoRA is the main notebook's own `lora-core` code, loaded from the notebook. Peak memory is measured with
each training variant alone in a fresh subprocess. Step times are measured with all variants in one process,
taking turns step by step on the same batches, so that the noise of a shared machine hits them all alike;
generation latency likewise in interleaved rounds. Medians are reported with their spread, and the goals are
checked as ratios measured in this one run (n/a, with the reason, where a goal cannot apply). Prints a markdown
table and writes the same numbers as JSON.

Every option and the --out path are checked before anything is built; the JSON is rewritten after each
measurement, so a run stopped by an error, Ctrl-C or SIGTERM keeps what it measured ("complete": false).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_VARIANTS = ["full_finetune", "lora_fp32", "lora_mixed", "peft_fp32"]
GENERATE_VARIANTS = ["base", "unmerged", "cached", "merged"]
TARGETS = ["attn.c_attn", "attn.c_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder; default: GPT2Config(), random init")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="GPT-2's own residual, embedding and attention dropout, all variants alike; default 0.0, "
                             "the notebooks' default (the paper's GPT-2 has none); 0.1 is GPT-2's config value")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="precision of the lora_mixed variant; auto is the notebooks' choice for the device "
                             "(fp16 with a gradient scaler on GPUs older than Ampere, bf16 on newer ones and on CPUs "
                             "with native bf16, else fp32)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant")
    parser.add_argument("--steps", type=int, default=9, help="timed training steps per variant, taken in turns")
    parser.add_argument("--rounds", type=int, default=5, help="timed generation rounds over the four variants")
    parser.add_argument("--gen-tokens", type=int, default=48, help="tokens generated per latency sample")
    parser.add_argument("--forward-repeats", type=int, default=15, help="timed prompt forward passes per variant")
    parser.add_argument("--only", choices=["train", "inference"], default=None, help="run one half only")
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/results/<device>.json")
    parser.add_argument("--worker", choices=TRAIN_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if problem := argument_problem(args):
        parser.error(problem)
    return args


# The smallest value of each count, and why: checked before anything is built (rules as data).
COUNT_FLOORS = {
    "batch_size": (1, "sequences per training step"),
    "block_size": (2, "tokens per sequence: a next-token loss needs two"),
    "rank": (1, "the LoRA rank r"),
    "warmup": (0, "untimed steps; 0 times the first step too"),
    "steps": (1, "timed steps: the median needs one"),
    "rounds": (1, "timed generation rounds: the median needs one"),
    "gen_tokens": (1, "tokens generated per latency sample"),
    "forward_repeats": (1, "timed forward passes: the median needs one"),
}
PROMPT_TOKENS = 8  # the generation prompt's length


def argument_problem(args) -> str | None:
    """What is wrong with the options' values, or None: counts, alpha, dropout, an empty --model."""
    for name, (low, what) in COUNT_FLOORS.items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be at least {low} ({what}), got {getattr(args, name)}"
    if not 0.0 < args.alpha < math.inf:
        return f"--alpha must be a finite positive number (the LoRA scale is alpha / rank), got {args.alpha}"
    if not 0.0 <= args.dropout < 1.0:
        return f"--dropout must be in [0, 1), got {args.dropout}; 0 is the notebooks' default"
    if args.model is not None and not args.model.strip():
        return "--model is empty: give a hub id or a folder, or leave --model out for GPT-2 small's shape at random init"
    return None


def paths_problem(args) -> str | None:
    """What is wrong with --model's folder or --out, or None (gpu_check.py checks options before the folder exists)."""
    model = Path(args.model).expanduser() if args.model else None
    if model and (model.exists() or args.model.startswith(("/", ".", "~"))) and not model.is_dir():
        what = "is a file" if model.exists() else "does not exist"
        return (f"--model {args.model} {what}: give a folder written by save_pretrained, or a hub id such as "
                "openai-community/gpt2 (the default, no --model, is GPT-2 small's shape at random init)")
    return out_path_problem(Path(args.out)) if args.out else None


def out_path_problem(out: Path) -> str | None:
    """Why the JSON cannot be written to out, or None. Writes nothing (a probe file is removed at once)."""
    if out.is_dir():
        return f"--out {out} is a folder: name the JSON file, e.g. --out {out / 'bench.json'}"
    if out.suffix != ".json":
        return f"--out {out} does not end in .json: name the JSON file, e.g. --out {out.with_suffix('.json')}"
    folder = next(parent for parent in out.absolute().parents if parent.exists())  # the nearest that exists
    if not folder.is_dir():
        return f"--out {out}: {folder} is a file, not a folder: put the JSON elsewhere, e.g. --out {folder}.d/{out.name}"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".benchmark-probe-")
        os.close(fd)
        os.remove(probe)
        if out.exists():
            open(out, "ab").close()  # appends nothing: only checks that the file can be rewritten
    except OSError as error:
        return f"--out {out}: cannot write there ({error.strerror}): pick a folder you can write to"
    return None


def fail(message: str) -> None:
    """Stop as argparse does for a bad option (exit status 2), before anything is measured."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_model_fits(args, core) -> None:
    """The options that depend on the model (positions, width), from its config alone: no weights are loaded."""
    from transformers import AutoConfig, GPT2Config

    try:
        config = AutoConfig.from_pretrained(args.model) if args.model else GPT2Config()
    except Exception as error:
        fail(str(core._hub_error(args.model, error)).replace("MODEL_NAME", "--model"))
    positions, width = getattr(config, "n_positions", None), getattr(config, "n_embd", None)
    if positions is None or width is None:
        fail(f"--model {args.model} is a {config.model_type} model, not GPT-2-family (no n_positions / n_embd): "
             "the notebook's LoRA adapts GPT-2's Conv1D projections")
    if args.block_size > positions:
        fail(f"--block-size {args.block_size} exceeds the model's {positions} positions: use --block-size <= {positions}")
    if args.only != "train" and PROMPT_TOKENS + args.gen_tokens > positions:
        fail(f"--gen-tokens {args.gen_tokens} after the {PROMPT_TOKENS}-token prompt exceeds the model's {positions} "
             f"positions: use --gen-tokens <= {positions - PROMPT_TOKENS}")
    if args.rank > width:
        fail(f"--rank {args.rank} exceeds {width}, the width of the model's attention weights (a low-rank update "
             f"needs rank <= min(in, out)): use --rank <= {width}")


# --- shared setup -------------------------------------------------------------------------------------------


def load_notebook_core():
    from tools.nbcode import MAIN_NOTEBOOK, load_core

    return load_core(MAIN_NOTEBOOK)


def build_model(args, core, device):
    """The base model: --model loaded with the notebook's loader, or GPT-2 small's shape at random init."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.model:
        return core.load_base_model(args.model, device, dropout=args.dropout)
    overrides = {"resid_pdrop": args.dropout, "embd_pdrop": args.dropout, "attn_pdrop": args.dropout}
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**overrides)).to(device).eval()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def machine_info(core, device) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_native_bf16": core.cpu_has_fast_bf16(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "gpu_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


# --- training: memory in a subprocess per variant, speed with the variants taking turns ------------------------


def build_variant(args, core, device, variant: str, mixed_precision: str):
    """The model, optimizer, scaler and precision of one training variant, ready to step.

    mixed_precision is --precision resolved once by the parent (the notebook's rule for "auto") and passed on to
    the memory workers, so that every process runs the same precision.
    """
    import torch

    model = build_model(args, core, device)
    precision = "fp32"
    if variant == "full_finetune":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("lora_fp32", "lora_mixed"):
        torch.manual_seed(0)
        core.inject_lora(model, TARGETS, args.rank, args.alpha)
        if variant == "lora_mixed":
            precision = mixed_precision
    else:  # peft_fp32: the same rank, alpha and targets, no LoRA dropout (ours has none)
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                            fan_in_fan_out=True)
        model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()
    return model, optimizer, scaler, precision


def random_batch(args, vocab_size: int, device, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (args.batch_size, args.block_size), generator=generator).to(device)


def timed_step(core, variant_state, batch, device) -> tuple[float, bool]:
    """Seconds of one step of the notebook's own train_step, and whether the gradient scaler skipped it."""
    model, optimizer, scaler, precision = variant_state
    scale = scaler.get_scale() if scaler.is_enabled() else None  # read outside the timed region (it syncs)
    seconds = timed(lambda: core.train_step(model, batch, optimizer, scaler, device, precision), device)
    skipped = scale is not None and scaler.get_scale() < scale  # the scaler lowers its scale when it skips a step
    return seconds, skipped


def memory_worker(args) -> dict:
    """In a fresh process: build one variant, take two steps, report the peak memory and trainable count."""
    core = load_notebook_core()
    device = core.choose_device(args.device)
    state = build_variant(args, core, device, args.worker, core.choose_precision(args.precision, device))
    for seed in range(2):  # AdamW allocates its state on the first step: the peak is within two
        timed_step(core, state, random_batch(args, state[0].config.vocab_size, device, seed), device)
    sync(device)
    trainable = sum(p.numel() for p in state[0].parameters() if p.requires_grad)
    return {"variant": args.worker, "peak_memory_bytes": peak_memory_bytes(device), "trainable_params": trainable,
            "precision": state[3]}


def run_memory_worker(args, variant: str, precision: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--device", args.device,
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--precision", precision]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        if done.returncode < 0:
            why = f"killed by {signal.Signals(-done.returncode).name}"
        else:
            why = (done.stderr.strip().splitlines() or ["no error message"])[-1]
        memory = done.returncode == -signal.SIGKILL or "allocate" in why or "out of memory" in why
        raise SystemExit(f"benchmark.py: the memory worker of {variant} failed ({why})"
                         + ("; out of memory: lower --batch-size or --block-size" if memory else ""))
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_training(args, core, device, precision: str, progress: dict, save) -> list[dict]:
    """The training rows. Each figure goes into progress as it is measured, and save() writes it to disk."""
    memory = progress.setdefault("peak_memory", {})
    for variant in TRAIN_VARIANTS:
        memory[variant] = run_memory_worker(args, variant, precision)
        save()
    states = {variant: build_variant(args, core, device, variant, precision) for variant in TRAIN_VARIANTS}
    seconds = progress.setdefault("step_seconds", {variant: [] for variant in TRAIN_VARIANTS})
    skipped = progress.setdefault("skipped_steps", dict.fromkeys(TRAIN_VARIANTS, 0))
    vocab = states["full_finetune"][0].config.vocab_size
    for step in range(args.warmup + args.steps):
        batch = random_batch(args, vocab, device, seed=step)
        order = TRAIN_VARIANTS if step % 2 == 0 else TRAIN_VARIANTS[::-1]  # no variant always goes first
        for variant in order:
            elapsed, was_skipped = timed_step(core, states[variant], batch, device)
            skipped[variant] += was_skipped
            if step >= args.warmup:
                seconds[variant].append(elapsed)
        print(f"  step {step + 1}/{args.warmup + args.steps}: " + ", ".join(
            f"{v} {seconds[v][-1] if seconds[v] else elapsed:.2f}s" for v in TRAIN_VARIANTS), file=sys.stderr, flush=True)
        save()
    del states
    tokens = args.batch_size * args.block_size
    rows = []
    for variant in TRAIN_VARIANTS:
        step_seconds = statistics.median(seconds[variant])
        rows.append({"variant": variant, "step_seconds": step_seconds, "tokens_per_second": tokens / step_seconds,
                     "peak_memory_bytes": memory[variant]["peak_memory_bytes"],
                     "trainable_params": memory[variant]["trainable_params"], "precision": memory[variant]["precision"],
                     "step_seconds_min": min(seconds[variant]), "step_seconds_max": max(seconds[variant]),
                     "samples": len(seconds[variant]), "skipped_steps": skipped[variant],
                     "steps_taken": args.warmup + args.steps})
    return rows


# --- inference: generation latency and prompt forward ---------------------------------------------------------


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def benchmark_inference(args, core, device, progress: dict, save) -> tuple[list[dict], list[dict], bool]:
    """The generation and forward rows; samples go into progress as they are measured, and save() writes them."""
    import torch
    from torch.nn.utils import parametrize

    base = build_model(args, core, device)
    adapted = build_model(args, core, device)
    torch.manual_seed(0)
    core.inject_lora(adapted, TARGETS, args.rank, args.alpha)
    with torch.no_grad():  # a trained-looking, non-zero update, so merged weights really differ from base
        for layer in core.lora_layers(adapted).values():
            layer.B.normal_(std=0.02)
    merged = build_model(args, core, device)
    with tempfile.TemporaryDirectory() as tmp:
        core.load_lora(merged, core.save_lora(adapted, Path(tmp) / "lora.pt"))
    core.merge_lora(merged)

    prompt = torch.randint(0, base.config.vocab_size, (1, PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(1)).to(device)
    variants = {"base": (base, False), "unmerged": (adapted, False), "cached": (adapted, True),
                "merged": (merged, False)}
    outputs = {}

    def generate(model, cached):
        context = parametrize.cached() if cached else contextlib.nullcontext()
        with torch.no_grad(), context:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                  pad_token_id=0)

    gen_samples = progress.setdefault("generate_seconds", {name: [] for name in variants})
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (model, cached) in variants.items():
            seconds = timed(lambda m=model, c=cached, n=name: outputs.__setitem__(n, generate(m, c)), device)
            if round_ > 0:
                gen_samples[name].append(seconds)
        save()
    same_tokens = torch.equal(outputs["unmerged"], outputs["cached"]) and torch.equal(outputs["unmerged"],
                                                                                       outputs["merged"])
    block = torch.randint(0, base.config.vocab_size, (args.batch_size, args.block_size),
                          generator=torch.Generator().manual_seed(2)).to(device)
    fwd_samples = progress.setdefault("forward_seconds", {"base": [], "merged": []})
    with torch.no_grad():
        for i in range(args.forward_repeats + 2):  # two warm-up passes
            for name, model in (("base", base), ("merged", merged)) if i % 2 == 0 else (("merged", merged),
                                                                                          ("base", base)):
                seconds = timed(lambda m=model: m(block), device)
                if i >= 2:
                    fwd_samples[name].append(seconds)

    def row(name, values, **extra):
        return {"variant": name, "seconds": statistics.median(values), "seconds_min": min(values),
                "seconds_max": max(values), "samples": len(values), **extra}

    generate_rows = [row(n, gen_samples[n], new_tokens=args.gen_tokens) for n in GENERATE_VARIANTS]
    forward_rows = [row(n, fwd_samples[n]) for n in ("base", "merged")]
    return generate_rows, forward_rows, same_tokens


# --- report ---------------------------------------------------------------------------------------------------


def mixed_goal_exemption(result: dict, precision: str) -> str | None:
    """Why the mixed-precision speed-up goal cannot apply to this run, or None when it does."""
    machine, requested = result["machine"], result["config"]["precision"]
    if precision == "fp32" and requested == "auto":
        return "n/a: no native bf16 here, the mixed variant ran in fp32"
    if precision == "fp32":
        return "n/a: --precision fp32, the mixed variant ran in fp32"
    if machine["device"] == "cpu" and precision == "fp16":
        return "n/a: a CPU has no fast fp16 matrix products (fp16 with its scaler is a GPU's path)"
    if machine["device"] == "cpu" and precision == "bf16" and not machine["cpu_native_bf16"]:
        return "n/a: this CPU has no native bf16 (AMX or AVX-512 BF16), so bf16 is emulated"
    capability = machine.get("gpu_capability")
    if machine["device"] == "cuda" and precision == "bf16" and capability and capability[0] < 8:
        return f"n/a: this GPU (compute capability {capability[0]}.{capability[1]}) has no fast bf16; Ampere (8.0) has"
    return None


def goal_rows(result: dict) -> list[dict]:
    """Each ratio measured in this run beside its goal: met, MISSED, no goal, or n/a with the reason."""
    checks = []  # (what, measured, op, goal, exemption)
    train = {r["variant"]: r for r in result.get("train", [])}
    if train:
        full, ours, mixed, peft = (train[v] for v in TRAIN_VARIANTS)
        checks += [
            ("LoRA fp32 step / full fine-tuning step", ours["step_seconds"] / full["step_seconds"], "<=", 0.70, None),
            ("LoRA fp32 step / PEFT fp32 step", ours["step_seconds"] / peft["step_seconds"], "<=", 1.08, None),
            (f"LoRA fp32 step / LoRA {mixed['precision']} step (speed-up)",
             ours["step_seconds"] / mixed["step_seconds"], ">=", 1.4, mixed_goal_exemption(result, mixed["precision"])),
            ("LoRA fp32 peak memory / full fine-tuning", ours["peak_memory_bytes"] / full["peak_memory_bytes"],
             "<=", 0.70, None),
        ]
    gen = {r["variant"]: r for r in result.get("generate", [])}
    if gen:
        for name in ("unmerged", "cached", "merged"):
            checks.append((f"generate {name} / base", gen[name]["seconds"] / gen["base"]["seconds"], "<=",
                           1.10 if name != "unmerged" else None, None))
        fwd = {r["variant"]: r for r in result["forward"]}
        checks.append(("prompt forward merged / base", fwd["merged"]["seconds"] / fwd["base"]["seconds"], "<=", 1.05,
                       None))
    rows = []
    for what, value, op, goal, exemption in checks:
        if exemption or goal is None:
            verdict = exemption or "(no goal)"
        else:
            verdict = f"goal {op} {goal}: {'met' if (value <= goal if op == '<=' else value >= goal) else 'MISSED'}"
        rows.append({"what": what, "measured": value, "goal": None if goal is None else f"{op} {goal}",
                     "verdict": verdict})
    return rows


def ratio_lines(result: dict) -> list[str]:
    return [f"| {r['what']} | {r['measured']:.2f} | {r['verdict']} |" for r in goal_rows(result)]


def markdown_report(result: dict) -> str:
    m = result["machine"]
    out = [f"Machine: {m['gpu'] or m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), "
           f"torch {m['torch']}, device {m['device']}; batch {result['config']['batch_size']} x "
           f"{result['config']['block_size']} tokens, rank {result['config']['rank']}, "
           f"dropout {result['config']['dropout']}.", ""]
    if result.get("train"):
        full = next(r for r in result["train"] if r["variant"] == "full_finetune")
        out += ["| training variant | precision | s/step (median) | spread (min-max) | tokens/s | peak memory (GB) |"
                " trainable params | step vs full FT | scaler skipped |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["train"]:
            scaler_note = f"{r['skipped_steps']} of {r['steps_taken']}" if r["precision"] == "fp16" else "no scaler"
            out.append(f"| {r['variant']} | {r['precision']} | {r['step_seconds']:.3f} | "
                       f"{r['step_seconds_min']:.3f}-{r['step_seconds_max']:.3f} | {r['tokens_per_second']:,.0f} | "
                       f"{r['peak_memory_bytes'] / 1e9:.2f} | {r['trainable_params']:,} | "
                       f"{r['step_seconds'] / full['step_seconds']:.2f}x | {scaler_note} |")
        out.append("")
    if result.get("generate"):
        base = next(r for r in result["generate"] if r["variant"] == "base")
        out += ["| inference | seconds (median) | spread (min-max) | vs base |", "|---|---|---|---|"]
        for r in result["generate"]:
            out.append(f"| generate {r['new_tokens']} tokens: {r['variant']} | {r['seconds']:.3f} | "
                       f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f} | {r['seconds'] / base['seconds']:.2f}x |")
        fbase = next(r for r in result["forward"] if r["variant"] == "base")
        for r in result["forward"]:
            out.append(f"| prompt forward: {r['variant']} | {r['seconds']:.4f} | "
                       f"{r['seconds_min']:.4f}-{r['seconds_max']:.4f} | {r['seconds'] / fbase['seconds']:.2f}x |")
        out += ["", f"The unmerged, cached and merged LoRA models generate the same tokens: "
                    f"{result['same_tokens']}", ""]
    if lines := ratio_lines(result):
        out += ["| goal | measured | |", "|---|---|---|", *lines]
    return "\n".join(out)


def save_result(result: dict, out: Path) -> None:
    """Write result to out through a temporary file: out is always a whole JSON document."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)


def stopped_by_signal(signum, frame) -> None:
    raise SystemExit(f"benchmark.py stopped by {signal.Signals(signum).name}")


def main(argv=None) -> None:
    args = parse_args(argv)  # every option that needs no model, before anything is imported or built
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    if problem := paths_problem(args):
        fail(problem)
    core = load_notebook_core()
    if args.device == "cuda" and not core.torch.cuda.is_available():
        fail(f"--device cuda but torch {core.torch.__version__} sees no GPU: use --device cpu (or auto), "
             "or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    device = core.choose_device(args.device)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{device.type}.json"
    if problem := out_path_problem(out):
        fail(problem)
    check_model_fits(args, core)  # from the model's config: still nothing built
    precision = core.choose_precision(args.precision, device)
    started = time.perf_counter()
    result = {"machine": machine_info(core, device),
              "config": {"model": args.model or "GPT2Config() random init", "batch_size": args.batch_size,
                         "block_size": args.block_size, "rank": args.rank, "alpha": args.alpha,
                         "targets": TARGETS, "dropout": args.dropout, "precision": args.precision,
                         "mixed_precision": precision, "rounds": args.rounds, "warmup": args.warmup,
                         "steps": args.steps},
              "complete": False}
    progress = result.setdefault("measured_so_far", {})  # raw samples, written as they come; dropped when complete
    saved = []
    sigterm = signal.signal(signal.SIGTERM, stopped_by_signal)  # `timeout`, `kill`: handled like Ctrl-C below

    def save():  # called after each measurement
        result["seconds_total"] = time.perf_counter() - started
        save_result(result, out)
        saved.append(True)

    try:
        if args.only != "inference":
            result["train"] = benchmark_training(args, core, device, precision, progress, save)
            save()
        if args.only != "train":
            result["generate"], result["forward"], result["same_tokens"] = benchmark_inference(
                args, core, device, progress, save)
        result["goals"] = goal_rows(result)
        del result["measured_so_far"]
        result["complete"] = True
        save()
    except BaseException as error:  # Ctrl-C included: what was measured is on disk before the error goes on
        if saved:
            result["stopped_by"] = f"{type(error).__name__}: {error}"
            save()
            print(f"\nStopped by {result['stopped_by']}. What was measured before is in {out} "
                  '("complete": false; raw samples under "measured_so_far").', file=sys.stderr)
            with contextlib.suppress(Exception):  # the table of the finished parts, if there are any
                result["goals"] = goal_rows(result)
                save()
                if result.get("train") or result.get("generate"):
                    print(markdown_report(result))
        raise
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    print(markdown_report(result))
    print(f"\n{result['seconds_total']:.0f} s in all; JSON written to {out}")


if __name__ == "__main__":
    main()
