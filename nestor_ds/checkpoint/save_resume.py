"""Checkpoints in DeepSpeed's layout, with our client state, completion markers, a run pointer and pruning.

Layout (``<output_dir>/<run>/checkpoints``)::

    latest                         DeepSpeed's pointer to the newest tag (moved before our marker: not trusted)
    nestor_latest                  OUR pointer: the tag this run continues from, rewritten atomically after COMPLETE
                                   and after every resume (so a rollback moves it back)
    step_00000100/                 one tag per save
        mp_rank_00_model_states.pt            non-expert weights + client state (DeepSpeed)
        layer_<L>_expert_<E>_mp_rank_00_model_states.pt   token experts, global ids (DeepSpeed-MoE)
        *_optim_states.pt                     ZeRO optimizer partitions (DeepSpeed)
        nestor_config.json                    resolved run config + world/ep sizes (ours, for export/fine-tune)
        consolidated_model_states.pt          ZeRO-3 only: the full weights, gathered at save time
        COMPLETE                              written last, after every rank finished writing (ours): JSON
                                              {"step", "seq" (save order), "files" {name: bytes}}
    set_aside/                     tags moved out of the way, never deleted by us:
        step_00000060.abandoned               a branch given up by resuming from an older tag
        step_00000065.partial                 a save cut short (kill, disk full): no COMPLETE

Why a pointer and a save sequence rather than the highest step number: after a rollback
(``--resume .../step_00000050``) the newest save has a *lower* step than the abandoned branch's tags.
``--resume auto`` follows ``nestor_latest``, pruning keeps the last ``keep_last`` tags in save order, and a
tag whose files no longer match its COMPLETE listing (missing or truncated) is skipped with a warning for the
previous complete one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nestor_ds.checkpoint.elastic import (
    ElasticResumeError,
    RunLayout,
    check_reshardable,
    load_resharded,
    refuse_changed_model,
    saved_layout,
)
from nestor_ds.checkpoint.layout import COMPLETE_MARKER, CONFIG_FILE, CONSOLIDATED_STATES, POINTER, CheckpointError
from nestor_ds.checkpoint.safe_load import verify_checkpoint_files
from nestor_ds.errors import UserError
from nestor_ds.files import write_atomic
from nestor_ds.log import get_logger
from nestor_ds.moe.placement import ExpertOrder, read_expert_order

log = get_logger(__name__)

SET_ASIDE = "set_aside"
State = dict[str, Any]  # client state, run config: JSON-like


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists only, so the checkpoint loads with ``weights_only=True``.

    Recorded for inspection; a resume does not need them: every draw of a step is seeded from
    (seed, purpose, rank, step) by the trainer, so the resumed steps draw the same numbers anyway."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
    }


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _no_space(err: BaseException, root: Path) -> bool:
    """Whether a failed save ran out of space. torch.save reports ENOSPC as ``RuntimeError: basic_ios::clear``
    (then often replaced by ``unexpected pos`` from its zip writer's cleanup), Python writes as OSError(ENOSPC):
    look through the exception chain, then at the filesystem itself."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "basic_ios" in str(e) or "No space left" in str(e):
            return True
        e = e.__context__
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


LAST_SAVE: dict[str, float] = {}  # this process's newest save (`_save_stats`), the same on every rank


@contextmanager
def _files_written(engine: Any) -> Iterator[list[str]]:
    """The paths this rank writes in the block: DeepSpeed 0.19.8 writes every checkpoint file through
    ``engine.checkpoint_engine.save(state, path)`` and names files by the data-parallel, the expert-parallel or no
    rank, so wrapping that method of this engine instance is how a rank knows its own bytes (none there: 0 bytes)."""
    paths: list[str] = []
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "save", None)
    if original is not None:
        ce.save = lambda *a, **k: (paths.append(str(k["path"] if "path" in k else a[1])), original(*a, **k))[1]
    try:
        yield paths
    finally:
        if original is not None:
            del ce.save  # the class's method again


