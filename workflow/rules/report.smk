rule report:
    input:
        evaluation_results(),
    output:
        csv=report(report_outputs()[0], category="Results"),
        markdown=report(report_outputs()[1], category="Results"),
        plot=report(report_outputs()[2], category="Results"),
    params:
        version=STAGE_VERSIONS["report"],
    log:
        f"{RESULTS}/logs/{CFG.report_name}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{CFG.report_name}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli report --csv {output.csv:q} --markdown {output.markdown:q} --plot {output.plot:q}"
        " {input:q} 2> {log:q}"


rule benchmark_report:
    input:
        benchmark_results(),
    output:
        **{name: report(path, category="Inference benchmark") for name, path in benchmark_report_outputs().items()},
    params:
        cache_budget_gib=BENCH.cache_budget_gib,
        version=STAGE_VERSIONS["benchmark_report"],
    log:
        f"{RESULTS}/logs/{CFG.report_name}-benchmark.log",
    benchmark:
        f"{RESULTS}/benchmarks/{CFG.report_name}-benchmark.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli benchmark-report --csv {output.csv:q} --markdown {output.markdown:q}"
        " --throughput-plot {output.throughput:q} --cache-plot {output.cache:q} --budget-plot {output.budget:q}"
        " --cache-budget-gib {params.cache_budget_gib} {input:q} 2> {log:q}"
