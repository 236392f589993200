"""Task registry and data loaders: GLUE TSV layouts, JSONL, and E2E NLG (split by meaning representation).

Every problem with the input raises :class:`~lorakit.train.errors.DataError` (file and line number
included) while loading, i.e. before any training starts.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.train.errors import DataError, UnknownTaskError

Kind = Literal["classification", "regression", "generation"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task looks like on disk and how it is scored."""

    name: str
    kind: Kind
    metric: str  # primary metric, used to pick the best checkpoint
    labels: tuple[str, ...] = ()  # raw label strings (classification), index = class id
    glue_dir: str = ""
    header: bool = True
    n_fields: int = 0
    text_cols: tuple[int, ...] = ()  # one column (single sentence) or two (pair)
    label_col: int = -1

    @property
    def num_labels(self) -> int:
        """Output size of the model head (1 for regression, 0 for generation)."""
        return {"classification": len(self.labels), "regression": 1, "generation": 0}[self.kind]


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "classification", "accuracy", ("0", "1"), "SST-2", True, 2, (0,), 1),
    "mrpc": TaskSpec("mrpc", "classification", "f1", ("0", "1"), "MRPC", True, 5, (3, 4), 0),
    "rte": TaskSpec(
        "rte", "classification", "accuracy", ("entailment", "not_entailment"), "RTE", True, 4, (1, 2), 3
    ),
    "cola": TaskSpec("cola", "classification", "matthews", ("0", "1"), "CoLA", False, 4, (3,), 1),
    "stsb": TaskSpec("stsb", "regression", "pearson", (), "STS-B", True, 10, (7, 8), 9),
    "e2e": TaskSpec("e2e", "generation", "bleu"),
}
STSB_RANGE = (0.0, 5.0)
# The figure the LoRA paper's tables report per task (Table 2: MRPC accuracy, CoLA Matthews, STS-B Pearson;
# Table 3: BLEU first). ``TaskSpec.metric`` is what picks the best checkpoint (MRPC: F1).
PAPER_METRIC = {"sst2": "accuracy", "mrpc": "accuracy", "rte": "accuracy", "cola": "matthews", "stsb": "pearson",
                "e2e": "bleu"}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, forgiving case, dashes and underscores (``SST-2`` = ``sst2``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class Example:
    """One classification / regression example."""

    text: str
    text_pair: str | None
    label: int | float


@dataclass
class MRGroup:
    """One E2E meaning representation with all its reference texts."""

    mr: str
    refs: list[str] = field(default_factory=list)


def _read_lines(path: Path) -> list[str]:
    """Read a UTF-8 text file (a leading BOM is dropped) as lines without line endings."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    if not any(ln.strip() for ln in lines):
        raise DataError(f"{path}: file is empty")
    return lines


def _parse_label(spec: TaskSpec, raw: object, where: str) -> int | float:
    """Turn a raw label (string, int or float) into a class id or a regression target."""
    if spec.kind == "regression":
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(f"{where}: score {raw!r} is not a number") from None
        lo, hi = STSB_RANGE
        if not (math.isfinite(value) and lo <= value <= hi):
            raise DataError(f"{where}: score {value} is outside the task's range [{lo}, {hi}]")
        return value
    key = str(raw).strip()
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(spec.labels):
        return raw
    if key in spec.labels:
        return spec.labels.index(key)
    raise DataError(f"{where}: label {raw!r} is not in the {spec.name} label set {list(spec.labels)}")


def read_glue_tsv(path: str | os.PathLike[str], spec: TaskSpec) -> list[Example]:
    """Parse a file in the GLUE layout of ``spec`` (header or not, column positions, BOM)."""
    p = Path(path)
    lines = _read_lines(p)
    out: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if lineno == 1 and spec.header:
            continue
        cols = line.split("\t")
        if len(cols) != spec.n_fields:
            raise DataError(
                f"{p}:{lineno}: expected {spec.n_fields} tab-separated fields for {spec.name} "
                f"({spec.glue_dir} layout{'' if spec.header else ', no header'}), got {len(cols)}"
            )
        texts = [cols[i].strip() for i in spec.text_cols]
        if not texts[0]:
            raise DataError(f"{p}:{lineno}: empty sentence")
        label = _parse_label(spec, cols[spec.label_col], f"{p}:{lineno}")
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not out:
        raise DataError(f"{p}: no examples (only a header or blank lines)")
    return out


def read_jsonl(path: str | os.PathLike[str], spec: TaskSpec) -> list[Example]:
    """Parse JSONL lines ``{"text": ..., "text_pair": ... (optional), "label": ...}``."""
    p = Path(path)
    out: list[Example] = []
    for lineno, line in enumerate(_read_lines(p), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "label" not in obj:
            raise DataError(f'{where}: expected an object with a string "text" and a "label"')
        pair = obj.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise DataError(f'{where}: "text_pair" must be a string')
        if len(spec.text_cols) == 2 and pair is None:
            raise DataError(f'{where}: task {spec.name} is a sentence-pair task; "text_pair" is missing')
        out.append(Example(obj["text"], pair, _parse_label(spec, obj["label"], where)))
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def read_e2e(path: str | os.PathLike[str]) -> list[MRGroup]:
    """Parse ``field : value | field : value||reference`` lines, grouped by MR in first-seen order."""
    p = Path(path)
    groups: dict[str, MRGroup] = {}
    for lineno, line in enumerate(_read_lines(p), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"{p}:{lineno}: expected 'field : value | ...||reference text' (no '||' found)")
        mr, ref = (s.strip() for s in line.split("||", 1))
        if not mr or not ref:
            raise DataError(f"{p}:{lineno}: empty meaning representation or reference")
        for part in mr.split("|"):
            if ":" not in part:
                raise DataError(f"{p}:{lineno}: MR item {part.strip()!r} is not of the form 'field : value'")
        groups.setdefault(mr, MRGroup(mr)).refs.append(ref)
    if not groups:
        raise DataError(f"{p}: no examples")
    return list(groups.values())


def split_by_mr(
    groups: Sequence[MRGroup], dev_fraction: float, seed: int
) -> tuple[list[MRGroup], list[MRGroup]]:
    """Split MR groups (never single lines) into train/dev, deterministically for a seed."""
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"E2E dev fraction must be in (0, 1), got {dev_fraction}")
    if len(groups) < 2:
        raise DataError("E2E data needs at least 2 distinct meaning representations to split train/dev")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_dev = min(len(groups) - 1, max(1, round(dev_fraction * len(groups))))
    dev_ids = set(order[:n_dev])
    train = [g for i, g in enumerate(groups) if i not in dev_ids]
    dev = [g for i, g in enumerate(groups) if i in dev_ids]
    return train, dev


def read_examples(path: str | os.PathLike[str], spec: TaskSpec) -> list[Example] | list[MRGroup]:
    """Read any supported file for ``spec``: JSONL (by extension), the task's TSV layout, or E2E."""
    if spec.kind == "generation":
        return read_e2e(path)
    if str(path).endswith((".jsonl", ".json")):
        return read_jsonl(path, spec)
    return read_glue_tsv(path, spec)


def subsample(items: list, n: int | None, seed: int) -> list:
    """At most ``n`` items, chosen by a seeded shuffle (order of the kept items preserved)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def eval_digest(items: Sequence) -> str:
    """Short hash of examples / MR groups: runs and evals with equal digests were scored on the same set."""
    import hashlib

    return hashlib.sha256(repr(list(items)).encode("utf-8")).hexdigest()[:12]


def default_data_dir() -> Path:
    """``$LORAKIT_DATA`` or ``../shared/data`` (relative to the working directory)."""
    return Path(os.environ.get("LORAKIT_DATA", "../shared/data"))


def load_task_data(
    spec: TaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    train_file: str | None = None,
    eval_file: str | None = None,
    *,
    seed: int = 0,
    dev_fraction: float = 0.1,
) -> tuple[list, list]:
    """Return ``(train, eval)`` for a task, from explicit files or the shared data layout."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if spec.kind == "generation":
        if train_file and eval_file:
            return read_e2e(train_file), read_e2e(eval_file)
        src = train_file or eval_file or root / "e2e" / "valid.txt"
        if not Path(src).is_file():
            raise DataError(f"E2E data not found at {src}; pass --train-file (split by MR) or --data-dir")
        return split_by_mr(read_e2e(src), dev_fraction, seed)
    glue = root / "glue" / spec.glue_dir
    tr = Path(train_file) if train_file else glue / "train.tsv"
    ev = Path(eval_file) if eval_file else glue / "dev.tsv"
    for p, flag in ((tr, "--train-file"), (ev, "--eval-file")):
        if not p.is_file():
            raise DataError(
                f"{spec.name} data not found at {p}; pass {flag} or --data-dir DIR (holding glue/)"
            )
    return list(read_examples(tr, spec)), list(read_examples(ev, spec))
