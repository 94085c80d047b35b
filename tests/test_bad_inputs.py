"""Careless inputs, tried as a user would: each gives a clear early error naming the problem, or the right result.

Each test asserts the error type and a message that names the knob, file or feature at fault (and, where
there is one, the fix). Nothing here trains: the tiny GPT-2 from conftest, a few tensors, files in tmp_path.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import torch
from conftest import MAIN_NOTEBOOK, TINY_BLOCK_SIZE, logits
from transformers import AutoModelForCausalLM

TARGETS = ["attn.c_attn", "attn.c_proj"]


def trained(core, model, scaling="alpha/r"):
    """Inject LoRA and give B a non-zero value, as training would."""
    core.inject_lora(model, TARGETS, 4, 8, scaling)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in core.lora_layers(model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.1)
    return model


def default_knobs() -> dict:
    namespace: dict = {}
    cells = nbformat.read(MAIN_NOTEBOOK, as_version=4).cells
    exec(next(c.source for c in cells if "parameters" in c.metadata.get("tags", [])), namespace)
    return {name: value for name, value in namespace.items() if name.isupper()}


# --- validate_knobs: one rule per knob ------------------------------------------------------------------


def test_the_defaults_are_valid_and_every_default_knob_has_a_rule(core):
    knobs = default_knobs()
    core.validate_knobs(knobs, core.knob_rules())
    assert set(knobs) <= set(core.knob_rules())


BAD_KNOBS = [
    ("MODEL_NAME", ""), ("MODEL_NAME", None), ("DATA_URL", "raw.githubusercontent.com/x.txt"), ("DATA_URL", None),
    ("DATA_PATH", ""), ("DATA_SHA256", "abc123"), ("DATA_SHA256", "g" * 64), ("DATA_SHA256", 0),
    ("VAL_FRACTION", 0), ("VAL_FRACTION", 1), ("VAL_FRACTION", 10), ("VAL_FRACTION", float("nan")),
    ("VAL_FRACTION", "0.1"), ("BLOCK_SIZE", 0), ("BLOCK_SIZE", 1), ("BLOCK_SIZE", 256.0), ("BLOCK_SIZE", True),
    ("BATCH_SIZE", 0), ("BATCH_SIZE", -2), ("BATCH_SIZE", 2.5), ("EPOCHS", 0), ("EPOCHS", None), ("MAX_STEPS", 0),
    ("MAX_STEPS", -1), ("LR", 0), ("LR", -1e-4), ("LR", float("inf")), ("LR", "1e-4"), ("WEIGHT_DECAY", -0.01),
    ("WEIGHT_DECAY", float("nan")), ("DROPOUT", 1), ("DROPOUT", -0.1), ("RANK", 0), ("RANK", 4.0), ("ALPHA", 0),
    ("ALPHA", float("inf")), ("ALPHA", float("nan")), ("TARGET_MODULES", []), ("TARGET_MODULES", "attn.c_attn"),
    ("TARGET_MODULES", ["attn.c_attn", "attn.c_attn"]), ("TARGET_MODULES", ["attn.c_attn", ""]),
    ("TARGET_MODULES", [1]), ("EVAL_INTERVAL", 0), ("EVAL_BATCHES", 0), ("PROMPT", ""), ("PROMPT", "   "),
    ("PROMPT", None), ("MAX_NEW_TOKENS", 0), ("TEMPERATURE", 0), ("TEMPERATURE", -1), ("TOP_K", 0),
    ("LATENCY_TOKENS", 0), ("SEED", -1), ("SEED", 1.5), ("SEED", 2**64), ("DEVICE", "gpu"), ("DEVICE", "CPU"),
    ("DEVICE", "cuda:x"), ("PRECISION", "FP16"), ("PRECISION", "float16"), ("PRECISION", None), ("OUTPUT_DIR", ""),
]


@pytest.mark.parametrize(("knob", "value"), BAD_KNOBS, ids=[f"{k}={v!r}" for k, v in BAD_KNOBS])
def test_a_bad_knob_is_named_with_its_value_and_the_fix(core, knob, value):
    knobs = default_knobs() | {knob: value}
    with pytest.raises(ValueError, match=rf"^{knob} = {re.escape(repr(value))} is not valid: set {knob} to \S"):
        core.validate_knobs(knobs, core.knob_rules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_gpu_that_is_not_there_is_refused_when_the_device_is_chosen(core, device):
    core.validate_knobs({"DEVICE": device}, core.knob_rules())  # the rule checks the spelling; the device cell
    with pytest.raises(RuntimeError, match=rf"DEVICE = '{device}'.*no GPU is visible.*T4 GPU"):  # the rest
        core.choose_device(device)


def test_paths_of_the_wrong_kind_are_refused(core, tmp_path):
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="DATA_PATH .*not a folder"):
        core.validate_knobs({"DATA_PATH": str(tmp_path)}, core.knob_rules())
    with pytest.raises(ValueError, match="OUTPUT_DIR .*not a file"):
        core.validate_knobs({"OUTPUT_DIR": str(a_file)}, core.knob_rules())


def test_numpy_numbers_and_upper_case_checksums_are_accepted(core):
    core.validate_knobs(default_knobs() | {
        "RANK": np.int64(8), "ALPHA": np.float32(16), "LR": np.float64(2e-4), "BATCH_SIZE": np.int32(4),
        "EPOCHS": np.int64(1), "VAL_FRACTION": np.float32(0.2), "SEED": np.uint32(7), "DROPOUT": np.float64(0.0),
        "DATA_SHA256": default_knobs()["DATA_SHA256"].upper(), "MAX_STEPS": 10, "EVAL_BATCHES": 3,
        "TARGET_MODULES": ("attn.c_proj",),
    }, core.knob_rules())


@pytest.mark.parametrize(("typo", "meant"), [("RANKK", "RANK"), ("EPOCH", "EPOCHS"), ("BATCHSIZE", "BATCH_SIZE"),
                                             ("TARGET_MODULE", "TARGET_MODULES")])
def test_a_misspelt_knob_is_not_silently_ignored(core, typo, meant):
    with pytest.raises(ValueError, match=f"{typo} is not a knob of this notebook: did you mean {meant}"):
        core.validate_knobs({typo: 1}, core.knob_rules())


def test_the_notebooks_own_constants_are_not_knobs(core):
    namespace = {"LORA_FILE_FORMAT": "lora-from-scratch/1", "RANK": 4, "lower": 1}
    assert core.knobs_in(namespace) == {"RANK": 4}
    core.validate_knobs(core.knobs_in(namespace), core.knob_rules())


@pytest.mark.parametrize("name", ["LEARNING_RATE", "A", "NUM_EPOCHS"])
def test_an_upper_case_name_that_is_no_knob_is_refused_with_the_list_of_knobs(core, name):
    with pytest.raises(ValueError, match=rf"^{name} is not a knob of this notebook: .*The knobs are MODEL_NAME, .*, LR, .*OUTPUT_DIR\.$"):
        core.validate_knobs({name: 1e-3}, core.knob_rules())


@pytest.mark.parametrize(("value", "form"), [("false", "false"), ("True", "true"), ("None", "null")])
def test_a_papermill_string_for_a_boolean_or_none_names_the_yaml_form(core, value, form):
    rules = {"RERUN": (lambda v: isinstance(v, bool), "True or False"), "MAX_STEPS": core.knob_rules()["MAX_STEPS"]}
    name = "MAX_STEPS" if value == "None" else "RERUN"
    with pytest.raises(ValueError, match=rf'^{name} = {value!r} is not valid: set {name} to .*-y "{name}: {form}"'):
        core.validate_knobs({name: value}, rules)


# --- lengths against the model's positions ----------------------------------------------------------------


def test_sequence_lengths_against_n_positions(core, fresh):
    config = fresh().config  # n_positions = 128
    core.check_sequence_lengths(config, 128, 8, 120, 120)
    with pytest.raises(ValueError, match="BLOCK_SIZE = 129 exceeds the model.s 128 positions: set BLOCK_SIZE <= 128"):
        core.check_sequence_lengths(config, 129)
    with pytest.raises(ValueError, match="MAX_NEW_TOKENS = 121 after a PROMPT of 8 tokens.*MAX_NEW_TOKENS <= 120"):
        core.check_sequence_lengths(config, 32, 8, 121, 10)
    with pytest.raises(ValueError, match="LATENCY_TOKENS = 200"):
        core.check_sequence_lengths(config, 32, 8, 10, 200)


# --- device and precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["gpu", "CPU", None, "cuda:x", "meta"])
def test_an_unknown_device_names_the_choices(core, requested):
    with pytest.raises(ValueError, match=rf"^DEVICE = {re.escape(repr(requested))} is not valid: set DEVICE to .*mps"):
        core.validate_knobs({"DEVICE": requested}, core.knob_rules())  # before choose_device reads it


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_how_to_get_one(core):
    with pytest.raises(RuntimeError, match="no GPU is visible.*T4 GPU"):
        core.choose_device("cuda:0")


@pytest.mark.parametrize("precision", ["fp64", "auto", "FP16", None])
def test_autocast_refuses_a_precision_it_does_not_know_instead_of_running_fp16(core, precision):
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'fp16'"):
        core.autocast_for(torch.device("cpu"), precision)


# --- data -----------------------------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20, encoding="utf-8")
    return path


@pytest.mark.parametrize("form", [str.upper, lambda s: f"  {s}\n", str.lower])
def test_a_checksum_in_upper_case_or_with_spaces_is_the_same_checksum(core, text_file, form):
    sha = hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert core.ensure_text_file(text_file, "http://127.0.0.1:9/never", form(sha)) == text_file


@pytest.mark.parametrize("sha", ["abc", "z" * 64, 12])
def test_a_malformed_checksum_names_data_sha256(core, sha):
    with pytest.raises(ValueError, match=rf"^DATA_SHA256 = {re.escape(repr(sha))} is not valid: set DATA_SHA256 to \S"):
        core.validate_knobs({"DATA_SHA256": sha}, core.knob_rules())  # before ensure_text_file reads it


def test_a_non_utf8_file_names_the_file_the_byte_and_the_fix(core, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ROMEO: Ô café\n".encode("latin-1") * 5)
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 7 is b'\\xd4'\).*iconv"):
        core.ensure_text_file(path, "http://127.0.0.1:9/never", None)


def test_an_empty_file_or_a_folder_is_named(core, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        core.ensure_text_file(tmp_path / "empty.txt", "http://127.0.0.1:9/never", None)
    with pytest.raises(ValueError, match=r"^DATA_PATH = .* is not valid: set DATA_PATH to \S"):  # before ensure_text_file
        core.validate_knobs({"DATA_PATH": str(tmp_path)}, core.knob_rules())


@pytest.mark.parametrize("fraction", [0, 1, -0.1, float("nan"), "0.1", True])
def test_a_bad_fraction_is_refused_before_the_split(core, fraction):
    with pytest.raises(ValueError, match=rf"^VAL_FRACTION = {re.escape(repr(fraction))} is not valid: set VAL_FRACTION to \S"):
        core.validate_knobs({"VAL_FRACTION": fraction}, core.knob_rules())


def test_split_and_blocks_accept_numpy_numbers(core):
    assert core.split_text("abcdefghij", np.float32(0.2)) == ("abcdefgh", "ij")
    assert core.make_blocks(list(range(10)), np.int64(3)).shape == (3, 3)


@pytest.mark.parametrize("size", [0, 1, -4, 2.0, None])
def test_a_bad_block_size_is_refused_before_the_blocks(core, size):
    with pytest.raises(ValueError, match=rf"^BLOCK_SIZE = {size!r} is not valid: set BLOCK_SIZE to \S"):
        core.validate_knobs({"BLOCK_SIZE": size}, core.knob_rules())


# --- loading the model and tokenizer ---------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    import shutil

    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.mark.parametrize("file", ["config.json", "model.safetensors"])
def test_a_corrupt_model_file_is_named(core, model_copy, file):
    (model_copy / file).write_text("{not json")
    with pytest.raises(OSError, match=f"{re.escape(str(model_copy / file))} is not (valid JSON|a readable safetensors)"):
        core.load_base_model(str(model_copy), torch.device("cpu"))


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json"])
def test_a_corrupt_tokenizer_file_is_named(core, model_copy, file):
    (model_copy / file).write_text("{not json")
    with pytest.raises(OSError, match=f"{re.escape(str(model_copy / file))} is not valid JSON"):
        core.load_tokenizer(str(model_copy))


def test_a_missing_config_is_named(core, model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(OSError, match="has no config.json"):
        core.load_base_model(str(model_copy), torch.device("cpu"))


def test_a_folder_that_does_not_exist_is_not_blamed_on_the_network(core, tmp_path):
    with pytest.raises(FileNotFoundError, match="There is no folder .*check MODEL_NAME"):
        core.load_base_model(str(tmp_path / "no-such-model"), torch.device("cpu"))
    with pytest.raises(ValueError, match="^MODEL_NAME = '' is not valid"):  # the knob check, before loading
        core.validate_knobs({"MODEL_NAME": ""}, core.knob_rules())


def test_transformers_refusing_this_torch_gives_the_two_fixes(core, monkeypatch):
    def too_old(*args, **kwargs):
        raise ImportError("\nAutoModelForCausalLM requires PyTorch >= 2.6, but PyTorch was not found or an older "
                          "version is installed.\nPlease install or upgrade PyTorch ...")

    loader_globals = core.load_base_model.__globals__
    monkeypatch.setattr(loader_globals["AutoModelForCausalLM"], "from_pretrained", too_old)
    with pytest.raises(ImportError, match=r"refuses torch .*requires PyTorch >= 2.6.*upgrade torch or downgrade "
                                          r"transformers, then restart the kernel"):
        core.load_base_model("openai-community/gpt2", torch.device("cpu"))


@pytest.mark.parametrize("dropout", [1, 1.5, -0.1, "0.1"])
def test_a_bad_dropout_is_refused_before_loading(core, dropout):
    with pytest.raises(ValueError, match=rf"^DROPOUT = {dropout!r} is not valid: set DROPOUT to \S"):
        core.validate_knobs({"DROPOUT": dropout}, core.knob_rules())


def test_a_model_without_conv1d_projections_is_refused_by_name(core, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM without GPT-2's Conv1D projections"):
        core.load_base_model(str(tmp_path / "llama"), torch.device("cpu"))


# --- LoRA files: save_lora / load_lora ---------------------------------------------------------------------------


def test_load_lora_refuses_a_merged_model_instead_of_adding_the_update_twice(core, fresh, tmp_path, batch):
    model = trained(core, fresh())
    path = core.save_lora(model, tmp_path / "lora.pt")
    expected = logits(model, batch)
    core.merge_lora(model)
    with pytest.raises(ValueError, match="already has a LoRA update merged into its weights"):
        core.load_lora(model, path)
    assert not core.lora_layers(model)
    assert (logits(model, batch) - expected).abs().max().item() <= 1e-5  # still applied exactly once


def test_the_merged_mark_survives_save_pretrained(core, fresh, tmp_path):
    model = trained(core, fresh())
    path = core.save_lora(model, tmp_path / "lora.pt")
    core.merge_lora(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="merged into its weights"):
        core.load_lora(reloaded, path)


def test_load_lora_refuses_an_adapted_model(core, fresh, tmp_path):
    model = trained(core, fresh())
    path = core.save_lora(model, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="already has LoRA layers: load_lora needs a plain base model.*swap_lora"):
        core.load_lora(model, path)


def _rewrite(path, change):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


def _poison(checkpoint, value):
    next(iter(checkpoint["tensors"].values()))[0, 0] = value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: _poison(c, float("nan")), "holds NaN, inf or non-float values"),
        (lambda c: _poison(c, float("inf")), "holds NaN, inf or non-float values"),
        (lambda c: c["config"].update(alpha=float("inf")), "alpha must be a finite positive number, got inf"),
        (lambda c: c["config"].update(alpha=float("nan")), "alpha must be a finite positive number, got nan"),
        (lambda c: c["config"].update(alpha=-8), "alpha must be a finite positive number, got -8"),
        (lambda c: c["config"].update(rank=0), "rank must be a positive integer, got 0"),
        (lambda c: c["config"].update(scaling="alpha"), "scaling must be one of .*got 'alpha'"),
        (lambda c: c["config"].update(adapted_modules=[]), "has an incomplete config"),
        (lambda c: c.pop("config"), "has an incomplete config.*save it again"),
        (lambda c: c["tensors"].update({k: v.long() for k, v in c["tensors"].items()}), "non-float"),
    ],
)
def test_a_lora_file_with_bad_values_is_refused_naming_the_file(core, fresh, tmp_path, change, message):
    path = _rewrite(core.save_lora(trained(core, fresh()), tmp_path / "lora.pt"), change)
    model = fresh()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        core.load_lora(model, path)
    assert not core.lora_layers(model)


def test_an_older_file_without_a_scaling_rule_loads_as_alpha_over_r(core, fresh, tmp_path, batch):
    model = trained(core, fresh())
    path = _rewrite(core.save_lora(model, tmp_path / "lora.pt"), lambda c: c["config"].pop("scaling"))
    again = fresh()
    core.load_lora(again, path)
    assert all(layer.scaling_rule == "alpha/r" for layer in core.lora_layers(again).values())
    assert torch.equal(logits(again, batch), logits(model, batch))


def test_the_scaling_rule_travels_in_the_file(core, fresh, tmp_path, batch):
    model = trained(core, fresh(), scaling="alpha/sqrt(r)")
    path = core.save_lora(model, tmp_path / "lora.pt")
    assert torch.load(path, weights_only=True)["config"]["scaling"] == "alpha/sqrt(r)"
    again = fresh()
    core.load_lora(again, path)
    assert {layer.scaling for layer in core.lora_layers(again).values()} == {8 / math.sqrt(4)}
    assert torch.equal(logits(again, batch), logits(model, batch))


def test_a_failed_save_leaves_no_temporary_file_and_keeps_the_old_one(core, fresh, tmp_path, monkeypatch):
    model = trained(core, fresh())
    path = core.save_lora(model, tmp_path / "lora.pt")
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.save_lora.__globals__["torch"], "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        core.save_lora(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt"] and path.read_bytes() == before


def test_saving_a_diverged_run_is_refused_and_writes_nothing(core, fresh, tmp_path):
    model = trained(core, fresh())
    with torch.no_grad():
        next(iter(core.lora_layers(model).values())).A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.A holds NaN or inf values"):
        core.save_lora(model, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="NaN or inf"):
        core.export_peft_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_saving_to_a_folder_asks_for_a_file_name(core, fresh, tmp_path):
    with pytest.raises(ValueError, match="is a folder: give save_lora a file name"):
        core.save_lora(trained(core, fresh()), tmp_path)


def test_loading_a_missing_file_or_a_peft_adapter_with_load_lora_is_named(core, fresh, tmp_path):
    with pytest.raises(FileNotFoundError, match="No LoRA file at"):
        core.load_lora(fresh(), tmp_path / "missing.pt")
    adapter = core.export_peft_adapter(trained(core, fresh()), tmp_path / "adapter")
    for wrong in (adapter, adapter / "adapter_model.safetensors"):
        model = fresh()
        with pytest.raises(ValueError, match="read a file save_lora wrote, not .*PeftModel.from_pretrained"):
            core.load_lora(model, wrong)
        assert not core.lora_layers(model)


# --- merge_lora, and training after it ----------------------------------------------------------------------------


def test_after_merge_nothing_trains_and_the_reason_is_given(core, fresh, tmp_path):
    model = trained(core, fresh())
    assert len(core.trainable_parameters(model)) == 2 * len(core.lora_layers(model))
    core.merge_lora(model)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="merged into its weights.*load a fresh base model, load_lora"):
        core.trainable_parameters(model)
    with pytest.raises(ValueError, match="update merged into its weights.*Call save_lora, then merge_lora"):
        core.save_lora(model, tmp_path / "late.pt")
    with pytest.raises(ValueError, match="merged into its weights.*Call export_peft_adapter, then merge_lora"):
        core.export_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already merged"):
        core.merge_lora(model)


def test_a_model_without_lora_has_nothing_to_train(core, fresh):
    with pytest.raises(RuntimeError, match="call inject_lora"):
        core.trainable_parameters(fresh())


# --- the notebook: a bad knob stops in the validation cell, before the model is loaded ----------------------------


def _run_with(tmp_path, model_dir, text_path, text_sha256, **knobs):
    executed = tmp_path / "executed.ipynb"
    parameters = {"MODEL_NAME": str(model_dir), "DATA_URL": "http://127.0.0.1:9/never-used",
                  "DATA_PATH": str(text_path), "DATA_SHA256": text_sha256, "BLOCK_SIZE": TINY_BLOCK_SIZE,
                  "OUTPUT_DIR": "out"} | knobs
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(MAIN_NOTEBOOK), str(executed), cwd=str(tmp_path), progress_bar=False,
                                   kernel_name="python3", parameters=parameters)
    cells = nbformat.read(executed, as_version=4).cells
    failed = next(c for c in cells if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs))
    ran_after = [c.source[:40] for c in cells[cells.index(failed) + 1:] if c.cell_type == "code" and c.execution_count]
    return error.value, failed, ran_after


@pytest.mark.parametrize(("knob", "value"), [("EVAL_BATCHES", 0), ("RANKK", 8), ("rank", 8)])
def test_a_bad_knob_stops_the_notebook_in_the_validation_cell(tmp_path, tiny_model_dir, play_text_path,
                                                              play_text_sha256, knob, value):
    error, failed, ran_after = _run_with(tmp_path, tiny_model_dir, play_text_path, play_text_sha256, **{knob: value})
    assert error.ename == "ValueError" and knob in error.evalue
    assert "check_all_knobs(" in failed.source and ran_after == []
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_an_output_dir_that_cannot_be_created_stops_in_the_validation_cell(tmp_path, tiny_model_dir, play_text_path,
                                                                           play_text_sha256):
    error, failed, ran_after = _run_with(tmp_path, tiny_model_dir, play_text_path, play_text_sha256, OUTPUT_DIR="/proc/run")
    assert error.ename == "ValueError" and "OUTPUT_DIR cannot create the folder /proc/run/figures" in error.evalue
    assert "check_all_knobs(" in failed.source and ran_after == []


@pytest.mark.parametrize(("knob", "value"), [("BLOCK_SIZE", 129), ("LATENCY_TOKENS", 200)])
def test_a_length_beyond_the_model_stops_right_after_loading_it(tmp_path, tiny_model_dir, play_text_path,
                                                                play_text_sha256, knob, value):
    error, failed, ran_after = _run_with(tmp_path, tiny_model_dir, play_text_path, play_text_sha256,
                                         **{knob: value})
    assert error.ename == "ValueError" and re.search(rf"{knob} = {value}.* exceeds the model's 128 positions",
                                                     error.evalue)
    assert "check_sequence_lengths(" in failed.source and ran_after == []


def test_a_rank_wider_than_the_model_stops_right_after_loading_it(tmp_path, tiny_model_dir, play_text_path,
                                                                  play_text_sha256):
    error, failed, ran_after = _run_with(tmp_path, tiny_model_dir, play_text_path, play_text_sha256, RANK=65)
    assert error.ename == "ValueError" and "RANK = 65 is larger than this model's width 64" in error.evalue
    assert "load_base_model(" in failed.source and ran_after == []


# --- adapter helpers check the model's state and the file's whole config before changing anything -----------------


@pytest.fixture
def deeper(tmp_path_factory, play_text_path):
    """A tiny GPT-2 one block deeper than conftest's (3 blocks instead of 2), as a factory of fresh copies."""
    from conftest import save_tiny_gpt2

    folder = save_tiny_gpt2(tmp_path_factory.mktemp("deeper"), play_text_path.read_text(), n_layer=3)
    return lambda: AutoModelForCausalLM.from_pretrained(folder).eval()


