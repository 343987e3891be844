"""The latent KV cache: generate() with it gives the dense cache's tokens, and holds the cost model's bytes.

Oracles: greedy (and beam, and seeded sampling) tokens identical to generation with transformers' own cache, on a
left-padded batch, at full rank (the uncompressed model) and reduced rank (the simulated low-rank model), for every
family; the bytes summed from the cache's tensors equal `cost.cache_bytes` for the plan, context and batch.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from qsvd.math.cost import CACHE_MODES, cache_bytes
from qsvd.models.latent_attention import (
    CACHE_ARGUMENT,
    absorbs_values,
    apply_rope,
    layer_cache_plans,
    new_cache,
    use_latent_cache,
)
from qsvd.models.latent_cache import LatentCache
from qsvd.models.prompts import GENERATION_PADDING, encode_prompt, pad_batch
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.surgery import apply_truncated_svd, layer_shapes
from tests.conftest import build_tiny

QUESTIONS = ("what color is it?", "is there a big red circle in the picture?")
NEW_TOKENS = 10


def make_lowrank(model, family, layout: str, fraction: float) -> tuple[list, list[int]]:
    """The model's truncated SVD at `fraction` of every unit's full rank: (shapes, ranks)."""
    return layer_shapes(model, family), apply_truncated_svd(model, family, layout, fraction)


def prompts(family, processor):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    samples = [encode_prompt(processor, family, q, image if family.multimodal else None) for q in QUESTIONS]
    return pad_batch(samples, processor, GENERATION_PADDING)


def dense_and_latent(model, batch, mode: str, **generate):
    """(tokens with transformers' DynamicCache, tokens with a LatentCache of `mode`, that cache)."""
    with torch.no_grad():
        dense = model.generate(**batch, **generate)
        use_latent_cache(model, mode)
        cache = new_cache(model)
        latent = model.generate(**batch, **generate, **{CACHE_ARGUMENT: cache})
    return dense, latent, cache


CASES = [("llava", 4), ("llava-next", 4), ("smolvlm", 2), ("llama", 2), ("llama", 1)]


@pytest.mark.parametrize("fraction", [1.0, 0.4], ids=["full-rank", "reduced-rank"])
@pytest.mark.parametrize("family_name,kv_heads", CASES, ids=[f"{f}-kv{k}" for f, k in CASES])
@pytest.mark.parametrize("mode", ["latent", "latent_v"])
def test_greedy_tokens_and_cache_bytes_equal_the_dense_cache_and_the_cost_model(
        family_name, kv_heads, fraction, mode, single_thread):
    model, processor = build_tiny(family_name, kv_heads)
    family = family_by_name(family_name)
    full = model.generate(**prompts(family, processor), max_new_tokens=NEW_TOKENS, do_sample=False)
    shapes, ranks = make_lowrank(model, family, "joint", fraction)
    batch = prompts(family, processor)
    dense, latent, cache = dense_and_latent(model, batch, mode, max_new_tokens=NEW_TOKENS, do_sample=False)
    if fraction == 1.0:
        assert torch.equal(dense, full)  # full rank is the uncompressed model
    assert torch.equal(latent, dense)
    caches_latent = any(plan.latents for plan in layer_cache_plans(model, mode))
    # a unit caches its latent where it is smaller than K+V: at full rank (64) only with 4 KV heads (K+V: 128)
    assert caches_latent == (ranks[0] < shapes[0].k_out + shapes[0].v_out)
    assert caches_latent or fraction == 1.0
    assert caches_latent == any(type(layer).__name__ == "LatentLayer" and layer.parts for layer in cache.layers)
    tokens = latent.shape[1] - 1  # the last token is generated, never fed back
    predicted = cache_bytes(shapes, ranks, "joint", mode, latent.shape[0], tokens, value_bytes=4)
    assert cache.nbytes == predicted
    if caches_latent and mode == "latent":
        dense_bytes = cache_bytes(shapes, ranks, "joint", "kv", latent.shape[0], tokens, value_bytes=4)
        assert cache.nbytes < dense_bytes


def test_generate_uses_the_latent_cache_by_default_and_kv_mode_restores_the_dense_cache(tiny_model):
    model, processor = tiny_model("smolvlm", 2)
    family = family_by_name("smolvlm")
    make_lowrank(model, family, "joint", 0.5)
    batch = prompts(family, processor)
    made = []
    original = LatentCache.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    LatentCache.__init__ = spy
    try:
        with torch.no_grad():
            use_latent_cache(model, "latent")
            latent = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert len(made) == 1 and made[0].get_seq_length() == latent.shape[1] - 1
            use_latent_cache(model, "kv")
            dense = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert len(made) == 1  # kv mode: transformers' own DynamicCache
    finally:
        LatentCache.__init__ = original
    assert torch.equal(latent, dense)


@pytest.mark.parametrize("mode", ["latent", "latent_v"])
def test_beam_search_and_seeded_sampling_match_the_dense_cache(mode, tiny_model):
    model, processor = tiny_model("llava", 4)
    family = family_by_name("llava")
    make_lowrank(model, family, "joint", 0.5)
    batch = prompts(family, processor)
    dense, latent, _ = dense_and_latent(model, batch, mode, max_new_tokens=6, do_sample=False, num_beams=3,
                                        num_return_sequences=2)
    assert torch.equal(latent, dense)
    use_latent_cache(model, "kv")
    torch.manual_seed(3)
    dense = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=20)
    use_latent_cache(model, mode)
    torch.manual_seed(3)
    latent = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=20)
    assert torch.equal(latent, dense)


