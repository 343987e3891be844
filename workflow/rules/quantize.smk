# Simulated low-precision models (method §3): every low-rank leaf, and the dense model for QuaRot ("quarot"),
# at every (format, seed, rotation, β) of config `quantization`. Changing bit widths re-runs only these.


rule quantize:
    input:
        unpack(quantize_model_input),
        data=f"results/data/{CFG.calibration.key}",
    output:
        directory(f"{RESULTS}/{{qbase}}/quant~{{quant}}/model"),
    params:
        model=quantize_model_source,
        family=CFG.model.family,
        spec=quant_spec,
        dtype=DTYPE,
        device=DEVICE,
        version=STAGE_VERSIONS["quantize"],
    log:
        f"{RESULTS}/logs/{{qbase}}/quant~{{quant}}/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{qbase}}/quant~{{quant}}/quantize.tsv"
    threads: 8  # capped at --cores locally; cpus per task on a cluster
    resources:
        **RESOURCES["quantize"],
    conda:
        "../../envs/qsvd.yaml"
    shell:
        "python -m qsvd.cli --threads {threads} quantize --model {params.model:q} --family {params.family:q}"
        " --spec {params.spec:q} --data {input.data:q} --dtype {params.dtype:q} --device {params.device:q}"
        " --out {output:q} 2> {log:q}"
