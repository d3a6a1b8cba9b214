#!/usr/bin/env python
# The GPU pilot of issue #33, for one call on a lent H100/H200 (bench/gpu_pilot.sh is the command): make
# the data (the Python standard library of that machine, tokenized here), run the init factorial at
# d=256 (scripts/init_factorial.py's build/measure, on the GPU), time 20 training steps of the MGT cell,
# size the rest to the budget, then train pre-LN, post-LN, DeepNorm and MGT at depth 100, d=256, bf16
# (~600 steps each, fewer if the budget says so), probing rank / rho every 50 steps (float64) and scoring
# the valid loss against the unigram loss (scripts/unigram_loss.py). Everything it writes to --out fits
# the device tool's 8 returned files: init_factorial.csv, train_<kind>.csv (4), summary.md, timings.json
# and the log the shell script tees (pilot.log). `--tiny` (d=32, depth 4, 5 steps, fp32) runs it on a CPU.
"""Why plain training in-process and not `mgt train`: the device machine has no DeepSpeed (nor `datasets`,
which `mgt prep` needs; KINDS.md's package list), nothing can be fetched there, and one GPU needs no
ZeRO: a 100-block d=256 model (~80 M parameters) with AdamW states is ~1.3 GB. The loop is the trainer's
arithmetic without the engine: the same model (build_model, same seed), AdamW groups (build_optimizer),
lr schedule (lr_at), gradient clipping (train.grad_clip) and loss (lm_loss); bf16 is autocast over fp32
weights (DeepSpeed's bf16 keeps bf16 weights with fp32 masters: close, not identical). The data is
written in `mgt prep`'s shard format by the repository's own tokenizer and shard writer, without
`datasets` (the loader then checks it as usual)."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import init_factorial  # noqa: E402  (scripts/)
from mgt_scale.logs import get_logger  # noqa: E402

log = get_logger("bench.gpu_pilot")
KINDS = ("preln", "postln", "deepnorm", "mgt")
SIZES = {
    # model, training cells, probes, factorial, data. 16 x 128 tokens per step, lr 1e-3, 8 x 16 x 128 valid
    # tokens and 128 x 128 probe tokens as hyp_main; factorial cells in order of seed, then depth (100, the
    # pilot's, first); up to 16 MB of stdlib (Python 3.11: all 796 non-test files, 4.3 M tokens, 30 k
    # valid; 8 MB gave 15 k valid tokens, fewer than the 16 k evaluated)
    "full": dict(d_model=256, num_heads=4, d_ff=1024, depth=100, steps=600, batch=16, seq=128, vocab=2048,
                 precision="bf16", lr=1e-3, probe_every=50, probe_batch=128, probe_seq=128, valid_batches=8,
                 fact_depths=[100, 12, 48, 200], fact_seeds=[0, 1, 2], fact_batch=32, fact_seq=128, prep_mb=16.0),
    "tiny": dict(d_model=32, num_heads=2, d_ff=64, depth=4, steps=5, batch=4, seq=32, vocab=512,
                 precision="fp32", lr=1e-3, probe_every=2, probe_batch=4, probe_seq=32, valid_batches=2,
                 fact_depths=[4], fact_seeds=[0], fact_batch=4, fact_seq=32, prep_mb=0.3),
}
TRAIN_FIELDS = ["step", "lr", "loss", "grad_norm", "elapsed_s", "valid_loss", "raw_last", "centred_last",
                "rho_last", "raw_min", "centred_min", "rho_min", "rho_min_layer"]


class Clock:
    """The budget: seconds left of --budget-s since the start."""

    def __init__(self, budget: float):
        self.t0, self.budget = time.monotonic(), budget

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.used()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------- data
def stdlib_files(max_mb: float) -> list[Path]:
    """The .py files of this interpreter's standard library (tests and site-packages left out), in path
    order, until `max_mb` megabytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in ("site-packages", "dist-packages", "test", "tests", "__pycache__") for part in rel[:-1]):
            continue
        size = p.stat().st_size
        if size == 0:
            continue
        out.append(p)
        total += size
        if total >= max_mb * 2**20:
            break
    return out


