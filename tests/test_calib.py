"""Calibration text → token windows: file formats, seeded windows, the token-count warning and error."""
import json
import warnings

import pytest
import torch

from admm_sparse.calib import calibration_windows, read_texts, split_heldout, windows_from_file, windows_from_texts


class CharTokenizer:
    """One token per character; enough to test the windowing."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def test_windows_follow_the_benchmark_draw():
    ids = torch.arange(10_000)
    got = calibration_windows(ids, num_samples=8, seq_len=300)
    torch.manual_seed(0)
    starts = torch.randint(0, 10_000 - 300 + 1, (8,))
    assert torch.equal(got, torch.stack([ids[s:s + 300] for s in starts]))
    # Fewer windows are the first draws of the same sequence; the global RNG is untouched.
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="only 900 calibration tokens"):
        fewer = calibration_windows(ids, num_samples=3, seq_len=300)
    assert torch.equal(fewer, got[:3])
    assert torch.equal(torch.get_rng_state(), state)


def test_short_stream_gives_one_window_and_warns():
    with pytest.warns(UserWarning, match="only 50 calibration tokens"):
        got = calibration_windows(torch.arange(50), num_samples=4, seq_len=100)
    assert got.shape == (1, 50)


def test_enough_tokens_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_windows(torch.arange(5000), num_samples=4, seq_len=512)


def test_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        windows_from_texts([""], CharTokenizer())


def test_bad_counts():
    with pytest.raises(ValueError, match="positive"):
        calibration_windows(torch.arange(100), num_samples=0, seq_len=10)


def test_text_jsonl_and_strings_agree(tmp_path):
    texts = ["first text " * 300, "second text " * 300]
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    tok = CharTokenizer()
    a = windows_from_file(tmp_path / "a.txt", tok, num_samples=32, seq_len=64)
    b = windows_from_file(tmp_path / "a.jsonl", tok, num_samples=32, seq_len=64)
    c = windows_from_texts(texts, tok, num_samples=32, seq_len=64)
    assert a.shape == (32, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a, c)
    assert read_texts(tmp_path / "a.jsonl") == texts


@pytest.mark.parametrize("line, match", [("not json", ":1: not valid JSON"), ('{"txt": "x"}', ':1: .*"text"'),
                                         ('["x"]', ':1: .*"text"'), ('{"text": 3}', ':1: .*"text"')])
def test_bad_jsonl_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        read_texts(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_strings_must_be_strings():
    with pytest.raises(TypeError):
        windows_from_texts(["ok", 3], CharTokenizer())


def test_split_holds_out_the_end_of_the_stream():
    kept, heldout = split_heldout(torch.arange(1005))
    assert torch.equal(kept, torch.arange(905)) and torch.equal(heldout, torch.arange(905, 1005))
    kept, heldout = split_heldout(torch.arange(9).reshape(3, 3), 0.5)
    assert kept.tolist() == [0, 1, 2, 3, 4] and heldout.tolist() == [5, 6, 7, 8]
    assert split_heldout(torch.arange(5))[1].numel() == 0  # too short to hold anything out


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_fraction_must_be_inside_0_1(fraction):
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_heldout(torch.arange(10), fraction)
