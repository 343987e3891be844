rule demo_model:
    output:
        directory(f"{RESULTS}/model"),
    params:
        seed=CFG.demo.seed,
        max_minutes=CFG.demo.max_minutes,
        recipe=json.dumps(CFG.demo.recipe, sort_keys=True),
        version=STAGE_VERSIONS["demo_model"],
    log:
        f"{RESULTS}/logs/demo_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_model.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "{QSVD} --threads {threads} demo-model --seed {params.seed}"
        " --max-minutes {params.max_minutes} --recipe '{params.recipe}' --out {output} 2> {log}"
