# `mgt prep`: build a tokenizer and token shards from raw text (or verify an existing output).
# Work happens in a hidden temporary sibling of --output that is renamed into place only when
# everything (manifest last) is written, so an interrupted prep never leaves a finished-looking dir.
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mgt_scale.exit_codes import CONFIG_ERROR as EXIT_ERROR  # bad input, retrying cannot help
from mgt_scale.logs import get_logger

from . import corpus, shards
from .shards import DataError


log = get_logger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the one-line `error: ...` (exit 2) every mgt command prints."""

    def error(self, message: str):
        log.error(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mgt prep",
        description="Train (or reuse) a SentencePiece tokenizer and write token shards for training, "
                    "or check an existing output with --verify.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="files, folders (recursed, filtered by --glob), globs, .jsonl/.json/.parquet/.csv/"
                        ".tsv files (one document per row; CSV/TSV need a header row), folders written by "
                        "datasets' save_to_disk (a DatasetDict gives its 'train' split, or all splits when it "
                        "has no 'train'), or a hub dataset name owner/name")
    p.add_argument("--output", metavar="DIR", help="output directory (created)")
    p.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest and exit")
    p.add_argument("--quick", action="store_true", help="with --verify: sizes and counts only, no sha256")
    g = p.add_argument_group("inputs")
    g.add_argument("--glob", default=corpus.DEFAULT_GLOB, help="comma-separated file patterns taken from folders")
    g.add_argument("--exclude", default=corpus.DEFAULT_EXCLUDE,
                   help="comma-separated folder-name patterns skipped while recursing")
    g.add_argument("--text-field", default="text", help="text column of JSONL/parquet/CSV/TSV/save_to_disk/hub inputs")
    g.add_argument("--on-bad-file", choices=("skip", "fail"), default="skip",
                   help="what to do with plain-text files that are not UTF-8")
    g.add_argument("--max-files", type=int, default=0, help="use only the first N files found (0: all)")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece .model instead of training")
    t.add_argument("--tokenizer-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--input-sentence-size", type=int, default=None,
                   help="tokenizer training sample: this many multi-line sentences (up to 8 lines each) from "
                        "randomly ordered documents; default 100000 for bpe (about 30 MB of code, trains in "
                        "~7 s on 2 cores), 20000 for unigram (whose trainer is far slower)")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    s = p.add_argument_group("shards")
    s.add_argument("--valid-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation (at least 1 when > 0)")
    s.add_argument("--shard-tokens", type=int, default=16 * 2**20, help="tokens per shard file (about)")
    s.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes for tokenization (datasets.map) and threads for tokenizer training")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--overwrite", action="store_true", help="replace an existing finished output")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if a.verify:
        if a.input or a.output:
            raise DataError("--verify takes only a directory: drop --input/--output")
        return
    if not a.input or not a.output:
        raise DataError("--input and --output are required (or use --verify DIR); see mgt prep --help")
    if a.vocab_size < 300 and not a.tokenizer:
        raise DataError(f"--vocab-size {a.vocab_size} too small: byte fallback alone needs 256 + specials; use >= 300")
    if not 0 <= a.valid_fraction < 1:
        raise DataError(f"--valid-fraction must be in [0, 1), got {a.valid_fraction}")
    if a.input_sentence_size is None:
        a.input_sentence_size = 100_000 if a.tokenizer_type == "bpe" else 20_000
    if a.shard_tokens < 1 or a.num_proc < 1 or a.input_sentence_size < 1 or a.max_files < 0:
        raise DataError("--shard-tokens, --num-proc and --input-sentence-size must be >= 1, --max-files >= 0")


def _prepare_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        if not out.parent.is_dir():
            raise DataError(f"{out.parent}: parent folder of --output does not exist")
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if shards.is_finished_output(out):
        if not overwrite:
            raise DataError(f"{out}: a finished prep output already exists; pass --overwrite to replace it")
    elif any(out.iterdir()):
        raise DataError(f"{out}: exists, is not empty and is not an mgt prep output; choose another --output")


def _encode_batch(batch: dict, model_path: str) -> dict:
    """datasets.map worker: one SentencePiece model per process, loaded on first use."""
    sp = _SP_CACHE.get(model_path)
    if sp is None:
        import sentencepiece as spm

        sp = _SP_CACHE[model_path] = spm.SentencePieceProcessor(model_file=model_path)
    return {"ids": sp.encode(batch["text"], num_threads=1)}  # parallelism comes from num_proc


_SP_CACHE: dict = {}


def split_documents(num_docs: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded permutation picks round(fraction * n) of them,
    at least 1 whenever fraction > 0 (so tiny corpora still get a validation set), at most n - 1."""
    mask = np.zeros(num_docs, dtype=bool)
    if valid_fraction <= 0:
        return mask
    if num_docs < 2:
        raise DataError(f"the corpus has only {num_docs} document(s): cannot hold one out for validation; "
                        "add inputs or pass --valid-fraction 0")
    n_valid = min(num_docs - 1, max(1, round(valid_fraction * num_docs)))
    perm = np.random.Generator(np.random.PCG64([seed, 11])).permutation(num_docs)
    mask[perm[:n_valid]] = True
    return mask


