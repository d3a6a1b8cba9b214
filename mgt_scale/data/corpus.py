# Input side of mgt prep: turn --input paths (files, globs, folders, JSONL, parquet, CSV/TSV, folders
# written by `datasets`' save_to_disk, hub names) into one Hugging Face `datasets.Dataset` with a
# single "text" column, one row per document. Plain-text files are one document per FILE (read as
# UTF-8; bad files skipped and counted, or fatal); structured inputs give one document per row.
from __future__ import annotations

import csv
import fnmatch
import glob as globmod
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mgt_scale.logs import get_logger

from .shards import DataError

STRUCTURED = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
DELIMITED = {"csv": ",", "tsv": "\t"}  # read by the `datasets` csv builder (pandas) with this separator
DEFAULT_GLOB = "*.py,*.txt,*.md"
DEFAULT_EXCLUDE = "site-packages,__pycache__,.*"


@dataclass
class InputPlan:
    """What was found: plain-text files, structured files by builder, save_to_disk folders, hub names."""

    text_files: list[Path] = field(default_factory=list)
    structured: dict[str, list[Path]] = field(default_factory=dict)  # "json"/"parquet"/"csv"/"tsv" -> files
    saved: list[Path] = field(default_factory=list)  # folders written by Dataset/DatasetDict.save_to_disk
    hub: list[str] = field(default_factory=list)

    @property
    def num_files(self) -> int:
        return len(self.text_files) + sum(len(v) for v in self.structured.values())


@dataclass
class CorpusStats:
    num_files: int = 0
    num_bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)
    num_empty: int = 0


def _split_patterns(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _walk(folder: Path, patterns: list[str], exclude: list[str]) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, x) for x in exclude))
        for name in sorted(files):
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append(Path(root) / name)
    return found


def is_saved_dataset(p: Path) -> bool:
    """A folder written by datasets' Dataset.save_to_disk (state.json + dataset_info.json) or
    DatasetDict.save_to_disk (dataset_dict.json)."""
    return p.is_dir() and ((p / "dataset_dict.json").is_file()
                           or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def plan_inputs(inputs: list[str], glob: str = DEFAULT_GLOB, exclude: str = DEFAULT_EXCLUDE,
                max_files: int = 0) -> InputPlan:
    """Expand inputs in the order given (folders recursively, sorted; globs sorted); dedupe files.
    Files ending .jsonl/.json/.parquet/.csv/.tsv are structured; other files are plain text. A folder
    written by save_to_disk is one saved dataset (not recursed, --glob and --max-files do not apply)."""
    patterns, excl = _split_patterns(glob), _split_patterns(exclude)
    files: list[Path] = []
    plan = InputPlan()
    for raw in inputs:
        p = Path(raw).expanduser()
        if is_saved_dataset(p):
            if all(os.path.realpath(p) != os.path.realpath(q) for q in plan.saved):
                plan.saved.append(p)
        elif p.is_dir():
            got = _walk(p, patterns, excl)
            if not got:
                raise DataError(f"{p}: folder has no files matching --glob {glob!r}")
            files += got
        elif p.is_file():
            files.append(p)
        elif any(c in raw for c in "*?["):
            got = sorted(Path(x) for x in globmod.glob(os.path.expanduser(raw), recursive=True)
                         if Path(x).is_file())
            if not got:
                raise DataError(f"{raw}: glob matches no files")
            files += got
        elif p.exists():
            raise DataError(f"{p}: not a regular file or folder")
        elif "/" in raw.strip("/") and raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
            plan.hub.append(raw)  # owner/name: a Hugging Face hub dataset
        else:
            raise DataError(f"{raw}: no such file or folder")
    seen = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if max_files > 0:
        unique = unique[:max_files]
    for f in unique:
        kind = STRUCTURED.get(f.suffix.lower())
        if kind:
            plan.structured.setdefault(kind, []).append(f)
        else:
            plan.text_files.append(f)
    return plan


def read_text_files(files: list[Path], on_bad_file: str, progress: bool = True) -> tuple[list[Path], CorpusStats]:
    """Check every plain-text file decodes as UTF-8. Returns the good files and stats; a bad file is
    skipped (and listed) or, with on_bad_file="fail", a DataError naming it. An unreadable file
    (permissions, I/O) is always a DataError naming it."""
    from tqdm.auto import tqdm

    good: list[Path] = []
    stats = CorpusStats()
    for f in tqdm(files, desc="read files", unit="file", disable=not progress, file=sys.stderr):
        try:
            data = f.read_bytes()
        except OSError as e:
            raise DataError(f"{f}: cannot read: {e.strerror or e}") from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_bad_file == "fail":
                raise DataError(f"{f}: not valid UTF-8 (byte {e.start}); pass --on-bad-file skip "
                                "to leave such files out") from None
            stats.skipped_files.append(str(f))
            continue
        good.append(f)
        stats.num_bytes += len(data)
    stats.num_files = len(good)
    return good, stats


def _text_generator(paths: list[str]):
    for p in paths:
        with open(p, "rb") as fh:
            yield {"text": fh.read().decode("utf-8")}


def _delimited_header(f: Path, sep: str) -> list[str]:
    """Column names of a CSV/TSV file: its first record (quoted names allowed; a UTF-8 BOM is dropped,
    as pandas does)."""
    try:
        with open(f, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh, delimiter=sep), None)
    except OSError as e:
        raise DataError(f"{f}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not valid UTF-8 near byte {e.start}: CSV/TSV inputs must be UTF-8") \
            from None
    except csv.Error as e:
        raise DataError(f"{f}: cannot read the header row: {e}") from None
    if not header:
        raise DataError(f"{f}: no header row: CSV/TSV inputs need a first line naming the columns")
    return header