def weights(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = weights(model)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_swap_refuses_a_file_saved_under_another_scaling_rule(core, fresh, tmp_path, batch):
    rslora = core.save_lora(trained(core, fresh(), scaling="alpha/sqrt(r)"), tmp_path / "rslora.pt")
    model = trained(core, fresh())  # the same rank 4 and alpha 8, but alpha/r
    before = weights(model)
    with pytest.raises(ValueError, match=r"another rank or alpha, scaling rule.*'alpha/sqrt\(r\)'.*load_lora it into a fresh"):
        core.swap_lora(model, rslora)
    assert unchanged(model, before)


def test_swap_refuses_a_file_from_a_deeper_model(core, fresh, deeper, tmp_path):
    path = core.save_lora(trained(core, deeper()), tmp_path / "deeper.pt")
    model = trained(core, fresh())
    before = weights(model)
    with pytest.raises(ValueError, match="transformer.h.2.attn.c_attn', which this model does not have.*deeper"):
        core.swap_lora(model, path)
    assert unchanged(model, before)


def test_swap_into_a_merged_or_plain_model_names_the_helper_to_use(core, fresh, tmp_path):
    path = core.save_lora(trained(core, fresh()), tmp_path / "lora.pt")
    merged = trained(core, fresh())
    core.merge_lora(merged)
    before = weights(merged)
    with pytest.raises(ValueError, match="merged into its weights: swap_lora needs LoRA layers.*add_lora_update"):
        core.swap_lora(merged, path)
    assert unchanged(merged, before)
    with pytest.raises(ValueError, match="plain base model.*use load_lora instead"):
        core.swap_lora(fresh(), path)


def test_lora_disabled_refuses_a_merged_model_instead_of_returning_adapted_logits(core, fresh, batch):
    model = trained(core, fresh())
    core.merge_lora(model)
    with pytest.raises(ValueError, match="merged into its weights, which lora_disabled cannot switch off.*add_lora_update"):
        with core.lora_disabled(model):
            pass
    with pytest.raises(ValueError, match="plain base model.*nothing to switch off"):
        with core.lora_disabled(fresh()):
            pass


def test_lora_disabled_restores_the_scales_after_an_error_inside(core, fresh, batch):
    model = trained(core, fresh())
    expected = logits(model, batch)
    with pytest.raises(ZeroDivisionError), core.lora_disabled(model):
        1 / 0  # noqa: B018
    assert torch.equal(logits(model, batch), expected)


def test_add_lora_update_refuses_a_model_that_is_not_merged(core, fresh):
    model = trained(core, fresh())
    before = weights(model)
    with pytest.raises(ValueError, match="still has its LoRA layers \\(it is not merged\\).*lora_disabled or swap_lora"):
        core.add_lora_update(model, core.lora_layers(model), sign=-1)
    assert unchanged(model, before)


def test_add_lora_update_from_a_deeper_model_changes_no_weight(core, fresh, deeper):
    model = trained(core, fresh())
    core.merge_lora(model)
    before = weights(model)
    deep_layers = core.lora_layers(trained(core, deeper()))
    with pytest.raises(ValueError, match="transformer.h.2.attn.c_attn', which this model does not have.*Nothing was changed"):
        core.add_lora_update(model, deep_layers, sign=-1)
    assert unchanged(model, before)


def test_add_lora_update_follows_the_merge_state(core, fresh, batch):
    model = trained(core, fresh())
    layers, expected = core.lora_layers(model), logits(model, batch)
    core.merge_lora(model)
    with pytest.raises(ValueError, match="has an update merged into it.*Nothing was changed"):
        core.add_lora_update(model, layers, sign=1)  # a second update on top
    core.add_lora_update(model, layers, sign=-1)
    before = weights(model)
    with pytest.raises(ValueError, match="has no update merged into it.*Nothing was changed"):
        core.add_lora_update(model, layers, sign=-1)  # subtracting again would change W0
    assert unchanged(model, before)
    with pytest.raises(ValueError, match="sign must be 1"):
        core.add_lora_update(model, layers, sign=2)
    with pytest.raises(ValueError, match="needs LoRA layers by module name"):
        core.add_lora_update(model, {}, sign=1)
    core.add_lora_update(model, layers, sign=1)
    assert (logits(model, batch) - expected).abs().max().item() <= 1e-5
    assert core.load_lora is not None and core.merged_lora_modules(model) == list(layers)


@pytest.mark.parametrize("helper", ["save_lora", "export_peft_adapter"])
def test_writing_under_a_plain_file_is_refused_before_anything_is_written(core, fresh, tmp_path, helper):
    (tmp_path / "notes.txt").write_text("a plain file")
    target = tmp_path / "notes.txt" / "inside" / "lora.pt"
    with pytest.raises(ValueError, match=f"{helper} cannot write .*notes.txt is a file. Choose a path in a folder"):
        getattr(core, helper)(trained(core, fresh()), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_exporting_onto_a_file_asks_for_a_folder(core, fresh, tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(ValueError, match="adapter is a file: give export_peft_adapter a folder"):
        core.export_peft_adapter(trained(core, fresh()), tmp_path / "adapter")


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_a_batch_size_that_would_average_nothing_is_refused_by_the_knob_check(core, batch_size):
    with pytest.raises(ValueError, match=rf"^BATCH_SIZE = {batch_size!r} is not valid: set BATCH_SIZE to \S"):
        core.validate_knobs({"BATCH_SIZE": batch_size}, core.knob_rules())


@pytest.mark.parametrize("max_batches", [0, -1, 2.0])
def test_evaluate_loss_refuses_what_would_average_nothing(core, fresh, max_batches):
    blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"Nothing to evaluate: 4 blocks, max_batches={max_batches!r}"):
        core.evaluate_loss(fresh(), blocks, 2, torch.device("cpu"), max_batches)


@pytest.mark.parametrize(("knob", "value"), [
    ("PROMPT", ""), ("PROMPT", "   "), ("PROMPT", None), ("MAX_NEW_TOKENS", 0), ("MAX_NEW_TOKENS", 4.0),
    ("TEMPERATURE", 0), ("TEMPERATURE", float("nan")), ("TOP_K", 0), ("SEED", 1.5), ("SEED", None), ("SEED", -1),
    ("SEED", "1337"), ("SEED", 2**64),
])
def test_bad_sampling_knobs_are_refused_before_generating(core, knob, value):
    """The knob check that starts sections 7 and 9 refuses them; generate_text does not check them again."""
    with pytest.raises(ValueError, match=rf"^{knob} = {re.escape(repr(value))} is not valid: set {knob} to \S"):
        core.validate_knobs({knob: value}, core.knob_rules())


# --- merge bookkeeping: which update is merged where, one entry per merge -----------------------------------------


def test_subtracting_another_adapters_layers_is_refused_and_changes_nothing(core, fresh, batch):
    model, other = trained(core, fresh()), fresh()
    core.inject_lora(other, TARGETS, 4, 8)
    with torch.no_grad():
        for layer in core.lora_layers(other).values():
            layer.B.normal_(generator=torch.Generator().manual_seed(2))
    core.merge_lora(model)
    before, record = weights(model), core.merged_lora_modules(model)
    with pytest.raises(ValueError, match="has another update merged into it than these layers'.*subtract the layers "
                                         "that were merged.*load_lora these into a fresh base model.*Nothing was changed"):
        core.add_lora_update(model, core.lora_layers(other), sign=-1)
    assert unchanged(model, before) and core.merged_lora_modules(model) == record


def test_merging_inside_lora_disabled_is_refused(core, fresh, batch):
    model = trained(core, fresh())
    before, expected = weights(model), logits(model, batch)
    with pytest.raises(ValueError, match=r"scale 0.0 \(in lora_disabled\?\): merge_lora .*switched-off.*after the `with` block"):
        with core.lora_disabled(model):
            core.merge_lora(model)
    assert unchanged(model, before) and core.merged_lora_modules(model) == []
    assert torch.equal(logits(model, batch), expected)  # the adapter is on again, still unmerged


def test_add_lora_update_refuses_switched_off_layers(core, fresh):
    source, model = trained(core, fresh()), fresh()
    before = weights(model)
    with core.lora_disabled(source), pytest.raises(ValueError, match="scale 0.0.*add_lora_update would use a switched-off"):
        core.add_lora_update(model, core.lora_layers(source), sign=1)
    assert unchanged(model, before)


def test_two_merges_are_two_entries_and_subtracting_the_first_keeps_the_second(core, fresh, tmp_path, batch):
    model = trained(core, fresh())
    first = core.lora_layers(model)
    core.merge_lora(model)
    core.inject_lora(model, ["attn.c_attn"], 4, 8)  # a second adapter on top of the merged one
    with torch.no_grad():
        for layer in core.lora_layers(model).values():
            layer.B.normal_(generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="LoRA layers on top of an update merged.*save_lora cannot write"
                                         ".*save_lora, then merge_lora"):
        core.save_lora(model, tmp_path / "second.pt")
    with pytest.raises(ValueError, match="on top of an update merged.*export_peft_adapter cannot write"):
        core.export_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "second.pt").exists() and not (tmp_path / "adapter").exists()
    second = core.lora_layers(model)
    core.merge_lora(model)
    assert sorted(core.merged_lora_modules(model)) == sorted(list(first) + list(second))  # one entry per merge
    core.add_lora_update(model, first, sign=-1)
    assert core.merged_lora_modules(model) == list(second)  # the second update is still in the weights
    with pytest.raises(ValueError, match="already has a LoRA update merged"):
        core.load_lora(model, core.save_lora(trained(core, fresh()), tmp_path / "other.pt"))
    core.add_lora_update(model, second, sign=-1)
    assert core.merged_lora_modules(model) == [] and (logits(model, batch) - logits(fresh(), batch)).abs().max() <= 1e-5


def test_the_merge_record_with_fingerprints_survives_save_pretrained(core, fresh, tmp_path, batch):
    model = trained(core, fresh())
    layers = core.lora_layers(model)
    core.merge_lora(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = core.load_base_model(str(tmp_path / "merged"), "cpu")
    assert core.merged_lora_modules(reloaded) == list(layers)
    core.add_lora_update(reloaded, layers, sign=-1)  # the fingerprints match the layers that were merged
    assert (logits(reloaded, batch) - logits(fresh(), batch)).abs().max().item() <= 1e-5


def test_the_injection_message_no_longer_invites_merge_then_inject(core, fresh):
    model = trained(core, fresh())
    with pytest.raises(RuntimeError, match=r"already has LoRA layers: load a fresh base model first\.$"):
        core.inject_lora(model, TARGETS, 4, 8)


def test_add_lora_update_refuses_a_diverged_adapter_and_writes_no_nan(core, fresh):
    model, diverged = fresh(), trained(core, fresh())
    with torch.no_grad():
        next(iter(core.lora_layers(diverged).values())).B[0, 0] = float("nan")
    before = weights(model)
    with pytest.raises(ValueError, match="B holds NaN, inf or non-float values.*Nothing was changed"):
        core.add_lora_update(model, core.lora_layers(diverged), sign=1)
    assert unchanged(model, before)


@pytest.mark.parametrize("sign", [True, "-1", -1 + 0j, 0.5])
def test_add_lora_update_refuses_a_sign_that_is_not_plus_or_minus_one(core, fresh, sign):
    model = trained(core, fresh())
    layers = core.lora_layers(model)
    core.merge_lora(model)
    before = weights(model)
    with pytest.raises(ValueError, match="sign must be 1"):
        core.add_lora_update(model, layers, sign=sign)
    assert unchanged(model, before)


def test_lora_disabled_without_with_warns_and_is_checked_at_the_call(core, fresh, batch):
    model = trained(core, fresh())
    expected = logits(model, batch)
    with pytest.warns(UserWarning, match="called without `with`, so it switched nothing off"):
        core.lora_disabled(model)
        import gc

        gc.collect()
    assert torch.equal(logits(model, batch), expected)
    merged = trained(core, fresh())
    core.merge_lora(merged)
    with pytest.raises(ValueError, match="which lora_disabled cannot switch off"):
        core.lora_disabled(merged)  # refused at the call, not only on entering a `with`
    with core.lora_disabled(model):
        with core.lora_disabled(model):
            pass
        assert torch.equal(logits(model, batch), logits(fresh(), batch))  # still off after the inner block
    assert torch.equal(logits(model, batch), expected)


# --- knobs: lower-case spellings, numpy numbers; the training section's data; a diverging run -------------------------


@pytest.mark.parametrize(("name", "knob"), [("rank", "RANK"), ("Lr", "LR"), ("max_steps", "MAX_STEPS")])
def test_a_lower_case_spelling_of_a_knob_is_refused_naming_the_knob(core, name, knob):
    namespace = default_knobs() | {name: 8, "device": "cpu", "precision": "fp32", "output_dir": "."}
    with pytest.raises(ValueError, match=rf"^{name} is not a knob of this notebook: did you mean {knob}\?"):
        core.validate_knobs(core.knobs_in(namespace), core.knob_rules())


def test_the_notebooks_own_lower_case_names_are_not_knobs(core):
    namespace = default_knobs() | {"device": "cpu", "precision": "fp32", "output_dir": "."}
    core.validate_knobs(core.knobs_in(namespace), core.knob_rules())


def test_numpy_knobs_become_python_numbers_that_torch_and_generate_take(core, fresh, tiny_model_dir):
    namespace = default_knobs() | {"SEED": np.int64(3), "TOP_K": np.int64(5), "MAX_NEW_TOKENS": np.int64(4),
                                   "LATENCY_TOKENS": np.int32(8), "TEMPERATURE": np.float32(0.8)}
    core.check_all_knobs(namespace)
    assert {type(namespace[k]) for k in ("SEED", "TOP_K", "MAX_NEW_TOKENS", "LATENCY_TOKENS")} == {int}
    assert type(namespace["TEMPERATURE"]) is float
    torch.Generator().manual_seed(namespace["SEED"])  # an np.int64 raises TypeError here
    tokenizer = core.load_tokenizer(str(tiny_model_dir))
    text = core.generate_text(fresh(), tokenizer, "To be", np.int64(4), np.int64(3), np.float32(0.8), np.int64(5))
    assert text == core.generate_text(fresh(), tokenizer, "To be", 4, 3, 0.8, 5)


def test_generate_text_checks_the_length(core, fresh, tiny_model_dir):
    tokenizer = core.load_tokenizer(str(tiny_model_dir))
    assert len(tokenizer("To be")["input_ids"]) == 3
    with pytest.raises(ValueError, match="A prompt of 3 tokens and max_new_tokens = 500 exceed this model's 128 "
                                         "positions: ask for at most 125"):
        core.generate_text(fresh(), tokenizer, "To be", 500, 1)


def test_the_training_section_refuses_a_rerun_after_a_knob_an_earlier_cell_read_changed(core):
    namespace = default_knobs()
    used = core.knobs_used_before_training(namespace)
    core.check_all_knobs(namespace | {"LR": 1e-3, "RANK": 8, "SEED": 7}, used)  # re-read: rerun freely
    # the data knobs name load_base_model's cell: section 5 alone would take its probe from the merged model
    with pytest.raises(RuntimeError, match=r"^Knobs changed since an earlier cell read them: BLOCK_SIZE; "
                                           r"rerun from section 4's first cell \(load_base_model\)"):
        core.check_all_knobs(namespace | {"BLOCK_SIZE": 64}, used)
    with pytest.raises(RuntimeError, match="read them: MODEL_NAME, VAL_FRACTION; rerun from section 4's first cell"):
        core.check_all_knobs(namespace | {"MODEL_NAME": "gpt2-medium", "VAL_FRACTION": 0.2}, used)
    with pytest.raises(RuntimeError, match="read them: PRECISION; rerun from section 3's device cell"):
        core.check_all_knobs(namespace | {"PRECISION": "fp32"}, used)
    with pytest.raises(ValueError, match="RANK = 0 is not valid"):  # every knob by its rule first
        core.check_all_knobs(namespace | {"RANK": 0, "BLOCK_SIZE": 64}, used)


def test_training_stops_at_the_first_non_finite_loss_naming_lr_and_alpha(core):
    losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    with pytest.raises(FloatingPointError, match=r"^The loss of step 39 is nan: training diverged; lower LR or ALPHA"):
        core.recent_loss(losses, 40)  # the losses of steps 38, 39 and 40
    assert core.recent_loss([torch.tensor(1.0), torch.tensor(2.0)], 2) == "1.500"


# --- load_base_model: a LoRA model saved unmerged; export keeps the old adapter on failure ----------------------------


def test_load_base_model_refuses_a_lora_model_saved_unmerged(core, fresh, tmp_path):
    trained(core, fresh()).save_pretrained(tmp_path / "adapted")
    with pytest.raises(ValueError, match="holds a LoRA model saved unmerged.*parametrizations.*merge_lora before "
                                         "save_pretrained.*save_lora"):
        core.load_base_model(str(tmp_path / "adapted"), "cpu")


def test_load_base_model_refuses_a_folder_missing_weights(core, fresh, tmp_path):
    from safetensors.torch import load_file, save_file

    fresh().save_pretrained(tmp_path / "partial")
    file = tmp_path / "partial" / "model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if "h.1.mlp" not in k}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 'transformer.h.1.mlp.*more weights.*random: write the folder again"):
        core.load_base_model(str(tmp_path / "partial"), "cpu")


def test_a_failed_export_leaves_the_old_adapter_whole(core, fresh, tmp_path, monkeypatch):
    folder = core.export_peft_adapter(trained(core, fresh()), tmp_path / "adapter")
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = trained(core, fresh())
    with torch.no_grad():
        next(iter(core.lora_layers(model).values())).B.add_(1.0)

    def failing_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tmp_path), "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        core.export_peft_adapter(model, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old  # both old files, no temporary one