def _save_stats(seconds: float, write_s: float, nbytes: int) -> dict[str, float]:
    """ckpt/save_s: training blocked on this rank (call to final barrier: the slowest rank sets it); over the ranks,
    from one small all-gather: the slowest rank's own writes, the largest rank's bytes, the tag's bytes."""
    mine = torch.tensor([write_s, float(nbytes)], dtype=torch.float64)
    every = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    (w, b), total = torch.stack(every).max(0).values.tolist(), float(sum(t[1] for t in every))
    return {"ckpt/save_s": seconds, "ckpt/write_s_max_rank": w, "ckpt/bytes_max_rank": b, "ckpt/bytes_total": total}


def save_checkpoint(
    engine: Any, root: Path, step: int, client_state: State, run_config: State, keep_last: int, tracker: Any = None
) -> Path:
    """Collective: every rank calls it. Rank 0 writes our files, the pointer, and prunes old tags afterwards. Timed
    (rank 0 logs seconds and bytes per rank; ``LAST_SAVE``; ``tracker.log_metrics``, MLflow): docs/reliability.md."""
    tag = tag_for(step)
    root.mkdir(parents=True, exist_ok=True)
    tag_dir = root / tag
    start = time.perf_counter()
    try:
        with _files_written(engine) as written:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
            if engine.zero_optimization_stage() == 3:
                # ZeRO-3 files hold partitions only: also gather the full weights (collective) for export
                engine.save_16bit_model(str(tag_dir), CONSOLIDATED_STATES)
        write_s, nbytes = time.perf_counter() - start, sum(os.path.getsize(p) for p in set(written))
        _barrier()
        if _rank() == 0:
            (tag_dir / CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
            files = {
                p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER
            }
            seq = 1 + max((marker(t).get("seq", 0) for t in complete_tags(root)), default=0)
            write_atomic(tag_dir / COMPLETE_MARKER, json.dumps({"step": step, "seq": seq, "files": files}) + "\n")
            write_atomic(root / POINTER, tag + "\n")
            prune(root, keep_last)
    except (OSError, RuntimeError) as err:
        if _no_space(err, root):
            free = shutil.disk_usage(root).free if root.exists() else 0
            raise OSError(
                errno.ENOSPC,
                f"no space left on {root} while saving {tag} ({free / 2**20:.1f} MiB free); "
                f"the partial {tag} is set aside at the next start, which resumes from the "
                f"previous complete checkpoint",
            ) from None
        raise
    _barrier()
    LAST_SAVE.update(_save_stats(time.perf_counter() - start, write_s, nbytes))
    if _rank() == 0:
        t, w, b, total = LAST_SAVE.values()
        msg = "saved %s in %.2f s (slowest rank's writes %.2f s): %.1f MiB per rank at most, %.1f MiB in all"
        log.info(msg, tag, t, w, b / 2**20, total / 2**20)
    if tracker is not None:
        tracker.log_metrics(dict(LAST_SAVE), step=step)
    return tag_dir


def marker(tag_dir: Path) -> dict[str, Any]:
    """The COMPLETE marker as a dict (``{"step": N}`` for markers written before the JSON form)."""
    try:
        data = json.loads((tag_dir / COMPLETE_MARKER).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {"step": int(data)} if isinstance(data, int) else {}


def tag_step(tag_dir: Path) -> int:
    """The step in a tag's name (`step_00001200` -> 1200); -1 for a directory that is not a tag."""
    try:
        return int(tag_dir.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_tags(root: Path) -> list[Path]:
    """Complete tags in save order (oldest first); markers without a sequence sort first, by step."""
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda p: (marker(p).get("seq", 0), tag_step(p)))


def prune(root: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` most recently *saved* tags (not the highest steps) and the one the pointer names."""
    pointed = _pointer(root)
    for old in complete_tags(root)[:-keep_last]:
        if old != pointed:
            shutil.rmtree(old, ignore_errors=True)


def _pointer(root: Path) -> Path | None:
    try:
        tag = (root / POINTER).read_text().strip()
    except OSError:
        return None
    return root / tag if tag else None


def set_aside(tag_dir: Path, why: str) -> Path:
    """Move a tag to ``<root>/set_aside/<tag>.<why>[.n]`` (never deleted: a user may still want it)."""
    dest_dir = tag_dir.parent / SET_ASIDE
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{tag_dir.name}.{why}"
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{tag_dir.name}.{why}.{n}", n + 1
    os.replace(tag_dir, dest)
    return dest


def set_aside_partial_tags(root: Path) -> None:
    """Rank 0 at start: tags without COMPLETE (a save killed or out of space) go to set_aside/, so neither a
    resume nor the next save of that step trips over their files."""
    if _rank() == 0 and root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and p.name.startswith("step_") and not (p / COMPLETE_MARKER).is_file():
                dest = set_aside(p, "partial")
                log.warning("%s has no %s marker (a save cut short): moved aside to %s", p, COMPLETE_MARKER, dest)
    _barrier()


def resume_candidates(resume: str | None, checkpoint_root: Path) -> tuple[list[Path], bool]:
    """(tags to try in order, may fall back). ``auto``: this run's pointer, then the other complete tags newest
    saved first. A root path: the same on that root. A tag path: that tag only (the user chose it)."""
    if resume is None:
        return [], False
    if resume == "auto":
        root = checkpoint_root
    else:
        p = Path(resume)
        if (p / COMPLETE_MARKER).is_file():
            return [p], False
        if not complete_tags(p):
            raise FileNotFoundError(
                f"--resume {resume}: no complete checkpoint there (expected a tag directory with "
                f"{COMPLETE_MARKER} or a directory of step_* tags)"
            )
        root = p
    tags = complete_tags(root)[::-1]
    pointed = _pointer(root)
    if pointed is not None and pointed in tags:
        tags.remove(pointed)
        tags.insert(0, pointed)
    return tags, True


def check_tag(tag_dir: Path) -> str | None:
    """Why this tag cannot be loaded (a file listed in COMPLETE is missing, a .pt file does not read, or a file
    has another size than when saved), or None. Pickled objects are not a reason to fall back: they raise
    (refused, never loaded), checked before the sizes since a tampered file also changes size."""
    files = marker(tag_dir).get("files", {})
    for name in files:
        if not (tag_dir / name).is_file():
            return f"{tag_dir / name} is missing"
    try:
        verify_checkpoint_files(tag_dir)
    except CheckpointError as err:
        if "refused to load" in str(err):
            raise
        return str(err)
    for name, size in files.items():
        f = tag_dir / name
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
    return None


def load_checkpoint(engine: Any, tag_dir: Path, layout: RunLayout | None = None) -> dict[str, Any]:
    """Load weights, optimizer state and our client state into a freshly initialised engine.

    DeepSpeed unpickles with weights_only=False; every file is first checked to load with weights_only=True.
    With `layout` (the trainer's): a tag saved on another world size or ep_size is re-sharded (`elastic.py`), and a
    model that no longer matches the saved one is refused before anything is loaded.
    """
    verify_checkpoint_files(tag_dir)
    if layout is not None:
        saved = saved_layout(tag_dir)
        order = _expert_order_for(tag_dir, layout)
        if saved != (layout.world_size, layout.ep_size) or order is not None:
            check_reshardable(tag_dir, layout.zero_stage, (layout.world_size, layout.ep_size), saved)
            client = load_resharded(engine, tag_dir, layout.model, order.orders if order else None)
            reordered = {"experts_reordered_by": layout.expert_order} if order else {}
            return {**client, "resharded_from": {"world_size": saved[0], "ep_size": saved[1]}, **reordered}
        refuse_changed_model(tag_dir, engine.module, layout.model)
    path, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return client_state or {}


def _expert_order_for(tag_dir: Path, layout: RunLayout) -> ExpertOrder | None:
    """The run's expert order (train.expert_order) if it was computed from `tag_dir`'s step, else None: tags saved
    after the re-ordering hold re-ordered experts already. (Applying an order twice would still give the same
    function, the experts permuted consistently everywhere, only not the balanced placement.)"""
    if not layout.expert_order:
        return None
    order = read_expert_order(layout.expert_order)
    if order.checkpoint_step is None:
        raise UserError(
            f"train.expert_order {layout.expert_order} was computed from an export, not from a checkpoint of this run: "
            "write it with python -m nestor_ds.routing.place --checkpoint <run>/checkpoints --order-out FILE"
        )
    step = tag_step(tag_dir)
    if order.checkpoint_step != step:
        log.info(
            "train.expert_order %s was computed from step %s, this checkpoint is step %d: the experts keep their order",
            layout.expert_order,
            order.checkpoint_step,
            step,
        )
        return None
    if layout.zero_stage not in (1, 2):
        raise ElasticResumeError(
            f"train.expert_order re-orders the experts in the fp32 masters and Adam's moments of a ZeRO-1/2 run; this "
            f"run has ZeRO stage {layout.zero_stage} (re-order an export instead: nestor_ds.routing.place --out)"
        )
    if order.ep_size != layout.ep_size:
        log.warning("train.expert_order balances ep_size %d; this run has ep_size %d", order.ep_size, layout.ep_size)
    log.info("re-ordering the token experts of %d token MoEs by %s", len(order.orders), layout.expert_order)
    return order


def resume(
    engine: Any,
    resume_arg: str | None,
    checkpoint_root: Path,
    step_logs: tuple[Path, ...],
    layout: RunLayout | None = None,
) -> dict[str, Any]:
    """Collective resume: choose a tag, fall back past broken ones, load, then tidy this run's directory.

    Order matters for a crash at any point: nothing is moved, truncated or announced before a load succeeded.
    Afterwards (rank 0): complete tags of this run with a higher step than the loaded one are an abandoned
    branch and are set aside; the pointer names the loaded tag; the run's per-step logs (``step_logs``:
    metrics.jsonl, expert_usage.jsonl) drop the steps to be redone. Returns the client state ({} for a fresh
    start, which also drops the rows of a run killed before its first save).
    """
    from nestor_ds.collectives import any_rank

    set_aside_partial_tags(checkpoint_root)
    candidates, may_fall_back = resume_candidates(resume_arg, checkpoint_root)
    if not candidates:
        if _rank() == 0:
            for path in step_logs:  # steps logged by a run killed before its first save are redone
                truncate_metrics(path, 0)
        if _rank() == 0 and layout is not None and layout.expert_order:
            log.warning("train.expert_order %s: no checkpoint to re-order, ignored", layout.expert_order)
        if _rank() == 0 and resume_arg is not None:
            log.warning(
                "--resume auto: no complete checkpoint under %s: starting fresh from step 0 (check --run-name "
                "if you meant to continue a run)",
                checkpoint_root,
            )
        return {}
    client: dict[str, Any] | None = None
    loaded: Path | None = None
    for i, tag_dir in enumerate(candidates):
        problem = check_tag(tag_dir)
        if any_rank(problem is not None):  # every rank must take the same tag
            problem = problem or "another rank could not read it"
            if not may_fall_back:
                raise FileNotFoundError(f"--resume {tag_dir}: cannot load: {problem}")
            if _rank() == 0:
                nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                log.warning(
                    "checkpoint %s cannot be loaded (%s): %s",
                    tag_dir.name,
                    problem,
                    f"falling back to {nxt.name}" if nxt else "no older complete checkpoint",
                )
            continue
        client, loaded = load_checkpoint(engine, tag_dir, layout), tag_dir
        break
    if loaded is None:
        raise FileNotFoundError(
            f"--resume {resume_arg}: no loadable checkpoint under {candidates[0].parent} "
            f"(tried {', '.join(t.name for t in candidates)})"
        )
    step = int(client.get("step", marker(loaded).get("step", 0)))
    _barrier()  # every rank has read its files before rank 0 moves anything
    if _rank() == 0:
        log.info("resumed from %s (step %d)", loaded, step)
        _after_resume(checkpoint_root, loaded, step)
        for path in step_logs:
            truncate_metrics(path, step)
    _barrier()
    return client


def _after_resume(root: Path, loaded: Path, step: int) -> None:
    """Set aside this run's tags past the resumed step (the abandoned branch) and point at the loaded tag."""
    for tag_dir in complete_tags(root):
        if tag_step(tag_dir) > step and tag_dir.resolve() != loaded.resolve():
            dest = set_aside(tag_dir, "abandoned")
            log.warning(
                "resumed from step %d: %s belongs to an abandoned branch, moved aside to %s", step, tag_dir.name, dest
            )
    root.mkdir(parents=True, exist_ok=True)
    if loaded.parent.resolve() == root.resolve():
        write_atomic(root / POINTER, loaded.name + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the steps a resumed run will redo (logged after its checkpoint), so a step log has each step once.
    Atomic (write-then-rename): a kill here leaves the old file, never a truncated one."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and _row_step(line) <= last_step]
    write_atomic(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line (killed mid-write) is dropped
