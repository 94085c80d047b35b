"""A GPT-2 and its tokenizer built offline, saved with save_pretrained as `from_pretrained` expects.

One builder for the tests (a tiny GPT-2, through tests/conftest.py) and for benchmarks/gpu_check.sh (GPT-2
small's shape with random weights). The tokenizer is a byte-level BPE trained on the given text, wrapped as
`GPT2TokenizerFast`, so the notebooks load both through the same code path as the real GPT-2.

    python3 -m tools.offline_gpt2 --size small --text data/tinyshakespeare.txt --out /tmp/gpt2-small-random
    python3 -m tools.offline_gpt2 --size tiny --out /tmp/tiny-gpt2 --write-text /tmp/play.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

EOS = "<|endoftext|>"
# GPT-2 small: 12 blocks, 12 heads, 768 wide, 1024 positions, 50,257 tokens (124,439,808 parameters).
SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "vocab_size": None}


def make_play_text(n_lines: int = 1500, seed: int = 0) -> str:
    """A small, regular 'play': speakers and lines from a tiny grammar, so a model can learn it."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING", "QUEEN"]
    subjects = ["the king", "my lord", "the queen", "this night", "sweet love", "the moon"]
    verbs = ["is", "was", "shall be", "must be", "seems"]
    objects = ["fair", "dead", "gone", "true", "false", "here", "kind"]
    lines = []
    for _ in range(n_lines):
        lines.append(f"{rng.choice(speakers)}:\n{rng.choice(subjects).capitalize()} {rng.choice(verbs)} "
                     f"{rng.choice(objects)}, and {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n")
    return "\n".join(lines)


def build_tokenizer(text: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on text (at most vocab_size tokens), as a GPT2TokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def save_gpt2(folder: Path, text: str, *, n_layer: int, n_head: int, n_embd: int, n_positions: int,
              vocab_size: int | None = None, tokenizer_vocab: int = 400, seed: int = 0) -> Path:
    """Save a randomly initialised GPT-2 of this shape and a BPE tokenizer trained on text into folder.

    vocab_size None sizes the model's vocabulary to the tokenizer; a larger value keeps a checkpoint's shape
    (GPT-2's 50,257) although the tokenizer, trained on a small text, has fewer tokens.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tokenizer = build_tokenizer(text, tokenizer_vocab)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size or len(tokenizer), bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, text: str, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> Path:
    """Train a byte-level BPE tokenizer on text and save it with a random tiny GPT-2, as from_pretrained expects."""
    return save_gpt2(folder, text, n_layer=n_layer, n_head=2, n_embd=n_embd, n_positions=128, seed=seed)


def save_gpt2_small_shaped(folder: Path, text: str, seed: int = 0) -> Path:
    """GPT-2 small's shape (124,439,808 parameters) with random weights, and a BPE tokenizer of up to 8,192 tokens."""
    return save_gpt2(folder, text, **SMALL, tokenizer_vocab=8192, seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], required=True, help="tiny (tests) or GPT-2 small's shape")
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer into")
    parser.add_argument("--text", default=None, help="train the tokenizer on this file; default: a synthetic play")
    parser.add_argument("--write-text", default=None, help="also write the synthetic play to this file")
    parser.add_argument("--lines", type=int, default=1500, help="lines of the synthetic play (about 55 bytes each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        text = make_play_text(args.lines)
        if args.write_text:
            Path(args.write_text).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write_text).write_text(text, encoding="utf-8")
    if args.size == "tiny":
        save_tiny_gpt2(Path(args.out), text, seed=args.seed)
    else:
        save_gpt2_small_shaped(Path(args.out), text, seed=args.seed)
    print(f"wrote a {args.size} GPT-2 with random weights and its tokenizer to {args.out}")


if __name__ == "__main__":
    main()
