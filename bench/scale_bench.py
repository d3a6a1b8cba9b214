# Scaling of the start, save and resume paths with the world size (issue #30): for world sizes 1, 2, 4
# and 8 (gloo ranks on this CPU, spawned in-process), bytes hashed / read and seconds per rank at start
# (data shards opened three times: train loader, validation batches, monitor probe), at save and at
# resume (CheckpointManager.find_resume + reading the rank's own shard), and the seconds the step loop
# is blocked per save, synchronous vs checkpoint.async_save. Weak scaling: every rank owns a shard of
# the same size (a stand-in engine writes it through a DeepSpeed-like `checkpoint_engine.save`), the
# data set is fixed. Run it against another checkout with PYTHONPATH=<that checkout> to compare.
"""Usage: python bench/scale_bench.py [--worlds 1 2 4 8] [--shard-mb 4] [--data-mb 8] [--label new]

Prints a markdown table (max over ranks of each figure) and writes --json if given."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_REAL_SHA = hashlib.sha256
HASHED = [0]


class _CountingSha:
    def __init__(self, *a):
        self._h = _REAL_SHA(*a)

    def update(self, b):
        HASHED[0] += len(b)
        self._h.update(b)

    def hexdigest(self):
        return self._h.hexdigest()


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


class _Writer:
    def save(self, state_dict, path):
        import torch
        torch.save(state_dict, path)


class StandInEngine:
    """A rank's share of a sharded model: one tensor of `shard_mb` MB, saved like DeepSpeed saves."""

    def __init__(self, rank: int, shard_mb: float):
        import torch
        self.rank = rank
        self.module = torch.nn.Linear(2, 2)
        self.engine = type("DS", (), {})()
        self.engine.checkpoint_engine = _Writer()
        self.weights = torch.randn(int(shard_mb * 2**20 / 4))

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.engine.checkpoint_engine.save({"w": self.weights}, str(d / f"zero_pp_rank_{self.rank}_optim_states.pt"))

    def load_own(self, tag_dir: Path) -> None:
        import torch
        self.weights = torch.load(tag_dir / f"zero_pp_rank_{self.rank}_optim_states.pt", weights_only=True)["w"]


