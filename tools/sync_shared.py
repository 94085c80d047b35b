"""Copy the shared `lora-core` cells of the main notebook into the ablations notebook, verbatim.

Each notebook must open alone in Colab, so both define `LoRALayer`, `inject_lora` and the other shared
pieces inline. The main notebook is the source of truth: an ablations `lora-core` cell whose first
definition is also defined by a main-notebook `lora-core` cell is replaced by that cell's text.
`tests/test_ablations.py` checks that the copies are identical.

    python tools/sync_shared.py          # rewrite lora_ablations.ipynb
    python tools/sync_shared.py --check  # exit 1 if a copy differs

An ablations copy may start with one extra line of its own, a Colab form title (`#@title ... { display-mode:
"form" }`), when the main cell has none: the ablations collapse the shared cells the main notebook shows. That
line is kept; everything after it is the main cell's text.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python tools/sync_shared.py` from the repo root
from tools.nbcode import ABLATIONS_NOTEBOOK, CORE_TAG, MAIN_NOTEBOOK  # noqa: E402


def top_level_names(source: str) -> list[str]:
    """Names of the functions and classes a cell defines, in order."""
    return [
        node.name
        for node in ast.parse(source).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
    ]


FORM_TITLE = re.compile(r'^#@title\b.*display-mode:\s*"form"')


def without_form_title(source: str) -> tuple[str, str]:
    """(the first line and its newline if it is a Colab form title, else ""; the rest)."""
    first, newline, rest = source.partition("\n")
    return (first + newline, rest) if FORM_TITLE.match(first) else ("", source)


def copy_of(main_source: str, ablations_source: str) -> str:
    """What the ablations cell must read: the main cell's text, under the ablations' own form title if any."""
    if without_form_title(main_source)[0]:
        return main_source
    return without_form_title(ablations_source)[0] + main_source


def core_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and CORE_TAG in c.metadata.get("tags", [])]


def sync(check: bool = False) -> list[str]:
    """Return the first names of the ablations cells that differ (and fix them unless check)."""
    main = nbformat.read(MAIN_NOTEBOOK, as_version=4)
    ablations = nbformat.read(ABLATIONS_NOTEBOOK, as_version=4)
    by_name = {}
    for cell in core_cells(main):
        for name in top_level_names(cell.source):
            by_name.setdefault(name, cell.source)
    changed = []
    for cell in core_cells(ablations):
        names = top_level_names(cell.source)
        if names and names[0] in by_name and cell.source != copy_of(by_name[names[0]], cell.source):
            changed.append(names[0])
            cell.source = copy_of(by_name[names[0]], cell.source)
    if changed and not check:
        nbformat.write(ablations, ABLATIONS_NOTEBOOK)
    return changed


if __name__ == "__main__":
    check = "--check" in sys.argv[1:]
    differing = sync(check)
    verb = "differ" if check else "updated"
    print(f"{verb}: {', '.join(differing)}" if differing else "shared cells are identical")
    sys.exit(1 if check and differing else 0)
