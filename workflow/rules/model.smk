# One rule per built model.source (qsvd.config.BUILT_SOURCES), each writing results/<name>/model
# (smolvlm-offline: two rules); only the configured source's rules exist, so each output has one producer.
if CFG.model.source == "demo":

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
        threads: 1  # training is bit-reproducible on one thread; on 2 its language phase is not (measured)
        resources:
            mem_mb=8000,
        conda:
            "../../envs/qsvd.yaml"
        shell:
            "python -m qsvd.cli --threads {threads} demo-model --seed {params.seed}"
            " --max-minutes {params.max_minutes} --recipe {params.recipe:q} --out {output:q} 2> {log:q}"


if CFG.model.source == "smollm2":

    rule smollm2_model:
        output:
            directory(f"{RESULTS}/model"),
        params:
            version=STAGE_VERSIONS["export_smollm2"],
        log:
            f"{RESULTS}/logs/smollm2_model.log",
        benchmark:
            f"{RESULTS}/benchmarks/smollm2_model.tsv"
        threads: 8  # capped at --cores locally; cpus per task on a cluster
        resources:
            mem_mb=4000,
        conda:
            "../../envs/qsvd.yaml"
        shell:
            "python -m qsvd.cli --threads {threads} export-smollm2 --out {output:q} 2> {log:q}"


if CFG.model.source == "smolvlm-offline":
    # The frozen language model is the smollm2 source's export, made here as its own cached output.

    rule smolvlm_offline_language_model:
        output:
            directory(f"{RESULTS}/language_model"),
        params:
            version=STAGE_VERSIONS["export_smollm2"],
        log:
            f"{RESULTS}/logs/smolvlm_offline_language_model.log",
        benchmark:
            f"{RESULTS}/benchmarks/smolvlm_offline_language_model.tsv"
        threads: 8  # capped at --cores locally; cpus per task on a cluster
        resources:
            mem_mb=4000,
        conda:
            "../../envs/qsvd.yaml"
        shell:
            "python -m qsvd.cli --threads {threads} export-smollm2 --out {output:q} 2> {log:q}"

    rule smolvlm_offline_model:
        input:
            language_model=f"{RESULTS}/language_model",
        output:
            directory(f"{RESULTS}/model"),
        params:
            seed=CFG.demo.seed,
            max_minutes=CFG.demo.max_minutes,
            recipe=json.dumps(CFG.demo.recipe, sort_keys=True),
            version=STAGE_VERSIONS["smolvlm_offline_model"],
        log:
            f"{RESULTS}/logs/smolvlm_offline_model.log",
        benchmark:
            f"{RESULTS}/benchmarks/smolvlm_offline_model.tsv"
        threads: 1  # training is bit-reproducible on one thread; on 2 its language phase is not (measured)
        resources:
            mem_mb=8000,
        conda:
            "../../envs/qsvd.yaml"
        shell:
            "python -m qsvd.cli --threads {threads} smolvlm-offline-model --language-model {input.language_model:q}"
            " --seed {params.seed} --max-minutes {params.max_minutes} --recipe {params.recipe:q} --out {output:q} 2> {log:q}"


if CFG.model.source == "random":

    rule random_model:
        output:
            directory(f"{RESULTS}/model"),
        params:
            architecture=CFG.random_model.architecture,
            layers=f"--layers {CFG.random_model.layers}" if CFG.random_model.layers else "",
            vision_layers=f"--vision-layers {CFG.random_model.vision_layers}" if CFG.random_model.vision_layers else "",
            seed=CFG.random_model.seed,
            dtype=DTYPE,
            version=STAGE_VERSIONS["random_model"],
        log:
            f"{RESULTS}/logs/random_model.log",
        benchmark:
            f"{RESULTS}/benchmarks/random_model.tsv"
        threads: 8  # capped at --cores locally; cpus per task on a cluster
        resources:
            mem_mb=RESOURCES["random_model"]["mem_mb"],
            disk_mb=RESOURCES["random_model"]["disk_mb"],
        conda:
            "../../envs/qsvd.yaml"
        shell:
            "python -m qsvd.cli --threads {threads} random-model --architecture {params.architecture:q} {params.layers}"
            " {params.vision_layers} --seed {params.seed} --dtype {params.dtype:q} --out {output:q} 2> {log:q}"
