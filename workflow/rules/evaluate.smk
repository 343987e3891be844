# One rule scores every model variant (uncompressed, each low-rank leaf, each quantized model, QuaRot) on
# every evaluation set: the variant is the path of its model below results/<model>/ (common.smk, VARIANTS).


rule evaluate:
    input:
        unpack(variant_model_input),
        data="results/data/{dataset}",
    output:
        report(f"{RESULTS}/{{variant}}/eval/{{dataset}}.json", caption="../report/evaluation.rst", category=MODEL,
               subcategory="Task {dataset}", labels=lambda wildcards: {
                   "method": VARIANTS[wildcards.variant]["method"], "budget": VARIANTS[wildcards.variant]["budget"],
                   "model variant": wildcards.variant}),
    params:
        model=variant_model_source,
        family=CFG.model.family,
        dtype=DTYPE,
        device=DEVICE,
        batch_size=CFG.compute.evaluation_batch_size,
        max_new_tokens=CFG.evaluation.max_new_tokens,
        labels=variant_labels,
        version=STAGE_VERSIONS["evaluate"],
    log:
        f"{RESULTS}/logs/{{variant}}/eval/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{variant}}/eval/{{dataset}}.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES["evaluate"],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} evaluate --model {params.model:q} --family {params.family:q}"
        " --data {input.data:q} --dtype {params.dtype:q} --device {params.device:q} --batch-size {params.batch_size}"
        " --max-new-tokens {params.max_new_tokens} --labels {params.labels:q} --out {output:q} 2> {log:q}"
