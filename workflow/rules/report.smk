rule report:
    input:
        evaluation_results(),
    output:
        csv=report(f"{RESULTS}/report/results.csv", category="Results"),
        markdown=report(f"{RESULTS}/report/tables.md", category="Results"),
        plot=report(f"{RESULTS}/report/tradeoff.png", category="Results"),
    params:
        version=STAGE_VERSIONS["report"],
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} report --csv {output.csv} --markdown {output.markdown} --plot {output.plot}"
        " {input} 2> {log}"