# --- papermill's text forms, paths under a plain file, odd paths and configs -------------------------------------


@pytest.mark.parametrize(("knob", "value", "hint"), [
    ("LR", "1e-4", "'1e-4' is text: use -y \"LR: 1.0e-4\""),
    ("ALPHA", "2.5e3", 'use -y "ALPHA: 2.5e[+]3"'), ("RANK", "8", 'use -y "RANK: 8"'),
    ("MAX_STEPS", "None", '-y "MAX_STEPS: null"'),
])
def test_a_text_value_gets_the_typed_form_that_would_pass(core, knob, value, hint):
    with pytest.raises(ValueError, match=rf"^{knob} = {re.escape(repr(value))} is not valid: .*{hint}"):
        core.validate_knobs({knob: value}, core.knob_rules())


@pytest.mark.parametrize(("knob", "value"), [("LR", "false"), ("DATA_SHA256", "false"), ("LR", "abc"), ("RANK", "4.5")])
def test_no_typed_form_is_suggested_that_the_rule_would_refuse_too(core, knob, value):
    with pytest.raises(ValueError, match=rf"^{knob} = {re.escape(repr(value))} is not valid") as error:
        core.validate_knobs({knob: value}, core.knob_rules())
    assert "-y" not in str(error.value) and "YAML" not in str(error.value)
    with pytest.raises(ValueError, match=r"LR = False is not valid"):
        core.validate_knobs({"LR": False}, core.knob_rules())  # what the old hint for LR='false' suggested


