# Unit tests of the resumable, rank-aware loader: sample contents across shards, coverage of an
# epoch by all ranks, exact resumption (also onto a different number of ranks), prefetch, blending
# weights, synthetic copy-task data, validation batches and errors for damaged or mismatched shards.
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mgt_scale.config import BlendSource, DataConfig
from mgt_scale.data import (
    DataError,
    build_blending_indices,
    build_train_loader,
    build_valid_batches,
    copy_task_mask,
    dataset_vocab_size,
)
from mgt_scale.data import shards as S

EOS = 1
SEQ = 8
G = 12  # global batch: divisible by 1, 2, 3, 4


def make_shard_dir(path: Path, *, num_tokens: int, vocab: int = 1000, lo: int = 2, doc_len: int = 50,
                   shard_tokens: int = 300, valid_tokens: int = 200, seed: int = 0) -> np.ndarray:
    """A prep-format output written with the real SplitWriter (random tokens in [lo, lo+900), EOS at
    document ends, several shards) and a stand-in tokenizer file. Returns the train token stream."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tok_file = path / S.TOKENIZER_FILE
    tok_file.write_bytes(b"fake tokenizer " + str(vocab).encode())
    dtype = S.token_dtype(vocab)
    splits, streams = {}, {}
    for split, n in (("train", num_tokens), ("valid", valid_tokens)):
        toks = rng.integers(lo, min(lo + 900, vocab), n).astype(np.int64)
        lengths = np.full(n // doc_len, doc_len)
        if n % doc_len:
            lengths = np.append(lengths, n % doc_len)
        toks[np.cumsum(lengths) - 1] = EOS
        w = S.SplitWriter(path, split, dtype, shard_tokens)
        w.add(toks, lengths)
        splits[split] = w.finish()
        streams[split] = toks
    S.write_manifest(path, {
        "format": S.FORMAT_NAME, "format_version": S.FORMAT_VERSION, "vocab_size": vocab,
        "dtype": S.dtype_name(dtype), "eos_id": EOS,
        "tokenizer": {"file": S.TOKENIZER_FILE, "sha256": S.sha256_file(tok_file), "type": "bpe"},
        "splits": splits,
    })
    return streams["train"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "out"
    n_samples = 120  # 10 steps of G per epoch
    stream = make_shard_dir(d, num_tokens=n_samples * SEQ + 1)
    return d, stream, n_samples


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), seed=kw.pop("seed", 7), prefetch=kw.pop("prefetch", 0), **kw)


def collect(loader, steps):
    out = []
    for _ in range(steps):
        out.append([(x.clone(), y.clone()) for x, y in loader.next_step()])
    return out


def global_batches(path, *, dp_size, micro, steps, consumed=0, state=None):
    """Per step, the global batch: every rank's micro batches concatenated in rank order."""
    per_rank = []
    for r in range(dp_size):
        ld = build_train_loader(cfg_for(path), seq_len=SEQ, global_batch=G, micro_batch=micro, dp_rank=r,
                                dp_size=dp_size, vocab_size=1000, consumed_samples=consumed)
        if state is not None:
            ld.load_state_dict(state)
        per_rank.append(collect(ld, steps))
        ld.close()
    return [torch.cat([x for r in range(dp_size) for x, _ in per_rank[r][s]]) for s in range(steps)], \
        [torch.cat([y for r in range(dp_size) for _, y in per_rank[r][s]]) for s in range(steps)]


