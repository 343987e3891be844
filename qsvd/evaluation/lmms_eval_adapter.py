r"""A qsvd model in lmms-eval 0.7 (the `lmmseval` extra): `lmms-eval --model qsvd --model_args pretrained=<checkpoint>`.

Registration: lmms-eval 0.7 resolves `--model NAME` in its model registry v2 only (`lmms_eval.models.get_model`;
the legacy `@register_model` dict is not read there). An installed package adds models through the entry-point
group `lmms_eval.models`, whose payload is a `ModelManifest` (or a callable returning one): qsvd's pyproject names
`qsvd.evaluation.lmms_eval_plugin:manifest`, so an installed qsvd makes `--model qsvd` known. From Python, `QSVDModel(model=..., processor=...,
family=...)` wraps a model already in memory and goes to `lmms_eval.evaluator.simple_evaluate(model=<it>, ...)`.

`QSVDModel` is a "simple" lmms-eval model (`is_simple = True`): a request carries the task's prompt text (its
`doc_to_text`) and a `doc_to_visual` callable. Answers go through qsvd's own prompt and generation path
(`qsvd.stages.evaluate.generate_answers`: the family's chat template with the image first, greedy decoding, each
answer cut at its first stop token), and a checkpoint loads through the evaluate stage's door (`open_checkpoint`,
simulated quantization), so on the same questions, images and `max_new_tokens` its answers are the evaluate
stage's `generated` texts. lmms-eval's `until` strings then cut them, as in its built-in models; sampling or beam
search is refused (qsvd answers greedily). Multiple-choice tasks by log-likelihood and multi-round tasks are not
served: their requests raise.

`write_question_task` turns a materialised qsvd question set (`samples.jsonl` + `images/`) into a local lmms-eval
task: a YAML file and a JSON-lines copy of the questions in one folder, read offline with `--include_path <folder>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from lmms_eval.api.model import lmms

DEFAULT_MAX_NEW_TOKENS = 8  # evaluate.max_new_tokens' default, for a task that sets none
# generation_kwargs of a task that ask for something other than greedy decoding: key -> the greedy value
GREEDY = {"do_sample": False, "temperature": 0.0, "num_beams": 1}
# generation_kwargs that do not matter under greedy decoding (or only to other models)
IGNORED = {"top_p", "top_k", "use_cache", "image_aspect_ratio"}

logger = logging.getLogger(__name__)


class QSVDModel(lmms):
    """lmms-eval's view of a qsvd model: `pretrained` a qsvd checkpoint (or a model directory or hub id, with
    `family`), or `model` + `processor` objects already in memory (with `family`)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, family: str | None = None, model=None, processor=None,
                 dtype: str = "float32", device: str = "cpu", batch_size: int | str = 1,
                 max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, max_batch_size: int | None = None) -> None:
        """`max_batch_size` is lmms-eval's (for `batch_size=auto`), accepted and not used: give `batch_size`."""
        super().__init__()
        from qsvd.models.device import dtype_by_name
        from qsvd.models.registry import family_by_name

        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.dtype = dtype_by_name(dtype)
        if model is None:
            if pretrained is None:
                raise ValueError("QSVDModel needs pretrained=<qsvd checkpoint directory> or model= and processor= objects")
            from qsvd.models.checkpoint import open_checkpoint

            family = family or _checkpoint_family(pretrained)
            model, processor, _ = open_checkpoint(pretrained, family, self.dtype, device)
        elif processor is None or family is None:
            raise ValueError("QSVDModel(model=...) needs its processor= and family= too")
        self.model, self.processor, self.family = model.eval(), processor, family_by_name(family)

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in order; requests go through the model `batch_size` at a time, grouped by
        their `max_new_tokens`."""
        import torch
        from tqdm import tqdm

        from qsvd.stages.evaluate import generate_answers

        prompts = [self._prompt(request.args) for request in requests]
        answers: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for index, (_, _, max_new_tokens, _) in enumerate(prompts):
            groups.setdefault(max_new_tokens, []).append(index)
        with torch.no_grad(), tqdm(total=len(requests), desc="qsvd generate_until", disable=self.rank != 0) as bar:
            for max_new_tokens, indices in groups.items():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    questions = [(prompts[i][0], prompts[i][1]) for i in chunk]
                    texts = generate_answers(self.model, self.processor, self.family, questions, max_new_tokens, self.dtype)
                    for i, text in zip(chunk, texts):
                        answers[i] = cut_at(text, prompts[i][3])
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                    bar.update(len(chunk))
        return answers

    def _prompt(self, args) -> tuple:
        """(question, image or None, max_new_tokens, until) of one generate_until request's arguments."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if self.family.multimodal != (len(visuals) == 1):
            need = "exactly one image" if self.family.multimodal else "no image"
            raise ValueError(f"task {task!r} doc {doc_id} gives {len(visuals)} visuals; qsvd's {self.family.name} "
                             f"prompt takes {need}")
        if visuals and not hasattr(visuals[0], "convert"):
            raise ValueError(f"task {task!r} doc {doc_id}: qsvd takes a PIL image, got {type(visuals[0]).__name__}")
        max_new_tokens, until = generation_options(gen_kwargs, self.max_new_tokens)
        return context, visuals[0] if visuals else None, max_new_tokens, until

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("qsvd's lmms-eval model answers generate_until tasks only (qsvd scores generated "
                                  "answers); run a task with output_type generate_until")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("qsvd's lmms-eval model answers one user turn (qsvd's prompt path); multi-round "
                                  "tasks are not supported")


