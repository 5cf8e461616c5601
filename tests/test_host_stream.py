"""The block loop's streams in host memory (config.stream_memory "host", admm_sparse.host_stream): stored on the
host, read on the compute device, the same results as streams on the device, resumable either way."""
import copy

import pytest
import torch

import admm_sparse.pipeline as pipeline
from admm_sparse.config import FloatSparseConfig
from admm_sparse.host_stream import HostStream, hold, like, stored, subset
from admm_sparse.pipeline import prune_blocks
from admm_sparse.resume import ResumeState
from test_device import TEST_DEVICE, on_device
from test_pipeline import tiny_model, token_windows
from test_reconstruct import interrupt_after_block

META = torch.device("meta")  # a device that is not the host: reading a HostStream must move its tensors there


def test_a_host_stream_stores_on_the_host_and_reads_on_its_device():
    tensors = [torch.randn(2, 3), None, torch.randn(4, 3)]
    stream = HostStream(iter(tensors), META)  # a generator is taken one item at a time
    assert len(stream) == 3 and all(t is None or t.device.type == "cpu" for t in stream.stored)
    assert stream[0].device == META and stream[0].shape == (2, 3) and stream[1] is None
    assert [None if t is None else t.shape for t in stream] == [(2, 3), None, (4, 3)]
    for part in (stream[1:], subset(stream, [2, 0]), like(stream, tensors)):
        assert isinstance(part, HostStream) and part.device == META
    assert [t.shape for t in subset(stream, [2, 0])] == [(4, 3), (2, 3)]
    assert stored(stream) is stream.stored
    assert stored(stream)[0].data_ptr() == tensors[0].data_ptr()  # no copy of a tensor already on the host


def test_lists_stay_lists():
    tensors = [torch.randn(2), torch.randn(3)]
    assert type(hold(tensors, "cpu", host=False)) is list and isinstance(hold(tensors, "cpu", host=True), HostStream)
    assert type(like(tensors, tensors)) is list and type(subset(tensors, [1])) is list
    assert subset(tensors, [1])[0] is tensors[1]


CONFIGS = {
    "seed": FloatSparseConfig(0.5),
    "best": FloatSparseConfig.from_preset("best", sparse_ratio=0.5, reconstruct_epochs=2),
    "sub-blocks": FloatSparseConfig.from_preset("best", sparse_ratio=0.5, reconstruct_epochs=2,
                                                reconstruct_unit="sub-block"),
}


def spy_on_streams(monkeypatch):
    """The kinds of the streams the loop's parts receive: run_block, run_dense_block, prune_block, the fit."""
    kinds = []

    def wrap(name, positions):
        real = getattr(pipeline, name)

        def spy(*args, **kwargs):
            kinds.extend((name, type(args[p])) for p in positions)
            return real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, spy)

    wrap("run_block", [1])
    wrap("run_dense_block", [1])
    wrap("prune_block", [2])
    wrap("reconstruct_block", [2, 4])  # its inputs and targets
    return kinds


@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_streams_give_the_same_model_and_perplexity(name, monkeypatch):
    dense, windows, evals = tiny_model(layers=3), token_windows(), token_windows(n=4, seed=5)
    results, models, kinds = [], [], []
    for memory in ("device", "host"):
        config = FloatSparseConfig(**{**CONFIGS[name].to_dict(), "stream_memory": memory})
        model = copy.deepcopy(dense)
        monkeypatch.undo()
        kinds = spy_on_streams(monkeypatch)
        results.append(prune_blocks(model, windows, config, progress=False, batch_size=2, eval_windows=evals))
        models.append(model)
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, models[1].state_dict()[k]), k
    assert results[0].perplexity_after == results[1].perplexity_after
    assert kinds and all(kind is HostStream for _, kind in kinds), kinds  # the host run's every stream


def test_a_run_resumes_with_the_other_stream_memory(tmp_path, monkeypatch):
    """stream_memory says where the streams live, not what is computed: a run that ran out of device memory
    resumes with host streams (job.py leaves it out of the resume fingerprint) to the same model."""
    dense = tiny_model(layers=3)
    config = CONFIGS["best"]
    whole = copy.deepcopy(dense)
    prune_blocks(whole, token_windows(), config, progress=False)
    state = ResumeState(tmp_path, {"run": 1})
    interrupt_after_block(monkeypatch, 1, lambda: prune_blocks(copy.deepcopy(dense), token_windows(), config,
                                                               state=state, progress=False))
    resumed = copy.deepcopy(dense)
    prune_blocks(resumed, token_windows(), FloatSparseConfig(**{**config.to_dict(), "stream_memory": "host"}),
                 state=state, progress=False)
    resumed_block = {k: v for k, v in resumed.state_dict().items() if k.startswith("model.layers.2.")}
    assert resumed_block and all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed_block.items())


def test_the_option_is_not_in_the_resume_fingerprint(tmp_path, monkeypatch):
    import admm_sparse.job as job

    fingerprints = []
    monkeypatch.setattr(job, "ResumeState", lambda work, fingerprint: fingerprints.append(fingerprint) or
                        ResumeState(work, fingerprint))
    for memory in ("device", "host"):
        config = FloatSparseConfig(0.5, stream_memory=memory)
        job.prune_to_folder(tiny_model(layers=1), token_windows(n=2), tmp_path / memory, config, fmt="hf",
                            progress=False)
    assert fingerprints[0]["config"] == fingerprints[-1]["config"]
    assert "stream_memory" not in fingerprints[0]["config"]


@on_device
def test_on_the_device_host_streams_stay_on_the_host_and_change_nothing(monkeypatch):
    dense, windows = tiny_model(layers=2), token_windows()
    models, kinds = [], []
    for memory in ("device", "host"):
        config = FloatSparseConfig(**{**CONFIGS["best"].to_dict(), "stream_memory": memory})
        model = copy.deepcopy(dense)
        monkeypatch.undo()
        kinds = spy_on_streams(monkeypatch)
        prune_blocks(model, windows, config, progress=False, device=TEST_DEVICE)
        models.append(model)
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, models[1].state_dict()[k]), k
    assert all(kind is HostStream for _, kind in kinds)
