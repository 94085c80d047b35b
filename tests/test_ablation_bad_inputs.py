"""Careless inputs to lora_ablations.ipynb as papermill and a new user pass them (issue 17, item 2).

Every knob of the parameters cell has a rule; each case below is refused before the first run with a message that
names the knob, its value and the fix, or (for the model-free checks) is accepted as the right value.
"""

from __future__ import annotations

import nbformat
import numpy as np
import papermill
import pytest
from test_ablations import run_ablations

from tools.nbcode import ABLATIONS_NOTEBOOK, load_core


@pytest.fixture(scope="module")
def nb():
    """The notebook's definitions with the default knobs of its parameters cell in the same namespace."""
    namespace = load_core(ABLATIONS_NOTEBOOK)
    cell = next(c for c in nbformat.read(ABLATIONS_NOTEBOOK, 4).cells if "parameters" in c.metadata.get("tags", []))
    exec(cell.source, namespace.validate_knobs.__globals__)
    return namespace


SHAPE = {"max_rank": 768, "n_layer": 12, "n_positions": 1024,
         "module_names": [f"transformer.h.{i}.{m}" for i in range(12) for m in ("attn.c_attn", "attn.c_proj")]}


def check(nb, **knobs):
    nb.validate_knobs(knobs, nb.ablation_rules(**SHAPE))


def test_every_knob_has_a_rule_and_the_defaults_pass(nb):
    knobs = nb.knob_values()
    assert set(knobs) == set(nb.ablation_rules())  # the parameters cell and the rules table name the same knobs
    nb.validate_knobs(knobs, nb.ablation_rules(**SHAPE))


@pytest.mark.parametrize("name", ["RERUN", "RUN_BASELINES", "RUN_FULL_FINETUNE"])
@pytest.mark.parametrize("text", ["false", "False", "true"])
def test_a_boolean_passed_as_a_string_names_the_papermill_y_form(nb, name, text):
    with pytest.raises(ValueError, match=rf"{name} = '{text}' is not valid: set {name} to True or False "
                                         rf"\('{text}' "
                                         rf'is text: use -y "{name}: {text.lower()}"\)'):
        check(nb, **{name: text})


@pytest.mark.parametrize("value", [0, 1, None])
def test_a_boolean_must_be_true_or_false(nb, value):
    with pytest.raises(ValueError, match=r"RERUN = .* is not valid: set RERUN to True or False"):
        check(nb, RERUN=value)


@pytest.mark.parametrize(("name", "value"), [
    ("SEEDS", list(np.arange(1, 3))),
    ("RANKS", list(np.array([1, 2, 4]))),
    ("SUBSPACE_RANKS", list(np.array([8, 64]))),
    ("STEPS_PER_RUN", np.int64(10)),
    ("LATENCY_WARMUP", np.int64(3)),
])
def test_numpy_integers_are_refused_with_the_fix(nb, name, value):
    with pytest.raises(ValueError, match=rf"{name} = .*np.int64.* is not valid: set {name} to .*plain.*"
                                         r"\(int\(x\) of a numpy integer\)"):
        check(nb, **{name: value})


def test_numpy_floats_are_refused(nb):
    with pytest.raises(ValueError, match=r"LR = np.float32\(.*\) is not valid: set LR to a positive number"):
        check(nb, LR=np.float32(2e-4))


@pytest.mark.parametrize(("name", "value"), [
    ("LATENCY_WARMUP", 3.0), ("LATENCY_REPEATS", 20.0), ("STEPS_PER_RUN", 10.0), ("BATCH_SIZE", 2.0),
    ("BLOCK_SIZE", 256.0), ("SAMPLE_TOKENS", 40.0), ("EVAL_BATCHES", 3.0), ("ANALYSIS_BLOCK", 1.0),
    ("RANKS", [1.0, 4]), ("SEEDS", [0, 1.5]), ("LATENCY_SHAPES", [[1, 128.0]]), ("STEPS_PER_RUN", True),
])
def test_a_float_or_bool_where_an_integer_is_meant_is_refused(nb, name, value):
    with pytest.raises(ValueError, match=rf"{name} = .* is not valid: set {name} to"):
        check(nb, **{name: value})


@pytest.mark.parametrize("seeds", [[-1], [2**32], [0, 2**40]])
def test_seeds_outside_the_generators_range_are_refused(nb, seeds):
    with pytest.raises(ValueError, match=r"SEEDS = .* distinct plain integers from 0 to 4294967295"):
        check(nb, SEEDS=seeds)