def make_data(out: Path, data_mb: float) -> Path:
    """A `mgt prep` output of random tokens (4 train shards, 1 valid shard) without a tokenizer run."""
    import numpy as np

    from mgt_scale.data import shards
    out.mkdir(parents=True, exist_ok=True)
    (out / shards.TOKENIZER_FILE).write_bytes(os.urandom(1024))
    rng = np.random.default_rng(0)
    n = int(data_mb * 2**20 / 2)
    splits = {}
    for split, tokens in (("train", n), ("valid", max(n // 16, 4096))):
        w = shards.SplitWriter(out, split, np.dtype(np.uint16), shard_tokens=max(tokens // 4, 1024))
        docs = rng.integers(1, 500, size=tokens, dtype=np.uint16)
        lengths = np.full(tokens // 256, 256)
        docs[np.cumsum(lengths) - 1] = 0
        w.add(docs[: int(lengths.sum())], lengths)
        splits[split] = w.finish()
    shards.write_manifest(out, {"format": shards.FORMAT_NAME, "format_version": shards.FORMAT_VERSION,
                                "vocab_size": 512, "dtype": "uint16", "eos_id": 0,
                                "tokenizer": {"file": shards.TOKENIZER_FILE,
                                              "sha256": shards.sha256_file(out / shards.TOKENIZER_FILE)},
                                "splits": splits})
    return out


def _phase(fn) -> dict:
    HASHED[0] = 0
    r0, t0 = _rchar(), time.perf_counter()
    extra = fn() or {}
    return {"s": time.perf_counter() - t0, "hashed": HASHED[0], "read": _rchar() - r0, **extra}


def _worker(rank: int, world: int, port: int, root: str, data: str, shard_mb: float, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    hashlib.sha256 = _CountingSha
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mgt_scale.config import ConfigError, load_config
    from mgt_scale.data import open_shards
    from mgt_scale.checkpoint.manager import CheckpointManager
    res = {}

    def start():
        try:
            from mgt_scale.data import verify_data_once
        except (ImportError, AttributeError):
            verify_data_once = None
        if verify_data_once is not None:
            verify_data_once(load_config(None, [f"data.path={data}"]).data)
        for _ in range(3):  # train loader, validation batches, monitor probe
            open_shards(data)
    dist.barrier()
    res["start"] = _phase(start)
    for mode in ("sync", "async"):
        try:
            cfg = load_config(None, ["data.synthetic=copy", "checkpoint.keep_last=2"]
                              + (["checkpoint.async_save=true"] if mode == "async" else []))
        except ConfigError:
            continue  # a checkout without asynchronous saves
        run = Path(root) / mode
        m = CheckpointManager(str(run), cfg, rank, world)
        eng = StandInEngine(rank, shard_mb)
        m.save(eng, 1, {})  # warm-up
        if hasattr(m, "wait"):
            m.wait()
        dist.barrier()

        def save():
            t = time.perf_counter()
            m.save(eng, 2, {})
            blocked = time.perf_counter() - t
            if hasattr(m, "wait"):
                m.wait()
            return {"blocked": blocked}
        res[f"save_{mode}"] = _phase(save)
        dist.barrier()
        if mode == "sync":
            fresh = CheckpointManager(str(run), cfg, rank, world)

            def resume():
                tag = fresh.find_resume(log=lambda *a: None)
                eng.load_own(tag)
            res["resume"] = _phase(resume)
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def run_world(world: int, shard_mb: float, data: Path, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    from mgt_scale.cluster.dist_env import free_port
    root = tmp / f"w{world}"
    out = root / "out"
    out.mkdir(parents=True)
    mp.start_processes(_worker, args=(world, free_port(), str(root), str(data), shard_mb, str(out)),
                       nprocs=world, start_method="spawn", join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shard-mb", type=float, default=4.0, help="checkpoint bytes per rank (MB)")
    ap.add_argument("--data-mb", type=float, default=8.0, help="training data size (MB)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = make_data(tmp / "data", a.data_mb)
        for w in a.worlds:
            rows[w] = run_world(w, a.shard_mb, data, tmp)
    mb = 2**20

    def mx(ranks, phase, key):
        vals = [r[phase][key] for r in ranks if phase in r]
        return max(vals) if vals else None

    def f(v, scale=1.0, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v / scale)
    print(f"\n{a.label} (max over ranks; MB hashed / MB read per rank; seconds per rank; "
          f"{a.shard_mb:g} MB checkpoint per rank, {a.data_mb:g} MB data)\n")
    print("| world | start MB hashed | start MB read | start s | save MB hashed | save s | resume MB hashed "
          "| resume MB read | resume s | blocked per save, sync s | blocked per save, async s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, ranks in rows.items():
        print(f"| {w} | {f(mx(ranks, 'start', 'hashed'), mb, '{:.1f}')} | {f(mx(ranks, 'start', 'read'), mb, '{:.1f}')} "
              f"| {f(mx(ranks, 'start', 's'))} | {f(mx(ranks, 'save_sync', 'hashed'), mb, '{:.1f}')} "
              f"| {f(mx(ranks, 'save_sync', 's'))} | {f(mx(ranks, 'resume', 'hashed'), mb, '{:.1f}')} "
              f"| {f(mx(ranks, 'resume', 'read'), mb, '{:.1f}')} | {f(mx(ranks, 'resume', 's'))} "
              f"| {f(mx(ranks, 'save_sync', 'blocked'))} | {f(mx(ranks, 'save_async', 'blocked'))} |")
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1])) if "mgt_scale" not in sys.modules else None
    sys.exit(main())
