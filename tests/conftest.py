"""Shared fixtures: a tiny GPT-2 and tokenizer saved offline, a small learnable text, the notebook's code."""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.nbcode import MAIN_NOTEBOOK, load_core  # noqa: E402

TINY_BLOCK_SIZE = 32


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


def save_tiny_gpt2(folder: Path, text: str, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> Path:
    """Train a byte-level BPE tokenizer on text and save it with a random tiny GPT-2, as from_pretrained expects."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=n_embd, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def notebook_stdout(executed: Path) -> str:
    """Everything an executed notebook printed, in cell order."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="session")
def core():
    """The main notebook's lora-core definitions, executed from the notebook itself."""
    return load_core(MAIN_NOTEBOOK)


@pytest.fixture(scope="session")
def play_text_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(make_play_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def play_text_sha256(play_text_path) -> str:
    return hashlib.sha256(play_text_path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, play_text_path) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), play_text_path.read_text(encoding="utf-8"))
