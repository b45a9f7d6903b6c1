"""fp32 master weights of bf16 ZeRO runs (docs/reliability.md, §7), read back from real trainer checkpoints.

The real trainer runs on CPU ranks over gloo with the shipped `*_bf16.json` configs, a tiny NESTOR with
expert-parallel token experts. The master copy read by `gather_fp32_master_state` is compared with an
independent reconstruction from each rank's own `param_slice_mappings` (not the `param_shapes` it uses).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from nestor_ds.checkpoint.convert import deepspeed_to_local_state
from nestor_ds.checkpoint.export import export_checkpoint
from nestor_ds.checkpoint.fp32_master import NoMasterWeights, gather_fp32_master_state, read_fp32_master_state
from nestor_ds.checkpoint.safe_load import gather_deepspeed_state, read_safetensors, safe_torch_load

from train_fixtures import ds_config, launch, tiny_config

TRAIN = "nestor_ds.train"
pytestmark = pytest.mark.timeout(900)
OPTIM_RE = re.compile(r"^bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _train(tiny_shards, work: Path, stage: int, ranks: int, ep_size: int) -> Path:
    """Two optimizer steps of a one-block tiny NESTOR under zero<stage>_bf16.json; returns the saved tag."""
    _, shards = tiny_shards
    cfg = tiny_config(
        work,
        shards,
        model={"depth": 1, "moe": {"backend": "local", "ep_size": ep_size}},
        train={"max_steps": 2, "ckpt_every": 2, "eval_every": 0},
        tracking={"enabled": False},
    )
    ds = ds_config(work, stage=stage, micro=2, suffix="_bf16")
    proc = launch([TRAIN, "--ds_config", str(ds), "--config", str(cfg), "--run-name", "bf16"], ranks=ranks, cwd=work)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    tag = work / "runs" / "bf16" / "checkpoints" / "step_00000002"
    assert (tag / "COMPLETE").is_file()
    return tag


def _optimizer_files(tag: Path) -> dict[int, dict]:
    files = {int(m.group(1)): f for f in tag.iterdir() if (m := OPTIM_RE.match(f.name))}
    return {r: safe_torch_load(files[r])["optimizer_state_dict"] for r in sorted(files)}


def _from_slice_mappings(tag: Path, ep_size: int) -> dict[str, torch.Tensor]:
    """Each parameter, flattened, from the fragments every rank records for its own slice (rank-local names;
    expert-parallel rank r = rank % ep_size holds experts r * local .. r * local + local - 1)."""
    states = safe_torch_load(tag / "mp_rank_00_model_states.pt", mmap=True)
    local = states["num_experts"][0] // ep_size if ep_size > 1 else 0
    pieces: dict[str, list[torch.Tensor]] = defaultdict(list)
    for rank, osd in _optimizer_files(tag).items():
        first = (rank % ep_size) * local
        for part, mapping in zip(osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]):
            for name, frag in mapping.items():
                m = re.search(r"deepspeed_experts\.(\d+)\.", name)
                if m:
                    name = f"{name[: m.start(1)]}{first + int(m.group(1))}{name[m.end(1) :]}"
                pieces[name].append(part[frag.start : frag.start + frag.numel])
    return {name: torch.cat(p) for name, p in pieces.items()}


def _check_master(tag: Path, ep_size: int) -> dict[str, torch.Tensor]:
    """(a) keys, shapes, fp32; (b) bit for bit the optimizer's copy; (c) bf16 module = master rounded to bf16."""
    module = gather_deepspeed_state(tag)
    master = gather_fp32_master_state(tag)
    assert master is not None
    assert list(master) == list(module)
    assert all(master[k].dtype == torch.float32 and master[k].shape == v.shape for k, v in module.items())
    assert {v.dtype for v in module.values()} == {torch.bfloat16}

    independent = _from_slice_mappings(tag, ep_size)
    assert set(independent) == set(module)  # every module key is an optimized parameter in this model
    mismatched = [k for k, v in independent.items() if not torch.equal(master[k].reshape(-1), v)]
    assert not mismatched, mismatched[:3]
    # the non-expert group as DeepSpeed flattened it: param_shapes order, rank slices one after the other
    shapes = safe_torch_load(tag / "mp_rank_00_model_states.pt", mmap=True)["param_shapes"][0]
    osds = list(_optimizer_files(tag).values())
    assert not any(osds[0].get("param_alignment_paddings", [[0]])[0])
    flat = torch.cat([osd["single_partition_of_fp32_groups"][0] for osd in osds])
    assert torch.equal(flat, torch.cat([master[k].reshape(-1) for k in shapes]))

    assert all(torch.equal(master[k].to(torch.bfloat16), v) for k, v in module.items())
    differ = [k for k, v in module.items() if not torch.equal(master[k], v.float())]
    assert differ, "the fp32 master equals the bf16 weights everywhere: the comparison shows nothing"
    return master


def test_zero2_bf16_expert_parallel_master_weights(tiny_shards, tmp_path):
    tag = _train(tiny_shards, tmp_path, stage=2, ranks=2, ep_size=2)
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    master = _check_master(tag, ep_size=2)
    # experts 2 and 3 of each layer exist only on rank 1: their names were rebuilt from rank 0's local ids
    assert any(".deepspeed_experts.3.w2." in k for k in master)

    # export (what fine-tuning and evaluation also read) carries the fp32 masters; --dtype bf16 the rounded weights
    fp32, _ = read_safetensors(export_checkpoint(tag, tmp_path / "fp32.safetensors"))
    want = deepspeed_to_local_state(master)
    assert set(fp32) == set(want) and all(torch.equal(fp32[k], v) for k, v in want.items())  # safetensors sorts keys
    bf16, _ = read_safetensors(export_checkpoint(tag, tmp_path / "bf16.safetensors", dtype="bf16"))
    rounded = deepspeed_to_local_state(gather_deepspeed_state(tag))
    assert set(bf16) == set(rounded) and all(torch.equal(bf16[k], v) for k, v in rounded.items())
    assert any(not torch.equal(fp32[k], bf16[k].float()) for k in fp32)


def test_zero1_bf16_experts_split_over_expert_data_parallel_ranks(tiny_shards, tmp_path):
    """4 ranks, ep_size 2: each expert group is partitioned over 2 ranks (0 and 2, 1 and 3) and concatenated."""
    tag = _train(tiny_shards, tmp_path, stage=1, ranks=4, ep_size=2)
    assert [osd["partition_count"] for osd in _optimizer_files(tag).values()] == [[4, 2]] * 4
    _check_master(tag, ep_size=2)


def test_zero0_has_no_readable_master_weights(tiny_shards, tmp_path):
    tag = _train(tiny_shards, tmp_path, stage=0, ranks=2, ep_size=2)
    assert gather_fp32_master_state(tag) is None
    with pytest.raises(NoMasterWeights, match="ZeRO-0"):
        read_fp32_master_state(tag)
