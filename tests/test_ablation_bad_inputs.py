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
    with pytest.raises(ValueError, match=rf"{name} = '{text}' is not valid: set {name} to True or False \(papermill "
                                         rf'passes -p values as text: use -y "{name}: {text.lower()}"\)'):
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
    ("VAL_FRACTION", 1, "between 0 and 1"), ("PRECISION", "fp8", "'auto', 'fp32'"), ("MODEL_NAME", " ", "a non-empty string"),
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
        nb.check_run_args(**call)


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
