# Checkpoint manager on DeepSpeed's sharded save_checkpoint: our client state (step, data position,
# RNG, monitor, config + hash, library versions) in every checkpoint, a manifest (files, sizes,
# sha256 hashed by the rank that wrote each file, world layout) written last, a `latest` pointer moved
# by atomic rename only after every rank has finished (with checkpoint.async_save, once the background
# writes of every rank are complete: a kill before that leaves `latest` on the previous checkpoint),
# retention (last K that verify, plus every M-th), the resume choice made by rank 0 and broadcast, each
# rank hashing only its own share (ckpt_collective), and each rank's parameter layout recorded and
# checked before anything loads. A new save of a step that has a completed checkpoint (after a
# rollback) is written to checkpoints/.resave/step_N and swapped in only once complete and size-checked,
# so `latest_good` never names a half-written directory; one that fails verification is moved to
# checkpoints/damaged/ (never resumed from, never counted, never deleted). DeepSpeed's own `latest`
# file is never written or read.
# The format (manifest, hashing, tags) is in ckpt_format.py, resharding in ckpt_universal.py.
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from mgt_scale.config import Config, canonical_mode, config_hash, to_dict
from mgt_scale.logs import get_logger
from mgt_scale.parallel.collectives import any_rank
from mgt_scale.checkpoint.collective import barrier, broadcast_obj, choose_step, first_problem, gather_obj, verify_shared
from mgt_scale.checkpoint.manifest import (LATEST, MANIFEST, TAG_RE, CheckpointError, file_record, layout_problem,
                                         library_versions, rank_file, read_manifest, rng_state, set_rng_state,
                                         tag_for, universal_dir, verify_checkpoint, write_durable, write_manifest)
from mgt_scale.checkpoint.universal import ConversionError, make_universal
from mgt_scale.checkpoint.writer import BackgroundWriter, own_files
from mgt_scale.data.shards import fsync_dir
from mgt_scale.train.failure import writing
from mgt_scale.train.optim import param_layout
from mgt_scale.checkpoint.retention import REASON, move_damaged, plan_retention

_log = get_logger(__name__)
RESAVE = ".resave"  # checkpoints/.resave/step_N: a new save of a step whose completed checkpoint stays in place


