# Checkpoint manager on DeepSpeed's sharded save_checkpoint: our client state (step, data position,
# RNG, monitor, config + hash, library versions) in every checkpoint, a manifest (files, sizes,
# sha256, world layout) written last, a `latest` pointer moved by atomic rename only after every rank
# has finished, retention (last K that verify, plus every M-th), selection of the newest *good*
# checkpoint, and each rank's parameter layout recorded and checked before anything loads. A completed
# checkpoint is never deleted before its replacement (a new save of the same step) is complete; one
# that fails verification is moved to checkpoints/damaged/ (never resumed from, never counted).
# DeepSpeed's own `latest` file is never written or read.
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mgt_scale.config import Config, config_hash, to_dict
from mgt_scale.train.failure import writing
from mgt_scale.train.optim import param_layout
from mgt_scale.train.retention import REASON, move_damaged, plan_retention

MANIFEST = "mgt_manifest.json"
LATEST = "latest_good"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rng_state() -> dict:
    """RNG states of python, numpy and torch as plain lists/ints/floats/tensors, so the file loads
    with `torch.load(..., weights_only=True)` (no pickled numpy objects). On GPUs, the CUDA state of
    this rank's device only: `get_rng_state_all` would create a context on every visible GPU from every
    rank, and its list could not be restored on a node with fewer GPUs (a resharded resume hands rank
    0's state to ranks that have no file of their own)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), [int(v) for v in internal], gauss],
             "numpy": [str(name), [int(v) for v in keys], int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # earlier versions kept one state per visible device
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _fault_step(var: str) -> int | None:
    """Fault injection for tests: the step named by environment variable `var`, if set."""
    v = os.environ.get(var, "")
    return int(v) if v.strip() else None


def library_versions() -> dict:
    import deepspeed
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "numpy": np.__version__}


def rank_file(tag_dir: Path, rank: int) -> Path:
    """Our per-rank file in a checkpoint: that rank's RNG state and parameter layout."""
    return tag_dir / f"rng_rank{rank:05d}.pt"


def layout_problem(tag_dir: Path, saved: Optional[list], current: list) -> Optional[str]:
    """Why the parameters recorded in a checkpoint (`optim.param_layout`) are not the model's, or None.
    DeepSpeed checks none of this: ZeRO's flat partitions of the same total size load into renamed or
    reordered parameters without an error."""
    if saved is None:
        return (f"{tag_dir}: records no parameter layout: it was written by mgt-scale 0.1, whose residual "
                "operators kept one parameter per LayerNorm weight and bias, b_beta and alpha (0.2 packs them "
                "into `vectors`), so its flat optimizer state would load into the wrong parameters. Resume it "
                "with mgt-scale 0.1, or export its weights with `mgt export` (which reads both layouts)")
    if saved == current:
        return None
    # the first entry that differs, or where the shorter list ends
    i = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))

    def entry(seq: list) -> str:
        return f"{seq[i][1]} {seq[i][2]} (group {seq[i][0]})" if i < len(seq) else "none"

    return (f"{tag_dir}: its parameters are not this model's ({len(saved)} tensors saved, {len(current)} in the "
            f"model); first difference at #{i}: checkpoint {entry(saved)}, model {entry(current)}. Resume "
            "with the model config and mgt-scale version that wrote it")


def _first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem, on every rank (so that all ranks raise, or none)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, problem)
        return next((p for p in every if p), None)
    return problem


def write_manifest(tag_dir: Path, meta: dict) -> None:
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(tag_dir))
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    if not files:
        raise CheckpointError(f"{tag_dir}: no files were written")
    manifest = dict(meta, files=files, written_at=time.time())
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, tag_dir / MANIFEST)


def verify_checkpoint(tag_dir: Path, full: bool = True) -> list[str]:
    """Problems with a checkpoint directory (empty list = good). Names every bad file."""
    mpath = tag_dir / MANIFEST
    if not mpath.is_file():
        return [f"{mpath}: missing (checkpoint incomplete: a save was interrupted)"]
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{mpath}: unreadable ({e})"]
    problems = []
    for rel, info in manifest.get("files", {}).items():
        p = tag_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{p}: size {p.stat().st_size} != {info['size']} in the manifest")
        elif full and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch (corrupted)")
    return problems


