"""Tiny, seeded, randomly initialised models of the architecture families admm_sparse must prune, and the
checks the architecture tests share (tests/test_architectures.py). Nothing is downloaded.

Each family is a `Family`: a config factory, where its decoder blocks are, and, for mixture-of-experts
families, where the experts and the router of an MoE block are. `build(name)` gives (config, model).

The layers a family's pruning must select are derived here from the model's own modules, independently
of admm_sparse (see `expected_layers`), with a `LayerRef` per layer saying which tensor (and which slice
of it) holds the layer's [out_features, in_features] weight:
- nn.Linear: its weight;
- transformers' Conv1D (GPT-2): its weight [in, out], transposed;
- fused 3D experts (`@use_experts_implementation`, concatenated and not transposed: gate_up_proj
  [E, 2I, H], down_proj [E, H, I]): expert i's gate_proj = gate_up_proj[i, :I], up_proj =
  gate_up_proj[i, I:], down_proj = down_proj[i]; named `<experts>.<i>.gate_proj` etc. The router
  (`mlp.gate`, a module with a .weight Parameter, not an nn.Linear) is never a layer to prune.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

VOCAB = 128
TOKENIZER_SIZE = 120  # ids 120..127 never occur in text (the multimodal model's image tokens live there)
FIRST_TOKEN = 4  # after the special tokens
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class Family:
    name: str
    make_config: Callable[[], object]
    model_class: str  # transformers class name, e.g. "LlamaForCausalLM"
    stack: str  # full name of the decoder block ModuleList
    moe_blocks: tuple[int, ...] = ()  # blocks whose MLP is a mixture of experts
    experts: str = "mlp.experts"  # inside a block: the fused experts module
    router: str = "mlp.gate"  # inside a block: the router (never pruned)
    tied: tuple[str, ...] = ()  # state_dict names that share storage with another (never pruned)
    notes: str = ""

    @property
    def moe(self) -> bool:
        return bool(self.moe_blocks)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _gemma3_text():
    from transformers import Gemma3TextConfig
    # A sliding-window layer (window 8, shorter than the calibration windows) then a global one.
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _phi3():
    from transformers import Phi3Config
    # Fused nn.Linear projections: self_attn.qkv_proj [q;k;v] and mlp.gate_up_proj [gate;up].
    return Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      original_max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _opt():
    from transformers import OPTConfig
    # Biases everywhere, ReLU, learned positions, and (word_embed_proj_dim != hidden_size) project_in /
    # project_out Linears outside the block stack, which are never pruned.
    return OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                     max_position_embeddings=256, word_embed_proj_dim=16, bos_token_id=1, eos_token_id=2,
                     pad_token_id=3)


def _gpt2():
    from transformers import GPT2Config
    # transformers.pytorch_utils.Conv1D layers (weight [in, out]); lm_head tied to wte.
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                      eos_token_id=2)


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          max_position_embeddings=256, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                          tie_word_embeddings=False)


def _deepseek_v3():
    from transformers import DeepseekV3Config
    # MLA with low-rank q (q_a_proj 32->16, q_b_proj 16->64) and kv (kv_a_proj_with_mqa 32->24,
    # kv_b_proj 16->64); block 0 dense (first_k_dense_replace=1), blocks 1-2 MoE with a shared expert.
    return DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=3)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", _llama, "LlamaForCausalLM", "model.layers"),
    Family("qwen2", _qwen2, "Qwen2ForCausalLM", "model.layers", notes="q/k/v biases"),
    Family("qwen3", _qwen3, "Qwen3ForCausalLM", "model.layers", notes="q_norm/k_norm"),
    Family("mistral", _mistral, "MistralForCausalLM", "model.layers", notes="sliding window 16"),
    Family("gemma3", _gemma3_text, "Gemma3ForCausalLM", "model.layers",
           tied=("lm_head.weight", "model.embed_tokens.weight"), notes="text-only, sliding window 8 then global"),
    Family("phi3", _phi3, "Phi3ForCausalLM", "model.layers", notes="fused qkv_proj / gate_up_proj Linears"),
    Family("opt", _opt, "OPTForCausalLM", "model.decoder.layers",
           tied=("lm_head.weight", "model.decoder.embed_tokens.weight"), notes="biases, ReLU, learned positions"),
    Family("gpt2", _gpt2, "GPT2LMHeadModel", "transformer.h", tied=("lm_head.weight", "transformer.wte.weight"),
           notes="Conv1D"),
    Family("mixtral", _mixtral, "MixtralForCausalLM", "model.layers", moe_blocks=(0, 1)),
    Family("qwen3_moe", _qwen3_moe, "Qwen3MoeForCausalLM", "model.layers", moe_blocks=(0, 1)),
    Family("deepseek_v3", _deepseek_v3, "DeepseekV3ForCausalLM", "model.layers", moe_blocks=(1, 2),
           notes="MLA, block 0 dense, shared experts"),
]}
MOE_FAMILIES = [name for name, f in FAMILIES.items() if f.moe]


def tiny_llama(blocks: int = 2, hidden: int = 32, vocab: int = 64, **config):
    """A LlamaForCausalLM of `blocks` blocks (intermediate 2 x hidden, 4 heads, 2 KV heads), seeded, in eval mode:
    the small model of the pipeline's tests; `config` adds LlamaConfig fields."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=blocks,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, **config)
    return AutoModelForCausalLM.from_config(config).eval()


