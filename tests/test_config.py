"""SPEC §4 config: the YAML shape, defaults, and an error naming the file and the key for every mistake."""
import pytest

from admm_sparse.config import ConfigError, FloatSparseConfig, load_config, parse_config

GOOD = """
spec:
  process:
    - type: "float_sparse"
      sparse_ratio: 0.5
      include: ["*mlp*"]
      exclude: ["*self_attn*"]
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_good_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg == FloatSparseConfig(0.5, ["*mlp*"], ["*self_attn*"])
    assert cfg.to_dict() == {"sparse_ratio": 0.5, "include": ["*mlp*"], "exclude": ["*self_attn*"],
                             "mask_structure": "unstructured", "mode": "seed", "round_in_admm": None,
                             "allow_tf32": False, "calibration_dtype": "auto", "keep_bits": 2, "keep_proportion": 0.02,
                             "salience_bits": None,
                             "reconstruct_epochs": 0, "reconstruct_lr": 3e-3, "reconstruct_dtype": "model",
                             "reconstruct_schedule": "constant", "reconstruct_unit": "block",
                             "distill_epochs": 0, "distill_lr": 3e-4, "distill_samples": 0,
                             "distill_schedule": "constant",
                             "dense_targets": 0.0, "sequential": False, "stream_memory": "device",
                             "allocation": "uniform", "target_bits_per_weight": None}


def test_defaults_match_spec():
    cfg = parse_config({"spec": {"process": [{"type": "float_sparse"}]}})
    assert cfg == FloatSparseConfig() == FloatSparseConfig(0.3, ["*"], [])


def test_integer_ratio_and_descriptive_top_keys_accepted():
    cfg = parse_config({"apiversion": "modelslim_v1", "metadata": {"name": "x"},
                        "spec": {"process": [{"type": "float_sparse", "sparse_ratio": 0}]}})
    assert cfg.sparse_ratio == 0.0 and isinstance(cfg.sparse_ratio, float)


def test_extension_keys(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("sparse_ratio: 0.5", 'mask_structure: "2:4"\n      mode: quality\n'
                                                   '      round_in_admm: false\n      allow_tf32: true\n'
                                                   '      keep_bits: null\n      keep_proportion: 0.01')))
    assert (cfg.sparse_ratio, cfg.mask_structure, cfg.mode, cfg.round_in_admm) == (0.5, "2:4", "quality", False)
    assert cfg.pruner_options() == {"mask_structure": "2:4", "mode": "quality", "round_in_admm": False,
                                    "allow_tf32": True, "keep_bits": None, "keep_proportion": 0.01,
                                    "salience_bits": None}
    assert FloatSparseConfig(mask_structure="1:4").sparse_ratio == 0.75  # N:M implies the ratio
    assert FloatSparseConfig(0.75, mask_structure="1:4").sparse_ratio == 0.75  # an agreeing ratio is fine
    assert FloatSparseConfig(0.6, mask_structure="per_row").sparse_ratio == 0.6


BAD = {
    "unknown top key": ("spec:\n  process: [{type: float_sparse}]\nspecs: 1\n", "specs"),
    "spec not a mapping": ("spec: [1]\n", "'spec'"),
    "unknown spec key": ("spec:\n  process: [{type: float_sparse}]\n  save: []\n", "save"),
    "no process": ("spec: {}\n", "spec.process"),
    "empty process": ("spec:\n  process: []\n", "spec.process"),
    "two processors": ("spec:\n  process: [{type: float_sparse}, {type: float_sparse}]\n", "exactly one"),
    "entry not a mapping": ("spec:\n  process: [float_sparse]\n", "spec.process[0]"),
    "missing type": ("spec:\n  process: [{sparse_ratio: 0.3}]\n", "spec.process[0].type"),
    "unknown type": ("spec:\n  process: [{type: w8a8}]\n", "'w8a8'"),
    "unknown processor key": ("spec:\n  process: [{type: float_sparse, ratio: 0.3}]\n", "ratio"),
    "ratio is a string": ("spec:\n  process: [{type: float_sparse, sparse_ratio: '0.3'}]\n", "sparse_ratio"),
    "ratio is a bool": ("spec:\n  process: [{type: float_sparse, sparse_ratio: true}]\n", "sparse_ratio"),
    "ratio too big": ("spec:\n  process: [{type: float_sparse, sparse_ratio: 1.5}]\n", "sparse_ratio"),
    "ratio one": ("spec:\n  process: [{type: float_sparse, sparse_ratio: 1.0}]\n", "sparse_ratio"),
    "ratio negative": ("spec:\n  process: [{type: float_sparse, sparse_ratio: -0.1}]\n", "sparse_ratio"),
    "ratio nan": ("spec:\n  process: [{type: float_sparse, sparse_ratio: .nan}]\n", "sparse_ratio"),
    "include a string": ("spec:\n  process: [{type: float_sparse, include: '*'}]\n", "include"),
    "exclude holds a number": ("spec:\n  process: [{type: float_sparse, exclude: [1]}]\n", "exclude"),
    "include null": ("spec:\n  process: [{type: float_sparse, include: null}]\n", "include"),
    "not yaml": ("spec: [unclosed\n", "not valid YAML"),
    "empty file": ("", "top"),
    "a list at the top": ("- 1\n", "top"),
    "bad mask structure": ("spec:\n  process: [{type: float_sparse, mask_structure: '2-4'}]\n", "mask_structure"),
    "ratio contradicts N:M": ("spec:\n  process: [{type: float_sparse, mask_structure: '2:4', sparse_ratio: 0.3}]\n",
                              "sparse_ratio"),
    "unknown mode": ("spec:\n  process: [{type: float_sparse, mode: turbo}]\n", "mode"),
    "round_in_admm not a bool": ("spec:\n  process: [{type: float_sparse, round_in_admm: 'yes'}]\n", "round_in_admm"),
    "allow_tf32 not a bool": ("spec:\n  process: [{type: float_sparse, allow_tf32: 1}]\n", "allow_tf32"),
    "negative epochs": ("spec:\n  process: [{type: float_sparse, reconstruct_epochs: -1}]\n", "reconstruct_epochs"),
    "zero lr": ("spec:\n  process: [{type: float_sparse, reconstruct_lr: 0}]\n", "reconstruct_lr"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_config_error_names_file_and_key(tmp_path, case):
    text, key = BAD[case]
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and key in str(err.value)
    assert isinstance(err.value, ValueError)


EXACT = {
    "sparse_ratio: 1.5": "sparse_ratio: must be from 0.0 up to (not including) 1.0, got 1.5; 0.3 is the usual start",
    "sparse_ratio: '0.3'": "sparse_ratio: expected a number from 0.0 up to (not including) 1.0, got '0.3'",
    "mode: turbo": "mode: must be one of ('seed', 'quality', 'fast'), got 'turbo'",
    "mask_structure: '2-4'": 'mask_structure: must be "unstructured", "per_row" or "N:M" with 1 <= N <= M <= 64 '
                             "(e.g. \"2:4\"), got '2-4'",
    "include: '*'": "include: expected a list of strings such as [\"*mlp*\"], got '*'",
    "exclude: [1]": "exclude: expected a list of strings such as [\"*mlp*\"], got [1]",
    "{mask_structure: '2:4', sparse_ratio: 0.3}": "sparse_ratio: mask_structure '2:4' prunes 2 of every 4 weights "
                                                  "(sparse_ratio 0.5); sparse_ratio=0.3 contradicts it: pass "
                                                  "sparse_ratio=None or 0.5",
    "reconstruct_epochs: 2.5": "reconstruct_epochs: expected a whole number of epochs >= 0 (0: off), got 2.5",
    "reconstruct_lr: -0.1": "reconstruct_lr: expected a learning rate > 0 such as 0.003, got -0.1",
}


@pytest.mark.parametrize("line", sorted(EXACT))
def test_error_names_file_and_key_path_once(tmp_path, line):
    entry = line[1:-1] if line.startswith("{") else line
    path = write(tmp_path, f"spec:\n  process:\n    - {{type: float_sparse, {entry}}}\n", "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: spec.process[0].{EXACT[line]}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("kwargs", [dict(sparse_ratio=2), dict(sparse_ratio="0.3"), dict(include="*"),
                                    dict(exclude=[None]), dict(mask_structure="2:5:1"), dict(mode="Quality"),
                                    dict(mask_structure="2:4", sparse_ratio=0.3), dict(round_in_admm=1),
                                    dict(allow_tf32=None), dict(reconstruct_epochs=-2), dict(reconstruct_lr=0.0)])
def test_python_config_is_validated(kwargs):
    with pytest.raises(ConfigError):
        FloatSparseConfig(**kwargs)


def test_presets_lie_under_the_flags_and_over_the_config(tmp_path):
    from admm_sparse.cli import _config, _parser
    from admm_sparse.config import PRESETS

    best = FloatSparseConfig.from_preset("best", sparse_ratio=0.7)
    assert best.sparse_ratio == 0.7 and all(getattr(best, k) == v for k, v in PRESETS["best"].items())
    with pytest.raises(ConfigError, match="unknown preset 'nope'; the presets are: best, fast"):
        FloatSparseConfig.from_preset("nope")
    cfg = str(write(tmp_path, GOOD))
    config = _config(_parser().parse_args(["prune", "--config", cfg, "--preset", "best", "--reconstruct-epochs", "2"]))
    assert config.include == ["*mlp*"] and config.reconstruct_epochs == 2  # the config's; the flag over the preset's
    config = _config(_parser().parse_args(["prune", "--config", cfg, "--preset", "fast"]))
    assert config.include == ["*mlp*"] and config.mode == "fast"  # the preset over the config