class CheckpointManager:
    # the identity of the data's tokenizer (mgt_scale.data.data_tokenizer_identity), set by the trainer's
    # entry: save() records it in the client state and the manifest, data_tokenizer_problem() checks it
    data_tokenizer: Optional[dict] = None

    def __init__(self, run_dir: str, cfg: Config, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.ckpt = cfg.checkpoint
        # what this process knows about its checkpoints, by step, with the identity of the manifest it
        # was learnt from (a step can be written again): fully verified (or written here), or damaged
        self._verified: dict[int, tuple] = {}
        self._damaged: dict[int, tuple[tuple, list[str]]] = {}

    # -- listing ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := TAG_RE.match(p.name)) and p.is_dir())

    def completed_steps(self) -> list[int]:
        """Steps whose save finished (manifest written); not verified."""
        return [s for s in self.steps() if (self.dir / tag_for(s) / MANIFEST).is_file()]

    def holds(self, tag_dir: Path, step: int) -> bool:
        """Whether `tag_dir` is this run's own checkpoint of `step` (or its universal conversion)."""
        mine = self.dir / tag_for(step)
        return Path(tag_dir).resolve() in (mine.resolve(), universal_dir(mine).resolve())

    def find_resume(self, log=print) -> Optional[Path]:
        """Newest checkpoint whose manifest verifies; damaged or incomplete newer ones are reported.
        Damaged ones (complete, but failing verification) are remembered: set_aside_damaged() and
        retention move them to checkpoints/damaged/."""
        for step in reversed(self.steps()):
            tag_dir = self.dir / tag_for(step)
            problems = verify_checkpoint(tag_dir)
            if not problems:
                self._verified[step] = self._manifest_id(step)
                return tag_dir
            if (tag_dir / MANIFEST).is_file():  # no manifest: an interrupted save, replaced by the next one
                self._damaged[step] = (self._manifest_id(step), problems)
            for p in problems:
                log(f"checkpoint {tag_dir.name} rejected: {p}")
        return None

    def _manifest_id(self, step: int) -> Optional[tuple]:
        """Identity of a checkpoint's manifest file (a new save of the step writes a new one)."""
        try:
            st = (self.dir / tag_for(step) / MANIFEST).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _problems(self, step: int) -> list[str]:
        """verify_checkpoint for retention: hashes each checkpoint once per process; one written or
        verified here before gets the cheap check (files present, sizes as in the manifest)."""
        ident = self._manifest_id(step)
        known = self._damaged.get(step)
        if known is not None and ident is not None and known[0] == ident:
            return known[1]
        full = ident is None or self._verified.get(step) != ident
        problems = verify_checkpoint(self.dir / tag_for(step), full=full)
        if problems:
            self._damaged[step] = (ident, problems)
            self._verified.pop(step, None)
        else:
            self._verified[step] = ident
        return problems

    # -- saving ----------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        with writing(self.dir / tag_for(step)):  # a failed write (disk full) names the checkpoint
            return self._save(engine, step, client_state)

    def _save(self, engine, step: int, client_state: dict) -> Path:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        replaced = self._replaced_dir(tag)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if (tag_dir / MANIFEST).is_file():
                # a completed checkpoint of this step (a save after a rollback to it): keep it, out of
                # sight of resume and retention, until the new one is complete. A kill in between leaves
                # it there for recover_interrupted_saves() to put back.
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(tag_dir, replaced)
            elif tag_dir.exists():  # a leftover from an interrupted save of the same step
                shutil.rmtree(tag_dir)
            shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)  # a conversion of other contents
        _barrier()
        state = dict(client_state)
        state.update({"step": step, "rng": rng_state(), "config": to_dict(self.cfg),
                      "config_hash": config_hash(self.cfg), "versions": library_versions(),
                      "world_size": self.world_size})
        if self.data_tokenizer is not None:
            state["data_tokenizer"] = dict(self.data_tokenizer)
        # per-rank RNG: DeepSpeed stores client_state from rank 0 only, so every rank keeps its own file
        engine.save(str(self.dir), tag, state)
        torch.save({"rng": rng_state(), "param_layout": param_layout(engine.module)}, rank_file(tag_dir, self.rank))
        _barrier()  # every rank has finished writing its shards
        if self.rank == 0 and _fault_step("MGT_FAULT_KILL_DURING_SAVE") == step:
            print(f"fault injection: killing rank 0 while saving {tag} (DeepSpeed files written, no manifest)",
                  flush=True)
            os._exit(137)
        if self.rank == 0:
            from mgt_scale.config import save_config
            save_config(self.cfg, tag_dir / "config.yaml")  # every checkpoint carries its resolved config
            write_manifest(tag_dir, {"step": step, "world_size": self.world_size, "mode": self.cfg.parallel.mode,
                                     "pipeline_stages": self.cfg.parallel.pipeline_stages,
                                     "config_hash": config_hash(self.cfg)}
                           | ({"data_tokenizer": self.data_tokenizer} if self.data_tokenizer is not None else {}))
            self._verified[step] = self._manifest_id(step)  # hashed from the files just written
            self._damaged.pop(step, None)
            self._point_latest(tag)
            shutil.rmtree(replaced, ignore_errors=True)
            self._prune(step)
        _barrier()
        return tag_dir

    def _replaced_dir(self, tag: str) -> Path:
        """Where save() keeps the completed checkpoint it is replacing (a dot name: no step folder)."""
        return self.dir / f".{tag}.replaced"

    def recover_interrupted_saves(self, log=print) -> list[str]:
        """Collective; call before looking for a checkpoint. For each checkpoint whose replacement was
        interrupted (see save()), rank 0 puts the completed one back in place of the incomplete new
        one; if the new one did complete, only the kept copy is deleted. Returns the tags put back."""
        restored = []
        if self.rank == 0 and self.dir.is_dir():
            for kept in sorted(self.dir.glob(".step_*.replaced")):
                tag = kept.name[1:-len(".replaced")]
                tag_dir = self.dir / tag
                if not TAG_RE.match(tag) or not kept.is_dir():
                    continue
                if (tag_dir / MANIFEST).is_file():
                    shutil.rmtree(kept)
                    continue
                if tag_dir.exists():
                    shutil.rmtree(tag_dir)
                os.replace(kept, tag_dir)
                restored.append(tag)
                log(f"checkpoint {tag}: its replacement was interrupted; put the completed one back")
        _barrier()
        return restored

    def _point_latest(self, tag: str) -> None:
        tmp = self.dir / f".{LATEST}.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, self.dir / LATEST)

    def set_aside_newer(self, step: int, resumed_from: Path, log=print) -> Optional[Path]:
        """Collective. A run resumed with `--resume PATH` at `step` while this run has completed
        checkpoints at later steps (PATH is an older one of its own: a deliberate rollback) starts a new
        branch, and those checkpoints belong to the one it left. Left in place, the next `--resume auto`
        (any requeue) would pick the newest of them and silently continue the abandoned branch, and
        retention, which keeps the highest step numbers, would delete the new branch's checkpoints
        first. When PATH is another run's checkpoint, this run's own one at `step` is set aside too:
        it holds other weights, and a save at that step would delete it. Rank 0 moves them untouched
        to checkpoints/abandoned/<time>-from-step_S/, which nothing resumes from or prunes, and drops
        their universal conversions. Saves without a manifest (interrupted) stay: the next save of
        that step replaces them. Returns the folder (rank 0), else None."""
        dest = None
        if self.rank == 0:
            own = self.holds(resumed_from, step)
            newer = [s for s in self.completed_steps() if s > step or (s == step and not own)]
            if newer:
                base = self.dir / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-from-{tag_for(step)}"
                dest, n = base, 1
                while dest.exists():
                    n += 1
                    dest = base.with_name(f"{base.name}-{n}")
                dest.mkdir(parents=True)
                for s in newer:
                    os.replace(self.dir / tag_for(s), dest / tag_for(s))
                    shutil.rmtree(universal_dir(self.dir / tag_for(s)), ignore_errors=True)
                kept = self.completed_steps()
                if kept:
                    self._point_latest(tag_for(kept[-1]))
                else:
                    (self.dir / LATEST).unlink(missing_ok=True)
                log(f"resumed from {resumed_from} with later checkpoints in this run: moved "
                    f"{', '.join(tag_for(s) for s in newer)} to {dest} (the branch this run leaves; "
                    "not resumed from, not pruned: delete it when no longer needed)")
        _barrier()
        return dest

    def set_aside_damaged(self, log=print) -> list[Path]:
        """Collective; call after find_resume(). Rank 0 moves the complete checkpoints that
        find_resume() rejected (still the same files) to checkpoints/damaged/ (see _move_damaged), once
        every rank has finished reading them, and points `latest` at the newest completed one left.
        Returns the folders (rank 0), else []."""
        _barrier()
        moved = []
        if self.rank == 0:
            for step, (ident, problems) in sorted(self._damaged.items()):
                if ident is not None and self._manifest_id(step) == ident:
                    moved.append(self._move_damaged(step, problems, log))
        _barrier()
        return moved

    def _move_damaged(self, step: int, problems: list[str], log=print) -> Path:
        """Rank 0: move a checkpoint that failed verification to checkpoints/damaged/ (retention.py),
        drop its universal conversion, and keep `latest` on a checkpoint that is still there. Left in
        place it counted towards keep_last, and retention deleted the good older one instead."""
        tag = tag_for(step)
        dest = move_damaged(self.dir, tag, problems)
        shutil.rmtree(universal_dir(self.dir / tag), ignore_errors=True)
        self._damaged.pop(step, None)
        self._verified.pop(step, None)
        latest = self.dir / LATEST
        if latest.is_file() and latest.read_text().strip() == tag:
            kept = self.completed_steps()
            if kept:
                self._point_latest(tag_for(kept[-1]))
            else:
                latest.unlink(missing_ok=True)
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        log(f"checkpoint {tag} failed verification ({problems[0]}{more}): moved to {dest} (not resumed "
            f"from, not counted by retention; {REASON} says why: delete it when no longer needed)")
        return dest

    def _prune(self, newest: int) -> None:
        """Retention (retention.plan_retention), rank 0 after a save: damaged checkpoints met on the
        way are moved aside, never counted."""
        delete, damaged = plan_retention(self.steps(), self.completed_steps(), newest, self.ckpt.keep_last,
                                         self.ckpt.keep_every, self._problems)
        for s, problems in damaged.items():
            self._move_damaged(s, problems)
        for s in delete:
            shutil.rmtree(self.dir / tag_for(s), ignore_errors=True)
            shutil.rmtree(universal_dir(self.dir / tag_for(s)), ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def same_layout(self, manifest: dict) -> bool:
        return (manifest["world_size"] == self.world_size and manifest["mode"] == self.cfg.parallel.mode
                and manifest.get("pipeline_stages", 1) == self.cfg.parallel.pipeline_stages)

    def load(self, engine, tag_dir: Path, log=print) -> dict:
        """Load model/optimizer into the engine and return our client state (RNG already restored).
        A checkpoint saved with another zero3 world size is converted to DeepSpeed's universal format
        (once, by rank 0, under checkpoints/universal/) and loaded from there."""
        tag_dir = Path(tag_dir)
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        same = self.same_layout(manifest)
        where = (f"{tag_dir}: saved with world size {manifest['world_size']} ({manifest['mode']}, "
                 f"{manifest.get('pipeline_stages', 1)} stages), resuming with {self.world_size} "
                 f"({self.cfg.parallel.mode}, {self.cfg.parallel.pipeline_stages} stages)")
        if not same and (manifest["mode"] != "zero3" or self.cfg.parallel.mode != "zero3"):
            raise CheckpointError(f"{where}: automatic resharding covers zero3 -> zero3 only; resume with the "
                                  "saved layout, or export the weights (`mgt export`)")
        # under ZeRO-3 every rank records the whole model, so rank 0's record serves any world size
        saved_file = rank_file(tag_dir, self.rank if same else 0)
        saved = torch.load(saved_file, weights_only=True).get("param_layout") if saved_file.is_file() else None
        problem = _first_problem(layout_problem(tag_dir, saved, param_layout(engine.module)))
        if problem:
            raise CheckpointError(problem)
        if same:
            state = engine.load(str(tag_dir.parent), tag_dir.name)
        else:
            if self.rank == 0:
                log(f"{where}: resharding through a universal checkpoint")
            err = None
            if self.rank == 0:
                try:
                    uni = make_universal(tag_dir, log=log)
                except CheckpointError as e:
                    err = str(e)
            err = _broadcast_obj(err)
            if err:
                raise CheckpointError(f"{err}\n(run `mgt ckpt reshard {tag_dir.parent.parent} --tag {tag_dir.name}` "
                                      "to retry the conversion by hand)")
            uni = universal_dir(tag_dir)
            state = engine.load(str(uni.parent), uni.name, universal=True)
        if state is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
        own = rank_file(tag_dir, self.rank)
        rng = torch.load(own, weights_only=True)["rng"] if own.is_file() else state["rng"]
        set_rng_state(rng)
        return state


def data_tokenizer_problem(tag_dir: Path, current: dict) -> tuple[Optional[str], Optional[str]]:
    """(error, warning) of resuming `tag_dir` on data whose tokenizer identity is `current`
    (mgt_scale.data.data_tokenizer_identity). Another tokenizer's ids name other pieces: the weights
    would train on what is noise to them (the loss jumps back up) without any error. A checkpoint
    written before identities were recorded gives a warning only. Reads the checkpoint's manifest, so
    every rank comes to the same answer without loading anything."""
    from mgt_scale.data.shards import describe_tokenizer, same_tokenizer
    tag_dir = Path(tag_dir)
    try:
        saved = json.loads((tag_dir / MANIFEST).read_text()).get("data_tokenizer")
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        return None, (f"{tag_dir}: records no data tokenizer identity (written by an older mgt-scale): cannot "
                      f"check that it was trained on data with the current {describe_tokenizer(current)}")
    if same_tokenizer(saved, current):
        return None, None
    return (f"{tag_dir}: trained on data with {describe_tokenizer(saved)}, but the configured data has "
            f"{describe_tokenizer(current)}: its token ids name other pieces, so resuming would train the weights "
            "on garbage. Resume with the data it was trained on (point data.path or data.blend at it again), "
            "or start a new run (another run.dir, without --resume)"), None


def _broadcast_obj(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal (world-size independent) form of a checkpoint lives."""
    tag_dir = Path(tag_dir)
    return tag_dir.parent / "universal" / tag_dir.name


def make_universal(tag_dir: Path, log=print, force: bool = False) -> Path:
    """Convert a verified sharded zero3 checkpoint with DeepSpeed's ds_to_universal (single process).
    The output gets its own manifest, which records the sha256 of the source's manifest (itself a list
    of every file's sha256). An existing verified conversion is reused only if it was made from these
    very files: a step directory can be written again with other contents (a run resumed from an
    older checkpoint reaches that step anew), and the stale conversion would load the old weights."""
    import subprocess
    import sys
    tag_dir = Path(tag_dir)
    out = universal_dir(tag_dir)
    source = sha256_file(tag_dir / MANIFEST) if (tag_dir / MANIFEST).is_file() else None
    if not force and out.is_dir() and not verify_checkpoint(out):
        made_from = json.loads((out / MANIFEST).read_text()).get("source_manifest_sha256")
        if source is not None and made_from == source:
            return out
        log(f"{out}: converted from other contents of {tag_dir.name}: converting again")
    problems = verify_checkpoint(tag_dir)
    if problems:
        raise CheckpointError(f"{tag_dir}: cannot reshard a damaged checkpoint: " + "; ".join(problems))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log("converting: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckpointError(f"{tag_dir}: ds_to_universal failed (exit {r.returncode}):\n"
                              + (r.stdout[-2000:] + r.stderr[-2000:]))
    for f in tag_dir.glob("rng_rank*.pt"):
        shutil.copy2(f, tmp / f.name)
    (out.parent / "latest_universal").unlink(missing_ok=True)
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    write_manifest(tmp, {k: v for k, v in manifest.items() if k not in ("files", "written_at")}
                   | {"universal_of": tag_dir.name, "source_manifest_sha256": source})
    os.replace(tmp, out)
    return out