@pytest.mark.parametrize("knob", ["OUTPUT_DIR", "DATA_PATH"])
def test_a_path_under_a_plain_file_is_refused_by_the_knob_check(core, tmp_path, knob):
    (tmp_path / "notes.txt").write_text("a plain file")
    with pytest.raises(ValueError, match=rf"^{knob} = .*notes.txt/x.* is not valid: .*nor under"):
        core.validate_knobs({knob: str(tmp_path / "notes.txt" / "x" / "y")}, core.knob_rules())


def test_save_lora_refuses_a_safetensors_name_pointing_to_export(core, fresh, tmp_path):
    with pytest.raises(ValueError, match="ends in .safetensors.*give save_lora a name such as 'lora.pt'.*export_peft_adapter"):
        core.save_lora(trained(core, fresh()), tmp_path / "mine.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("helper", "message"), [("save_lora", "save_lora needs a path to write to, got None"),
                                                  ("export_peft_adapter", "needs a path to write to, got None"),
                                                  ("load_lora", "read a file save_lora wrote, not None: give one")])
def test_a_none_path_is_a_clear_error(core, fresh, helper, message):
    model = fresh() if helper == "load_lora" else trained(core, fresh())
    with pytest.raises(ValueError, match=message):
        getattr(core, helper)(model, None)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