def test_samples_are_contiguous_slices_spanning_shards(shard_dir):
    d, stream, n = shard_dir
    assert len(S.load_manifest(d)["splits"]["train"]["shards"]) >= 3  # samples must cross shard bounds
    ld = build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=G, dp_rank=0, dp_size=1,
                            vocab_size=1000)
    (x, y), = ld.next_step()
    assert x.dtype == torch.long and x.shape == (G, SEQ)
    pos = np.arange(G)
    idx = ld.sampler.locate(pos)[1]
    for row, i in enumerate(idx):
        sample = stream[i * SEQ: i * SEQ + SEQ + 1]
        assert x[row].tolist() == sample[:-1].tolist() and y[row].tolist() == sample[1:].tolist()


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_ranks_cover_epoch_exactly_once(shard_dir, dp_size):
    d, stream, n = shard_dir
    expected = {tuple(stream[i * SEQ: i * SEQ + SEQ].tolist()) for i in range(n)}
    assert len(expected) == n
    seen = []
    for r in range(dp_size):
        ld = build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=G // dp_size // 2 or 1,
                                dp_rank=r, dp_size=dp_size, vocab_size=1000)
        for _ in range(n // G):
            for x, _ in ld.next_step():
                seen += [tuple(row) for row in x.tolist()]
        ld.close()
    assert len(seen) == n and set(seen) == expected


def test_epochs_are_different_permutations(shard_dir):
    d, _, n = shard_dir
    ld = build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=G, dp_rank=0, dp_size=1,
                            vocab_size=1000)
    src, idx = ld.sampler.locate(np.arange(2 * n))
    assert sorted(idx[:n]) == list(range(n)) and sorted(idx[n:]) == list(range(n))
    assert not np.array_equal(idx[:n], idx[n:])
    other = build_train_loader(cfg_for(d, seed=8), seq_len=SEQ, global_batch=G, micro_batch=G, dp_rank=0,
                               dp_size=1, vocab_size=1000)
    assert not np.array_equal(other.sampler.locate(np.arange(n))[1], idx[:n])


def test_resume_matches_uninterrupted_bit_for_bit(shard_dir):
    d, _, _ = shard_dir
    steps, k = 15, 7  # crosses the epoch boundary at step 10
    for r in range(2):
        full = build_train_loader(cfg_for(d, prefetch=2), seq_len=SEQ, global_batch=G, micro_batch=3,
                                  dp_rank=r, dp_size=2, vocab_size=1000)
        ref = collect(full, steps)
        full.close()
        a = build_train_loader(cfg_for(d, prefetch=2), seq_len=SEQ, global_batch=G, micro_batch=3, dp_rank=r,
                               dp_size=2, vocab_size=1000)
        first = collect(a, k)
        state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON round trip (checkpoint)
        a.close()
        assert state["consumed_samples"] == k * G
        b = build_train_loader(cfg_for(d, prefetch=2), seq_len=SEQ, global_batch=G, micro_batch=3, dp_rank=r,
                               dp_size=2, vocab_size=1000)
        b.load_state_dict(state)
        rest = collect(b, steps - k)
        b.close()
        for got, want in zip(first + rest, ref):
            assert len(got) == len(want) == 2
            for (x1, y1), (x2, y2) in zip(got, want):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("new_dp,new_micro", [(1, 4), (4, 1), (3, 2)])
def test_resume_on_different_dp_size_continues_global_batch(shard_dir, new_dp, new_micro):
    d, _, _ = shard_dir
    ref_x, ref_y = global_batches(d, dp_size=2, micro=2, steps=12)
    ld = build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=2, dp_rank=1, dp_size=2,
                            vocab_size=1000)
    collect(ld, 5)
    state = ld.state_dict()
    got_x, got_y = global_batches(d, dp_size=new_dp, micro=new_micro, steps=7, state=state)
    for s in range(7):
        assert torch.equal(got_x[s], ref_x[5 + s]) and torch.equal(got_y[s], ref_y[5 + s])


def test_prefetch_is_deterministic_and_closes(shard_dir):
    d, _, _ = shard_dir
    runs = []
    for prefetch in (0, 1, 4):
        ld = build_train_loader(cfg_for(d, prefetch=prefetch), seq_len=SEQ, global_batch=G, micro_batch=2,
                                dp_rank=1, dp_size=3, vocab_size=1000, consumed_samples=5 * G)
        runs.append(torch.cat([x for step in collect(ld, 6) for x, _ in step]))
        thread = ld._thread
        ld.close()
        assert thread is None if prefetch == 0 else not thread.is_alive()
        with pytest.raises(RuntimeError, match="closed"):
            ld.next_step()
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_batch_arithmetic_errors(shard_dir):
    d, _, _ = shard_dir
    with pytest.raises(ValueError, match="multiple of dp_size x micro_batch"):
        build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=5, dp_rank=0, dp_size=1,
                           vocab_size=1000)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(cfg_for(d), seq_len=SEQ, global_batch=G, micro_batch=1, dp_rank=2, dp_size=2,
                           vocab_size=1000)