class CheckpointManager:
    # the identity of the data's tokenizer (mgt_scale.data.data_tokenizer_identity), set by the trainer's
    # entry: save() records it in the client state and the manifest, data_tokenizer_problem() checks it
    data_tokenizer: Optional[dict] = None

    def __init__(self, run_dir: str, cfg: Config, rank: int, world_size: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.ckpt = cfg.checkpoint
        # what this process knows about its checkpoints, by step, with the identity of the manifest it
        # was learnt from (a step can be written again): verified (or written here), or damaged
        self._verified: dict[int, tuple] = {}
        self._damaged: dict[int, tuple[tuple, list[str]]] = {}
        # checkpoint.async_save: the thread that writes this rank's files, and the save in flight
        self._writer: Optional[BackgroundWriter] = None
        self._pending: Optional[dict] = None
        self.last_blocked_s = 0.0  # seconds the last save() kept the caller (the step loop) waiting

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

    def find_resume(self, log=_log.info) -> Optional[Path]:
        """Collective. The newest checkpoint that verifies, the same on every rank: rank 0 picks the
        newest whose manifest and sizes check out and broadcasts its step, then every rank hashes its
        own share of it (ckpt_collective.verify_shared); if any rank finds a problem, the next older one
        is tried. Damaged or incomplete newer ones are reported; damaged ones (complete, but failing
        verification) are remembered: set_aside_damaged() and retention move them to checkpoints/damaged/."""
        self.wait()  # a save in flight (checkpoint.async_save) completes first
        tried: set[int] = set()
        while True:
            candidates = [s for s in reversed(self.steps()) if s not in tried] if self.rank == 0 else []
            step, skipped = choose_step(candidates, self._cheap_problems, self.rank)
            for s, problems in skipped.items():
                tried.add(s)
                self._rejected(s, problems, log)
            if step is None:
                return None
            tag_dir = self.dir / tag_for(step)
            problems = self.verify(tag_dir)
            if not problems:
                self._verified[step] = self._manifest_id(step)
                return tag_dir
            tried.add(step)
            self._rejected(step, problems, log)

    def verify(self, tag_dir: Path) -> list[str]:
        """Collective: problems of `tag_dir` (same list on every rank), each rank hashing its share, or
        everything with checkpoint.verify=full."""
        return verify_shared(Path(tag_dir), self.rank, self.world_size, full=self.ckpt.verify == "full")

    def _cheap_problems(self, step: int) -> list[str]:
        """Rank 0's choice: manifest and sizes (a stat per file), or what is known of it already."""
        known = self._damaged.get(step)
        if known is not None and known[0] == self._manifest_id(step):
            return known[1]
        return verify_checkpoint(self.dir / tag_for(step), full=False)

    def _rejected(self, step: int, problems: list[str], log) -> None:
        tag_dir = self.dir / tag_for(step)
        if (tag_dir / MANIFEST).is_file():  # no manifest: an interrupted save, replaced by the next one
            self._damaged[step] = (self._manifest_id(step), problems)
            self._verified.pop(step, None)
        for p in problems:
            log(f"checkpoint {tag_dir.name} rejected: {p}")

    def _manifest_id(self, step: int) -> Optional[tuple]:
        """Identity of a checkpoint's manifest file (a new save of the step writes a new one)."""
        try:
            st = (self.dir / tag_for(step) / MANIFEST).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _problems(self, step: int) -> list[str]:
        """verify_checkpoint for retention (rank 0): hashes each checkpoint once per process; one
        written or verified here before gets the cheap check (files present, sizes as in the manifest)."""
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
        """Collective: every rank calls it. Returns the checkpoint directory. With checkpoint.async_save
        it returns once the state is copied to host memory; the files are written in the background and
        the checkpoint counts (manifest, `latest_good`) once poll() or wait() sees every rank done."""
        tic = time.perf_counter()
        self.wait()
        tag_dir = self.dir / tag_for(step)
        with writing(tag_dir):  # a failed write (disk full) names the checkpoint
            self._start_save(engine, step, client_state)
            if self._writer is None:
                self._finish_save()
        self.last_blocked_s = time.perf_counter() - tic
        return tag_dir

    def pending(self) -> Optional[int]:
        """The step of the save in flight (async), or None."""
        return None if self._pending is None else self._pending["step"]

    def poll(self) -> bool:
        """Collective, cheap (one all-reduce of a flag); call at a step boundary. Completes the save in
        flight if every rank's writes are done. True if one was completed."""
        if self._pending is None:
            return False
        busy = self._writer is not None and not self._writer.idle()
        if any_rank(busy):
            return False
        self.wait()
        return True

    def wait(self) -> None:
        """Collective when a save is in flight: wait for this rank's writes, then complete it (manifest,
        `latest_good`, retention). A preemption or the end of the run calls it before exiting."""
        if self._pending is None:
            return
        with writing(self._pending["tag_dir"]):
            self._finish_save()

    def _start_save(self, engine, step: int, client_state: dict) -> None:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        write_dir = tag_dir
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if (tag_dir / MANIFEST).is_file():
                known = self._known_damage(step)
                if known:
                    # rejected by find_resume (a rollback past it): set aside with its reason, never
                    # deleted; `latest_good` moves to a good one; the new save goes in its place
                    self._move_damaged(step, known)
                else:
                    # a completed checkpoint of this step (a save after a rollback to it) stays in place,
                    # and `latest_good` on it, until the new one, written beside it, is complete and
                    # size-checked (_swap_in); a kill in between leaves recover_interrupted_saves() to clean up
                    write_dir = self._resave_dir(tag)
                    shutil.rmtree(write_dir, ignore_errors=True)
                    write_dir.mkdir(parents=True)
            elif tag_dir.exists():  # a leftover from an interrupted save of the same step
                shutil.rmtree(tag_dir)
            if write_dir == tag_dir:
                shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)  # a conversion of other contents
        write_dir = Path(broadcast_obj(str(write_dir)))  # every rank writes where rank 0 decided
        state = dict(client_state)
        state.update({"step": step, "rng": rng_state(), "config": to_dict(self.cfg),
                      "config_hash": config_hash(self.cfg), "versions": library_versions(),
                      "world_size": self.world_size})
        if self.data_tokenizer is not None:
            state["data_tokenizer"] = dict(self.data_tokenizer)
        if self.ckpt.async_save and self._writer is None:
            self._writer = BackgroundWriter()
        own = own_files(engine, self.rank)
        if own is not None:
            own.start(write_dir, self._writer)
        engine.save(str(write_dir.parent), tag, state)
        # per-rank RNG: DeepSpeed stores client_state from rank 0 only, so every rank keeps its own file
        mine = rank_file(write_dir, self.rank)
        torch.save({"rng": rng_state(), "param_layout": param_layout(engine.module)}, mine)
        self._pending = {"step": step, "tag_dir": tag_dir, "write_dir": write_dir, "own": own,
                         "records": {mine.name: file_record(mine, self.rank)}}

    def _finish_save(self) -> None:
        """Collective: every rank's file records are gathered (after its background writes, if any);
        rank 0 writes the manifest (hashing only files no rank claimed), moves `latest_good`, prunes."""
        p, self._pending = self._pending, None
        err = None
        try:
            if self._writer is not None:
                self._writer.wait()
        except Exception as e:  # every rank must reach the gather below, or the others hang in it
            err = e
        records = dict(p["records"])
        if p["own"] is not None:
            records.update(p["own"].records)
            p["own"].start(p["write_dir"], None)
        every = gather_obj((records, None if err is None else f"{type(err).__name__}: {err}"))
        if err is not None:
            raise err
        failed = [(r, msg) for r, (_, msg) in enumerate(every) if msg]
        if failed:
            raise CheckpointError(f"{p['tag_dir']}: rank {failed[0][0]} failed to write its files "
                                  f"({failed[0][1]}): checkpoint left incomplete, {LATEST} not moved")
        step, tag_dir = p["step"], p["write_dir"]  # write_dir: the step's folder, or beside it (_start_save)
        swap_err = None
        if self.rank == 0:
            from mgt_scale.config import save_config
            save_config(self.cfg, tag_dir / "config.yaml")  # every checkpoint carries its resolved config
            hashed = {rel: rec for recs, _ in every for rel, rec in recs.items()}
            write_manifest(tag_dir, {"step": step, "world_size": self.world_size, "mode": self.cfg.parallel.mode,
                                     "pipeline_stages": self.cfg.parallel.pipeline_stages,
                                     "config_hash": config_hash(self.cfg)}
                           | ({"data_tokenizer": self.data_tokenizer} if self.data_tokenizer is not None else {}),
                           hashed=hashed)
            if tag_dir != p["tag_dir"]:  # a new save of a completed step, written beside it
                swap_err = self._swap_in(tag_dir, p["tag_dir"], step)
            if swap_err is None:
                self._damaged.pop(step, None)
                self._point_latest(tag_dir.name)
                self._prune(step)
        swap_err = broadcast_obj(swap_err)  # every rank raises, or none
        if swap_err:
            raise CheckpointError(swap_err)
        barrier()
        self._verified[step] = self._manifest_id(step)  # hashed from the files just written

    def _resave_dir(self, tag: str) -> Path:
        """Where a new save of a step that has a completed checkpoint is written (the tag stays the
        DeepSpeed tag; a dot folder: no step folder for resume or retention)."""
        return self.dir / RESAVE / tag

    def _known_damage(self, step: int) -> list[str]:
        """The problems find_resume() or retention found in the checkpoint of `step` now in place."""
        known = self._damaged.get(step)
        return known[1] if known is not None and known[0] == self._manifest_id(step) else []

    def _swap_in(self, new: Path, tag_dir: Path, step: int) -> Optional[str]:
        """Rank 0: put the complete new save of `step` (written to `new`) in place of the completed one,
        which is deleted (or, failing the size check, set aside as damaged). None, or why the new one
        was not put in place (the old one and `latest_good` are left as they were)."""
        problems = verify_checkpoint(new, full=False)  # its writers hashed every file as they wrote it
        if problems:
            return (f"{new}: the new save of {tag_dir.name} does not verify ({problems[0]}): "
                    f"{tag_dir.name} and {LATEST} left on the completed one")
        replaced = self._replaced_dir(tag_dir.name)
        if replaced.exists():  # a leftover of an earlier replacement
            self._discard_replaced(replaced, tag_dir.name)
        os.replace(tag_dir, replaced)
        os.replace(new, tag_dir)
        shutil.rmtree(new.parent, ignore_errors=True)  # one save at a time; DeepSpeed's zero_to_fp32.py copy
        fsync_dir(self.dir)
        shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)  # a conversion of the old contents
        self._discard_replaced(replaced, tag_dir.name)
        return None

    def _discard_replaced(self, replaced: Path, tag: str, log=_log.warning) -> None:
        """Rank 0: the completed checkpoint a new save of its step replaced is deleted, unless it fails
        the size check (a stat per file): then it is damaged, and set aside to checkpoints/damaged/ like
        any other, never deleted."""
        problems = verify_checkpoint(replaced, full=False)
        if not problems:
            shutil.rmtree(replaced, ignore_errors=True)
            return
        dest = move_damaged(self.dir, tag, problems, src=replaced)
        log(f"checkpoint {tag} (replaced by a new save of its step) failed verification ({problems[0]}): "
            f"moved to {dest} ({REASON} says why: delete it when no longer needed)")

    def _replaced_dir(self, tag: str) -> Path:
        """Where save() keeps the completed checkpoint it is replacing (a dot name: no step folder)."""
        return self.dir / f".{tag}.replaced"

    def recover_interrupted_saves(self, log=_log.info) -> list[str]:
        """Collective; call before looking for a checkpoint. For each checkpoint whose replacement was
        interrupted (see save()), rank 0 puts the completed one back in place of the incomplete new
        one; if the new one did complete, only the kept copy is deleted. Returns the tags put back."""
        restored = []
        if self.rank == 0 and self.dir.is_dir():
            for new in sorted((self.dir / RESAVE).glob("step_*")):
                tag_dir = self.dir / new.name
                if not TAG_RE.match(new.name) or not new.is_dir():
                    continue
                if (new / MANIFEST).is_file() and not verify_checkpoint(new, full=False):
                    # killed while swapping a complete new save in (_swap_in): it goes in place, the
                    # completed one it replaces is discarded by the loop below
                    if (tag_dir / MANIFEST).is_file():
                        if self._replaced_dir(new.name).exists():
                            self._discard_replaced(self._replaced_dir(new.name), new.name, log=log)
                        os.replace(tag_dir, self._replaced_dir(new.name))
                    elif tag_dir.exists():
                        shutil.rmtree(tag_dir)
                    os.replace(new, tag_dir)
                    shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
                    restored.append(new.name)
                    log(f"checkpoint {new.name}: a new save of it was complete when it was interrupted: put in place")
                else:  # an interrupted new save: the completed checkpoint of the step never left its place
                    shutil.rmtree(new)
            shutil.rmtree(self.dir / RESAVE, ignore_errors=True)  # what is left: DeepSpeed's zero_to_fp32.py copy
            for kept in sorted(self.dir.glob(".step_*.replaced")):
                tag = kept.name[1:-len(".replaced")]
                tag_dir = self.dir / tag
                if not TAG_RE.match(tag) or not kept.is_dir():
                    continue
                if (tag_dir / MANIFEST).is_file():
                    self._discard_replaced(kept, tag, log=log)
                    continue
                if tag_dir.exists():
                    shutil.rmtree(tag_dir)
                os.replace(kept, tag_dir)
                restored.append(tag)
                log(f"checkpoint {tag}: its replacement was interrupted; put the completed one back")
        barrier()
        return restored

    def _point_latest(self, tag: str) -> None:
        write_durable(self.dir / LATEST, tag + "\n")

    def set_aside_newer(self, step: int, resumed_from: Path, log=_log.info) -> Optional[Path]:
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
        barrier()
        return dest

    def set_aside_damaged(self, log=_log.info) -> list[Path]:
        """Collective; call after find_resume(). Rank 0 moves the complete checkpoints that
        find_resume() rejected (still the same files) to checkpoints/damaged/ (see _move_damaged), once
        every rank has finished reading them, and points `latest` at the newest completed one left.
        Returns the folders (rank 0), else []."""
        barrier()
        moved = []
        if self.rank == 0:
            for step, (ident, problems) in sorted(self._damaged.items()):
                if ident is not None and self._manifest_id(step) == ident:
                    moved.append(self._move_damaged(step, problems, log))
        barrier()
        return moved

    def _move_damaged(self, step: int, problems: list[str], log=_log.info) -> Path:
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
            kept = [s for s in self.completed_steps() if not self._known_damage(s)]
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
        return (manifest["world_size"] == self.world_size and canonical_mode(manifest["mode"]) == self.cfg.parallel.mode
                and manifest.get("pipeline_stages", 1) == self.cfg.parallel.pipeline_stages)

    def load(self, engine, tag_dir: Path, log=_log.info) -> dict:
        """Load model/optimizer into the engine and return our client state (RNG already restored).
        A checkpoint saved with another zero3 world size, or a pipeline x ZeRO-1 one with another
        data-parallel size, is converted to DeepSpeed's universal format (once, by rank 0 with
        checkpoint.reshard_workers processes, under checkpoints/universal/; `mgt ckpt reshard` does it
        ahead of the job) and loaded from there."""
        self.wait()
        tag_dir = Path(tag_dir)
        manifest = read_manifest(tag_dir)
        same = self.same_layout(manifest)
        where = (f"{tag_dir}: saved with world size {manifest['world_size']} ({manifest['mode']}, "
                 f"{manifest.get('pipeline_stages', 1)} stages), resuming with {self.world_size} "
                 f"({self.cfg.parallel.mode}, {self.cfg.parallel.pipeline_stages} stages)")
        stages = self.cfg.parallel.pipeline_stages
        zero3 = canonical_mode(manifest["mode"]) == "zero" == self.cfg.parallel.mode
        # pipeline x ZeRO-1: another data-parallel size over the same stages (DeepSpeed's universal format)
        pipe = (manifest["mode"] == "pipeline" == self.cfg.parallel.mode and self.cfg.parallel.zero_stage == 1
                and manifest.get("pipeline_stages", 1) == stages)
        if not same and not (zero3 or pipe):
            raise CheckpointError(f"{where}: automatic resharding covers zero3 -> zero3, and pipeline with "
                                  "zero_stage 1 -> another data-parallel size over the same stages; resume with "
                                  "the saved layout, or export the weights (`mgt export`)")
        # under ZeRO-3 every rank records the whole model, so rank 0's record serves any world size; a
        # pipeline stage's record is that of the stage's first rank (DeepSpeed places rank = stage x dp + d)
        old_dp = max(int(manifest["world_size"]) // max(stages, 1), 1)
        stage_rank = (self.rank // max(self.world_size // max(stages, 1), 1)) * old_dp
        saved_file = rank_file(tag_dir, self.rank if same else (stage_rank if pipe else 0))
        saved = torch.load(saved_file, weights_only=True).get("param_layout") if saved_file.is_file() else None
        problem = first_problem(layout_problem(tag_dir, saved, param_layout(engine.module)))
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
                    # every load follows find_resume or verify, which hashed the source in parallel
                    uni = make_universal(tag_dir, log=log, workers=self.ckpt.reshard_workers, verified=True)
                except CheckpointError as e:
                    err = (isinstance(e, ConversionError), str(e))
            err = broadcast_obj(err)
            if err:
                kind = ConversionError if err[0] else CheckpointError  # ConversionError: a crash (exit 1), not input
                raise kind(f"{err[1]}\n(run `mgt ckpt reshard {tag_dir.parent.parent} --tag {tag_dir.name}` "
                           "to retry the conversion by hand)")
            uni = universal_dir(tag_dir)
            state = engine.load(str(uni.parent), uni.name, universal=True)
        if state is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
        own = rank_file(tag_dir, self.rank)
        rng = torch.load(own, weights_only=True)["rng"] if own.is_file() else state["rng"]
        set_rng_state(rng)
        return state
