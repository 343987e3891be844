rule materialise_dataset:
    input:
        dataset_input,
    output:
        directory("results/data/{dataset}"),
    params:
        args=dataset_args,
        version=STAGE_VERSIONS["data"],
    log:
        "results/logs/data/{dataset}.log",
    benchmark:
        "results/benchmarks/data/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli data {params.args} --out {output:q} 2> {log:q}"
