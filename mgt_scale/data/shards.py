# The on-disk token shard format written by `mgt prep` and read by the loader: flat little-endian
# memmap files per split, a per-shard document index (.npy offsets), the copied tokenizer.model and
# manifest.json (counts, vocab, dtype, EOS id, sha256 of every file). Also: verification of an
# output directory (cheap size/count checks, or full sha256) with errors that name the bad file.
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_NAME = "mgt-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"


class DataError(ValueError):
    """A problem with data inputs or shard outputs; the message names the offending file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id (little-endian, fixed on disk)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_name(dt: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[np.dtype(dt)]


def dtype_from_name(name: str) -> np.dtype:
    try:
        return {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[name]
    except KeyError:
        raise DataError(f"unknown token dtype {name!r} in manifest") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def is_finished_output(path: str | Path) -> bool:
    """A directory is a finished prep output iff it holds a manifest (written last, then renamed in)."""
    return (Path(path) / MANIFEST).is_file()


# ----------------------------------------------------------------------------------------------
# Writing


class SplitWriter:
    """Streams documents (each already ending in EOS) of one split into shards of about
    `shard_tokens` tokens. Shards end on document boundaries: a shard is closed before a document
    that would overflow it, and a document longer than `shard_tokens` gets a shard of its own."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._h = None
        self._offsets: list[np.ndarray] = []
        self._cur_tokens = 0
        self._cur_docs = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._name = name
        self._f = open(self.out_dir / name, "wb")
        self._h = hashlib.sha256()
        self._offsets = [np.zeros(1, dtype=np.int64)]
        self._cur_tokens = 0
        self._cur_docs = 0

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        offsets = np.concatenate(self._offsets)
        index_name = self._name[: -len(".bin")] + ".idx.npy"
        np.save(self.out_dir / index_name, offsets)
        self.shards.append({
            "file": self._name,
            "index": index_name,
            "num_tokens": int(self._cur_tokens),
            "num_documents": int(self._cur_docs),
            "sha256": self._h.hexdigest(),
            "index_sha256": sha256_file(self.out_dir / index_name),
        })
        self._f = None
        self._cur_tokens = 0
        self._cur_docs = 0

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._f is None:
            self._open()
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._f.write(data)
        self._h.update(data)
        self._offsets.append(self._cur_tokens + np.cumsum(lengths, dtype=np.int64))
        self._cur_tokens += int(tokens.size)
        self._cur_docs += int(lengths.size)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation, `lengths` their lengths (EOS included)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        start = 0
        while lengths.size:
            room = self.shard_tokens - self._cur_tokens
            k = int(np.searchsorted(np.cumsum(lengths), room, side="right"))
            if k == 0:
                if self._cur_tokens == 0:
                    k = 1  # a document bigger than a whole shard: it gets its own
                else:
                    self._close()
                    continue
            n = int(lengths[:k].sum())
            self._write(tokens[start:start + n], lengths[:k])
            start += n
            lengths = lengths[k:]
            if lengths.size:
                self._close()

    def finish(self) -> dict:
        self._close()
        return {
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(Path(out_dir) / MANIFEST)


# ----------------------------------------------------------------------------------------------
# Reading and verification


def load_manifest(path: str | Path) -> dict:
    d = Path(path)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise DataError(f"{d}: no such directory (expected a `mgt prep` output)")
    if not mpath.is_file():
        raise DataError(f"{mpath}: missing; {d} is not a finished mgt prep output "
                        "(an interrupted prep leaves none: re-run `mgt prep`)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: unreadable manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DataError(f"{mpath}: not an mgt prep manifest (format != {FORMAT_NAME!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {m.get('format_version')!r} is not supported "
                        f"(this mgt-scale reads {FORMAT_VERSION}); re-run `mgt prep`")
    for key in ("vocab_size", "dtype", "eos_id", "tokenizer", "splits"):
        if key not in m:
            raise DataError(f"{mpath}: manifest lacks {key!r}")
    return m


def tokenizer_identity(manifest: dict, source: str | Path | None = None) -> dict:
    """The stable identity of the tokenizer a prep output was written with: the sha256 of its
    tokenizer.model (recorded by `mgt prep` in the manifest, checked against the file by check_output)
    and its vocabulary size. Two outputs with equal identities use the same token ids for the same
    pieces. `source` (the manifest path) is carried for messages only, never compared."""
    ident = {"tokenizer_sha256": str(manifest["tokenizer"].get("sha256")), "vocab_size": int(manifest["vocab_size"])}
    if source is not None:
        ident["source"] = str(source)
    return ident


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two identities (tokenizer_identity, or synthetic data's) name the same token space."""
    return (a.get("tokenizer_sha256"), a.get("vocab_size")) == (b.get("tokenizer_sha256"), b.get("vocab_size"))


def describe_tokenizer(ident: dict) -> str:
    """One-line form of an identity for messages, e.g. `tokenizer sha256 ab12... (vocab 512, d/manifest.json)`."""
    where = f", {ident['source']}" if ident.get("source") else ""
    if ident.get("tokenizer_sha256") is None:
        return f"no tokenizer (vocab {ident.get('vocab_size')}{where})"
    return f"tokenizer sha256 {ident['tokenizer_sha256']} (vocab {ident.get('vocab_size')}{where})"


# prep outputs whose shards this process has seen verified in full (by itself or, in a training job,
# by the ranks of its node together: loader.verify_data_once), by absolute path -> manifest identity
_VERIFIED: dict[str, tuple] = {}


def _manifest_ident(path: str | Path) -> tuple | None:
    try:
        st = (Path(path) / MANIFEST).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def mark_verified(path: str | Path) -> None:
    _VERIFIED[str(Path(path).absolute())] = _manifest_ident(path)


def is_verified(path: str | Path) -> bool:
    ident = _manifest_ident(path)
    return ident is not None and _VERIFIED.get(str(Path(path).absolute())) == ident


def shard_files(path: str | Path) -> list[str]:
    """The shard and index files of a prep output (relative names), in a fixed order."""
    m = load_manifest(path)
    return [name for split in sorted(m["splits"]) for s in m["splits"][split]["shards"]
            for name in (s["file"], s["index"])]


def check_output(path: str | Path, full: bool, only: set | None = None) -> list[str]:
    """All problems found in a prep output dir, one line each naming the file ([] = fine).
    Always: manifest, tokenizer hash, shard and index sizes and token/document counts.
    `full`: also the sha256 of every shard and index file (`only`: of these relative names)."""
    d = Path(path)
    try:
        m = load_manifest(d)
    except DataError as e:
        return [str(e)]
    problems = []
    tok = d / m["tokenizer"].get("file", TOKENIZER_FILE)
    if not tok.is_file():
        problems.append(f"{tok}: tokenizer model missing")
    elif sha256_file(tok) != m["tokenizer"].get("sha256"):
        problems.append(f"{d / MANIFEST}: written with another tokenizer: its tokenizer sha256 "
                        f"{str(m['tokenizer'].get('sha256'))[:12]}... does not match {tok} "
                        f"({sha256_file(tok)[:12]}...)")
    try:
        dt = dtype_from_name(m["dtype"])
    except DataError as e:
        return problems + [f"{d / MANIFEST}: {e}"]
    for split, info in m["splits"].items():
        for s in info["shards"]:
            f = d / s["file"]
            idx = d / s["index"]
            hash_f = full and (only is None or s["file"] in only)
            hash_idx = full and (only is None or s["index"] in only)
            if not f.is_file():
                problems.append(f"{f}: shard file missing")
                continue
            want = s["num_tokens"] * dt.itemsize
            have = f.stat().st_size
            if have != want:
                kind = "truncated" if have < want else "too long"
                problems.append(f"{f}: {kind}: {have} bytes, manifest says {s['num_tokens']} tokens "
                                f"= {want} bytes")
                continue
            if hash_f and sha256_file(f) != s["sha256"]:
                problems.append(f"{f}: sha256 checksum mismatch (the shard was modified or damaged)")
            if not idx.is_file():
                problems.append(f"{idx}: index file missing")
                continue
            if hash_idx and sha256_file(idx) != s["index_sha256"]:
                problems.append(f"{idx}: sha256 checksum mismatch")
                continue
            try:
                offs = np.load(idx, mmap_mode="r")
            except (OSError, ValueError) as e:
                problems.append(f"{idx}: unreadable index: {e}")
                continue
            if offs.ndim != 1 or len(offs) != s["num_documents"] + 1 or int(offs[-1]) != s["num_tokens"] \
                    or int(offs[0]) != 0:
                problems.append(f"{idx}: document index does not match the manifest "
                                f"({s['num_documents']} documents, {s['num_tokens']} tokens)")
                continue
            if hash_f and s["num_documents"]:
                # every document ends with EOS: a cheap semantic check on top of the checksum
                toks = np.memmap(f, dtype=dt, mode="r")
                if not np.all(toks[np.asarray(offs[1:]) - 1] == m["eos_id"]):
                    problems.append(f"{f}: documents do not end with EOS id {m['eos_id']}")
        if sum(s["num_tokens"] for s in info["shards"]) != info["num_tokens"] or \
                sum(s["num_documents"] for s in info["shards"]) != info["num_documents"]:
            problems.append(f"{d / MANIFEST}: split {split!r} totals do not add up over its shards")
    return problems


def verify_output(path: str | Path, full: bool = True) -> dict:
    """Raise DataError (all problems, one per line) unless the output dir is intact; return its manifest.
    A dir verified in full before in this process (same manifest) gets the cheap checks only."""
    deep = full and not is_verified(path)
    problems = check_output(path, deep)
    if problems:
        raise DataError("; ".join(problems))
    if deep:
        mark_verified(path)
    return load_manifest(path)


@dataclass
class SplitTokens:
    """The concatenated token stream of one split, read lazily through np.memmap.
    `starts[k]` is the global offset of shard k (the shard-boundary index), `starts[-1]` the total."""

    name: str
    files: list[Path]
    index_files: list[Path]
    starts: np.ndarray
    dtype: np.dtype

    def __post_init__(self) -> None:
        self._maps: list[np.memmap | None] = [None] * len(self.files)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def _map(self, k: int) -> np.ndarray:
        mm = self._maps[k]
        if mm is None:
            if self.starts[k + 1] == self.starts[k]:
                mm = np.zeros(0, dtype=self.dtype)
            else:
                mm = np.memmap(self.files[k], dtype=self.dtype, mode="r")
            self._maps[k] = mm
        return mm

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream as int64 (may span shards)."""
        if start < 0 or stop > self.num_tokens or start > stop:
            raise IndexError(f"token range [{start}, {stop}) outside split {self.name!r} of {self.num_tokens}")
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            s0, s1 = int(self.starts[k]), int(self.starts[k + 1])
            take = min(stop, s1) - pos
            if take > 0:
                out[pos - start: pos - start + take] = self._map(k)[pos - s0: pos - s0 + take]
                pos += take
            k += 1
        return out

    def documents(self) -> "list[tuple[int, int]]":
        """(start, stop) token ranges of every document in the concatenated stream (EOS included)."""
        out = []
        for k, idx in enumerate(self.index_files):
            offs = np.load(idx) + int(self.starts[k])
            out.extend(zip(offs[:-1].tolist(), offs[1:].tolist()))
        return out


class ShardSet:
    """An opened, checked prep output: manifest, tokenizer path and the token stream of each split."""

    def __init__(self, path: str | Path, full_checksums: bool = True):
        self.path = Path(path)
        self.manifest = verify_output(self.path, full=full_checksums)
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eos_id = int(self.manifest["eos_id"])
        self.dtype = dtype_from_name(self.manifest["dtype"])
        self.tokenizer_path = self.path / self.manifest["tokenizer"].get("file", TOKENIZER_FILE)
        self.tokenizer_sha256 = self.manifest["tokenizer"]["sha256"]

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def has_split(self, split: str) -> bool:
        info = self.manifest["splits"].get(split)
        return bool(info) and info["num_tokens"] > 0

    def split(self, split: str) -> SplitTokens:
        info = self.manifest["splits"].get(split)
        if not info or info["num_tokens"] == 0:
            raise DataError(f"{self.manifest_path}: has no {split!r} tokens")
        shards = info["shards"]
        starts = np.concatenate([[0], np.cumsum([s["num_tokens"] for s in shards])]).astype(np.int64)
        return SplitTokens(split, [self.path / s["file"] for s in shards],
                           [self.path / s["index"] for s in shards], starts, self.dtype)


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
