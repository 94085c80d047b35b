"""The notebooks as files: valid, cleared, parametrized, self-contained, correctly cited, lint-clean."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import nbformat
import papermill
import pytest
from conftest import MAIN_NOTEBOOK, REPO

from tools.nbcode import ABLATIONS_NOTEBOOK, tagged_sources


def project_notebooks() -> list:
    """The notebooks git tracks (in a checkout), else the project's two: never an executed copy lying around."""
    listed = subprocess.run(["git", "ls-files", "--", "*.ipynb"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return sorted(REPO / line for line in listed.stdout.splitlines())
    return sorted([MAIN_NOTEBOOK, ABLATIONS_NOTEBOOK])


NOTEBOOKS = project_notebooks()

MAIN_PARAMETERS = {
    "MODEL_NAME": "openai-community/gpt2",
    "DATA_URL": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "DATA_PATH": "data/tinyshakespeare.txt",
    "DATA_SHA256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "VAL_FRACTION": 0.1, "BLOCK_SIZE": 256, "BATCH_SIZE": 2, "EPOCHS": 3, "MAX_STEPS": None, "LR": 1e-4,
    "WEIGHT_DECAY": 0.01, "DROPOUT": 0.0, "RANK": 4, "ALPHA": 8, "TARGET_MODULES": ["attn.c_attn", "attn.c_proj"],
    "EVAL_BATCHES": None, "PROMPT": "To be or not to be", "SEED": 1337, "DEVICE": "auto", "PRECISION": "auto",
    "OUTPUT_DIR": ".",
}
# Sections of arXiv 2106.09685 v2 the notebooks may cite (see shared PAPER_FACTS).
PAPER_SECTIONS = {"3", "4", "4.1", "4.2", "5", "5.1", "5.2", "5.3", "5.4", "5.5", "7", "7.1", "7.2", "7.3"}


def test_both_notebooks_are_checked():
    assert MAIN_NOTEBOOK in NOTEBOOKS and ABLATIONS_NOTEBOOK in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat_with_outputs_cleared(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_first_and_papermill_reads_every_line(path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code_cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code_cells[0]
    assigned = [line.split("=")[0].strip() for line in tagged[0].source.splitlines() if re.match(r"^[A-Z_][A-Z0-9_]* =", line)]
    inferred = papermill.inspect_notebook(str(path))
    assert sorted(inferred) == sorted(assigned)  # papermill skips a line whose comment holds "="


def test_main_parameters_have_the_agreed_names_and_defaults():
    namespace: dict = {}
    source = next(c.source for c in nbformat.read(MAIN_NOTEBOOK, 4).cells if "parameters" in c.metadata.get("tags", []))
    exec(source, namespace)
    for name, default in MAIN_PARAMETERS.items():
        assert namespace[name] == default, name
    assert "EVAL_INTERVAL" in namespace and "MAX_NEW_TOKENS" in namespace


SHARED_COPY = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHARED_COPY.exists(), reason="no local copy of Tiny Shakespeare beside the repo")
def test_default_checksum_is_that_of_tiny_shakespeare():
    import hashlib

    assert hashlib.sha256(SHARED_COPY.read_bytes()).hexdigest() == MAIN_PARAMETERS["DATA_SHA256"]
    assert SHARED_COPY.stat().st_size == 1_115_394


def is_import_cell_setup(node) -> bool:
    """What the imports cell (the first lora-core cell) may also hold: `if <old Python>: raise ...`, and calls
    that quiet the libraries' logging."""
    if isinstance(node, ast.If):
        return not node.orelse and all(isinstance(n, ast.Raise) for n in node.body)
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and "logging" in ast.unparse(node)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_core_cells_hold_only_imports_and_definitions(path):
    sources = tagged_sources(path)
    assert sources
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    for index, source in enumerate(sources):
        for node in ast.parse(source).body:
            if index == 0 and is_import_cell_setup(node):
                continue
            assert isinstance(node, allowed), f"{type(node).__name__} in a lora-core cell: {source[:60]}"
            if isinstance(node, ast.Assign):
                assert isinstance(node.value, ast.Constant), "only constants may be assigned in lora-core"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_stands_alone(path):
    code = "\n".join(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code")
    assert not re.search(r"^\s*(from|import)\s+(tools|tests|conftest)\b", code, re.M)
    assert "pip install" not in code  # Colab brings torch and friends; never reinstall them


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paper_citations_are_v2_and_name_real_sections(path):
    markdown = "\n".join(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "markdown")
    assert "2106.09685" in markdown and "v2" in markdown
    cited = set(re.findall(r"§\s*(\d+(?:\.\d+)?)", markdown))
    assert cited and cited <= PAPER_SECTIONS, cited - PAPER_SECTIONS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_has_a_markdown_lead_in(path):
    cells = nbformat.read(path, 4).cells
    for previous, cell in zip(cells, cells[1:], strict=False):
        if cell.cell_type == "code":
            assert previous.cell_type == "markdown", f"no lead-in before: {cell.source[:80]}"


def test_ruff_passes_on_code_and_notebooks():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("notebook", [MAIN_NOTEBOOK, ABLATIONS_NOTEBOOK], ids=lambda path: path.name)
def test_no_code_line_is_longer_than_ruffs_110_columns(notebook):
    """Fewer lines must not mean denser ones: ruff's line length (110) holds in the notebooks' code, Colab's
    #@param and #@title lines aside (their annotations must stay on the line they annotate)."""
    long = [line for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"
            for line in cell.source.splitlines() if len(line) > 110 and not re.search(r"#@(param|title)\b", line)]
    assert not long, long[:3]
