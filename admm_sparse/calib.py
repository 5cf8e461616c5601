"""Calibration text → token windows.

Sources: a text file (the whole file is one text), a JSONL file (one JSON object per line with a "text"
field), or Python strings. The texts are joined with blank lines and tokenised once without special
tokens, like the BENCHMARKS.md protocol; windows of `seq_len` tokens start at positions drawn by
`torch.manual_seed(seed); torch.randint(0, len(ids) - seq_len + 1, (num_samples,))`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

import torch

MIN_TOKENS = 2048  # the original tool's minimum; fewer risks an ill-conditioned H
HELDOUT_FRACTION = 0.1  # the end of a user's calibration text that measures perplexity instead


def read_texts(path: str | Path) -> list[str]:
    """Texts of a calibration file: one per JSONL line ("text" field) or the whole of any other file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    if path.suffix.lower() != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be an object "
                                 'like {"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{lineno}: each JSONL line needs a string field "text"')
            texts.append(record["text"])
    return texts


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """1-D long tensor of the text's token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_heldout(ids: torch.Tensor, fraction: float = HELDOUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids, held-out ids): the last `fraction` of a token stream is held out.

    One cut, not a sample: calibration windows drawn from the first part never overlap the held-out end.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    ids = ids.reshape(-1)
    cut = ids.numel() - int(ids.numel() * fraction)
    return ids[:cut], ids[cut:]


def calibration_windows(ids: torch.Tensor, num_samples: int = 64, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """[num_samples, seq_len] windows of a token stream at seeded random starts (BENCHMARKS.md).

    A stream shorter than seq_len gives one window of the whole stream. Warns below 2048 calibration
    tokens; no tokens at all is an error.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be positive (got {num_samples} and {seq_len})")
    ids = ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the calibration text produced no tokens; give a longer text (at least 2048 tokens)")
    if ids.numel() <= seq_len:
        windows = ids[None, :]
    else:
        # A private generator seeded like torch.manual_seed(seed) draws the same starts without touching global RNG.
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=gen)
        windows = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
    tokens = min(ids.numel(), num_samples * seq_len)
    if tokens < MIN_TOKENS:
        warnings.warn(f"only {tokens} calibration tokens (at least {MIN_TOKENS} recommended): the statistics may be "
                      "too few for a stable inverse; give more text, or raise --num-samples / --seq-len",
                      stacklevel=2)
    return windows


def windows_from_texts(texts: str | Iterable[str], tokenizer, num_samples: int = 64, seq_len: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """Calibration windows from Python strings, joined with blank lines and tokenised once."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("calibration texts must be strings")
    return calibration_windows(tokenize("\n\n".join(texts), tokenizer), num_samples, seq_len, seed)


def windows_from_file(path: str | Path, tokenizer, num_samples: int = 64, seq_len: int = 512,
                      seed: int = 0) -> torch.Tensor:
    """Calibration windows from a text or JSONL file."""
    return windows_from_texts(read_texts(path), tokenizer, num_samples, seq_len, seed)