def build(name: str, seed: int = 0):
    """(config, model) of a family: float32, eval mode, seeded. Routers get larger random weights than the
    default init (std 0.02, or zeros before init) so that tokens spread over the experts."""
    import transformers

    family = FAMILIES[name]
    config = family.make_config()
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config).eval()
    if family.moe:
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for b in family.moe_blocks:
                router = model.get_submodule(f"{family.stack}.{b}.{family.router}")
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
    return config, model


MULTIMODAL_STACK = "model.language_model.layers"
VISION_STACK = "model.vision_tower.encoder.layers"


def build_multimodal(seed: int = 0):
    """(config, model): a tiny Gemma3ForConditionalGeneration (what AutoModelForCausalLM builds for a
    "gemma3" config) whose SigLIP vision tower (3 layers of width 64, ~100k parameters in
    model.vision_tower.encoder.layers) is a larger ModuleList than the language model's decoder
    (2 layers of width 32, ~19k in model.language_model.layers). Text-only input never runs the vision tower.
    Image token ids 125-127 are outside the tokenizer's words."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=125,
                          eoi_token_index=126, image_token_index=127, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    return config, AutoModelForCausalLM.from_config(config).eval()


def save_multimodal(folder: Path, seed: int = 0) -> Path:
    _, model = build_multimodal(seed)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


class TiedBlock(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)

    def forward(self, h):
        return h + self.b(torch.relu(self.a(h))) + self.c(h)


class TiedModel(nn.Module):
    """Not a Hugging Face model: forward(tokens). Three blocks of three Linears, with shared weights:
    blocks.0.b uses blocks.0.a's weight (inside one block), blocks.2.c uses blocks.1.c's (across blocks),
    and blocks.0.c uses the weight of `out`, a Linear outside the block stack (like GPT-2's lm_head / wte)."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList([TiedBlock(width) for _ in range(3)])
        self.out = nn.Linear(width, width)
        self.blocks[0].b.weight = self.blocks[0].a.weight
        self.blocks[2].c.weight = self.blocks[1].c.weight
        self.blocks[0].c.weight = self.out.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


# ---------------------------------------------------------------- which layers, and where their weights are

@dataclass(frozen=True)
class LayerRef:
    """Where a prunable layer's [out, in] weight lives: state_dict tensor `param`, then `index` into it
    (for one expert of a fused 3D tensor), transposed for Conv1D."""
    name: str
    param: str
    index: tuple = ()
    transposed: bool = False
    bias: str | None = None

    def weight(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        w = state[self.param][self.index] if self.index else state[self.param]
        return w.T if self.transposed else w

    def mask(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean mask over state[self.param], True on this layer's weight."""
        m = torch.zeros(state[self.param].shape, dtype=torch.bool)
        if self.index:
            m[self.index] = True
        else:
            m[...] = True
        return m


def fused_experts(module: nn.Module) -> bool:
    """A transformers `@use_experts_implementation` experts module with 3D gate_up_proj / down_proj."""
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and hasattr(module, "is_concatenated")


def expert_refs(name: str, module: nn.Module) -> list[LayerRef]:
    """Per-expert layers of a fused experts module (concatenated [gate; up], not transposed)."""
    if not module.is_concatenated or module.is_transposed or getattr(module, "has_bias", False):
        raise NotImplementedError(f"{name}: only the concatenated, untransposed, bias-free layout is described here")
    experts, two_i, _ = module.gate_up_proj.shape
    inter = two_i // 2
    refs = []
    for i in range(experts):
        refs += [LayerRef(f"{name}.{i}.gate_proj", f"{name}.gate_up_proj", (i, slice(0, inter))),
                 LayerRef(f"{name}.{i}.up_proj", f"{name}.gate_up_proj", (i, slice(inter, two_i))),
                 LayerRef(f"{name}.{i}.down_proj", f"{name}.down_proj", (i,))]
    return refs


def expected_layers(model: nn.Module, stack: str) -> dict[str, LayerRef]:
    """Every prunable layer inside the decoder stack `stack`, in model order, by the name the report gives it:
    nn.Linear and Conv1D modules, and each expert of fused experts modules. Routers are not nn.Linear (and
    not Conv1D), so they are never among them."""
    from transformers.pytorch_utils import Conv1D

    refs: dict[str, LayerRef] = {}
    for name, module in model.named_modules():
        if not name.startswith(stack + "."):
            continue
        has_bias = getattr(module, "bias", None) is not None
        if isinstance(module, nn.Linear):
            refs[name] = LayerRef(name, f"{name}.weight", bias=f"{name}.bias" if has_bias else None)
        elif isinstance(module, Conv1D):
            refs[name] = LayerRef(name, f"{name}.weight", transposed=True,
                                  bias=f"{name}.bias" if has_bias else None)
        elif fused_experts(module):
            refs.update((r.name, r) for r in expert_refs(name, module))
    return refs


def block_of(name: str, stack: str) -> int:
    return int(name[len(stack) + 1:].split(".")[0])


# ---------------------------------------------------------------- checkpoint (on-disk) layout

class CheckpointLayout:
    """Where a model's tensors go in the layout save_pretrained writes (the checkpoint layout):
    transformers.core_model_loading.revert_weight_conversion undoes the load-time conversions, e.g.
    Qwen3-MoE's / DeepSeek-V3's fused mlp.experts.gate_up_proj [E, 2I, H] -> mlp.experts.<i>.gate_proj.weight
    and up_proj.weight [I, H], down_proj [E, H, I] -> mlp.experts.<i>.down_proj.weight; Mixtral's ->
    block_sparse_moe.experts.<i>.w1 / w3 / w2 .weight. Found by running that reverse conversion on a
    state_dict whose entries are unique numbers, so that these tests do not restate transformers' rules."""

    def __init__(self, model: nn.Module):
        from transformers.core_model_loading import revert_weight_conversion

        self.tagged, offset = {}, 0
        for key, tensor in model.state_dict().items():
            self.tagged[key] = torch.arange(offset, offset + tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
            offset += tensor.numel()
        self.reverted = revert_weight_conversion(model, dict(self.tagged))
        self._by_first: dict[float, list[str]] = {}
        for key, tensor in self.reverted.items():
            if tensor.numel():
                self._by_first.setdefault(float(tensor.reshape(-1)[0]), []).append(key)

    def key_of(self, param: str, index: tuple = ()) -> str:
        """The checkpoint key of the tensor that holds exactly state_dict[param][index]."""
        source = self.tagged[param][index] if index else self.tagged[param]
        hits = [k for k in self._by_first.get(float(source.reshape(-1)[0]), [])
                if self.reverted[k].shape == source.shape and torch.equal(self.reverted[k], source)]
        if len(hits) != 1:
            raise AssertionError(f"expected one checkpoint tensor holding {param}{list(index)}, found {hits}")
        return hits[0]

    def weight_key(self, ref: "LayerRef") -> str:
        return self.key_of(ref.param, ref.index)


def saved_keys(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained folder (one or several safetensors files)."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


# ---------------------------------------------------------------- tokenizer, text, folders

def words(count: int = 100, seed: int = 0) -> list[str]:
    """Made-up words of two consonant-vowel syllables ("bako"): letters only, so that every family's
    tokenizer pre-tokenisation (including Qwen2's, which splits digits apart) sees the same pieces."""
    rng = random.Random(seed)
    found: set[str] = set()
    while len(found) < count:
        found.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2)))
    return sorted(found)


def calibration_text(count: int = 3000, seed: int = 0) -> str:
    """`count` seeded random words, 20 to a line."""
    rng = random.Random(seed)
    vocabulary = words()
    return "".join(" ".join(rng.choice(vocabulary) for _ in range(20)) + "\n" for _ in range(count // 20))


def tokenizer():
    """A byte-level BPE of TOKENIZER_SIZE (120) entries trained on calibration_text(): <unk> <s> </s> <pad>
    = ids 0..3, then the letters, then merges (many words are one token). Ids 120..127 of the models'
    vocabulary never occur in text. Byte-level BPE because AutoTokenizer rebuilds some families'
    tokenizers from tokenizer.json's vocab and merges (Qwen2Tokenizer for a "qwen2" config): a BPE
    survives that with the same ids, a word-level model would not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=SPECIAL, initial_alphabet=[],
                                  show_progress=False)
    tok.train_from_iterator([calibration_text()], trainer)
    assert tok.get_vocab_size() == TOKENIZER_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def write_calibration(path: Path, count: int = 3000, seed: int = 0) -> Path:
    """A JSONL calibration file ({"text": ...} per line) of `count` words (~4000 tokens)."""
    lines = calibration_text(count, seed).splitlines()
    path.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 10])}) + "\n"
                            for i in range(0, len(lines), 10)), encoding="utf-8")
    return path


def token_windows(n: int = 8, length: int = 64, seed: int = 1) -> torch.Tensor:
    """[n, length] token ids drawn uniformly from the tokenizer's non-special ids (4..119)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, TOKENIZER_SIZE, (n, length), generator=gen)


def save_family(name: str, folder: Path, seed: int = 0) -> Path:
    """A family's model (save_pretrained) and the word-level tokenizer in `folder`, for the CLI."""
    _, model = build(name, seed)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- shared checks

def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def routing(model: nn.Module, family: Family, ids: torch.Tensor, block: int) -> tuple[list, list]:
    """For each window (run one at a time, batch 1, like the pipeline's default): the router's input
    [tokens, hidden] and its top-k expert indices [tokens, k] in `block`."""
    router = model.get_submodule(f"{family.stack}.{block}.{family.router}")
    inputs, indices = [], []

    def hook(module, args, output):
        inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        indices.append(output[2].detach().clone())  # (router_logits, top_k_weights, top_k_index)

    handle = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for window in ids:
                model(input_ids=window[None], use_cache=False)
    finally:
        handle.remove()
    return inputs, indices


def expert_counts(indices: list[torch.Tensor], experts: int) -> list[int]:
    """Number of (token, expert) routings per expert."""
    top = torch.cat([i.reshape(-1) for i in indices])
    return torch.bincount(top, minlength=experts).tolist()


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def rows_equal_as_sets(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """The same rows in any order (within float32 rounding): H = XᵀX does not depend on the order."""
    assert got.shape == want.shape, f"{msg}: {tuple(got.shape)} != {tuple(want.shape)}"
    if got.shape[0] == 0:
        return
    direction = torch.randn(got.shape[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    key = lambda x: torch.argsort(x.double() @ direction)  # noqa: E731
    torch.testing.assert_close(got[key(got)], want[key(want)], rtol=1e-5, atol=1e-6, msg=msg)
