"""On the demo's compressed models, made by the pipeline: generation with the latent cache gives the dense cache's
answers, and holds the bytes the cost model predicts for the checkpoint's plan."""

import torch

from qsvd.data.records import read_records
from qsvd.math.cost import cache_bytes
from qsvd.models.checkpoint import is_compressed_checkpoint, load_checkpoint
from qsvd.models.latent_attention import CACHE_ARGUMENT, new_cache, use_latent_cache
from qsvd.models.prompts import GENERATION_PADDING, encode_prompt, pad_batch
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import layer_shapes


def test_demo_checkpoints_generate_the_same_answers_with_the_latent_cache(finished_workdir, monkeypatch):
    monkeypatch.chdir(finished_workdir)  # lean checkpoints name their base model relative to the workdir
    checkpoints = sorted(p.parent for p in (finished_workdir / "results").rglob("manifest.json")
                         if is_compressed_checkpoint(p.parent))
    data_dir = next(p.parent for p in (finished_workdir / "results").rglob("samples.jsonl") if "test" in str(p))
    records = read_records(data_dir)[:6]
    assert any("quant" in str(c) for c in checkpoints) and len(checkpoints) >= 3
    for path in checkpoints:
        model, processor, manifest = load_checkpoint(path)
        family = family_by_name(manifest["family"])
        samples = [encode_prompt(processor, family, r.question, r.load_image(data_dir)) for r in records]
        batch = pad_batch(samples, processor, GENERATION_PADDING)
        with torch.no_grad():
            dense = model.generate(**batch, max_new_tokens=4, do_sample=False)
            use_latent_cache(model, "latent")
            cache = new_cache(model)
            latent = model.generate(**batch, max_new_tokens=4, do_sample=False, **{CACHE_ARGUMENT: cache})
        assert torch.equal(latent, dense), path
        shapes = layer_shapes(model, family)
        ranks = [unit["rank"] for unit in manifest["units"]]
        if not ranks:  # a quantized dense model (QuaRot): K and V as transformers caches them
            dense_bytes = sum(s.k_out + s.v_out for s in shapes) * 4 * len(records) * (latent.shape[1] - 1)
            assert cache.nbytes == dense_bytes, path
            continue
        latent_layers = [layer for layer in (manifest.get("quantization") or {}).get("layers", [])
                         if layer["kind"] == "latent_down"]
        bits = latent_layers[0]["latent_bits"] if latent_layers else None
        predicted = cache_bytes(shapes, ranks, manifest["layout"], "latent", len(records), latent.shape[1] - 1, 4, bits)
        assert cache.nbytes == predicted, path