@pytest.mark.parametrize("helper", ["save_lora", "export_peft_adapter"])
def test_a_folder_that_cannot_be_created_is_named(core, fresh, helper):
    target = "/proc/no-such-folder/lora.pt" if helper == "save_lora" else "/proc/no-such-adapter"
    with pytest.raises(ValueError, match=f"{helper} cannot create the folder /proc/no-such.*choose a folder you can write"):
        getattr(core, helper)(trained(core, fresh()), target)


@pytest.mark.parametrize(("blocks", "shown"), [
    (torch.randint(0, 300, (6, 1)), r"\(6, 1\)"), (torch.randint(0, 300, (16,)), r"\(16,\)"),
    (torch.rand(2, 16), r"\(2, 16\)"), ([[1, 2, 3]], "list"), (None, "NoneType"),
])
def test_evaluate_loss_refuses_blocks_that_are_not_rows_of_token_ids(core, fresh, blocks, shown):
    with pytest.raises(ValueError, match=f"blocks must be a 2-D tensor of token ids.*got {shown}"):
        core.evaluate_loss(fresh(), blocks, 2, torch.device("cpu"))  # width 1 would average nothing: nan


@pytest.mark.parametrize(("ids", "shown"), [
    ("KING: the moon", "str"), ([[1, 2, 3, 4, 5]], r"list of shape \(1, 5\)"), ([1.5, 2.5, 3.5, 4.5], "list of shape"),
    ((i for i in range(8)), "generator"), ({"input_ids": [1, 2, 3, 4]}, "dict"),
])
def test_make_blocks_refuses_what_is_not_one_flat_list_of_token_ids(core, ids, shown):
    with pytest.raises(ValueError, match=rf"make_blocks needs one flat list of integer token ids.*got {shown}"):
        core.make_blocks(ids, 2)