def make_data(out: Path, max_mb: float, vocab: int, threads: int, seed: int = 1234) -> dict:
    """Shards in `mgt prep`'s format (manifest, tokenizer.model, train/valid .bin + .idx.npy) from the
    stdlib: the same tokenizer training (sample_sentences, train_tokenizer: BPE), document split
    (split_documents, 1 % held out) and shard writer as run_prep, without its `datasets` pipeline."""
    from mgt_scale.data import shards
    from mgt_scale.data.prep import split_documents
    from mgt_scale.data.tokenizer import Tokenizer, sample_sentences, train_tokenizer
    if (out / shards.MANIFEST).is_file():
        return shards.load_manifest(out / shards.MANIFEST)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = stdlib_files(max_mb)
    texts = []
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            texts.append(t)
    sents = sample_sentences(lambda i: texts[i], len(texts), 100_000, seed)
    tok = train_tokenizer(sents, tmp / shards.TOKENIZER_FILE, vocab_size=vocab, model_type="bpe", seed=seed,
                          num_threads=threads)
    tok = Tokenizer(tmp / shards.TOKENIZER_FILE)
    ids = tok.encode_batch(texts, num_threads=threads)
    valid = split_documents(len(ids), 0.01, seed)
    dtype = shards.token_dtype(tok.vocab_size)
    splits = {}
    for split, sel in (("train", ~valid), ("valid", valid)):
        docs = [ids[i] + [tok.eos_id] for i in np.flatnonzero(sel)]
        w = shards.SplitWriter(tmp, split, dtype, 16 * 2**20)
        if docs:
            w.add(np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]), [len(d) for d in docs])
        splits[split] = w.finish()
    manifest = {
        "format": shards.FORMAT_NAME, "format_version": shards.FORMAT_VERSION, "vocab_size": tok.vocab_size,
        "dtype": shards.dtype_name(dtype), "eos_id": tok.eos_id,
        "tokenizer": {"file": shards.TOKENIZER_FILE, "sha256": tok.sha256, "type": "bpe"},
        "splits": splits, "num_documents": sum(s["num_documents"] for s in splits.values()),
        "num_tokens": sum(s["num_tokens"] for s in splits.values()), "seed": seed, "valid_fraction": 0.01,
        "shard_tokens": 16 * 2**20,
        "source": {"inputs": [str(Path(sysconfig.get_paths()["stdlib"]))], "num_files": len(texts),
                   "num_bytes": sum(len(t.encode()) for t in texts), "num_empty_documents_dropped": 0,
                   "skipped_files": [], "text_field": "text"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "tokenize_seconds": 0.0,
    }
    shards.write_manifest(tmp, manifest)
    os.replace(tmp, out)
    return manifest


def write_base(path: Path, data: Path, s: dict, steps: int) -> Path:
    """The run config every cell starts from (configs/experiments/base_lm.yaml's layout at the pilot's size)."""
    import yaml
    cfg = {
        "run": {"dir": str(path.parent / "runs"), "name": "gpu_pilot"},
        "model": {"num_layers": s["depth"], "d_model": s["d_model"], "num_heads": s["num_heads"], "d_ff": s["d_ff"],
                  "vocab_size": s["vocab"], "max_seq_len": max(s["seq"], s["probe_seq"], s["fact_seq"]),
                  "residual": "mgt"},
        "data": {"path": str(data), "seq_len": s["seq"], "valid_fraction_batches": s["valid_batches"], "prefetch": 2},
        "parallel": {"precision": s["precision"]},
        "train": {"max_steps": steps, "global_batch_size": s["batch"], "micro_batch_size": s["batch"],
                  "lr": s["lr"], "warmup_steps": max(1, steps // 20), "log_interval": 10},
        "monitor": {"interval": s["probe_every"], "probe_batch_size": s["probe_batch"],
                    "probe_seq_len": s["probe_seq"]},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def unigram(base: Path) -> dict:
    """scripts/unigram_loss.py's numbers for the base config (its JSON product, read from its stdout)."""
    import unigram_loss
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        unigram_loss.main([str(base)])
    return json.loads(buf.getvalue())


# ----------------------------------------------------------------------------------------- factorial
def factorial(base: Path, s: dict, dev: torch.device, out_csv: Path, budget: float) -> dict:
    """init_factorial's cells at the pilot's width, seed by seed (every depth of seed 0 first), built on the
    CPU (its draws), probed in float64 on `dev`; stops before a cell that would not fit in `budget` s."""
    from mgt_scale.config import load_config
    from mgt_scale.train.monitor_callback import probe_tokens
    cells = [(seed, depth, kind, init, alpha) for seed in s["fact_seeds"] for depth in s["fact_depths"]
             for kind in init_factorial.KINDS for init in init_factorial.INITS
             for alpha in ((0.0, 0.1) if kind in ("ddl", "mgt") else (None,))]
    cfg0 = load_config(base, [f"monitor.probe_batch_size={s['fact_batch']}", f"monitor.probe_seq_len={s['fact_seq']}"])
    t0, per_depth, done, tokens = time.monotonic(), {}, 0, None
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=init_factorial.FIELDS)
        w.writeheader()
        for seed, depth, kind, init, alpha in cells:
            known = per_depth.get(depth) or max((t * depth / d for d, t in per_depth.items()), default=0.0)
            if time.monotonic() - t0 + 1.2 * known > budget:
                log.info("factorial: stopped before %s L=%d seed %d (budget %.0f s)", kind, depth, seed, budget)
                break
            tic = time.monotonic()
            if tokens is None:  # the probe batch is the same for every cell
                tokens = probe_tokens(cfg0, cfg0.model.vocab_size).to(dev)
            cfg, model = init_factorial.build(str(base), kind, depth, seed, init, alpha, s["fact_batch"], s["fact_seq"])
            row = init_factorial.measure(cfg, model.to(dev), tokens)
            del model
            sec = time.monotonic() - tic
            per_depth[depth] = sec  # the latest: the first cell also paid the device's start-up
            row.update(residual=kind, depth=depth, seed=seed, init=init, seconds=sec,
                       alpha_init="" if alpha is None else init_factorial.fmt(float(alpha)))
            w.writerow({k: init_factorial.fmt(row[k]) for k in init_factorial.FIELDS})
            f.flush()
            done += 1
    return {"cells_done": done, "cells_planned": len(cells), "seconds": time.monotonic() - t0,
            "seconds_per_cell_by_depth": per_depth}


# ---------------------------------------------------------------------------------------------- train
class Cell:
    """One training run in-process: model, AdamW, data, validation batches and probe tokens of `cfg`."""

    def __init__(self, cfg, dev: torch.device):
        from mgt_scale.data import build_train_loader, build_valid_batches
        from mgt_scale.model import build_model
        from mgt_scale.train.monitor_callback import probe_tokens
        from mgt_scale.train.optim import build_optimizer
        self.cfg, self.dev = cfg, dev
        self.model = build_model(cfg.model, seed=cfg.train.seed, device=dev)
        self.opt = build_optimizer(self.model, cfg.train)
        d, t, v = cfg.data, cfg.train, cfg.model.vocab_size
        self.loader = build_train_loader(d, seq_len=d.seq_len, global_batch=t.global_batch_size,
                                         micro_batch=t.micro_batch_size, dp_rank=0, dp_size=1, vocab_size=v,
                                         prefetch=d.prefetch)
        self.valid = [(x.to(dev), y.to(dev)) for x, y in
                      build_valid_batches(d, d.seq_len, t.micro_batch_size, d.valid_fraction_batches, v)]
        self.tokens = probe_tokens(cfg, v).to(dev)
        self.bf16 = cfg.parallel.precision == "bf16"

    def autocast(self):
        return torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, step: int):
        """One optimizer step (0-based `step`); returns (loss, grad norm) as device tensors (no sync)."""
        from mgt_scale.model import lm_loss
        from mgt_scale.train.schedule import lr_at
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.cfg.train, step)
        (x, y), = self.loader.next_step()
        with self.autocast():
            logits = self.model(x.to(self.dev, non_blocking=True))
        loss = lm_loss(logits, y.to(self.dev, non_blocking=True))
        loss.backward()
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach(), norm.detach()

    @torch.no_grad()
    def probe(self) -> dict:
        """Valid loss (the trainer's batches, bf16 as trained) and float64 geometry (init_factorial.measure)."""
        from mgt_scale.model import lm_loss
        self.model.eval()
        with self.autocast():
            losses = [lm_loss(self.model(x), y) for x, y in self.valid]
        self.model.train()
        out = init_factorial.measure(self.cfg, self.model, self.tokens)
        out["valid_loss"] = float(torch.stack(losses).mean()) if losses else float("nan")
        return out

    def close(self) -> None:
        self.loader.close()


def load_cell_config(base: Path, kind: str, steps: int):
    from mgt_scale.config import load_config
    return load_config(base, [f"model.residual={kind}", f"train.max_steps={max(steps, 1)}",
                              f"train.warmup_steps={max(1, steps // 20)}"])


def time_steps(base: Path, dev: torch.device, n: int = 20) -> dict:
    """Build time, per-step time (median of steps 6..n, each synchronised) and one probe's time, MGT cell."""
    tic = time.monotonic()
    cell = Cell(load_cell_config(base, "mgt", 600), dev)
    sync(dev)
    build = time.monotonic() - tic
    times = []
    for i in range(n):
        tic = time.monotonic()
        cell.step(i)
        sync(dev)
        times.append(time.monotonic() - tic)
    tic = time.monotonic()
    cell.probe()
    sync(dev)
    probe = time.monotonic() - tic
    cell.close()
    del cell
    warm = times[5:] or times
    return {"build_s": build, "step_s": statistics.median(warm), "first_step_s": times[0], "probe_s": probe,
            "step_times_s": [round(t, 5) for t in times]}


def size_steps(avail: float, cells: int, timing: dict, probe_every: int, max_steps: int, margin: float = 1.2) -> int:
    """Steps per cell so that `cells` cells (build, steps, a probe at 0 and every `probe_every` steps and at
    the end) fit in `avail` seconds, at most `max_steps`."""
    per_cell = avail / max(cells, 1) - timing["build_s"] - 2 * timing["probe_s"]
    per_step = timing["step_s"] * margin + timing["probe_s"] / probe_every
    return max(0, min(max_steps, int(per_cell / per_step)))


def train(base: Path, kind: str, steps: int, dev: torch.device, out_csv: Path, slot: float, probe_every: int) -> dict:
    """Train one kind for `steps`, writing one CSV row per step and one per probe (at 0, every `probe_every`
    steps and at the end); stops early (reported) past 1.15 x its `slot` seconds or on a non-finite loss.
    Losses stay on the device and are read every 10 steps, so the loop does not wait on each step."""
    from mgt_scale.train.schedule import lr_at
    t0 = time.monotonic()
    cfg = load_cell_config(base, kind, steps)
    cell = Cell(cfg, dev)
    pending, losses, stop, done = [], [], "", 0
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRAIN_FIELDS)
        w.writeheader()

        def row(rec: dict) -> None:
            w.writerow({k: init_factorial.fmt(rec[k]) if k in rec else "" for k in TRAIN_FIELDS})

        def probe(step: int) -> dict:
            p = cell.probe()
            row({"step": step, "elapsed_s": time.monotonic() - t0, **p})
            f.flush()  # a run killed at its time limit keeps its rows
            return p

        first = last = probe(0)
        for i in range(steps):
            loss, norm = cell.step(i)
            pending.append((i + 1, loss, norm))
            at_probe = (i + 1) % probe_every == 0 or i + 1 == steps
            if not (at_probe or len(pending) >= 10):
                continue
            vals = torch.stack([torch.stack((l.float(), n.float())) for _, l, n in pending]).tolist()
            for (st, _, _), (l, n) in zip(pending, vals):
                row({"step": st, "lr": lr_at(cfg.train, st - 1), "loss": l, "grad_norm": n,
                     "elapsed_s": time.monotonic() - t0})
                losses.append(l)
            pending.clear()
            done = i + 1
            if any(not math.isfinite(l) for l, _ in vals):
                stop = f"non-finite loss by step {done}"
                break
            if time.monotonic() - t0 > 1.15 * slot and done < steps:
                stop = f"stopped at step {done} of {steps}: past its {slot:.0f} s slot"
            if at_probe or stop:
                last = probe(done)
            if stop:
                break
    cell.close()
    return {"kind": kind, "steps_planned": steps, "steps_done": done, "seconds": time.monotonic() - t0,
            "stop": stop, "final_train_loss": statistics.mean(losses[-20:]) if losses else float("nan"),
            "valid_loss": last["valid_loss"], "init": first, "final": last}


