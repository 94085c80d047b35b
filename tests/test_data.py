"""The data helpers: download with the network mocked (success, offline, bad checksum, interrupted), split, blocks."""

from __future__ import annotations

import hashlib

import pytest
import requests
import torch

CONTENT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 100
SHA = hashlib.sha256(CONTENT).hexdigest()
URL = "https://example.invalid/input.txt"


class FakeResponse:
    def __init__(self, chunks, fail_after=None):
        self.chunks, self.fail_after = chunks, fail_after

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise requests.exceptions.ChunkedEncodingError("connection broken mid-file")
            yield chunk


@pytest.fixture
def network(core, monkeypatch):
    """Replace requests.get and time.sleep as the notebook's download_file sees them; record the calls."""
    calls = []
    behaviour = {"respond": lambda: FakeResponse([CONTENT[:1000], CONTENT[1000:]])}

    def fake_get(url, stream, timeout):
        calls.append((url, timeout))
        return behaviour["respond"]()

    monkeypatch.setattr(core.download_file.__globals__["requests"], "get", fake_get)
    monkeypatch.setattr(core.download_file.__globals__["time"], "sleep", lambda seconds: None)
    return behaviour, calls


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_success_writes_the_verified_file(core, network, tmp_path):
    _, calls = network
    path = core.download_file(URL, tmp_path / "data" / "input.txt", sha256=SHA)
    assert path.read_bytes() == CONTENT
    assert leftovers(path.parent) == ["input.txt"]
    assert len(calls) == 1 and calls[0][1] > 0  # a timeout is always set


def test_offline_retries_then_says_what_to_do_and_writes_nothing(core, network, tmp_path):
    behaviour, calls = network

    def offline():
        raise requests.exceptions.ConnectionError("Failed to resolve host")

    behaviour["respond"] = offline
    target = tmp_path / "input.txt"
    with pytest.raises(RuntimeError) as error:
        core.download_file(URL, target, sha256=SHA, retries=3)
    assert len(calls) == 3
    assert f"If offline, put the file at {target}" in str(error.value)
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_is_a_clear_error_and_writes_nothing(core, network, tmp_path):
    behaviour, _ = network
    behaviour["respond"] = lambda: FakeResponse([b"not shakespeare"])
    with pytest.raises(ValueError, match=f"expected {SHA}.*Nothing was written"):
        core.download_file(URL, tmp_path / "input.txt", sha256=SHA)
    assert leftovers(tmp_path) == []


def test_an_interrupted_download_leaves_no_file(core, network, tmp_path):
    behaviour, calls = network
    behaviour["respond"] = lambda: FakeResponse([CONTENT[:1000], CONTENT[1000:]], fail_after=1)
    with pytest.raises(RuntimeError, match="Could not download"):
        core.download_file(URL, tmp_path / "input.txt", sha256=SHA, retries=2)
    assert len(calls) == 2
    assert leftovers(tmp_path) == []


def test_a_retry_after_an_interruption_succeeds(core, network, tmp_path):
    behaviour, calls = network
    attempts = iter([1, None])
    behaviour["respond"] = lambda: FakeResponse([CONTENT[:1000], CONTENT[1000:]], fail_after=next(attempts))
    path = core.download_file(URL, tmp_path / "input.txt", sha256=SHA)
    assert path.read_bytes() == CONTENT and len(calls) == 2
    assert leftovers(tmp_path) == ["input.txt"]


def test_ensure_text_file_uses_a_matching_cached_file_without_network(core, network, tmp_path):
    _, calls = network
    path = tmp_path / "input.txt"
    path.write_bytes(CONTENT)
    assert core.ensure_text_file(path, URL, SHA) == path
    assert calls == []


def test_ensure_text_file_downloads_a_missing_file(core, network, tmp_path):
    _, calls = network
    assert core.ensure_text_file(tmp_path / "input.txt", URL, SHA).read_bytes() == CONTENT
    assert len(calls) == 1


def test_a_corrupt_cached_file_is_reported_and_kept(core, network, tmp_path):
    _, calls = network
    path = tmp_path / "input.txt"
    path.write_bytes(CONTENT[:500])
    with pytest.raises(ValueError, match="delete it and rerun.*DATA_SHA256 = None"):
        core.ensure_text_file(path, URL, SHA)
    assert path.read_bytes() == CONTENT[:500] and calls == []  # loses nothing, downloads nothing


def test_no_checksum_means_any_text_of_your_own(core, network, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("my own text")
    assert core.ensure_text_file(path, URL, None) == path


def test_split_text_cuts_the_characters_90_10(core):
    text = "abcdefghij" * 10
    train, val = core.split_text(text, 0.1)
    assert (len(train), len(val)) == (90, 10) and train + val == text
    with pytest.raises(ValueError, match="^VAL_FRACTION = 1.5 is not valid"):  # the knob check, before split_text
        core.validate_knobs({"VAL_FRACTION": 1.5}, core.knob_rules())


def test_make_blocks_are_contiguous_full_and_unpadded(core):
    blocks = core.make_blocks(list(range(103)), 10)
    assert blocks.shape == (10, 10) and blocks.dtype == torch.long
    assert torch.equal(blocks.flatten(), torch.arange(100))  # contiguous, no overlap, tail dropped
    with pytest.raises(ValueError, match="fewer than one block"):
        core.make_blocks(list(range(5)), 10)
