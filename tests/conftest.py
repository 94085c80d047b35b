"""Shared fixtures: a tiny GPT-2 and tokenizer saved offline, a small learnable text, the notebook's code."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.nbcode import MAIN_NOTEBOOK, load_core  # noqa: E402
from tools.offline_gpt2 import make_play_text, save_tiny_gpt2  # noqa: E402,F401  (shared with benchmarks/gpu_check.sh)

TINY_BLOCK_SIZE = 32


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


@pytest.fixture
def fresh(tiny_model_dir):
    """A factory of fresh tiny GPT-2s, in eval mode, loaded through from_pretrained."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def batch():
    """Two rows of 16 token ids, the same every time."""
    import torch

    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, batch):
    """The model's logits for batch, without gradients."""
    import torch

    with torch.no_grad():
        return model(batch).logits
