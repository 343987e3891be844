"""The llm-compressor peer: its GPTQ or RTN, with SpinQuant-style Hadamard rotations, on a dense model; perplexity
written as qsvd's evaluate stage writes it, so its rows sit in the same tables as QuaRot and QSVD.

Runs in llm-compressor's own virtual environment (benchmarks/peers/setup_llmcompressor.sh: llmcompressor 0.14
needs transformers <= 5.17), where qsvd is installed without its dependencies. Calibration passages and test
passages are qsvd's materialised data sets (`results/data/...`), encoded by qsvd's own `encode_text` (first 256
tokens of each passage) and scored by the evaluate stage's own `passage_nlls` one passage at a time, as
`qsvd evaluate --batch-size 1` does.

Weights: symmetric int per output channel (llm-compressor's min-max observer, GPTQ with its defaults: static
act-order, damping 0.01, blocks of 128); activations: symmetric int, dynamic per token, at the input of every
decoder Linear; lm_head and the embeddings in full precision (qsvd's default too). Rotations: SpinQuantModifier
R1 (residual stream, fused), R2 (value/o_proj head dim, fused), R4 (down_proj input, online). Everything is
simulated (fake) quantization: llm-compressor's frozen model dequantizes in its forward pass.

    .venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_quant.py --format W4A4 --weight-method gptq \\
        --out results/smollm2/peers/llmcompressor/W4A4-gptq-R1R2R4/eval/sotu-test-n32-s0.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from peer_result import bits_of, peer_parser, score_passages, start, write_peer_result
from qsvd.data.records import read_records
from qsvd.models.prompts import encode_text

log = logging.getLogger("llmcompressor_peer")


def scheme(weight_bits: int | None, act_bits: int | None, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = None if weight_bits is None else QuantizationArgs(
        num_bits=weight_bits, type="int", symmetric=True, strategy="group" if group_size else "channel", group_size=group_size)
    acts = None if act_bits is None else QuantizationArgs(
        num_bits=act_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def recipe(fmt: str, weight_method: str, rotations: list[str], transform_type: str, block_size: int | None,
           group_size: int | None, damping: float) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    modifiers = []
    if rotations:
        modifiers.append(SpinQuantModifier(rotations=rotations, transform_type=transform_type, transform_block_size=block_size))
    groups = {"group_0": scheme(*bits_of(fmt), group_size)}
    if weight_method == "gptq":
        modifiers.append(GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=damping))
    else:
        modifiers.append(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    return modifiers


def recipe_entry(modifier) -> dict:
    """A modifier as the result records it: its class and the fields set (lifecycle flags left out)."""
    fields = modifier.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return {"modifier": type(modifier).__name__, **{k: v for k, v in fields.items() if not k.endswith("_")}}


def calibration_dataset(tokenizer, data_dir: Path):
    """qsvd's calibration passages as llm-compressor takes them: a datasets.Dataset of token ids (first 256 tokens)."""
    from datasets import Dataset

    encoded = [encode_text(tokenizer, r.question, with_labels=False) for r in read_records(data_dir)]
    return Dataset.from_dict({"input_ids": [e["input_ids"][0].tolist() for e in encoded],
                              "attention_mask": [e["attention_mask"][0].tolist() for e in encoded]})


def main(argv: list[str] | None = None) -> Path:
    p = peer_parser(__doc__.split("\n\n")[0])
    p.add_argument("--calibration", type=Path, default=Path("results/data/sotu-train-n32-s0"))
    p.add_argument("--format", default="W4A4", help="W<w>A<a>, 16 = full precision on that side")
    p.add_argument("--weight-method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--rotations", nargs="*", default=["R1", "R2", "R4"], help="SpinQuantModifier rotations; none: no rotation")
    p.add_argument("--transform-type", default="random-hadamard", choices=["hadamard", "random-hadamard", "random-matrix"])
    p.add_argument("--transform-block-size", type=int, default=None,
                   help="block-diagonal rotations of this size (hadamard needs a power of two dividing 576, 64 and 1536: 64)")
    p.add_argument("--group-size", type=int, default=None, help="weight columns per scale; default one scale per output channel")
    p.add_argument("--damping", type=float, default=0.01, help="GPTQ dampening_frac")
    p.add_argument("--seed", type=int, default=0, help="torch's global seed (calibration shuffling, random rotations)")
    args = p.parse_args(argv)
    start(args)
    torch.manual_seed(args.seed)  # llm-compressor draws its random Hadamard signs and calibration order from the global RNG

    import compressed_tensors
    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    modifiers = recipe(args.format, args.weight_method, args.rotations, args.transform_type, args.transform_block_size,
                       args.group_size, args.damping)
    dataset = calibration_dataset(tokenizer, args.calibration)
    started = time.perf_counter()
    # RTN with dynamic activations needs no data (min-max weight scales): llm-compressor's data-free pipeline;
    # GPTQ: its default, the sequential pipeline (one decoder layer at a time, inputs through the layers already quantized)
    pipeline = "datafree" if args.weight_method == "rtn" else "independent"
    model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifiers, pipeline=pipeline,
                    num_calibration_samples=len(dataset), max_seq_length=max(len(x) for x in dataset["input_ids"]))
    compress_seconds = time.perf_counter() - started
    log.info("oneshot took %.1f s", compress_seconds)
    score, predictions = score_passages(model, tokenizer, args.evaluation)
    log.info("%s %s rotations %s: perplexity %.2f", args.format, args.weight_method, args.rotations, score)

    rotation = "+".join(args.rotations) if args.rotations else "no rotations"
    config = {key: value for key, value in vars(args).items() if key != "out"}
    config["pipeline"] = pipeline
    config["recipe"] = [recipe_entry(m) for m in modifiers]
    return write_peer_result(
        args.out, stage="peer-llmcompressor", config=config, seed=args.seed,
        versions=dict(llmcompressor_version=llmcompressor.__version__,
                      compressed_tensors_version=compressed_tensors.__version__),
        peer="llm-compressor", method=f"llm-compressor {args.weight_method.upper()}, {rotation}", fmt=args.format,
        rotate=bool(args.rotations), weight_method=args.weight_method, execution="simulated", model_name=args.model_name,
        evaluation=args.evaluation, score=score, predictions=predictions, compress_seconds=compress_seconds)


if __name__ == "__main__":
    main()
