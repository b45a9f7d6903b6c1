"""The training step reads nothing back from the device between logging steps (counted, not assumed).

On a GPU every ``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``, ``.cpu()`` or ``.numpy()`` of a device
tensor is a host sync. On CPU we count those calls for real: :func:`count_host_reads` wraps the Tensor methods
while one trainer step runs (it observes the calls and forwards them unchanged) and attributes each call to the
file that made it. tools/bench_model.py uses the same counter for its ``host_syncs_per_step``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nestor_ds.engine.hot_loop import DeviceLog
from nestor_ds.engine.sync_count import count_host_reads

pytestmark = pytest.mark.timeout(600)


def _engine_and_batches(tiny_shards, model_over: dict, ds: dict):
    """A real DeepSpeed engine around the engine tests' tiny model (as AFNO, or as ``model_over`` says) and 4 real
    batches of the tiny shards."""
    import deepspeed

    from nestor_ds.config import load_config
    from nestor_ds.data import TrainStream
    from nestor_ds.engine.distributed import init_distributed
    from nestor_ds.model import build_model

    from train_fixtures import tiny_config

    init_distributed()
    root, shards = tiny_shards
    cfg = load_config(tiny_config(root, shards, model=model_over, train={"input_noise": 5e-4}))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 10**9, **ds},
    )
    stream = TrainStream(cfg.data, micro_batch=2)
    batches = list(itertools.islice(stream.batches(0), 4))  # drawn before counting: the data loader is host code
    return cfg, engine, batches


def test_counter_sees_reads_and_names_their_file():
    """Counts by kind and site inside the block; on exit every wrapped method is torch's own object again (the
    wrapper names itself after the method, so a name check could not tell) and later reads go uncounted."""
    from nestor_ds.engine.sync_count import READ_METHODS

    originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}
    t = torch.ones(3)
    with count_host_reads() as reads:
        assert all(getattr(torch.Tensor, name) is not originals[name] for name in READ_METHODS)
        t.sum().item()
        float(t[0])
        t.tolist()
        bool(t.any())
    assert reads.total == 4 and reads.by_kind == {"item": 1, "__float__": 1, "tolist": 1, "__bool__": 1}
    assert all("test_hot_loop.py" in site for site in reads.by_site)
    assert all(getattr(torch.Tensor, name) is originals[name] for name in READ_METHODS)  # restored on exit
    t.sum().item()
    assert reads.total == 4


STATIC = {"image_routing": "static", "moe": {"routing": "static"}}


@pytest.mark.parametrize(
    "model,ds",
    [
        ({"preset": "afno-tiny"}, {"zero_optimization": {"stage": 0}}),
        ({"preset": "afno-tiny"}, {"zero_optimization": {"stage": 2}}),
        (STATIC, {"zero_optimization": {"stage": 0}}),
    ],
    ids=["afno-zero0", "afno-zero2", "nestor-static-zero0"],
)
def test_trainer_step_makes_no_host_reads_except_on_logging_steps(tiny_shards, model, ds):
    """AFNO and NESTOR with static routing, real batches, real DeepSpeed engine: the step itself reads nothing; the
    logging step reads everything once. ZeRO-1/2's optimizer step makes its own reads (DeepSpeed checks the gradient
    norm and overflow on the host); they are reported separately and none of ours is among them."""
    from nestor_ds.engine.step import optimizer_step
    from nestor_ds.tracking import ExpertUsage

    cfg, engine, batches = _engine_and_batches(tiny_shards, model, ds)
    feed = iter(batches)
    usage = ExpertUsage(num_datasets=len(cfg.data.datasets))
    log = DeviceLog(usage)
    parts = optimizer_step(engine, feed, cfg, 0, 0, 1, torch.float32, log)  # warm-up (lazy init in DeepSpeed)
    log.add_step(1, 1e-3, parts, engine.get_global_grad_norm())
    with count_host_reads() as reads:
        for step in (1, 2):
            parts = optimizer_step(engine, feed, cfg, 0, step, 1, torch.float32, log)
            log.add_step(step + 1, 1e-3, parts, engine.get_global_grad_norm())
    ours = {k: v for k, v in reads.by_site.items() if "/nestor_ds/" in k}
    assert reads.total > 0 or ds["zero_optimization"]["stage"] == 0  # the counter is live (DeepSpeed's reads)
    assert ours == {}, ours
    if ds["zero_optimization"]["stage"] == 0:
        deepspeed_reads = {k: v for k, v in reads.by_site.items() if "/deepspeed/" in k}
        assert deepspeed_reads == {}, deepspeed_reads
    with count_host_reads() as flush_reads:
        rows = log.flush()
    assert [s for s, _ in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(m["train/loss"])) for _, m in rows)
    # one .cpu() of the stacked rows and one .tolist() after the reduce (+ the routing counts for NESTOR's statistics)
    assert flush_reads.from_files("/nestor_ds/engine/") == 2
    if cfg.model.arch == "nestor":  # the routing of the 3 steps reached the statistics at the flush, not before
        assert flush_reads.from_files("/nestor_ds/tracking/") > 0
        assert usage.counts_matrix(0).sum() == 3 * 2 * cfg.model.image_top_k  # 3 steps x 2 samples x top-k


def test_device_log_flush_equals_direct_reads():
    """What the logging step reports equals reading each step at once (parts, grad norm as tensor or float)."""
    log = DeviceLog()
    # PART_NAMES: image_lb, loss, rel_l2, skipped_samples, token_lb, token_z
    parts = [torch.tensor([0.1, 1.5, 1.2, 0.0, 0.3, 0.0]), torch.tensor([0.2, 1.4, 1.1, 1.0, 0.1, 0.0])]
    log.add_step(1, 1e-3, parts[0], torch.tensor(2.5))
    log.add_step(2, 2e-3, parts[1], 0.75)
    log.add_step(3, 3e-3, parts[1] * 2, None)
    rows = log.flush()
    assert [s for s, _ in rows] == [1, 2, 3]
    assert rows[0][1]["train/loss"] == pytest.approx(1.5) and rows[0][1]["train/grad_norm"] == pytest.approx(2.5)
    assert rows[1][1]["train/rel_l2"] == pytest.approx(1.1) and rows[1][1]["train/grad_norm"] == 0.75
    assert rows[1][1]["train/skipped_samples"] == 1.0
    assert "train/grad_norm" not in rows[2][1] and rows[2][1]["train/loss"] == pytest.approx(2.8)
    assert rows[2][1]["train/lr"] == 3e-3 and log.flush() == []


def test_routing_records_can_be_copied_out_of_graph_memory():
    """Under CUDA graphs the routing records are cloned (a replay would overwrite them before the flush)."""
    from nestor_ds.model.image_moe import BlockRouting
    from nestor_ds.tracking import ExpertUsage

    usage = ExpertUsage(num_datasets=2)
    log = DeviceLog(usage)
    r = BlockRouting(torch.tensor([[0, 1], [1, 0]]), torch.tensor([2, 2]), torch.ones(2, 3, dtype=torch.long))
    log.add_micro([r], torch.tensor([0, 1]), copy=True)
    r.image_topk_idx.fill_(0)  # what a replay does to graph-owned memory
    r.token_counts.fill_(100)
    log.flush_usage()
    assert usage.counts_matrix(0).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert usage.token_counts(0).sum() == 6