def generation_options(gen_kwargs: dict | None, default_max_new_tokens: int) -> tuple[int, list[str]]:
    """(max_new_tokens, until strings) of a request's generation_kwargs; anything but greedy decoding raises."""
    gen_kwargs = dict(gen_kwargs or {})
    for key, greedy in GREEDY.items():
        if key in gen_kwargs and gen_kwargs[key] is not None and float(gen_kwargs[key]) != float(greedy):
            raise ValueError(f"generation_kwargs {key}={gen_kwargs[key]!r}: qsvd answers greedily, set {key}: {greedy} "
                             "in the task (or --gen_kwargs)")
    unused = set(gen_kwargs) - set(GREEDY) - IGNORED - {"until", "max_new_tokens"}
    if unused:
        logger.warning("generation_kwargs %s are not used by qsvd's greedy generation", sorted(unused))
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new_tokens = gen_kwargs.get("max_new_tokens")
    return int(max_new_tokens) if max_new_tokens is not None else default_max_new_tokens, until


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings, stripped."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def _checkpoint_family(path: str | Path) -> str:
    from qsvd.artefacts import MANIFEST, read_json

    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} is not a qsvd checkpoint (no {MANIFEST}): give family=<name> in --model_args")
    return read_json(manifest_path)["family"]


def doc_image(doc: dict) -> list:
    """The `doc_to_visual` of a `write_question_task` task: the question's image, as qsvd's records open it."""
    from PIL import Image

    return [] if doc["image"] is None else [Image.open(doc["image"]).convert("RGB")]


def write_question_task(data_dir: str | Path, out_dir: str | Path, name: str = "qsvd_questions",
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:
    """A local lmms-eval task over the materialised question set `data_dir`: `out_dir/<name>.yaml` (the path
    returned; give `--include_path out_dir`) and `out_dir/<name>.jsonl` (questions with absolute image paths);
    greedy answers of at most `max_new_tokens` tokens, no `until` cut, scored by exact match of the gold answer
    (case and punctuation ignored). The datasets cache goes in `out_dir/datasets`."""
    from qsvd.data.records import read_records

    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir).resolve()
    records = read_records(data_dir)
    if not records or any(r.is_text for r in records):
        raise ValueError(f"{data_dir} holds no questions (a text corpus or nothing): give a question dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    docs = [{"id": r.id, "question": r.question, "answer": r.answer,
             "image": None if r.image is None else str(data_dir / r.image)} for r in records]
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task = out_dir / f"{name}.yaml"
    # JSON values are YAML; `!function` names doc_image by its module path (lmms-eval imports it)
    task.write_text("\n".join([
        f"task: {json.dumps(name)}",
        "dataset_path: json",
        f"dataset_kwargs: {json.dumps({'data_files': {'test': str(data)}, 'cache_dir': str(out_dir / 'datasets')})}",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: !function {__name__}.doc_image",
        "doc_to_text: question",
        "doc_to_target: answer",
        f"generation_kwargs: {json.dumps({'max_new_tokens': max_new_tokens, 'until': []})}",
        "metric_list:",
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}",
        "metadata: {version: 1.0}",
        "",
    ]))
    return task