def _reason(e: BaseException) -> str:
    """First line of the innermost cause (datasets wraps a parser's error in DatasetGenerationError)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).splitlines()[0] if str(e) else repr(e)


def _load_structured(kind: str, files: list[Path], text_field: str, cache_dir: str):
    import datasets

    kwargs: dict = {}
    if kind in DELIMITED:
        # check every header first, so a missing column names its file; then read only the text column,
        # as strings (no type guessing), and keep cells like "NA" or "null" as the text they are
        for f in files:
            cols = _delimited_header(f, DELIMITED[kind])
            if text_field not in cols:
                raise DataError(f"{f}: no field {text_field!r} (fields: {', '.join(cols)}); pass --text-field")
        kwargs = dict(sep=DELIMITED[kind], usecols=[text_field], keep_default_na=False, na_filter=False,
                      features=datasets.Features({text_field: datasets.Value("string")}))
    builder = "csv" if kind in DELIMITED else kind

    def load(fs):
        return datasets.load_dataset(builder, data_files=[str(f) for f in fs], split="train", cache_dir=cache_dir,
                                     **kwargs)

    try:
        ds = load(files)
    except Exception as e:  # find which file is bad by loading them one by one
        for f in files:
            try:
                load([f])
            except Exception as e1:
                raise DataError(f"{f}: cannot load as {kind}: {_reason(e1)}") from None
        raise DataError(f"cannot load {kind} inputs {files[0]}...: {_reason(e)}") from None
    return _select_text(ds, text_field, f"{files[0]}" + (f" (and {len(files) - 1} more)" if len(files) > 1 else ""))


def _select_text(ds, text_field: str, where: str, cache_file: str | None = None):
    """ds reduced to one large_string column "text". cache_file: where the cast writes its Arrow file
    (needed for a save_to_disk dataset, whose default cache is the user's own folder)."""
    import datasets

    if text_field not in ds.column_names:
        raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
                        "pass --text-field")
    feat = ds.features[text_field]
    if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
        raise DataError(f"{where}: field {text_field!r} holds {feat}, not text")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.cast(datasets.Features({"text": datasets.Value("large_string")}), cache_file_name=cache_file)


def _load_saved(path: Path, text_field: str, cache_dir: str, index: int):
    """A save_to_disk folder: a Dataset, or a DatasetDict of which the `train` split is used when it
    has one, else all its splits in their saved order."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        raise DataError(f"{path}: cannot load this save_to_disk folder: {msg}") from None
    os.makedirs(cache_dir, exist_ok=True)
    if isinstance(obj, datasets.Dataset):
        return [_select_text(obj, text_field, str(path), os.path.join(cache_dir, f"saved-{index}.arrow"))]
    names = ["train"] if "train" in obj else list(obj)
    if not names:
        raise DataError(f"{path}: the saved DatasetDict has no splits")
    if list(obj) != names:
        get_logger(__name__).warning(f"{path}: using split 'train' of the saved splits {', '.join(obj)}")
    return [_select_text(obj[n], text_field, f"{path} (split {n})",
                         os.path.join(cache_dir, f"saved-{index}-{k}.arrow")) for k, n in enumerate(names)]


def build_corpus(plan: InputPlan, *, text_field: str, on_bad_file: str, cache_dir: str,
                 progress: bool = True):
    """One datasets.Dataset with column "text" (empty and null documents removed) plus CorpusStats."""
    import datasets

    parts = []
    stats = CorpusStats()
    if plan.text_files:
        good, stats = read_text_files(plan.text_files, on_bad_file, progress)
        if good:
            parts.append(datasets.Dataset.from_generator(
                _text_generator, gen_kwargs={"paths": [str(f) for f in good]}, cache_dir=cache_dir,
                features=datasets.Features({"text": datasets.Value("large_string")})))
    for kind, files in plan.structured.items():
        for f in files:
            try:
                stats.num_bytes += f.stat().st_size
            except OSError as e:
                raise DataError(f"{f}: cannot read: {e.strerror}") from None
        stats.num_files += len(files)
        parts.append(_load_structured(kind, files, text_field, cache_dir))
    for i, folder in enumerate(plan.saved):
        arrow = [f for f in folder.rglob("*.arrow") if f.is_file()]
        stats.num_files += len(arrow)
        stats.num_bytes += sum(f.stat().st_size for f in arrow)
        parts += _load_saved(folder, text_field, cache_dir, i)
    for name in plan.hub:
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else repr(e)
            raise DataError(f"{name}: not a local path, and loading it as a Hugging Face hub dataset "
                            f"failed: {msg}") from None
        parts.append(_select_text(ds, text_field, name))
    if not parts:
        raise DataError("empty corpus: no readable input files" +
                        (f" ({len(stats.skipped_files)} skipped as non-UTF-8)" if stats.skipped_files else ""))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    n0 = len(ds)
    ds = ds.filter(lambda b: [t is not None and len(t) > 0 for t in b["text"]], batched=True,
                   desc="drop empty documents")
    stats.num_empty = n0 - len(ds)
    if len(ds) == 0:
        raise DataError("empty corpus: all documents are empty" +
                        (f" ({len(stats.skipped_files)} non-UTF-8 files skipped)" if stats.skipped_files else ""))
    return ds, stats
