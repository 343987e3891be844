"""The torchao peer: its W8A8 (`Int8DynamicActivationInt8WeightConfig`: symmetric int8 weights per output channel,
dynamic symmetric int8 activations per token, round to nearest, no rotations, no calibration) on every decoder
linear of a dense model; perplexity written as qsvd's evaluate stage writes it, beside QuaRot, QSVD and
llm-compressor (benchmarks/peers/table.py).

Runs in qsvd's own environment with the `bench` extra (`pip install -e '.[bench]'`: torchao leaves torch alone).
lm_head stays in full precision, as qsvd's default and the llm-compressor peer keep it. torchao executes the
quantized linears on int8 values (its integer matmul), so the cell is real quantization, not simulated.

    python benchmarks/peers/torchao_quant.py --out results/smollm2/peers/torchao/W8A8-rtn/eval/sotu-test-n32-s0.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from peer_result import peer_parser, score_passages, start, write_peer_result

log = logging.getLogger("torchao_peer")

CONFIGS = {"W8A8": "Int8DynamicActivationInt8WeightConfig"}


def quantize_decoder_linears(model: nn.Module, fmt: str) -> int:
    """torchao's `fmt` config on every linear but lm_head, in place; the number of linears quantized."""
    import torchao.quantization as quantization

    config = getattr(quantization, CONFIGS[fmt])()
    chosen = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
    quantization.quantize_(model, config, filter_fn=lambda module, name: name in chosen)
    return len(chosen)


def main(argv: list[str] | None = None) -> Path:
    p = peer_parser(__doc__.split("\n\n")[0])
    p.add_argument("--format", default="W8A8", choices=sorted(CONFIGS), help="the torchao config (CPU: W8A8 only)")
    args = p.parse_args(argv)
    start(args)

    import torchao
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    linears = quantize_decoder_linears(model, args.format)
    compress_seconds = time.perf_counter() - started
    score, predictions = score_passages(model, tokenizer, args.evaluation)
    log.info("torchao %s on %d linears: perplexity %.2f", args.format, linears, score)
    config = {key: value for key, value in vars(args).items() if key != "out"}
    config.update(torchao_config=CONFIGS[args.format], linears_quantized=linears)
    return write_peer_result(
        args.out, stage="peer-torchao", config=config, seed=0, versions=dict(torchao_version=torchao.__version__),
        peer="torchao", method="torchao RTN, no rotations", fmt=args.format, rotate=False, weight_method="rtn",
        execution="real", model_name=args.model_name, evaluation=args.evaluation, score=score, predictions=predictions,
        compress_seconds=compress_seconds)


if __name__ == "__main__":
    main()
