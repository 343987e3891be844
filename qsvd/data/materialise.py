"""Stage 1: materialise a seeded subset of a dataset into results/data/<key>/ (format: qsvd.data.records).

Sources: `easy-vqa` (the PyPI package), `scienceqa-img` (hub `derek-thomas/ScienceQA`, only the
questions with an image) and `vizwiz` (hub `lmms-lab/VizWiz-VQA`; its val split has the 10 human
answers). `local_dir` replaces the hub: a directory written by `datasets` `save_to_disk` (a Dataset,
or a DatasetDict holding the split) with the hub dataset's columns — ScienceQA: image, question,
choices, answer (index), hint; VizWiz: question_id, image, question, answers (10 strings).
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import torch

from qsvd.artefacts import atomic_directory, provenance, write_json
from qsvd.data.easy_vqa import easy_vqa_records
from qsvd.data.records import OPTION_LETTERS, Record, write_records

HUB_IDS = {"scienceqa-img": "derek-thomas/ScienceQA", "vizwiz": "lmms-lab/VizWiz-VQA"}
DATASETS = ("easy-vqa", *HUB_IDS)


def _hub_split(dataset: str, split: str, local_dir: Path | None):
    import datasets

    if local_dir is not None:
        if not local_dir.exists():
            raise FileNotFoundError(f"local_dir {local_dir} does not exist; give a directory written by datasets' save_to_disk")
        loaded = datasets.load_from_disk(str(local_dir))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{local_dir} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    hub_id = HUB_IDS[dataset]
    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as error:  # offline, unknown split, gated: all end here with one advice
        raise RuntimeError(
            f"cannot load {hub_id} split {split!r} from the Hugging Face hub ({type(error).__name__}: {error}); "
            "the hub may be unreachable (HF_DATASETS_OFFLINE / no network): set local_dir to a local copy"
        ) from error


def scienceqa_question(question: str, choices: list[str], hint: str | None) -> str:
    """Context, question and lettered options, in the LLaVA ScienceQA prompt format."""
    context = f"Context: {hint.strip()}\n" if hint and hint.strip() else ""
    options = "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{question}\n{options}\nAnswer with the option's letter from the given choices directly."


def _hub_records(dataset: str, rows, indices: list[int], images_dir: Path) -> list[Record]:
    records = []
    for i in indices:
        row = rows[i]
        image_name = f"{i}.png"
        row["image"].convert("RGB").save(images_dir / image_name)
        if dataset == "scienceqa-img":
            records.append(
                Record(id=str(i), task=dataset, question=scienceqa_question(row["question"], row["choices"], row.get("hint")),
                       answer=OPTION_LETTERS[row["answer"]], answers=[OPTION_LETTERS[row["answer"]]], choices=list(row["choices"]), image=image_name)
            )
        else:
            answers = [a if isinstance(a, str) else a["answer"] for a in row["answers"]]
            most_common = collections.Counter(answers).most_common(1)[0][0]
            question = f"{row['question']}\nWhen the provided information is insufficient, respond with 'Unanswerable'. Answer the question using a single word or phrase."
            records.append(Record(id=str(row.get("question_id", i)), task=dataset, question=question,
                                  answer=most_common, answers=answers, image=image_name))
    return records


def _subset(count: int, num_samples: int | None, seed: int, where: str) -> list[int]:
    if num_samples is None:
        return list(range(count))
    if num_samples > count:
        raise ValueError(f"{where}: num_samples={num_samples} but only {count} samples exist; lower num_samples or use null for all")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return sorted(order.tolist())


def materialise_dataset(dataset: str, split: str, num_samples: int | None, seed: int, out_dir: Path, local_dir: Path | None = None) -> dict:
    """Write samples.jsonl, images/ and manifest.json into out_dir (built aside, then renamed)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (key: dataset); known datasets: {list(DATASETS)}")
    with atomic_directory(out_dir) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        where = f"{dataset} {split}"
        if dataset == "easy-vqa":
            all_records, image_paths = easy_vqa_records(split)
            records = [all_records[i] for i in _subset(len(all_records), num_samples, seed, where)]
            for name in sorted({r.image for r in records}):
                shutil.copyfile(image_paths[int(name.split(".")[0])], images_dir / name)
            available = len(all_records)
        else:
            rows = _hub_split(dataset, split, Path(local_dir) if local_dir else None)
            if dataset == "scienceqa-img":
                with_image = [i for i, image in enumerate(rows["image"]) if image is not None]
                rows = rows.select(with_image)
            available = len(rows)
            records = _hub_records(dataset, rows, _subset(available, num_samples, seed, where), images_dir)
        write_records(tmp, records)
        manifest = provenance(
            "data",
            {"dataset": dataset, "split": split, "num_samples": num_samples, "seed": seed, "local_dir": str(local_dir) if local_dir else None},
            seed,
        )
        manifest.update(source=str(local_dir) if local_dir else HUB_IDS.get(dataset, "easy-vqa (PyPI)"), available=available, samples=len(records))
        write_json(tmp / "manifest.json", manifest)
    return manifest
