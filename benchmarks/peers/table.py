"""One markdown table (rows: method and weight quantizer; columns: precision) of evaluation results of qsvd
(`qsvd evaluate`) and of the peers (benchmarks/peers/llmcompressor_quant.py, torchao_quant.py), which write the
same result format. Each row names how the weights were quantized, read from the quantized model's manifest
(qsvd) or from the result's recorded config (peer).

    python benchmarks/peers/table.py results/smollm2/uncompressed/eval/sotu-test-n32-s0.json \\
        results/smollm2/quarot/quant~*/eval/sotu-test-n32-s0.json results/smollm2/peers/*/*/eval/*.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from qsvd.artefacts import read_json

FULL = "FP"


def row_label(result: dict) -> str:
    """"quarot, GPTQ act-order"; "llm-compressor GPTQ, R1+R2+R4"; "uncompressed"."""
    if result.get("peer"):
        return result["method"]
    if result["quantization"].startswith("none"):
        return str(result["method"])
    spec = read_json(Path(result["config"]["model_source"]) / "manifest.json")["quantization"]["spec"]
    weights = spec["weight_method"].upper() + (" act-order" if spec.get("act_order") else "")
    if spec.get("group_size"):
        weights += f" g{spec['group_size']}"
    rotations = "" if spec["rotate"] else ", no rot."
    return f"{result['method']}, {weights}{rotations}, clip {spec['lm_clip']:g}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+")
    args = p.parse_args(argv)
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    formats, rows = [FULL], []
    for path in args.results:
        result = read_json(path)
        fmt = result.get("quant_format") or FULL
        label = row_label(result)
        formats += [fmt] if fmt not in formats else []
        rows += [label] if label not in rows else []
        cells[(label, fmt)].append(result["score"])
    formats = [FULL] + sorted(formats[1:], key=lambda f: tuple(-int(b) for b in f[1:].split("A")))  # W8A8, W8A4, W4A4
    lines = ["| method | " + " | ".join(formats) + " |", "|---" * (len(formats) + 1) + "|"]
    for label in rows:
        values = [" / ".join(f"{v:.2f}" for v in cells[(label, f)]) for f in formats]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
