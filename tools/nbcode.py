"""Run the code a notebook defines, outside Jupyter: the cells tagged `lora-core`, exactly as readers see them.

Tests and benchmarks import the notebook's own definitions through this module instead of a copy,
so what is tested is what is taught.
"""

from __future__ import annotations

import types
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
MAIN_NOTEBOOK = REPO / "lora_from_scratch.ipynb"
ABLATIONS_NOTEBOOK = REPO / "lora_ablations.ipynb"
CORE_TAG = "lora-core"


def tagged_sources(notebook: Path, tag: str = CORE_TAG) -> list[str]:
    """The source of every code cell carrying tag, in notebook order."""
    nb = nbformat.read(notebook, as_version=4)
    return [
        cell.source for cell in nb.cells if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])
    ]


def load_core(notebook: Path = MAIN_NOTEBOOK, tag: str = CORE_TAG) -> types.SimpleNamespace:
    """Execute the tagged cells, in order, in one fresh namespace, and return it."""
    namespace: dict = {"__name__": f"notebook_{notebook.stem}"}
    for index, source in enumerate(tagged_sources(notebook, tag)):
        exec(compile(source, f"<{notebook.name} {tag} cell {index}>", "exec"), namespace)
    return types.SimpleNamespace(**namespace)