# --------------------------------------------------------------------------------------------- output
def summary_md(info: dict, fact_csv: Path) -> str:
    """summary.md of what has run so far (written after every phase, so a run cut short keeps its part)."""
    g = lambda v, p=4: f"{v:.{p}f}" if isinstance(v, float) and math.isfinite(v) else str(v)
    t, f = info.get("timing") or {}, info.get("factorial") or {}
    uni = (info.get("unigram") or {}).get("unigram_loss_eval_batches", float("nan"))
    out = [f"# GPU pilot ({info['device']}, torch {info['torch']}, {info['precision']})", "",
           f"budget {info['budget_s']:.0f} s, used {info.get('used_s', 0):.1f} s; data {info.get('data_s', 0):.1f} s "
           f"({info.get('data_tokens')} tokens); factorial {f.get('seconds', 0):.1f} s "
           f"({f.get('cells_done', 0)}/{f.get('cells_planned', '?')} cells)", ""]
    if t:
        out += [f"timing (MGT, depth {info['depth']}, d {info['d_model']}, batch {info['tokens_per_step']} tokens): "
                f"build {t['build_s']:.2f} s, step {t['step_s'] * 1e3:.1f} ms (median of steps 6-20; first "
                f"{t['first_step_s']:.2f} s), probe {t['probe_s']:.2f} s -> {info.get('steps_per_cell')} steps per "
                f"cell (asked {info['steps_asked']})", ""]
    out += [f"unigram loss on the eval batches: {g(uni)}", "",
            "| kind | steps | s | s/step | train loss (last 20) | valid loss | valid - unigram | "
            "raw last (init -> final) | centred last | rho last | rho min | stop |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in info.get("train", []):
        if "error" in r:
            out.append(f"| {r['kind']} | failed: {r['error']} |")
            continue
        fi, la = r["init"], r["final"]
        sps = r["seconds"] / r["steps_done"] if r["steps_done"] else float("nan")
        out.append(f"| {r['kind']} | {r['steps_done']}/{r['steps_planned']} | {r['seconds']:.1f} | {g(sps, 3)} | "
                   f"{g(r['final_train_loss'])} | {g(r['valid_loss'])} | {g(r['valid_loss'] - uni)} | "
                   f"{g(fi['raw_last'], 3)} -> {g(la['raw_last'], 3)} | {g(la['centred_last'], 3)} | "
                   f"{g(la['rho_last'], 3)} | {g(la['rho_min'], 3)} | {r['stop'] or '-'} |")
    out += ["", "## Init factorial (last layer: raw / centred / rho)", "",
            init_factorial.table(str(fact_csv)) if f.get("cells_done") else "no cell ran", ""]
    if info.get("errors"):
        out += ["## Errors", "", *(f"- {e}" for e in info["errors"]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mgt_gpu_pilot"), help="results (default $OUT)")
    ap.add_argument("--work", default="/tmp/mgt_gpu_pilot_work", help="data and configs (not returned)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for everything (default 420)")
    ap.add_argument("--factorial-share", type=float, default=0.2, help="share of the budget left after the data")
    ap.add_argument("--steps", type=int, help="training steps per cell at most (default 600; --tiny 5)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--tiny", action="store_true", help="d=32, depth 4, 5 steps, fp32: the CPU test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    clock = Clock(a.budget_s)
    s = dict(SIZES["tiny" if a.tiny else "full"])
    if a.steps:
        s["steps"] = a.steps
    dev = torch.device(a.device)
    if dev.type == "cpu" and s["precision"] == "bf16":
        log.warning("no GPU: training in fp32 (bf16 matmuls on a CPU are far slower)")
        s["precision"] = "fp32"
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    fact_csv = out / "init_factorial.csv"
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "precision": s["precision"], "budget_s": a.budget_s, "depth": s["depth"], "d_model": s["d_model"],
            "tokens_per_step": s["batch"] * s["seq"], "steps_asked": s["steps"], "sizes": s, "errors": [], "train": []}
    log.info("gpu pilot on %s (torch %s), budget %.0f s", info["device"], info["torch"], a.budget_s)

    def save() -> None:
        info["used_s"] = clock.used()
        (out / "summary.md").write_text(summary_md(info, fact_csv))
        (out / "timings.json").write_text(json.dumps(info, indent=1, default=str))

    def guarded(name: str, fn, *args):
        """One phase: a failure is logged and recorded, and the pilot goes on with what does not need it."""
        try:
            return fn(*args)
        except Exception as e:  # one device call: keep every result that can still be had
            log.exception("%s failed", name)
            info["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        finally:
            save()

    tic = time.monotonic()
    data = work / f"stdlib_{s['vocab']}_{s['prep_mb']}mb"
    manifest = make_data(data, s["prep_mb"], s["vocab"], os.cpu_count() or 1)  # nothing runs without it
    info["data_s"], info["data_tokens"] = time.monotonic() - tic, manifest["num_tokens"]
    base = write_base(work / "base.yaml", data, s, s["steps"])
    info["unigram"] = guarded("unigram loss", unigram, base)
    log.info("data: %d tokens in %.1f s", manifest["num_tokens"], info["data_s"])

    info["factorial"] = guarded("init factorial", factorial, base, s, dev, fact_csv, a.factorial_share * clock.left())
    if info["factorial"]:
        log.info("factorial: %d/%d cells in %.1f s", info["factorial"]["cells_done"],
                 info["factorial"]["cells_planned"], info["factorial"]["seconds"])

    info["timing"] = guarded("timing", time_steps, base, dev)
    reserve = 10.0  # the summary
    n = 0
    if info["timing"]:
        avail = clock.left() - reserve
        n = size_steps(avail, len(a.kinds), info["timing"], s["probe_every"], s["steps"])
        log.info("timing: step %.1f ms, probe %.2f s, build %.2f s -> %d steps per cell in %.0f s",
                 info["timing"]["step_s"] * 1e3, info["timing"]["probe_s"], info["timing"]["build_s"], n, avail)
    info["steps_per_cell"] = n
    for i, kind in enumerate(a.kinds):
        if n < 1:
            break
        slot = (clock.left() - reserve) / (len(a.kinds) - i)
        r = guarded(f"train {kind}", train, base, kind, n, dev, out / f"train_{kind}.csv", slot, s["probe_every"])
        info["train"].append(r or {"kind": kind, "error": info["errors"][-1]})
        if r:
            log.info("%s: %d/%d steps in %.1f s, valid loss %.4f %s", kind, r["steps_done"], n, r["seconds"],
                     r["valid_loss"], r["stop"])
    save()
    print(summary_md(info, fact_csv))
    return 1 if info["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