def test_make_blocks_accepts_tensors_and_numpy_arrays_of_ids(core):
    expected = core.make_blocks(list(range(10)), 4)
    assert torch.equal(core.make_blocks(torch.arange(10), 4), expected)
    assert torch.equal(core.make_blocks(np.arange(10), 4), expected)
    with pytest.raises(ValueError, match="Only 0 tokens"):
        core.make_blocks([], 4)


def test_generate_text_refuses_a_diverged_model_by_name(core, fresh, tiny_model_dir):
    model = trained(core, fresh())
    with torch.no_grad():
        core.lora_layers(model)["transformer.h.1.attn.c_proj"].B.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"transformer.h.1.attn.c_proj.parametrizations.weight.0.B holds NaN or inf.*"
                                         "lower LR or ALPHA"):
        core.generate_text(model, core.load_tokenizer(str(tiny_model_dir)), "To be", 4, 1)


# --- what a reader passes to a helper directly, or reruns one cell with (a careless-input pass, third edition) -------


@pytest.mark.parametrize("args", [
    ("", 4, 1), ("To be", 2.5, 1), ("To be", 4, 1.5), ("To be", 4, -1), ("To be", 4, 1, "0.8"), ("To be", 4, 1, 0.8, 0),
])
def test_generate_text_refuses_arguments_it_would_round_or_ignore(core, fresh, tiny_model_dir, args):
    tokenizer = core.load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"^generate_text needs a non-empty prompt.*\(MAX_NEW_TOKENS, TOP_K"):
        core.generate_text(fresh(), tokenizer, *args)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_evaluate_loss_refuses_a_batch_size_that_would_give_nan(core, fresh, batch_size):
    blocks = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer \(BATCH_SIZE\), got {batch_size!r}"):
        core.evaluate_loss(fresh(), blocks, batch_size, torch.device("cpu"))


