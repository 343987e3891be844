# Simulated low-precision models (method §3): every low-rank leaf, and the dense model for QuaRot,
# at every (format, seed, rotation) of config `quantization`. Changing bit widths re-runs only these.


rule quantize_lowrank:
    input:
        model=rules.lowrank_model.output[0],
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{SVD}/rank~{{rank}}/{FACTORS}/quant~{{quant}}/model"),
    params:
        family=CFG.model.family,
        spec=quant_spec,
        version=STAGE_VERSIONS["quantize"],
    log:
        f"{SVD}/logs/rank~{{rank}}/{FACTORS}/quant~{{quant}}/quantize.log",
    benchmark:
        f"{SVD}/benchmarks/rank~{{rank}}/{FACTORS}/quant~{{quant}}/quantize.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} quantize --model {input.model} --family {params.family}"
        " --spec '{params.spec}' --data {input.data} --out {output} 2> {log}"


rule quantize_dense:
    input:
        model_input,
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{QUAROT}/model"),
    params:
        model=model_source(),
        family=CFG.model.family,
        spec=quant_spec,
        version=STAGE_VERSIONS["quantize"],
    log:
        f"{RESULTS}/logs/quarot/quant~{{quant}}/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/quarot/quant~{{quant}}/quantize.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} quantize --model {params.model} --family {params.family}"
        " --spec '{params.spec}' --data {input.data} --out {output} 2> {log}"


rule evaluate_quantized_lowrank:
    input:
        model=rules.quantize_lowrank.output[0],
        data="results/data/{dataset}",
    output:
        f"{SVD}/rank~{{rank}}/{FACTORS}/quant~{{quant}}/eval/{{dataset}}.json",
    params:
        family=CFG.model.family,
        dtype=CFG.model.dtype,
        max_new_tokens=CFG.evaluation.max_new_tokens,
        labels=lambda wildcards: quantized_labels(wildcards, *leaf(wildcards)),
        version=STAGE_VERSIONS["evaluate"],
    log:
        f"{SVD}/logs/rank~{{rank}}/{FACTORS}/quant~{{quant}}/eval/{{dataset}}.log",
    benchmark:
        f"{SVD}/benchmarks/rank~{{rank}}/{FACTORS}/quant~{{quant}}/eval/{{dataset}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} evaluate --model {input.model} --family {params.family}"
        " --data {input.data} --dtype {params.dtype} --max-new-tokens {params.max_new_tokens}"
        " --labels '{params.labels}' --out {output} 2> {log}"


rule evaluate_quarot:
    input:
        model=rules.quantize_dense.output[0],
        data="results/data/{dataset}",
    output:
        f"{QUAROT}/eval/{{dataset}}.json",
    params:
        family=CFG.model.family,
        dtype=CFG.model.dtype,
        max_new_tokens=CFG.evaluation.max_new_tokens,
        labels=quantized_labels,
        version=STAGE_VERSIONS["evaluate"],
    log:
        f"{RESULTS}/logs/quarot/quant~{{quant}}/eval/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quarot/quant~{{quant}}/eval/{{dataset}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} evaluate --model {input.model} --family {params.family}"
        " --data {input.data} --dtype {params.dtype} --max-new-tokens {params.max_new_tokens}"
        " --labels '{params.labels}' --out {output} 2> {log}"