def test_blend_matches_weights_within_one_percent(tmp_path):
    weights = [5.0, 3.0, 2.0]
    blend = []
    for k in range(3):
        make_shard_dir(tmp_path / f"s{k}", num_tokens=(40 + 30 * k) * SEQ + 1, vocab=4000, lo=2 + 1000 * k,
                       seed=k)
        blend.append(BlendSource(path=str(tmp_path / f"s{k}"), weight=weights[k]))
    cfg = DataConfig(blend=tuple(blend), seed=3, prefetch=0)
    assert dataset_vocab_size(cfg) == 4000
    ld = build_train_loader(cfg, seq_len=SEQ, global_batch=48, micro_batch=24, dp_rank=0, dp_size=1,
                            vocab_size=4000)
    counts = np.zeros(3)
    for _ in range(150):  # 7200 samples
        for x, _ in ld.next_step():
            counts += np.bincount((x[:, 0].numpy() - 2) // 1000, minlength=3)
    frac = counts / counts.sum()
    assert np.all(np.abs(frac - np.array(weights) / 10) < 0.01), frac
    # each source is walked in its own seeded order: its first epoch is a permutation of its samples
    src, idx = ld.sampler.locate(np.arange(4000))
    for k in range(3):
        n_k = ld.sampler.sources[k].num_samples
        first_epoch = idx[src == k][:n_k]
        assert sorted(first_epoch.tolist()) == list(range(n_k))
    ld.close()


def test_blending_indices_greedy_exact():
    src, local = build_blending_indices((0.7, 0.2, 0.1), 1000)
    counts = np.bincount(src, minlength=3)
    assert np.all(np.abs(counts - np.array([700, 200, 100])) <= 1)
    for k in range(3):
        assert local[src == k].tolist() == list(range(counts[k]))


def test_blend_rejects_path_and_blend_and_mixed_tokenizers(tmp_path):
    make_shard_dir(tmp_path / "a", num_tokens=200, vocab=1000)
    make_shard_dir(tmp_path / "b", num_tokens=200, vocab=999)  # different stand-in tokenizer file
    both = DataConfig(path=str(tmp_path / "a"), blend=(BlendSource(str(tmp_path / "a")),))
    with pytest.raises(DataError, match="both set"):
        build_train_loader(both, seq_len=SEQ, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1, vocab_size=1000)
    mixed = DataConfig(blend=(BlendSource(str(tmp_path / "a")), BlendSource(str(tmp_path / "b"))))
    with pytest.raises(DataError, match=r"b/manifest.json.*another tokenizer"):
        build_train_loader(mixed, seq_len=SEQ, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1,
                           vocab_size=1000)


# ----------------------------------------------------------------------------------------------
# Damaged and mismatched data


@pytest.fixture
def fresh_dir(tmp_path):
    d = tmp_path / "out"
    make_shard_dir(d, num_tokens=50 * SEQ + 1)
    return d


def open_loader(d, **kw):
    return build_train_loader(cfg_for(d, **kw), seq_len=SEQ, global_batch=4, micro_batch=4, dp_rank=0,
                              dp_size=1, vocab_size=1000)


def test_checksum_mismatch_names_shard(fresh_dir):
    shard = fresh_dir / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00001\.bin: sha256 checksum mismatch"):
        open_loader(fresh_dir)
    open_loader(fresh_dir, verify_checksums=False).close()  # same size and counts: the cheap check passes


def test_truncated_shard_names_file_even_without_checksums(fresh_dir):
    shard = fresh_dir / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"train-00000\.bin: truncated"):
        open_loader(fresh_dir, verify_checksums=False)


def test_manifest_from_another_tokenizer(fresh_dir):
    (fresh_dir / S.TOKENIZER_FILE).write_bytes(b"some other tokenizer")
    with pytest.raises(DataError, match=r"manifest\.json: written with another tokenizer.*tokenizer\.model"):
        open_loader(fresh_dir, verify_checksums=False)