def test_the_largest_seed_both_generators_take_passes(nb):
    import torch

    check(nb, SEEDS=[0, 2**32 - 1])
    torch.Generator().manual_seed(2**32 - 1)
    np.random.default_rng(2**32 - 1)


@pytest.mark.parametrize(("name", "close"), [("RANKZ", "RANKS"), ("LEARNING_RATE", None), ("SEED", "SEEDS")])
def test_an_upper_case_name_that_is_no_knob_is_refused_with_the_knobs(nb, name, close):
    message = rf"{name} is not a knob of this notebook: " + (rf"did you mean {close}\? " if close else "")
    with pytest.raises(ValueError, match=message + r"The knobs are MODEL_NAME, .*LATENCY_WARMUP, RUN_BEYOND_PAPER, .*\."):
        check(nb, **{name: 1})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("LR", 0, "a positive number"), ("LR", float("nan"), "a positive number"), ("LR", "2e-4", "a positive number"),
    ("ALPHA", -8, "a positive number"), ("WEIGHT_DECAY", -0.1, "at least 0"), ("DROPOUT", 1.0, r"\[0, 1\)"),
    ("VAL_FRACTION", 1, "between 0 and 1"), ("DATA_SHA256", "abc123", "64 hex digits"),
    ("DATA_SHA256", "g" * 64, "64 hex digits"), ("PRECISION", "fp8", "'auto', 'fp32'"),
    ("MODEL_NAME", " ", "a non-empty string"), ("DATA_PATH", ".", "a file's path, not a folder's"),
    ("DEVICE", "cuda:x", "'cuda:N'"), ("DEVICE", "cpu:1", "'cuda:N'"), ("DEVICE", 0, "'cuda:N'"),
    ("BASELINES", ["lora"], "distinct"), ("LATENCY_SHAPES", [[1, 2048]], "tokens <= 1024"),
    ("RANKS", "[1, 32]", "pass lists with -y"), ("SCALINGS", [], "distinct"), ("RANK_TARGETS", ["mlp.c_fc"], "module name"),
])
def test_other_bad_values_name_the_knob_and_what_is_valid(nb, name, value, message):
    with pytest.raises(ValueError, match=rf"{name} = .* is not valid: set {name} to .*{message}"):
        check(nb, **{name: value})


@pytest.mark.parametrize(("arguments", "message"), [
    ({"init": "zeros"}, "init must be 'paper' or 'mirrored'"),
    ({"lr_ratio": 0}, "lr_ratio .* must be a positive number"),
    ({"lr": -1e-3}, "lr must be None"),
    ({"seed": np.int64(1)}, "seed must be an integer"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"scaling": "alpha"}, "scaling must be one of"),
    ({"baseline": "lora", "rank": 0}, "baseline must be one of"),
    ({"full_finetune": True, "init": "mirrored"}, "init and lr_ratio apply to LoRA runs only"),
])
def test_run_experiment_arguments_fail_before_a_model_is_built(nb, arguments, message):
    call = {"rank": 4, "seed": 1, "scaling": "alpha/r", "full_finetune": False, "baseline": None, "init": "paper",
            "lr": None, "lr_ratio": 1.0} | arguments
    with pytest.raises(ValueError, match=rf"run_experiment: {message}"):
        nb.run_config(["attn.c_attn"], "", **call)


def test_papermill_p_rerun_false_fails_before_anything_trains(tmp_path, tiny_model_dir, play_text_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r'use -y \\?"RERUN: false'):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, RERUN="false")
    assert not (tmp_path / "out").exists()  # refused before the output folders are made


def test_papermill_float_warmup_and_unknown_knob_fail_before_anything_trains(tmp_path, tiny_model_dir, play_text_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"LATENCY_WARMUP = 3.0 is not valid"):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, LATENCY_WARMUP=3.0)
    with pytest.raises(papermill.PapermillExecutionError, match=r"LEARNING_RATE is not a knob of this notebook"):
        run_ablations(tmp_path, tiny_model_dir, play_text_path, LEARNING_RATE=1e-3)
    assert not (tmp_path / "out").exists()


# --- a section rerun in a live kernel reads the knobs as they are then (the model-free parts) ----------------


