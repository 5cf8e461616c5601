"""The float16 check: run a float16 copy block by block, name the first block and module that overflow."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from admm_sparse.deploy import check_dtype, describe


class Block(nn.Module):
    """h + scale * h: the Linear's output and the residual sum can overflow separately."""

    def __init__(self, scale):
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(8) * scale)

    def forward(self, h):
        return h + self.lin(h)


class Toy(nn.Module):
    def __init__(self, scales, embed=1e4):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        nn.init.constant_(self.embed.weight, embed)
        self.blocks = nn.ModuleList(Block(s) for s in scales)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return h


IDS = torch.arange(10).reshape(2, 5)


def test_finite_model_reports_the_largest_hidden_state():
    result = check_dtype(Toy([1, 1], embed=1e3), IDS)
    assert result == {"ok": True, "dtype": "float16", "windows": 2, "max_abs": 4000.0, "block": None, "module": None}
    assert describe(result) == ("every block's output stays finite in float16 on 2 window(s) (largest finite "
                                "|hidden state| 4000, float16's limit 65504)")


def test_overflow_in_a_module_names_it():
    result = check_dtype(Toy([1, 4, 1]), IDS)  # block 1's Linear: 2e4 * 4 = 8e4 > 65504
    assert (result["ok"], result["block"], result["module"], result["max_abs"]) == (False, 1, "blocks.1.lin", 2e4)
    assert describe(result).startswith("block 1 is the first whose output is not finite in float16: first in "
                                       "blocks.1.lin (largest finite |hidden state| 2e+04")


def test_overflow_in_the_residual_sum_names_no_module():
    result = check_dtype(Toy([1, 1, 1]), IDS)  # 2e4, 4e4, then 4e4 + 4e4: only the sum overflows
    assert (result["ok"], result["block"], result["module"], result["max_abs"]) == (False, 2, None, 4e4)
    assert "in the block's own arithmetic (such as a residual sum), not in a submodule" in describe(result)


def test_other_dtype_and_batches():
    model = Toy([1, 1, 1])
    assert check_dtype(model, IDS, dtype=torch.bfloat16)["ok"]  # bfloat16 has float32's range
    assert check_dtype(model, IDS, batch_size=1)["block"] == 2


def test_needs_a_block_stack():
    with pytest.raises(ValueError, match="stack of repeated blocks"):
        check_dtype(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)), IDS)


def overflowing_llama():
    """A tiny LLaMA whose block 1 MLP output (~1e5) is finite in float32 but not in float16."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight *= 1e3
        model.model.layers[1].mlp.down_proj.weight *= 3e4
    return model


def test_llama_overflow_is_found_and_the_model_is_unchanged():
    model = overflowing_llama()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_dtype(model, ids)
    assert (result["ok"], result["block"], result["module"]) == (False, 1, "model.layers.1.mlp.down_proj")
    assert all(torch.equal(v, state[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert torch.isfinite(model(ids).logits).all()  # float32 is fine
    assert not torch.isfinite(model.half()(ids).logits).all()  # the whole model in float16 is not


def test_results_of_several_processes_merge_to_the_first_failing_block():
    from admm_sparse.deploy import DtypeCheck

    check = DtypeCheck(torch.float16, IDS)
    ok = {"ok": True, "dtype": "float16", "windows": 2, "max_abs": 10.0, "block": None, "module": None}
    late = {**ok, "ok": False, "max_abs": 30.0, "block": 3, "module": "m.3.mlp"}
    early = {**ok, "ok": False, "max_abs": 20.0, "block": 1, "module": "m.1.attn"}
    check.merge([ok, late, early])
    assert check.result == {"ok": False, "dtype": "float16", "windows": 6, "max_abs": 30.0, "block": 1,
                            "module": "m.1.attn"}
    check.merge([ok, ok])
    assert check.result["ok"] and check.result["block"] is None and check.result["windows"] == 4