@pytest.mark.parametrize("layout", ["separate", "kv", "q-kv"])
def test_separate_k_and_v_latents_and_a_joint_kv_latent(layout, tiny_model):
    model, processor = tiny_model("llama", 2)
    family = family_by_name("llama")
    shapes, ranks = make_lowrank(model, family, layout, 0.4)
    batch = prompts(family, processor)
    dense, latent, cache = dense_and_latent(model, batch, "latent", max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(latent, dense)
    plan = layer_cache_plans(model, "latent")[0]
    assert (plan.k_latent, plan.v_latent) == (("kv", "kv") if layout == "q-kv" else ("k", "v"))
    assert cache.nbytes == cache_bytes(shapes, ranks, layout, "latent", latent.shape[0], latent.shape[1] - 1, 4)


@pytest.mark.parametrize("model_class", ["Qwen2ForCausalLM", "MistralForCausalLM"])
def test_other_llama_family_classes(model_class, single_thread):
    model, processor = build_tiny("llama", 2, model_class=model_class)
    family = family_by_name("llama")
    make_lowrank(model, family, "joint", 0.5)
    dense, latent, _ = dense_and_latent(model, prompts(family, processor), "latent", max_new_tokens=NEW_TOKENS,
                                        do_sample=False)
    assert torch.equal(latent, dense)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_latent_is_cached_as_codes(bits, tiny_model):
    model, processor = tiny_model("llava", 4)
    family = family_by_name("llava")
    shapes, ranks = make_lowrank(model, family, "joint", 0.5)
    rank = ranks[0]
    for layer in decoder_layers(model, family):
        layer.self_attn.qkv_down.latent_transform.set_quantization(bits, clip_ratio=0.9)
    dense, latent, cache = dense_and_latent(model, prompts(family, processor), "latent", max_new_tokens=NEW_TOKENS,
                                            do_sample=False)
    assert torch.equal(latent, dense)
    parts = cache.layers[0].parts
    assert parts["qkv"].dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert parts["qkv"].shape[-1] == (rank + 1) // 2 if bits <= 4 else rank
    predicted = cache_bytes(shapes, ranks, "joint", "latent", latent.shape[0], latent.shape[1] - 1, 4, latent_bits=bits)
    assert cache.nbytes == predicted


def test_crop_and_batch_selection_follow_every_part_and_the_positions(tiny_model):
    model, processor = tiny_model("smolvlm", 2)
    family = family_by_name("smolvlm")
    make_lowrank(model, family, "joint", 0.5)
    use_latent_cache(model, "latent")
    batch = prompts(family, processor)
    with torch.no_grad():
        reference = model(**batch).logits
        cache = new_cache(model)
        model(**batch, **{CACHE_ARGUMENT: cache})
        length = batch["input_ids"].shape[1]
        cache.crop(-3)
        assert cache.get_seq_length() == length - 3 and cache.positions.shape == (2, length - 3)
        tail = {"input_ids": batch["input_ids"][:, -3:], "attention_mask": batch["attention_mask"],
                CACHE_ARGUMENT: cache}
        logits = model(**tail).logits
        torch.testing.assert_close(logits, reference[:, -3:], rtol=1e-4, atol=1e-5)
        cache.batch_select_indices(torch.tensor([1]))
        assert cache.positions.shape[0] == 1 and all(t.shape[0] == 1 for t in cache.layers[0].parts.values())


def test_forward_without_a_latent_cache_is_unchanged(tiny_model):
    model, processor = tiny_model("llava-next", 4)
    family = family_by_name("llava-next")
    make_lowrank(model, family, "joint", 0.5)
    batch = prompts(family, processor)
    with torch.no_grad():
        before = model(**batch).logits
        use_latent_cache(model, "latent")
        assert torch.equal(model(**batch).logits, before)


def test_unknown_mode_is_rejected(tiny_model):
    model, _ = tiny_model("llama", 2)
    with pytest.raises(ValueError, match="cache mode must be one of"):
        use_latent_cache(model, "compressed")
    assert set(CACHE_MODES) == {"kv", "latent", "latent_v"}


def test_smollm2_generates_64_identical_tokens_with_the_latent_cache(gguf_smollm2):
    mode = "latent"  # the mode that rebuilds K; latent_v is covered on every tiny family
    import copy

    base, tokenizer = gguf_smollm2
    model = copy.deepcopy(base)  # the session's model stays as it is
    family = family_by_name("llama")
    shapes, ranks = make_lowrank(model, family, "joint", 0.5)  # rank 288 < K+V 384: every layer caches its latent
    text = ["The capital of France is", "Here is a short story about a robot who learns to paint:"]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(text, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    dense, latent, cache = dense_and_latent(model, batch, mode, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert latent.shape[1] == batch["input_ids"].shape[1] + 64
    assert torch.equal(latent, dense)
    assert cache.nbytes == cache_bytes(shapes, ranks, "joint", mode, 2, latent.shape[1] - 1, value_bytes=4)


def test_decoded_perplexity_through_the_latent_cache_equals_one_forward(tiny_model):
    from transformers import DynamicCache

    from qsvd.evaluation.perplexity import decoded_nll, sequence_nll
    from qsvd.measure import cache_nbytes

    model, processor = tiny_model("llama", 2)
    family = family_by_name("llama")
    shapes, ranks = make_lowrank(model, family, "joint", 0.4)
    ids = processor(["the cache is read at every step " * 3], return_tensors="pt")["input_ids"]
    expected, count = sequence_nll(model, {"input_ids": ids})
    dense = DynamicCache()
    assert decoded_nll(model, ids, dense, CACHE_ARGUMENT) == pytest.approx((expected, count), rel=1e-5)
    assert cache_nbytes(dense) == sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    use_latent_cache(model, "latent")
    cache = new_cache(model)
    assert decoded_nll(model, ids, cache, CACHE_ARGUMENT) == pytest.approx((expected, count), rel=1e-5)
    tokens = ids.shape[1] - 1  # the last token is scored, never fed
    assert cache_nbytes(cache) == cache_bytes(shapes, ranks, "joint", "latent", 1, tokens, 4) < cache_nbytes(dense)


def test_values_are_absorbed_in_decode_steps_and_rebuilt_for_a_prefill():
    """SmolLM2's shape (9 query heads, 3 KV heads of 64, a 288-wide latent): a decode step attends over the cached
    latents; a prefill rebuilds V first (attending with 9 heads over 288-wide latents would cost 4.5x more)."""
    assert absorbs_values(1, 9, 2048, 288, 3, 64)
    assert not absorbs_values(512, 9, 512, 288, 3, 64) and not absorbs_values(128, 9, 2048 + 128, 288, 3, 64)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rope_equals_transformers_bit_for_bit(layout):
    """The latent attention's RoPE (tokens-first input, no concatenation) gives exactly transformers' result, for
    cos/sin whose halves differ (no assumption on their layout) and for a strided input (a rebuilt K's view)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 64, generator=generator)  # (batch, tokens, heads, head_dim)
    if layout == "strided":
        x = torch.randn(2, 7, 3, 128, generator=generator)[..., ::2]
    cos, sin = torch.randn(2, 7, 64, generator=generator), torch.randn(2, 7, 64, generator=generator)
    expected, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    assert torch.equal(apply_rope(x, cos, sin), expected)
