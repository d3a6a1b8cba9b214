# Input side of mgt prep: turn --input paths (files, globs, folders, JSONL, parquet, hub names) into
# one Hugging Face `datasets.Dataset` with a single "text" column, one row per document. Plain-text
# files are one document per FILE (read as UTF-8; bad files skipped and counted, or fatal).
from __future__ import annotations

import fnmatch
import glob as globmod
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .shards import DataError

STRUCTURED = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_GLOB = "*.py,*.txt,*.md"
DEFAULT_EXCLUDE = "site-packages,__pycache__,.*"


@dataclass
class InputPlan:
    """What was found: plain-text files, structured files by builder, hub dataset names."""

    text_files: list[Path] = field(default_factory=list)
    structured: dict[str, list[Path]] = field(default_factory=dict)  # "json"/"parquet" -> files
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


def plan_inputs(inputs: list[str], glob: str = DEFAULT_GLOB, exclude: str = DEFAULT_EXCLUDE,
                max_files: int = 0) -> InputPlan:
    """Expand inputs in the order given (folders recursively, sorted; globs sorted); dedupe files.
    Files ending .jsonl/.json/.parquet are structured; other files are plain text."""
    patterns, excl = _split_patterns(glob), _split_patterns(exclude)
    files: list[Path] = []
    plan = InputPlan()
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
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


def _load_structured(kind: str, files: list[Path], text_field: str, cache_dir: str):
    import datasets

    def load(fs):
        return datasets.load_dataset(kind, data_files=[str(f) for f in fs], split="train", cache_dir=cache_dir)

    try:
        ds = load(files)
    except Exception as e:  # find which file is bad by loading them one by one
        for f in files:
            try:
                load([f])
            except Exception as e1:
                raise DataError(f"{f}: cannot load as {kind}: {str(e1).splitlines()[0] if str(e1) else e1!r}") \
                    from None
        raise DataError(f"cannot load {kind} inputs {files[0]}...: {e}") from None
    return _select_text(ds, text_field, f"{files[0]}" + (f" (and {len(files) - 1} more)" if len(files) > 1 else ""))


def _select_text(ds, text_field: str, where: str):
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
    return ds.cast(datasets.Features({"text": datasets.Value("large_string")}))


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
