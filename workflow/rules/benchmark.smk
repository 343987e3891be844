# One rule measures every model variant (uncompressed with the peers, each low-rank leaf and quantized model in its
# cache modes and executions) over the benchmark grid: the variant is the path of its model below results/<model>/
# (common.smk, VARIANTS). Timings want the machine to themselves: see the README's benchmark section.


rule benchmark:
    input:
        unpack(variant_model_input),
    output:
        f"{RESULTS}/{{variant}}/bench/inference.json",
    params:
        model=variant_model_source,
        family=CFG.model.family,
        dtype=DTYPE,
        device=DEVICE,
        grid=benchmark_args,
        labels=variant_labels,
        version=STAGE_VERSIONS["benchmark"],
    log:
        f"{RESULTS}/logs/{{variant}}/bench/inference.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{variant}}/bench/inference.tsv"
    threads: BENCH.threads or 8  # capped at --cores locally; torch uses exactly these (recorded in the result)
    resources:
        **BENCH_RESOURCES,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} benchmark --model {params.model:q} --family {params.family:q}"
        " --dtype {params.dtype:q} --device {params.device:q} {params.grid} --labels {params.labels:q}"
        " --out {output:q} 2> {log:q}"
