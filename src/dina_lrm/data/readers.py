"""Readers for public preference datasets and a generic format, into :class:`PreferenceGroup`.

Every reader splits its dataset into deterministic *work units* (a parquet row group, or a slice of
rows), so that ``dina-lrm prepare`` can spread units over processes and skip finished ones after a
crash. Layouts (see ``docs/data.md``):

- ``pickapic``: Pick-a-Pic v2 parquet: ``caption``, ``jpg_0`` / ``jpg_1`` (image bytes),
  ``label_0`` / ``label_1`` (1 preferred, 0.5 tie), ``has_label``, ``are_different``,
  ``image_0_uid`` / ``image_1_uid``, ``ranking_id``.
- ``hpdv3``: HPDv3 JSON list of ``{prompt, path1, path2, model1, model2, choice_dist, confidence}``;
  ``path1`` is always the preferred image.
- ``imagereward``: ImageReward JSON list of ``{id, prompt, generations: [paths], ranking: [ranks]}``,
  lower rank preferred, equal ranks tied.
- ``hpdv2``: HPDv2 ``test.json`` list of ``{prompt, image_path: [paths], rank: [ranks]}`` (lower rank
  preferred).
- ``genai_bench``: GenAI-Bench (GenAI-Arena) ``image_generation`` parquet: ``prompt``,
  ``left_image`` / ``right_image`` (image structs or bytes), ``vote_type`` (``leftvote``,
  ``rightvote``, ``tievote``, ``bothbad_vote``; the last two are ties), ``left_model`` /
  ``right_model``.
- ``generic``: JSONL or CSV rows of ``prompt, chosen, rejected`` (optional ``confidence``) or
  ``prompt, images, ranks`` (lists; in CSV as JSON lists or ``;``-separated).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dina_lrm.data.parquet import parquet_file, read_row_group
from dina_lrm.data.config import DEFAULT_GROUPS_PER_UNIT
from dina_lrm.data.records import PreferenceGroup, ReadReport
from dina_lrm.data.rows import read_rows



class InvalidRow(ValueError):
    """A row that cannot become a preference group; its message is the reason counted in the report."""


class BadProbability(ValueError):
    """A label probability outside its range: an error in the dataset, named with its file and row."""


@dataclass(frozen=True)
class LabelRules:
    """How HPDv3 rows become training targets, and which rows are kept (the same in prepare and eval).

    ``soft_labels``: the target P(path1 preferred) is HPSv3's soft label, the majority share of
    ``choice_dist`` (max / sum); otherwise 1 (``path1`` is the preferred image). ``min_confidence``:
    keep rows whose ``confidence`` is at least this (HPSv3's 7B config: 0.95). ``min_vote_share``:
    keep rows whose chosen image's vote share ``choice_dist[0] / sum`` is above this, or that have no
    votes for it (the authors' data tool: 0.6)."""

    soft_labels: bool = True
    min_confidence: float | None = None
    min_vote_share: float | None = None


@dataclass
class WorkUnit:
    """A deterministic slice of a dataset; ``read()`` returns its groups and what it saw."""

    index: int
    name: str
    read: Callable[[], tuple[list[PreferenceGroup], ReadReport]]


def _convert(rows, to_group: Callable[[dict, int], PreferenceGroup], start: int, where: str) -> tuple[list[PreferenceGroup], ReadReport]:
    report, groups = ReadReport(), []
    for offset, row in enumerate(rows):
        report.rows += 1
        try:
            if not isinstance(row, dict):
                raise InvalidRow("row is not an object")
            group = to_group(row, start + offset)
        except InvalidRow as err:
            report.reject(str(err))
            continue
        except BadProbability as err:
            raise ValueError(f"{where}, row {start + offset}: {err}") from None
        report.add(group)
        groups.append(group)
    return groups, report


def _required(row: dict, *names: str):
    values = []
    for name in names:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InvalidRow(f"missing {name}")
        values.append(value)
    return values


def _resolve(root: Path, path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


# Pick-a-Pic v2 -------------------------------------------------------------------------------

PICKAPIC_COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different",
                    "image_0_uid", "image_1_uid", "ranking_id"]


def pickapic_group(row: dict, index: int) -> PreferenceGroup:
    caption, jpg_0, jpg_1 = _required(row, "caption", "jpg_0", "jpg_1")
    if row.get("has_label") is False or row.get("has_label") == 0:
        raise InvalidRow("unlabelled pair (has_label=0)")
    if row.get("are_different") is False or row.get("are_different") == 0:
        raise InvalidRow("identical images (are_different=0)")
    label_0, label_1 = _required(row, "label_0", "label_1")
    if {float(label_0), float(label_1)} not in ({0.0, 1.0}, {0.5}):
        raise InvalidRow("labels not (1, 0), (0, 1) or (0.5, 0.5)")
    ids = [str(row.get(f"image_{i}_uid") or f"{index}/{i}") for i in (0, 1)]
    return PreferenceGroup(
        group_id=str(row.get("ranking_id") or index),
        prompt=caption,
        images=[jpg_0, jpg_1],
        ranks=[1.0 - float(label_0), 1.0 - float(label_1)],
        image_ids=ids,
        source="pickapic",
    )


SHARD_NAME = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")  # the hub's parquet names: test_unique-00000-of-00001-....parquet


def unit_files(units: list[WorkUnit]) -> list[str]:
    """The names of the files the units read, for reports."""
    return sorted({unit.name.rsplit(":", 1)[0] for unit in units})


def split_of(file: Path) -> str:
    """The split a parquet file of a hub dataset belongs to, from its name."""
    match = SHARD_NAME.match(file.name)
    return match.group("split") if match else file.stem


def parquet_files(path: Path, split: str | None = None) -> list[Path]:
    """The parquet files of ``path`` (a file, a glob, or a dataset folder). A folder that holds
    several splits (Pick-a-Pic's train, validation, test and their ``_unique`` variants; GenAI-Bench's
    current and v1 files) must be narrowed to one with ``split``."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path))) if any(c in str(path) for c in "*?[") else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"no parquet files at {path}")
    splits = sorted({split_of(f) for f in files})
    if split is not None:
        files = [f for f in files if split_of(f) == split]
        if not files:
            raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(splits)}")
    elif len(splits) > 1:
        raise ValueError(f"{path} holds several splits ({', '.join(splits)}): pass --split NAME to read one")
    return files


def _parquet_units(path: Path, split: str | None, to_group, columns: list[str], required: list[str], dataset: str) -> list[WorkUnit]:
    """One unit per parquet row group, so a unit never needs more than one row group in memory."""
    units = []
    for file in parquet_files(path, split):
        parquet = parquet_file(file)
        metadata = parquet.metadata
        missing = [c for c in required if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{file} is not {dataset} parquet: columns {missing} are missing")
        start = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows

            def read(file=file, group=group, start=start):
                return _convert(read_row_group(file, group, columns).to_pylist(), to_group, start, str(file))

            units.append(WorkUnit(len(units), f"{file.name}:rg{group}", read))
            start += rows
    return units


def pickapic_units(path: Path, images_root: Path | None = None, groups_per_unit: int = 0, split: str | None = None,
                   rules: LabelRules = LabelRules()) -> list[WorkUnit]:
    required = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    return _parquet_units(path, split, pickapic_group, PICKAPIC_COLUMNS, required, "Pick-a-Pic v2")


# GenAI-Bench (GenAI-Arena votes) ------------------------------------------------------------

GENAI_BENCH_COLUMNS = ["prompt", "left_image", "right_image", "vote_type", "left_model", "right_model"]
GENAI_BENCH_VOTES = {"leftvote": [0.0, 1.0], "rightvote": [1.0, 0.0], "tievote": [0.0, 0.0], "bothbad_vote": [0.0, 0.0]}


def _image_bytes(value, name: str) -> bytes:
    """Encoded image bytes from a raw bytes column or a Hugging Face ``Image`` struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes) or not value:
        raise InvalidRow(f"missing {name}")
    return value


def genai_bench_group(row: dict, index: int) -> PreferenceGroup:
    prompt, vote = _required(row, "prompt", "vote_type")
    if vote not in GENAI_BENCH_VOTES:
        raise InvalidRow(f"unknown vote_type (expected one of {sorted(GENAI_BENCH_VOTES)})")
    left, right = row.get("left_model") or "left", row.get("right_model") or "right"
    return PreferenceGroup(
        group_id=str(index),
        prompt=prompt,
        images=[_image_bytes(row.get("left_image"), "left_image"), _image_bytes(row.get("right_image"), "right_image")],
        ranks=list(GENAI_BENCH_VOTES[vote]),
        image_ids=[f"{index}/left:{left}", f"{index}/right:{right}"],
        source=f"genai_bench:{left}-vs-{right}",
        label=vote,
    )


def genai_bench_units(path: Path, images_root: Path | None = None, groups_per_unit: int = 0, split: str | None = None,
                      rules: LabelRules = LabelRules()) -> list[WorkUnit]:
    required = ["prompt", "left_image", "right_image", "vote_type"]
    return _parquet_units(path, split, genai_bench_group, GENAI_BENCH_COLUMNS, required, "GenAI-Bench image_generation")


# JSON / JSONL / CSV formats -----------------------------------------------------------------


def probability(value, name: str) -> float | None:
    """``value`` as a probability in [0, 1]; None when absent; :class:`BadProbability` otherwise."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadProbability(f"{name} {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise BadProbability(f"{name} {number:g} is outside [0, 1]")
    return number


def vote_counts(value) -> tuple[float, float] | None:
    """HPDv3's ``choice_dist``: votes (or shares) for path1 and path2; None when absent."""
    if value is None:
        return None
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BadProbability(f"choice_dist {value!r} is not two vote counts") from None
    if not (first >= 0 and second >= 0 and first + second > 0):
        raise BadProbability(f"choice_dist {value!r} needs two non-negative counts with a positive sum")
    return first, second


def hpdv3_group(row: dict, index: int, root: Path, rules: LabelRules = LabelRules()) -> PreferenceGroup:
    prompt, path1, path2 = _required(row, "prompt", "path1", "path2")
    confidence = probability(row.get("confidence"), "confidence")
    votes = vote_counts(row.get("choice_dist"))
    if rules.min_confidence is not None and confidence is not None and confidence < rules.min_confidence:
        raise InvalidRow(f"confidence below {rules.min_confidence:g}")
    if rules.min_vote_share is not None and votes is not None and votes[0] > 0 and not votes[0] / sum(votes) > rules.min_vote_share:
        raise InvalidRow(f"vote share of path1 not above {rules.min_vote_share:g}")
    target = max(votes) / sum(votes) if rules.soft_labels and votes is not None else 1.0
    return PreferenceGroup(
        group_id=str(index),
        prompt=prompt,
        images=[_resolve(root, path1), _resolve(root, path2)],
        ranks=[0.0, 1.0],
        confidence=target,
        image_ids=[path1, path2],
        source=f"hpdv3:{row.get('model1', '')}-vs-{row.get('model2', '')}",
    )


def imagereward_group(row: dict, index: int, root: Path) -> PreferenceGroup:
    prompt, generations, ranking = _required(row, "prompt", "generations", "ranking")
    return _ranked_group(str(row.get("id", index)), prompt, generations, ranking, root, "imagereward")


def hpdv2_group(row: dict, index: int, root: Path) -> PreferenceGroup:
    prompt, paths, ranks = _required(row, "prompt", "image_path", "rank")
    return _ranked_group(str(index), prompt, paths, ranks, root, "hpdv2")


def _ranked_group(group_id: str, prompt: str, images, ranks, root: Path, source: str) -> PreferenceGroup:
    images, ranks = _as_list(images), _as_list(ranks)
    if len(images) != len(ranks):
        raise InvalidRow("images and ranks differ in length")
    if len(images) < 2:
        raise InvalidRow("fewer than two images")
    try:
        ranks = [float(r) for r in ranks]
    except (TypeError, ValueError):
        raise InvalidRow("non-numeric rank") from None
    if not all(math.isfinite(r) for r in ranks):
        raise InvalidRow("non-numeric rank")
    return PreferenceGroup(group_id, prompt, [_resolve(root, str(i)) for i in images], ranks,
                           image_ids=[str(i) for i in images], source=source)


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise InvalidRow("unparseable list") from None
    return [v.strip() for v in text.split(";") if v.strip()]


def generic_group(row: dict, index: int, root: Path) -> PreferenceGroup:
    group_id = str(row.get("group_id") or row.get("id") or index)
    if row.get("chosen") is not None or row.get("rejected") is not None:
        prompt, chosen, rejected = _required(row, "prompt", "chosen", "rejected")
        confidence = probability(row.get("confidence"), "confidence")
        return PreferenceGroup(group_id, prompt, [_resolve(root, chosen), _resolve(root, rejected)], [0.0, 1.0],
                               confidence=confidence, image_ids=[str(chosen), str(rejected)], source="generic")
    prompt, images, ranks = _required(row, "prompt", "images", "ranks")
    return _ranked_group(group_id, prompt, images, ranks, root, "generic")


def _row_units(to_group: Callable[..., PreferenceGroup], takes_rules: bool = False):
    def units(path: Path, images_root: Path | None = None, groups_per_unit: int = DEFAULT_GROUPS_PER_UNIT,
              split: str | None = None, rules: LabelRules = LabelRules()) -> list[WorkUnit]:
        if split is not None:
            raise ValueError(f"--split picks one split of a parquet dataset folder (pickapic, genai_bench); {path} is one file already")
        rows = read_rows(path, "dataset file")
        convert = functools.partial(to_group, root=Path(images_root) if images_root is not None else path.parent,
                                    **({"rules": rules} if takes_rules else {}))
        return [
            WorkUnit(n, f"{path.name}:{start}",
                     lambda start=start: _convert(rows[start : start + groups_per_unit], convert, start, str(path)))
            for n, start in enumerate(range(0, len(rows), groups_per_unit))
        ]

    return units


FORMATS: dict[str, Callable[..., list[WorkUnit]]] = {
    "pickapic": pickapic_units,
    "hpdv3": _row_units(hpdv3_group, takes_rules=True),
    "imagereward": _row_units(imagereward_group),
    "hpdv2": _row_units(hpdv2_group),
    "genai_bench": genai_bench_units,
    "generic": _row_units(generic_group),
}


def dataset_units(
    fmt: str, path: str | Path, images_root: str | Path | None = None, groups_per_unit: int = DEFAULT_GROUPS_PER_UNIT,
    split: str | None = None, rules: LabelRules = LabelRules(),
) -> list[WorkUnit]:
    """The work units of a dataset in format ``fmt`` (one of ``FORMATS``), of one ``split`` of a parquet
    folder, with HPDv3's label ``rules``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {sorted(FORMATS)}")
    if groups_per_unit < 1:
        raise ValueError(f"groups_per_unit must be >= 1, got {groups_per_unit}")
    units = FORMATS[fmt](Path(path), Path(images_root) if images_root else None, groups_per_unit, split, rules)
    if not units:
        raise ValueError(f"dataset {path} holds no rows")
    return units


def read_dataset(fmt: str, path: str | Path, images_root: str | Path | None = None,
                 split: str | None = None, rules: LabelRules = LabelRules()) -> tuple[list[PreferenceGroup], ReadReport]:
    """All groups of a dataset at once (for small datasets and evaluation sets)."""
    return read_units(dataset_units(fmt, path, images_root, split=split, rules=rules))


def read_units(units: list[WorkUnit]) -> tuple[list[PreferenceGroup], ReadReport]:
    groups, report = [], ReadReport()
    for unit in units:
        unit_groups, unit_report = unit.read()
        groups += unit_groups
        report.merge(unit_report)
    return groups, report
