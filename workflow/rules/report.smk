rule report:
    input:
        evaluation_results(),
    output:
        csv=report(report_outputs()[0], caption="../report/results.rst", category=MODEL, subcategory="Accuracy (every task)",
                   labels={"file": Path(report_outputs()[0]).name, "shows": "every result, one row each"}),
        markdown=report(report_outputs()[1], caption="../report/tables.rst", category=MODEL, subcategory="Accuracy (every task)",
                        labels={"file": Path(report_outputs()[1]).name, "shows": "methods × budgets, per task"}),
        plot=report(report_outputs()[2], caption="../report/tradeoff.rst", category=MODEL, subcategory="Accuracy (every task)",
                    labels={"file": Path(report_outputs()[2]).name, "shows": "score against R1 and R2, per task"}),
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
        **{name: report(path, caption=f"../report/benchmark_{name}.rst", category=MODEL, subcategory="Inference benchmark",
                        labels={"file": Path(path).name, "shows": {
                            "csv": "every row, one per cell",
                            "markdown": "timings, cells not measured, latent/kv crossovers, cache budget",
                            "throughput": "tokens/s against context",
                            "cache": "cache bytes against context",
                            "budget": "tokens whose cache fits the budget",
                        }[name]})
           for name, path in benchmark_report_outputs().items()},
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


# The model's slice of a paper table (qsvd/paper/published.yaml) and its rows laid out as the paper does, ours beside
# the published values: the configs of config/paper/ name their table as report_name. Not part of `all`: ask for it,
# the target before --configfile (`snakemake paper_table --configfile config/paper/<table>-<model>.yaml`);
# `qsvd paper-table --table <id> --results results ...` assembles the whole table from the slices of its models.
rule paper_table:
    input:
        results=evaluation_results(),
        published=str(REPO / "qsvd" / "paper" / "published.yaml"),
    output:
        json=paper_table_files()["json"],
        markdown=report(paper_table_files()["markdown"], caption="../report/paper_table.rst", category=MODEL,
                        subcategory="Paper table", labels={"file": SLICE_MARKDOWN, "shows": "the paper's layout, ours beside"}),
    params:
        table=CFG.report_name,
        version=STAGE_VERSIONS["paper_table"],
    log:
        f"{RESULTS}/logs/{CFG.report_name}-paper-table.log",
    benchmark:
        f"{RESULTS}/benchmarks/{CFG.report_name}-paper-table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli paper-table --table {params.table:q} --published {input.published:q}"
        " --json {output.json:q} --markdown {output.markdown:q} --evaluations {input.results:q} 2> {log:q}"