def test_missing_manifest_is_not_finished(fresh_dir):
    (fresh_dir / S.MANIFEST).unlink()
    with pytest.raises(DataError, match=r"manifest\.json: missing.*not a finished mgt prep output"):
        open_loader(fresh_dir)
    with pytest.raises(DataError, match="not a finished"):
        dataset_vocab_size(cfg_for(fresh_dir))


def test_data_vocab_larger_than_model(fresh_dir):
    with pytest.raises(DataError, match=r"manifest\.json: data vocab_size 1000 exceeds the model's vocab_size 500"):
        build_train_loader(cfg_for(fresh_dir), seq_len=SEQ, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1,
                           vocab_size=500)


def test_too_few_tokens_for_one_sample(tmp_path):
    make_shard_dir(tmp_path / "tiny", num_tokens=SEQ, valid_tokens=3)
    with pytest.raises(DataError, match="too few for one sample"):
        open_loader(tmp_path / "tiny")
    # a validation split shorter than one sample still gives (repeated-token) batches
    (x, y), = build_valid_batches(cfg_for(tmp_path / "tiny"), SEQ, 2, 1, 1000)
    assert x.shape == (2, SEQ)


# ----------------------------------------------------------------------------------------------
# Validation batches and synthetic data


def test_valid_batches_fixed_and_from_valid_split(shard_dir):
    d, stream, _ = shard_dir
    a = build_valid_batches(cfg_for(d), SEQ, 4, 3, 1000)
    b = build_valid_batches(cfg_for(d, seed=99), SEQ, 4, 3, 1000)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    valid = S.ShardSet(d).split("valid").read(0, SEQ + 1)
    assert a[0][0][0].tolist() == valid[:-1].tolist() and a[0][1][0].tolist() == valid[1:].tolist()


def test_copy_task_second_half_equals_first():
    cfg = DataConfig(synthetic="copy", seed=5, prefetch=2)
    for seq_len in (16, 17):
        ld = build_train_loader(cfg, seq_len=seq_len, global_batch=8, micro_batch=4, dp_rank=0, dp_size=1,
                                vocab_size=50)
        steps = collect(ld, 3)
        ld.close()
        n = seq_len // 2
        for step in steps:
            for x, y in step:
                full = torch.cat([x, y[:, -1:]], dim=1)  # the seq_len + 1 sample
                assert torch.equal(full[:, :n], full[:, n + 1:2 * n + 1])
                assert (full[:, n] == 49).all() and (full[:, :n] < 49).all()
                mask = copy_task_mask(y)
                assert mask.sum(dim=1).tolist() == [n] * x.shape[0]
                assert torch.equal(y[mask].view(-1, n), full[:, :n])  # masked targets = the copied tokens
        rows = torch.cat([x for step in steps for x, _ in step])
        assert len({tuple(r) for r in rows.tolist()}) == rows.shape[0]  # different samples
    again = build_train_loader(cfg, seq_len=17, global_batch=8, micro_batch=4, dp_rank=0, dp_size=1, vocab_size=50)
    assert torch.equal(again.next_step()[0][0], steps[0][0][0])
    valid = build_valid_batches(cfg, 17, 4, 1, 50)
    assert not torch.equal(valid[0][0], steps[0][0][0])  # separate seed stream
    assert dataset_vocab_size(cfg) is None


def test_random_synthetic_in_vocab_and_rank_independent():
    cfg = DataConfig(synthetic="random", seed=1, prefetch=0)
    whole = build_train_loader(cfg, seq_len=32, global_batch=8, micro_batch=8, dp_rank=0, dp_size=1,
                               vocab_size=100).next_step()[0][0]
    halves = [build_train_loader(cfg, seq_len=32, global_batch=8, micro_batch=4, dp_rank=r, dp_size=2,
                                 vocab_size=100).next_step()[0][0] for r in range(2)]
    assert torch.equal(whole, torch.cat(halves))
    assert whole.min() >= 0 and whole.max() < 100 and len(whole.unique()) > 50


def test_shard_files_hash_matches_manifest(shard_dir):
    d, _, _ = shard_dir
    m = S.load_manifest(d)
    for s in m["splits"]["train"]["shards"]:
        assert hashlib.sha256((d / s["file"]).read_bytes()).hexdigest() == s["sha256"]