def _write_split(ds, writer: shards.SplitWriter, eos_id: int, progress) -> None:
    """Stream the tokenized documents of `ds` (column "ids") into `writer`, one EOS after each."""
    for table in ds.with_format("arrow").iter(batch_size=1024):
        col = table.column("ids").combine_chunks()
        offs = col.offsets.to_numpy().astype(np.int64)
        vals = col.values.to_numpy(zero_copy_only=False)
        vals = vals[offs[0]:offs[-1]]
        offs = offs - offs[0]
        n = len(offs) - 1
        lengths = np.diff(offs) + 1
        out = np.empty(int(vals.size) + n, dtype=np.int64)
        ends = np.cumsum(lengths) - 1  # where each document's EOS goes
        is_tok = np.ones(out.size, dtype=bool)
        is_tok[ends] = False
        out[is_tok] = vals
        out[ends] = eos_id
        writer.add(out, lengths)
        progress.update(n)


def run_prep(a: argparse.Namespace) -> dict:
    """Do the prep described by parsed args; returns the manifest. Raises DataError on bad input."""
    import datasets
    from tqdm.auto import tqdm

    from .tokenizer import Tokenizer, sample_sentences, train_tokenizer

    out = Path(a.output).expanduser().absolute()
    _prepare_output(out, a.overwrite)
    quiet = a.no_progress
    if quiet:
        datasets.disable_progress_bars()
    else:
        datasets.enable_progress_bars()
    datasets.logging.set_verbosity_error()
    t_start = time.time()
    plan = corpus.plan_inputs(a.input, a.glob, a.exclude, a.max_files)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should look like a mkdir
    try:
        cache = str(tmp / ".cache")
        ds, stats = corpus.build_corpus(plan, text_field=a.text_field, on_bad_file=a.on_bad_file,
                                        cache_dir=cache, progress=not quiet)
        if stats.skipped_files:
            shown = ", ".join(stats.skipped_files[:5]) + (" ..." if len(stats.skipped_files) > 5 else "")
            log.warning(f"skipped {len(stats.skipped_files)} non-UTF-8 file(s): {shown}")
        tok_path = tmp / shards.TOKENIZER_FILE
        if a.tokenizer:
            src = Path(a.tokenizer).expanduser()
            if not src.is_file():
                raise DataError(f"{src}: tokenizer model not found")
            Tokenizer(src)  # validates before copying
            shutil.copyfile(src, tok_path)
            tok_kind = "given"
        else:
            with tqdm(total=a.input_sentence_size, desc="tokenizer sample", unit="sent",
                      disable=quiet, file=sys.stderr) as bar:
                sents = sample_sentences(lambda i: ds[i]["text"], len(ds), a.input_sentence_size, a.seed, bar)
            t0 = time.time()
            log.info(f"training {a.tokenizer_type} tokenizer (vocab {a.vocab_size}) on {len(sents)} sentences...")
            train_tokenizer(sents, tok_path, vocab_size=a.vocab_size, model_type=a.tokenizer_type,
                            seed=a.seed, num_threads=a.num_proc, character_coverage=a.character_coverage)
            del sents
            log.info(f"tokenizer trained in {time.time() - t0:.1f}s")
            tok_kind = a.tokenizer_type
        tok = Tokenizer(tok_path)
        t0 = time.time()
        num_proc = a.num_proc if len(ds) >= 2 * a.num_proc else 1
        tokenized = ds.map(_encode_batch, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                           remove_columns=["text"], fn_kwargs={"model_path": str(tok_path)},
                           features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                           desc="tokenize")
        t_tok = time.time() - t0
        valid_mask = split_documents(len(tokenized), a.valid_fraction, a.seed)
        dtype = shards.token_dtype(tok.vocab_size)
        splits = {}
        with tqdm(total=len(tokenized), desc="write shards", unit="doc", disable=quiet, file=sys.stderr) as bar:
            for split, sel in (("train", ~valid_mask), ("valid", valid_mask)):
                w = shards.SplitWriter(tmp, split, dtype, a.shard_tokens)
                idx = np.flatnonzero(sel)
                if idx.size:
                    _write_split(tokenized.select(idx), w, tok.eos_id, bar)
                splits[split] = w.finish()
        del tokenized, ds
        shutil.rmtree(cache, ignore_errors=True)
        manifest = {
            "format": shards.FORMAT_NAME,
            "format_version": shards.FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "dtype": shards.dtype_name(dtype),
            "eos_id": tok.eos_id,
            "tokenizer": {"file": shards.TOKENIZER_FILE, "sha256": tok.sha256, "type": tok_kind},
            "splits": splits,
            "num_documents": sum(s["num_documents"] for s in splits.values()),
            "num_tokens": sum(s["num_tokens"] for s in splits.values()),
            "seed": a.seed,
            "valid_fraction": a.valid_fraction,
            "shard_tokens": a.shard_tokens,
            "source": {
                "inputs": list(a.input),
                "num_files": stats.num_files,
                "num_bytes": stats.num_bytes,
                "num_empty_documents_dropped": stats.num_empty,
                "skipped_files": stats.skipped_files,
                "text_field": a.text_field,
            },
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenize_seconds": round(t_tok, 3),
        }
        shards.write_manifest(tmp, manifest)
        shards.fsync_dir(tmp)
        if out.exists():  # verified above: empty, or a finished output with --overwrite
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tr, va = splits["train"], splits["valid"]
    log.info(f"wrote {out}: {tr['num_documents']} train docs / {tr['num_tokens']} tokens in {len(tr['shards'])} "
             f"shard(s), {va['num_documents']} valid docs / {va['num_tokens']} tokens, vocab {tok.vocab_size} "
             f"({time.time() - t_start:.1f}s)")
    return manifest


def run_verify(path: str, full: bool = True) -> int:
    problems = shards.check_output(path, full=full)
    if problems:
        for line in problems:
            log.error(f"FAIL {line}")
        log.error(f"{path}: {len(problems)} problem(s) found")
        return EXIT_ERROR
    m = shards.load_manifest(path)
    n = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"ok: {path}: {n} shard(s), {m['num_tokens']} tokens, vocab {m['vocab_size']}"
          + ("" if full else " (sizes and counts only)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mgt prep` (and `python -m data_prep.prep`). Returns the exit code."""
    p = build_parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (argparse exits 2 after printing usage)
        return int(e.code or 0)
    try:
        _check_args(a, p)
        if a.verify:
            return run_verify(a.verify, full=not a.quick)
        run_prep(a)
        return 0
    except DataError as e:
        log.error(str(e))
        return EXIT_ERROR
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        log.error(f"{where}{e.strerror or e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
