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
        "{QSVD} report --csv {output.csv:q} --markdown {output.markdown:q} --plot {output.plot:q}"
        " {input:q} 2> {log:q}"
