"""The README's commands, as a newcomer runs them, leave the tests passing and `git status` clean.

The commands are read from the README itself (the fenced block after each `<!-- command: NAME -->` marker), so
the README cannot drift from what is tested. They run in a temporary copy of this checkout (its tracked and
not-ignored files, committed into a fresh repository), offline: the install lines are checked, not run, and the
run line gets the tiny GPT-2 in `models/gpt2` (where the README's offline recipe puts a model) and small knobs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"  # the pages the README links to for everything beyond a two-minute read
README_MAX_LINES = 150
GIT = shutil.which("git")
# Small knobs for the tiny model (128 positions); every other knob keeps the README's value.
TINY_KNOBS = {"MAX_STEPS": "3", "BLOCK_SIZE": "32", "BATCH_SIZE": "4", "EVAL_INTERVAL": "3", "EVAL_BATCHES": "2",
              "MAX_NEW_TOKENS": "8", "LATENCY_TOKENS": "4"}


def readme_block(name: str) -> list[str]:
    """The command lines of the fenced block after `<!-- command: name -->`, continuations joined."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- command: {re.escape(name)} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert match, f"README.md has no block marked <!-- command: {name} -->"
    joined = match.group(1).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def papermill_line(lines: list[str]) -> list[str]:
    [line] = [line for line in lines if "papermill " in line]
    words = shlex.split(line)
    return words[words.index("papermill"):]  # after any `mkdir -p ... &&`


def with_knobs(words: list[str], knobs: dict[str, str]) -> list[str]:
    """words with each `-p NAME VALUE` of knobs replaced, or added when the README does not pass it."""
    words, remaining = list(words), dict(knobs)
    for i, word in enumerate(words[:-2]):
        if word == "-p" and words[i + 1] in remaining:
            words[i + 2] = remaining.pop(words[i + 1])
    for name, value in remaining.items():
        words += ["-p", name, value]
    return words


def copy_of_checkout(tmp_path: Path) -> Path:
    """The working tree's tracked and not-ignored files, committed into a new repository."""
    listed = subprocess.run([GIT, "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    git = [GIT, "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=clone, check=True)
    return clone


def test_install_block_uses_a_venv_and_the_requirements():
    lines = readme_block("install-and-run")
    assert any(re.match(r"python3? -m venv \S+", line) for line in lines)
    assert any("pip install -r requirements.txt" in line for line in lines)
    words = papermill_line(lines)
    assert words[1] == "lora_from_scratch.ipynb" and words[2].startswith("runs/")


def papermill_commands(page: Path) -> list[list[str]]:
    return [shlex.split(m.split(" #")[0]) for m in re.findall(r"^.*papermill \S+\.ipynb .*$", page.read_text(), re.M)]


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda page: page.name)
def test_every_papermill_command_in_the_readme_and_docs_writes_under_runs(page):
    """Each executed copy and each OUTPUT_DIR the README (or a docs/ page) gives lies under the git-ignored runs/."""
    commands = papermill_commands(page)
    if page == README:
        assert len(commands) >= 3
    for words in commands:
        words = words[words.index("papermill"):]
        assert words[2].startswith("runs/"), words
        assert "OUTPUT_DIR" in words and words[words.index("OUTPUT_DIR") + 1].startswith("runs/"), words


def test_readme_test_command_is_the_one_ci_runs():
    [command] = [line for line in readme_block("tests") if "pytest" in line]
    assert command.split("&&")[-1].strip() == "python3 -m pytest tests -q"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^run_pytest \"[^\"]*\" python3 tests -q$", ci, re.M), ".ci/run no longer runs `python3 tests -q`"


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    """The page's markdown link targets that point into this repository (no scheme, no bare anchor)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    return [target for target in targets if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if not file.is_file() or (anchor and file.suffix == ".md" and anchor not in heading_anchors(file)):
            broken.append(target)
    return broken


def test_readme_is_a_two_minute_read_and_its_docs_links_resolve():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/ (at most {README_MAX_LINES})"
    docs_links = [target for target in relative_links(README) if target.startswith("docs/")]
    assert docs_links, "README.md links to no docs/ page"
    assert broken_links(README) == [], "README.md links to files or headings that do not exist"
    linked = {target.partition("#")[0] for target in docs_links}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages <= linked, f"docs/ pages the README never links to: {sorted(pages - linked)}"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_every_link_of_a_docs_page_resolves(page):
    assert broken_links(page) == [], f"{page.name} links to files or headings that do not exist"


def test_readme_states_the_python_floor_and_requirements_hold_the_true_floors():
    assert "Python 3.10" in README.read_text(encoding="utf-8")
    requirements = (REPO / "requirements.txt").read_text()
    torch_floor = re.search(r"^torch>=(\d+)\.(\d+)", requirements, re.M)
    mpl_floor = re.search(r"^matplotlib>=(\d+)\.(\d+)", requirements, re.M)
    assert torch_floor and (int(torch_floor[1]), int(torch_floor[2])) >= (2, 6)  # transformers 5.20+ refuse < 2.6
    assert mpl_floor and (int(mpl_floor[1]), int(mpl_floor[2])) >= (3, 9)  # 3.7/3.8 fail under IPython 9


@pytest.mark.skipif(GIT is None or not (REPO / ".git").exists(), reason="needs git and a git checkout")
def test_readme_run_then_tests_leave_the_checkout_clean(tmp_path, tiny_model_dir, play_text_path):
    clone = copy_of_checkout(tmp_path)
    # The README's offline recipe: a model folder made with save_pretrained in models/, the text in data/.
    shutil.copytree(tiny_model_dir, clone / "models" / "gpt2")
    (clone / "data" / "tinyshakespeare.txt").write_bytes(play_text_path.read_bytes())
    sha256 = hashlib.sha256(play_text_path.read_bytes()).hexdigest()

    offline = readme_block("run-offline")
    words = papermill_line(offline)
    assert words[words.index("MODEL_NAME") + 1] == "models/gpt2"
    words = with_knobs(words, {**TINY_KNOBS, "DATA_SHA256": sha256})
    mkdirs = [line.split("&&")[0] for line in offline if line.startswith("mkdir")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    for mkdir in mkdirs:
        subprocess.run(mkdir, shell=True, cwd=clone, check=True)
    done = subprocess.run([sys.executable, "-m", *words, "--kernel", "python3"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    executed, output_dir = clone / words[2], clone / words[words.index("OUTPUT_DIR") + 1]
    assert executed.is_file() and (output_dir / "results.json").is_file()

    hygiene = subprocess.run([sys.executable, "-m", "pytest", "tests/test_notebook_hygiene.py", "-q",
                              "-p", "no:cacheprovider"], cwd=clone, env=env, capture_output=True, text=True,
                             timeout=600)
    assert hygiene.returncode == 0, hygiene.stdout[-3000:]
    status = subprocess.run([GIT, "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"the README's commands left files git does not ignore:\n{status}"