@pytest.mark.parametrize("dropout", [1, 1.5, -0.1, "0.1", float("nan")])
def test_load_base_model_refuses_a_bad_dropout_by_name_not_as_a_broken_folder(core, tiny_model_dir, dropout):
    with pytest.raises(ValueError, match=r"^dropout must be None or a probability in \[0, 1\) \(DROPOUT\)"):
        core.load_base_model(str(tiny_model_dir), torch.device("cpu"), dropout=dropout)


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_named_not_taken_for_this_folder(core, name):
    with pytest.raises(ValueError, match="^MODEL_NAME is empty"):
        core.load_base_model(name, torch.device("cpu"))


def test_the_cells_a_reader_reruns_after_a_setup_knob_check_the_knobs_first():
    """The helpers there trust the rules table, so the device, model and data cells check every knob again."""
    import nbformat

    from tools.nbcode import ABLATIONS_NOTEBOOK, MAIN_NOTEBOOK

    def first_code_line(source: str) -> str:
        return next(line for line in source.splitlines() if line.strip() and not line.startswith("#@title"))

    starts = {"choose_device(DEVICE)": "check_all_knobs(globals())", "check_rank_fits(model.config, RANK)":
              "check_all_knobs(globals())", "ensure_text_file(DATA_PATH": "check_all_knobs(globals())"}
    ablation_starts = {"ensure_text_file(DATA_PATH": "validate_knobs(knob_values(), ablation_rules())",
                       "SAMPLE_PROMPT, SAMPLE_TOKENS": "check_knobs()"}
    for notebook, wanted in ((MAIN_NOTEBOOK, starts), (ABLATIONS_NOTEBOOK, ablation_starts)):
        cells = [c.source for c in nbformat.read(notebook, as_version=4).cells
                 if c.cell_type == "code" and "lora-core" not in c.metadata.get("tags", [])]
        for use, check in wanted.items():
            users = [source for source in cells if use in source]
            assert users, (notebook.name, use)
            assert all(first_code_line(source).startswith(check) for source in users), (notebook.name, use)
