"""Benchmark LoRA from scratch against full fine-tuning and Hugging Face PEFT, and merged vs unmerged inference.

    python benchmarks/benchmark.py                  # GPT-2 small shape, random init, batch 2 x 256
    python benchmarks/benchmark.py --device cuda --steps 20 --out results.json
    python benchmarks/benchmark.py --device cuda --precision fp16   # a T4's path (fp16 + gradient scaler) anywhere

Our LoRA is the main notebook's own `lora-core` code, loaded from the notebook. Peak memory is measured with
each training variant alone in a fresh subprocess. Step times are measured with all variants in one process,
taking turns step by step on the same batches, so that the noise of a shared machine hits them all alike;
generation latency likewise in interleaved rounds. Medians are reported with their spread, and the goals are
checked as ratios measured in this one run. Prints a markdown table and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}; 0 is the notebooks' default")
    return args


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
            "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


# --- training: memory in a subprocess per variant, speed with the variants taking turns ------------------------


def build_variant(args, core, device, variant: str):
    """The model, optimizer, scaler and precision of one training variant, ready to step."""
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
            precision = core.choose_precision(args.precision, device)  # the notebook's own rule for "auto"
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
    state = build_variant(args, core, device, args.worker)
    for seed in range(2):  # AdamW allocates its state on the first step: the peak is within two
        timed_step(core, state, random_batch(args, state[0].config.vocab_size, device, seed), device)
    sync(device)
    trainable = sum(p.numel() for p in state[0].parameters() if p.requires_grad)
    return {"variant": args.worker, "peak_memory_bytes": peak_memory_bytes(device), "trainable_params": trainable,
            "precision": state[3]}


def run_memory_worker(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--device", args.device,
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--rank", str(args.rank),
               "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--precision", args.precision]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training variant {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_training(args, core, device) -> list[dict]:
    memory = {variant: run_memory_worker(args, variant) for variant in TRAIN_VARIANTS}
    states = {variant: build_variant(args, core, device, variant) for variant in TRAIN_VARIANTS}
    seconds = {variant: [] for variant in TRAIN_VARIANTS}
    skipped = dict.fromkeys(TRAIN_VARIANTS, 0)
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


def benchmark_inference(args, core, device) -> tuple[list[dict], list[dict], bool]:
    import contextlib

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

    prompt = torch.randint(0, base.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    variants = {"base": (base, False), "unmerged": (adapted, False), "cached": (adapted, True),
                "merged": (merged, False)}
    outputs = {}

    def generate(model, cached):
        context = parametrize.cached() if cached else contextlib.nullcontext()
        with torch.no_grad(), context:
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                  pad_token_id=0)

    gen_samples = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (model, cached) in variants.items():
            seconds = timed(lambda m=model, c=cached, n=name: outputs.__setitem__(n, generate(m, c)), device)
            if round_ > 0:
                gen_samples[name].append(seconds)
    same_tokens = torch.equal(outputs["unmerged"], outputs["cached"]) and torch.equal(outputs["unmerged"],
                                                                                       outputs["merged"])
    block = torch.randint(0, base.config.vocab_size, (args.batch_size, args.block_size),
                          generator=torch.Generator().manual_seed(2)).to(device)
    fwd_samples = {"base": [], "merged": []}
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


def ratio_lines(result: dict) -> list[str]:
    lines = []
    train = {r["variant"]: r for r in result.get("train", [])}
    if train:
        full, ours, mixed, peft = (train[v] for v in TRAIN_VARIANTS)
        checks = [
            ("LoRA fp32 step / full fine-tuning step", ours["step_seconds"] / full["step_seconds"], "<=", 0.70),
            ("LoRA fp32 step / PEFT fp32 step", ours["step_seconds"] / peft["step_seconds"], "<=", 1.08),
            (f"LoRA fp32 step / LoRA {mixed['precision']} step (speed-up)",
             ours["step_seconds"] / mixed["step_seconds"], ">=", 1.4),
            ("LoRA fp32 peak memory / full fine-tuning", ours["peak_memory_bytes"] / full["peak_memory_bytes"],
             "<=", 0.70),
        ]
        lines += [_check(*c) for c in checks]
    gen = {r["variant"]: r for r in result.get("generate", [])}
    if gen:
        for name in ("unmerged", "cached", "merged"):
            goal = 1.10 if name != "unmerged" else None
            lines.append(_check(f"generate {name} / base", gen[name]["seconds"] / gen["base"]["seconds"], "<=", goal))
        fwd = {r["variant"]: r for r in result["forward"]}
        lines.append(_check("prompt forward merged / base", fwd["merged"]["seconds"] / fwd["base"]["seconds"],
                            "<=", 1.05))
    return lines


def _check(label, value, op, goal) -> str:
    if goal is None:
        return f"| {label} | {value:.2f} | (no goal) |"
    met = value <= goal if op == "<=" else value >= goal
    return f"| {label} | {value:.2f} | goal {op} {goal}: {'met' if met else 'MISSED'} |"


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
    out += ["| goal | measured | |", "|---|---|---|", *ratio_lines(result)]
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    core = load_notebook_core()
    device = core.choose_device(args.device)
    started = time.perf_counter()
    result = {"machine": machine_info(core, device),
              "config": {"model": args.model or "GPT2Config() random init", "batch_size": args.batch_size,
                         "block_size": args.block_size, "rank": args.rank, "alpha": args.alpha,
                         "targets": TARGETS, "dropout": args.dropout, "precision": args.precision,
                         "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps}}
    if args.only != "inference":
        result["train"] = benchmark_training(args, core, device)
    if args.only != "train":
        result["generate"], result["forward"], result["same_tokens"] = benchmark_inference(args, core, device)
    result["seconds_total"] = time.perf_counter() - started
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{result['machine']['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown_report(result))
    print(f"\n{result['seconds_total']:.0f} s in all; JSON written to {out}")


if __name__ == "__main__":
    main()
