# Unit tests of `mgt prep` on tiny corpora built in tmp_path (a slice of the Python standard library
# as real code): exact decode(encode) round trip through the shards, manifest contents, determinism,
# JSONL/parquet inputs, bad and empty inputs, --verify, overwrite protection and interrupted runs.
from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mgt_scale.data import Tokenizer, open_shards
from mgt_scale.data import prep as P
from mgt_scale.data import shards as S

VOCAB = 512


def stdlib_files(n: int = 30) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 30_000)
    assert len(files) >= n
    return files[:: len(files) // n][:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus") / "src"
    (d / "pkg").mkdir(parents=True)
    for i, f in enumerate(stdlib_files()):
        shutil.copyfile(f, (d / "pkg" if i % 2 else d) / f.name)
    (d / "tabs_and_crlf.txt").write_bytes("a\tb  \r\n\tc\n\n\n  trailing   \n€ ünïcödé 你好\n".encode())
    (d / "ignored.bin").write_bytes(b"\x00\x01 not matched by --glob")
    return d


def run(argv, capsys=None) -> tuple[int, str]:
    code = P.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(scope="module")
def prepped(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    code = P.main(["--input", str(corpus), "--output", str(out), "--vocab-size", str(VOCAB), "--num-proc", "2",
                   "--shard-tokens", "20000", "--no-progress"])
    assert code == 0
    return out


def decoded_documents(out: Path) -> list[str]:
    ss = open_shards(out)
    tok = Tokenizer(ss.tokenizer_path)
    docs = []
    for split in ("train", "valid"):
        st = ss.split(split)
        for a, b in st.documents():
            ids = st.read(a, b)
            assert ids[-1] == ss.eos_id and ss.eos_id not in ids[:-1]
            docs.append(tok.decode(ids[:-1]))
    return docs


def test_round_trip_exact(prepped, corpus):
    m = S.load_manifest(prepped)
    texts = sorted(p.read_bytes().decode("utf-8") for p in corpus.rglob("*") if p.suffix in (".py", ".txt"))
    assert m["num_documents"] == len(texts) == 31  # one document per file; ignored.bin not matched
    assert sorted(decoded_documents(prepped)) == texts
    assert m["splits"]["valid"]["num_documents"] == 1  # tiny corpus still gets a validation document
    assert len(m["splits"]["train"]["shards"]) > 1
    assert m["vocab_size"] == VOCAB and m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == S.sha256_file(prepped / "tokenizer.model")
    shard = m["splits"]["train"]["shards"][0]
    assert (prepped / shard["file"]).stat().st_size == 2 * shard["num_tokens"]
    assert np.load(prepped / shard["index"])[-1] == shard["num_tokens"]
    # newlines are real pieces, not only byte fallback: the trainer saw them inside sentences
    assert Tokenizer(prepped / "tokenizer.model").sp.piece_to_id("\n") != 0


@pytest.mark.slow
def test_unigram_round_trip_and_reused_tokenizer(prepped, corpus, tmp_path, capsys):
    out = tmp_path / "uni"
    code, _ = run(["--input", corpus, "--output", out, "--vocab-size", VOCAB, "--tokenizer-type", "unigram",
                   "--num-proc", "1", "--no-progress", "--valid-fraction", "0.2"], capsys)
    assert code == 0
    texts = sorted(p.read_bytes().decode("utf-8") for p in corpus.rglob("*") if p.suffix in (".py", ".txt"))
    assert sorted(decoded_documents(out)) == texts
    assert S.load_manifest(out)["splits"]["valid"]["num_documents"] == round(0.2 * 31)
    reused = tmp_path / "reused"
    code, _ = run(["--input", corpus, "--output", reused, "--tokenizer", prepped / "tokenizer.model",
                   "--no-progress", "--shard-tokens", "20000", "--num-proc", "2"], capsys)
    assert code == 0
    a, b = S.load_manifest(prepped), S.load_manifest(reused)
    assert b["tokenizer"]["sha256"] == a["tokenizer"]["sha256"] and b["tokenizer"]["type"] == "given"
    # same tokenizer, same inputs, same seed: identical shards (deterministic split and order)
    assert [s["sha256"] for s in b["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in a["splits"]["train"]["shards"]]


def test_tokenizer_training_deterministic(prepped, corpus, tmp_path):
    out = tmp_path / "again"
    assert P.main(["--input", str(corpus), "--output", str(out), "--vocab-size", str(VOCAB), "--num-proc", "2",
                   "--shard-tokens", "20000", "--no-progress"]) == 0
    assert S.load_manifest(out)["tokenizer"]["sha256"] == S.load_manifest(prepped)["tokenizer"]["sha256"]
    assert S.load_manifest(out)["splits"] == S.load_manifest(prepped)["splits"]


def test_jsonl_and_parquet_inputs(prepped, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs[:10])))
    pq.write_table(pa.table({"content": docs[10:], "n": list(range(10))}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    code, err = run(["--input", tmp_path / "a.jsonl", tmp_path / "b.parquet", "--output", out, "--text-field",
                     "content", "--tokenizer", prepped / "tokenizer.model", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(decoded_documents(out)) == sorted(docs)
    code, err = run(["--input", tmp_path / "a.jsonl", "--output", tmp_path / "out2", "--text-field", "body",
                     "--tokenizer", prepped / "tokenizer.model", "--no-progress"], capsys)
    assert code == 2 and "a.jsonl: no field 'body'" in err and "content" in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_non_utf8_file_skip_counted_or_fail(prepped, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"ok{i}.py").write_text(f"x = {i}\nprint('hello {i}')\n")
    (src / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    out = tmp_path / "out"
    code, err = run(["--input", src, "--output", out, "--tokenizer", prepped / "tokenizer.model", "--no-progress"],
                    capsys)
    assert code == 0
    assert "skipped 1 non-UTF-8 file(s)" in err and "latin1.py" in err
    m = S.load_manifest(out)
    assert m["num_documents"] == 3 and m["source"]["skipped_files"] == [str(src / "latin1.py")]
    code, err = run(["--input", src, "--output", tmp_path / "out2", "--tokenizer", prepped / "tokenizer.model",
                     "--on-bad-file", "fail", "--no-progress"], capsys)
    assert code == 2 and err.startswith("error: ") and "latin1.py: not valid UTF-8" in err
    assert not (tmp_path / "out2").exists()


def test_empty_corpus_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("")
    (src / "b.txt").write_text("")
    code, err = run(["--input", src, "--output", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2 and "error: empty corpus" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary leftovers
    (src / "c.bin").write_text("not matched")
    code, err = run(["--input", tmp_path / "nothing_here", "--output", tmp_path / "out"], capsys)
    assert code == 2 and "nothing_here: no such file or folder" in err


def test_unreadable_file_named(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("a = 1\n")
    (src / "secret.py").write_text("b = 2\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, err = run(["--input", src, "--output", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2 and err.strip() == f"error: {src / 'secret.py'}: cannot read: Permission denied"


def test_verify_ok_and_names_damaged_shard(prepped, tmp_path, capsys):
    code, _ = run(["--verify", prepped], capsys)
    assert code == 0
    copy = tmp_path / "copy"
    shutil.copytree(prepped, copy)
    shard = copy / S.load_manifest(copy)["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))
    code, err = run(["--verify", copy], capsys)
    assert code == 2 and f"{shard}: sha256 checksum mismatch" in err
    assert run(["--verify", copy, "--quick"], capsys)[0] == 0  # sizes and counts still fine
    shard.write_bytes(bytes(data[:-2]))
    code, err = run(["--verify", copy, "--quick"], capsys)
    assert code == 2 and f"{shard}: truncated" in err
    (copy / "manifest.json").unlink()
    code, err = run(["--verify", copy], capsys)
    assert code == 2 and "not a finished mgt prep output" in err


def test_refuses_overwrite_unless_asked(prepped, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepped, out)
    args = ["--input", corpus, "--output", out, "--tokenizer", prepped / "tokenizer.model", "--no-progress",
            "--valid-fraction", "0.1"]
    code, err = run(args, capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert S.load_manifest(out)["valid_fraction"] == 0.01
    code, _ = run(args + ["--overwrite"], capsys)
    assert code == 0 and S.load_manifest(out)["valid_fraction"] == 0.1
    other = tmp_path / "notours"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    code, err = run(["--input", corpus, "--output", other, "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "not an mgt prep output" in err and (other / "precious.txt").exists()


def test_interrupted_prep_leaves_nothing_finished(prepped, corpus, tmp_path, monkeypatch, capsys):
    calls = []
    real_close = S.SplitWriter._close

    def failing_close(self):
        real_close(self)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(S.SplitWriter, "_close", failing_close)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        P.main(["--input", str(corpus), "--output", str(out), "--tokenizer", str(prepped / "tokenizer.model"),
                "--shard-tokens", "20000", "--no-progress"])
    assert len(calls) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not list(tmp_path.rglob("manifest.json"))


def test_help_and_usage_errors(capsys):
    assert P.main(["--help"]) == 0
    assert "--vocab-size" in capsys.readouterr().out
    code, err = run(["--output", "x"], capsys)
    assert code == 2 and err.startswith("error: --input and --output are required")
    code, err = run(["--input", "a", "--output", "b", "--valid-fraction", "1.5"], capsys)
    assert code == 2 and "--valid-fraction" in err
    code, err = run(["--bogus"], capsys)
    assert code == 2 and err.startswith("error: unrecognized arguments: --bogus") and err.count("\n") == 1


def test_split_documents_deterministic():
    a = P.split_documents(1000, 0.01, 3)
    assert a.sum() == 10 and np.array_equal(a, P.split_documents(1000, 0.01, 3))
    assert not np.array_equal(a, P.split_documents(1000, 0.01, 4))
    assert P.split_documents(3, 0.01, 0).sum() == 1 and P.split_documents(5, 0.0, 0).sum() == 0
    with pytest.raises(S.DataError, match="only 1 document"):
        P.split_documents(1, 0.01, 0)


def test_glob_input_and_max_files(prepped, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "__pycache__").mkdir(parents=True)
    for i in range(4):
        (src / f"m{i}.py").write_text(f"VALUE = {i}\n")
    (src / "__pycache__" / "cached.py").write_text("skipped = True\n")  # excluded folder
    out = tmp_path / "out"
    code, err = run(["--input", str(src / "m*.py"), "--output", out, "--max-files", 3, "--tokenizer",
                     prepped / "tokenizer.model", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(decoded_documents(out)) == [f"VALUE = {i}\n" for i in range(3)]
    out2 = tmp_path / "out2"
    assert run(["--input", src, "--output", out2, "--tokenizer", prepped / "tokenizer.model", "--no-progress"],
               capsys)[0] == 0
    assert S.load_manifest(out2)["num_documents"] == 4


# Texts that trip naive CSV handling: commas, quotes, newlines (LF and CRLF) inside the field, cells that
# pandas would read as missing ("NA", "null") or as numbers, leading/trailing spaces, non-ASCII.
TABLE_DOCS = ['def f(a, b):\n    return "a, b"\n', 'x = 1,2,3\n\n# "quoted", with, commas\n', "NA", "null",
              "12345", "  padded, with spaces  ", "line one\r\nline two\r\n", "€ ünïcödé, 你好\n\n\n",
              "\tindented\ttabs\n", 'say "hi"']


def split_tokens(out: Path) -> dict[str, np.ndarray]:
    ss = open_shards(out)
    return {s: np.concatenate([ss.split(s).read(a, b) for a, b in ss.split(s).documents()])
            for s in ("train", "valid")}


def prep_with(prepped: Path, inputs, out: Path, capsys, *extra) -> tuple[int, str]:
    return run(["--input", *inputs, "--output", out, "--tokenizer", prepped / "tokenizer.model", "--no-progress",
                "--valid-fraction", "0.2", *extra], capsys)


@pytest.mark.slow
def test_csv_and_tsv_rows_are_documents(prepped, tmp_path, capsys):
    import csv

    rows = [{"id": i, "text": d, "score": 0.5 * i} for i, d in enumerate(TABLE_DOCS)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, sep in (("docs.csv", ","), ("docs.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["id", "text", "score"], delimiter=sep)
            w.writeheader()
            w.writerows(rows)
    assert '"def f(a, b):\n    return ""a, b""\n"' in (tmp_path / "docs.csv").read_text()  # really quoted
    code, err = prep_with(prepped, [tmp_path / "docs.jsonl"], tmp_path / "j", capsys)
    assert code == 0, err
    want = split_tokens(tmp_path / "j")
    for name in ("docs.csv", "docs.tsv"):
        code, err = prep_with(prepped, [tmp_path / name], tmp_path / f"out-{name}", capsys)
        assert code == 0, err
        assert sorted(decoded_documents(tmp_path / f"out-{name}")) == sorted(TABLE_DOCS)
        got = split_tokens(tmp_path / f"out-{name}")
        for split in ("train", "valid"):
            assert np.array_equal(got[split], want[split]), (name, split)
        assert S.load_manifest(tmp_path / f"out-{name}")["num_documents"] == len(TABLE_DOCS)
    code, err = prep_with(prepped, [tmp_path / "docs.csv"], tmp_path / "bad", capsys, "--text-field", "body")
    assert code == 2 and err == f"error: {tmp_path / 'docs.csv'}: no field 'body' (fields: id, text, score); " \
                                "pass --text-field\n"
    assert not (tmp_path / "bad").exists()
    (tmp_path / "broken.csv").write_text('id,text\n1,"no closing quote\n2,x\n')
    code, err = prep_with(prepped, [tmp_path / "broken.csv"], tmp_path / "bad", capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'broken.csv'}: cannot load as csv: ") \
        and "EOF inside string" in err and err.count("\n") == 1  # the parser's reason, not datasets' wrapper


@pytest.mark.slow
def test_save_to_disk_folders(prepped, tmp_path, capsys):
    import datasets

    ids = list(range(len(TABLE_DOCS)))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in TABLE_DOCS),
                                         encoding="utf-8")
    assert prep_with(prepped, [tmp_path / "docs.jsonl"], tmp_path / "j", capsys, "--text-field", "content")[0] == 0
    want = split_tokens(tmp_path / "j")

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"id": ids, "content": TABLE_DOCS}).save_to_disk(str(saved))
    held_out = [f"held out {i}\n" for i in range(3)]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"content": held_out}),
                          "train": datasets.Dataset.from_dict({"content": TABLE_DOCS})}).save_to_disk(str(dd))
    no_train = tmp_path / "no_train"
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"content": TABLE_DOCS[:4]}),
                          "b": datasets.Dataset.from_dict({"content": TABLE_DOCS[4:]})}).save_to_disk(str(no_train))
    def listing():
        return {f: sorted(str(p.relative_to(f)) for p in f.rglob("*")) for f in (saved, dd, no_train)}

    before = listing()

    for folder in (saved, dd, no_train):
        out = tmp_path / f"out-{folder.name}"
        code, err = prep_with(prepped, [folder], out, capsys, "--text-field", "content")
        assert code == 0, err
        got = split_tokens(out)
        for split in ("train", "valid"):  # the same rows in the same order: the same tokens
            assert np.array_equal(got[split], want[split]), (folder.name, split)
        assert ("using split 'train' of the saved splits test, train" in err) == (folder is dd)
    # the input folders are read only: no cache files written next to the user's data
    assert listing() == before
    code, err = prep_with(prepped, [saved], tmp_path / "bad", capsys)
    assert code == 2 and err == f"error: {saved}: no field 'text' (fields: id, content); pass --text-field\n"
