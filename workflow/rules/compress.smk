rule activation_stats:
    input:
        model_input,
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{RESULTS}/{CALIB}/stats"),
    params:
        model=model_source(),
        family=CFG.model.family,
        dtype=DTYPE,
        device=DEVICE,
        batch_size=CFG.compute.calibration_batch_size,
        version=STAGE_VERSIONS["activation_stats"],
    log:
        f"{RESULTS}/logs/{CALIB}/stats.log",
    benchmark:
        f"{RESULTS}/benchmarks/{CALIB}/stats.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES['activation_stats'],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} stats --model {params.model:q} --family {params.family:q}"
        " --data {input.data:q} --dtype {params.dtype:q} --device {params.device:q} --batch-size {params.batch_size}"
        " --out {output:q} 2> {log:q}"


rule input_gram:
    input:
        model_input,
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{RESULTS}/{CALIB}/gram"),
    params:
        model=model_source(),
        family=CFG.model.family,
        dtype=DTYPE,
        device=DEVICE,
        batch_size=CFG.compute.calibration_batch_size,
        version=STAGE_VERSIONS["activation_stats"],
    log:
        f"{RESULTS}/logs/{CALIB}/gram.log",
    benchmark:
        f"{RESULTS}/benchmarks/{CALIB}/gram.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES['input_gram'],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} stats --gram --model {params.model:q} --family {params.family:q}"
        " --data {input.data:q} --dtype {params.dtype:q} --device {params.device:q} --batch-size {params.batch_size}"
        " --out {output:q} 2> {log:q}"


rule decompose:
    input:
        model_input,
        stats=decomposition_stats,
    output:
        directory(f"{SVD}/decomposition"),
    params:
        model=model_source(),
        family=CFG.model.family,
        layout=lambda wildcards: decomposition_method(wildcards).layout,
        transform=lambda wildcards: CFG.svd.transform(decomposition_method(wildcards)),
        alpha=CFG.svd.alpha,
        damping=CFG.svd.damping,
        dtype=DTYPE,
        device=DEVICE,
        version=STAGE_VERSIONS["decompose"],
    log:
        f"{SVD}/logs/decompose.log",
    benchmark:
        f"{SVD}/benchmarks/decompose.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES['decompose'],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} decompose --model {params.model:q} --family {params.family:q}"
        " --stats {input.stats:q} --layout {params.layout:q} --transform {params.transform:q}"
        " --alpha {params.alpha} --damping {params.damping} --dtype {params.dtype:q} --device {params.device:q}"
        " --out {output:q} 2> {log:q}"


rule importance:
    input:
        model_input,
        decomposition=rules.decompose.output[0],
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{SVD}/importance"),
    params:
        model=model_source(),
        family=CFG.model.family,
        dtype=DTYPE,
        device=DEVICE,
        # how, not what: the scores are the same either way, so it is a param, not a path segment
        checkpointing="--gradient-checkpointing" if CFG.compute.gradient_checkpointing else "",
        # the Fisher sums cost a float32 copy of each unit's weight: only when a method of this decomposition uses them
        fisher=lambda wildcards: "--fisher" if any(
            m.allocation == "fisher" for m in METHODS if CFG.svd.key(m) == wildcards.svd) else "",
        version=STAGE_VERSIONS["importance"],
    log:
        f"{SVD}/logs/importance.log",
    benchmark:
        f"{SVD}/benchmarks/importance.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES['importance'],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} importance --model {params.model:q} --family {params.family:q}"
        " --decomposition {input.decomposition:q} --data {input.data:q} --dtype {params.dtype:q}"
        " --device {params.device:q} {params.checkpointing} {params.fisher} --out {output:q} 2> {log:q}"


rule rank_plan:
    input:
        decomposition=rules.decompose.output[0],
        importance=lambda wildcards: (
            expand(rules.importance.output[0], svd=wildcards.svd) if leaf(wildcards)[0].reads_importance else []
        ),
    output:
        f"{SVD}/rank~{{rank}}/plan.json",
    params:
        importance=lambda wildcards, input: f"--importance {shlex.quote(str(input.importance))}" if input.importance else "",
        allocation=lambda wildcards: leaf(wildcards)[0].allocation,
        budget_kind=CFG.rank.budget_kind,
        budget=lambda wildcards: leaf(wildcards)[1],
        r_min=CFG.rank.r_min,
        version=STAGE_VERSIONS["rank_plan"],
    log:
        f"{SVD}/logs/rank~{{rank}}/plan.log",
    benchmark:
        f"{SVD}/benchmarks/rank~{{rank}}/plan.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli rank-plan --decomposition {input.decomposition:q} {params.importance}"
        " --allocation {params.allocation:q} --budget-kind {params.budget_kind:q} --budget {params.budget}"
        " --r-min {params.r_min} --out {output:q} 2> {log:q}"


rule lowrank_model:
    input:
        model_input,
        decomposition=rules.decompose.output[0],
        plan=rules.rank_plan.output[0],
    output:
        directory(f"{SVD}/rank~{{rank}}/{FACTORS}/model"),
    params:
        model=model_source(),
        family=CFG.model.family,
        beta=CFG.factors.beta,
        dtype=DTYPE,
        device=DEVICE,
        version=STAGE_VERSIONS["lowrank_model"],
    log:
        f"{SVD}/logs/rank~{{rank}}/{FACTORS}/lowrank_model.log",
    benchmark:
        f"{SVD}/benchmarks/rank~{{rank}}/{FACTORS}/lowrank_model.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES['lowrank_model'],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} lowrank-model --model {params.model:q} --family {params.family:q}"
        " --decomposition {input.decomposition:q} --plan {input.plan:q} --beta {params.beta}"
        " --dtype {params.dtype:q} --device {params.device:q} --out {output:q} 2> {log:q}"