def test_output_dir_at_or_under_a_plain_file_is_refused_before_anything_is_written(nb, tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a folder")
    for value in (str(plain), str(plain / "out")):
        with pytest.raises(ValueError, match=r"OUTPUT_DIR = .* is not valid: set OUTPUT_DIR to a folder path with no "
                                             r"plain file at it or above it"):
            check(nb, OUTPUT_DIR=value)
    check(nb, OUTPUT_DIR=str(tmp_path / "new" / "folder"))  # a folder that does not exist yet is fine
    assert not (tmp_path / "new").exists()  # the check writes nothing


@pytest.mark.parametrize("name", ["a/b", "../up", "", "two words", 7])
def test_a_run_name_that_cannot_name_a_file_is_refused_before_training(nb, tmp_path, name):
    with pytest.raises(ValueError, match=r"run_experiment: name .* names the run's files: use letters, digits"):
        nb.run_file(tmp_path, name, 1, {"rank": 4})
    assert nb.run_file(tmp_path, "layers-Wq+Wv-alpha-sqrt-r", 1, {}).parent == tmp_path


@pytest.fixture
def setup_namespace(nb):
    """The notebook's globals with section 0's three cells recorded as run under the default knobs."""
    space = nb.validate_knobs.__globals__
    space["setup_seen"] = {}
    for step in nb.setup_steps():
        nb.note_setup(step)
    saved = {name: space[name] for names in nb.setup_steps().values() for name in names}
    yield space
    space.update(saved)


@pytest.mark.parametrize(("name", "value"), [
    ("MODEL_NAME", "other/model"), ("DATA_PATH", "other.txt"), ("VAL_FRACTION", 0.3), ("PRECISION", "fp32"),
    ("DEVICE", "cpu"), ("OUTPUT_DIR", "out2"), ("EVAL_BATCHES", 3), ("BATCH_SIZE", 4), ("BLOCK_SIZE", 128),
])
def test_a_setup_knob_changed_after_section_0_refuses_a_section_rerun(nb, setup_namespace, name, value):
    nb.check_setup()  # unchanged: fine
    setup_namespace[name] = value
    with pytest.raises(RuntimeError, match=rf"{name} is now {value!r}, but section 0's \w+ cell ran with .*: its "
                                           rf"results are stale. Rerun from section 0, or set {name} back"):
        nb.check_setup()


def test_a_section_0_cell_that_did_not_run_again_refuses_a_section_rerun(nb, setup_namespace):
    del setup_namespace["setup_seen"]["reference"]  # the device cell ran again (it starts the record afresh), no more
    with pytest.raises(RuntimeError, match=r"Section 0's reference cell has not run since its first cell: rerun from "
                                           r"section 0"):
        nb.check_setup()


def test_the_model_fingerprint_tells_two_models_of_the_same_name_apart(nb, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    first, second = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    assert nb.model_fingerprint(first) == nb.model_fingerprint(second)
    with torch.no_grad():
        second.transformer.h[0].attn.c_attn.weight[0, 0] += 1.0  # the first entry is in every sample
    assert nb.model_fingerprint(first) != nb.model_fingerprint(second)
    with_dropout = AutoModelForCausalLM.from_pretrained(tiny_model_dir, resid_pdrop=0.3)
    assert nb.model_fingerprint(with_dropout) == nb.model_fingerprint(first)  # a run's config holds its dropout


def test_results_of_another_setup_in_output_dir_are_named_before_they_are_overwritten(nb, tmp_path):
    import json

    setup = {"model": "m", "model_fingerprint": "f1", "data_fingerprint": "d1"}
    path = tmp_path / "ablation_results.json"
    assert nb.earlier_results_note(path, setup) is None  # nothing there yet
    path.write_text(json.dumps({"setup": setup}))
    assert nb.earlier_results_note(path, setup) is None  # the same setup: nothing to say
    path.write_text(json.dumps({"setup": dict(setup, data_fingerprint="d0")}))
    note = nb.earlier_results_note(path, setup)
    assert str(path) in note and "data_fingerprint 'd0' -> 'd1'" in note and "Set OUTPUT_DIR to another folder" in note
    path.write_text(json.dumps({"rank": []}))  # written before the setup was recorded
    assert "its setup is not recorded" in nb.earlier_results_note(path, setup)


def test_a_finding_keeps_the_papers_words_apart_from_our_reading(nb):
    finding = nb.make_finding("x", "claim", "the paper's words", [1.0, 1.1], [0.0, 0.1], 1, "detail", note="ours")
    assert finding["paper"] == "the paper's words" and finding["note"] == "ours"
    assert nb.make_finding("x", "c", "p", [1.0], [0.0], 1, "d")["note"] == ""


def test_a_lora_run_with_nothing_to_adapt_fails_before_a_model_is_built(nb):
    with pytest.raises(ValueError, match=r"run_experiment: a LoRA run needs something to adapt: whole modules"):
        nb.run_config([], "", 4, seed=1)
