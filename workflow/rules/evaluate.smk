rule evaluate_uncompressed:
    input:
        model_input,
        data="results/data/{dataset}",
    output:
        f"{RESULTS}/uncompressed/eval/{{dataset}}.json",
    params:
        model=model_source(),
        family=CFG.model.family,
        dtype=CFG.model.dtype,
        max_new_tokens=CFG.evaluation.max_new_tokens,
        labels=eval_labels(),
        version=STAGE_VERSIONS["evaluate"],
    log:
        f"{RESULTS}/logs/uncompressed/eval/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/uncompressed/eval/{{dataset}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} evaluate --model {params.model} --family {params.family}"
        " --data {input.data} --dtype {params.dtype} --max-new-tokens {params.max_new_tokens}"
        " --labels '{params.labels}' --out {output} 2> {log}"


rule evaluate_lowrank:
    input:
        model=rules.lowrank_model.output[0],
        data="results/data/{dataset}",
    output:
        f"{SVD}/rank~{{rank}}/{FACTORS}/eval/{{dataset}}.json",
    params:
        family=CFG.model.family,
        dtype=CFG.model.dtype,
        max_new_tokens=CFG.evaluation.max_new_tokens,
        labels=lambda wildcards: eval_labels(*leaf(wildcards)),
        version=STAGE_VERSIONS["evaluate"],
    log:
        f"{SVD}/logs/rank~{{rank}}/{FACTORS}/eval/{{dataset}}.log",
    benchmark:
        f"{SVD}/benchmarks/rank~{{rank}}/{FACTORS}/eval/{{dataset}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} evaluate --model {input.model} --family {params.family}"
        " --data {input.data} --dtype {params.dtype} --max-new-tokens {params.max_new_tokens}"
        " --labels '{params.labels}' --out {output} 2> {log}"
