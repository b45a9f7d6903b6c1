"""torch.compile of the models: whole-model + loss graphs without breaks, regional compile in the trainer.

Compiling on CPU takes time (C++ code generation): the models are tiny, graph-break checks use Dynamo's
``explain`` (no code generation) and forward+backward capture uses the ``aot_eager`` backend; one test runs the
real Inductor compile through the trainer, with exact resume.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from nestor_ds.config import ConfigError, load_config
from nestor_ds.engine.compile import apply_compile, compile_regions, static_routing
from nestor_ds.engine.loss import training_loss
from nestor_ds.model import build_model, get_preset

pytestmark = pytest.mark.timeout(900)

STATIC = {"image_routing": "static", "moe": {"routing": "static"}}
CASES = {  # name: (preset, overrides)
    "afno-dft": ("afno-tiny", {"afno_spectral": "dft"}),
    "afno-fft": ("afno-tiny", {"afno_spectral": "fft"}),
    "nestor-static-dft": ("nestor-tiny", {**STATIC, "afno_spectral": "dft"}),
    "nestor-static-fft": ("nestor-tiny", {**STATIC, "afno_spectral": "fft"}),
}


def _model_and_batch(preset: str, over: dict, batch: int = 4):
    torch.manual_seed(0)
    cfg = get_preset(preset, over)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.resolution, cfg.resolution, cfg.t_in, cfg.in_channels, generator=g)
    y = torch.randn(batch, cfg.resolution, cfg.resolution, cfg.t_ar, cfg.c_out, generator=g)
    mask = torch.ones(batch, cfg.c_out, dtype=torch.bool)
    mask[0, -1] = False
    return cfg, model, x, y, mask


def _loss_fn(model, loss_cfg):
    def fn(x, y, mask):
        out = model(x, mask)
        return training_loss(out.pred.float(), y, mask, out.aux_losses, loss_cfg)[0]

    return fn


@pytest.mark.parametrize("case", list(CASES))
def test_whole_model_and_loss_trace_as_one_graph(case):
    """Dynamo captures forward + loss of the whole model in ONE graph: no break anywhere (static routing)."""
    from nestor_ds.engine.loss import LossConfig

    preset, over = CASES[case]
    _, model, x, y, mask = _model_and_batch(preset, over)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_loss_fn(model, LossConfig()))(x, y, mask)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_dropless_nestor_does_break_the_graph():
    """The counter-check: dropless routing reads group sizes on the host, which Dynamo must split at."""
    from nestor_ds.engine.loss import LossConfig

    _, model, x, y, mask = _model_and_batch("nestor-tiny", {})
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_loss_fn(model, LossConfig()))(x, y, mask)
    assert explanation.graph_break_count > 0


def test_tracing_a_dropless_token_moe_leaves_the_eager_kernel_choice_alone():
    """The grouped-kernel probe is not run on Dynamo's fake tensors (whose _grouped_mm wants bf16): traced after an
    eager call (probe cached as supported) it does not fail, traced first it does not cache "unsupported"."""
    from nestor_ds.moe import LocalTokenMoE, MoEConfig
    from nestor_ds.moe.experts import _grouped_mm_runs, grouped_mm_supported

    torch.manual_seed(0)
    moe = LocalTokenMoE(MoEConfig(num_experts=4, top_k=2), dim=32)
    x_ND = torch.randn(48, 32)
    sizes = (torch.device("cpu"), torch.float32, 32, moe.hidden)
    for probed_first in (True, False):
        _grouped_mm_runs.cache_clear()
        if probed_first:
            assert moe.experts.default_kernel(x_ND) == "grouped"  # the CPU kernel runs fp32 eagerly
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda x: moe(x).out_ND.sum())(x_ND)
        assert explanation.graph_break_count > 0  # the host read of the group sizes
        assert grouped_mm_supported(*sizes)


@pytest.mark.parametrize("case", ["afno-dft", "nestor-static-fft"])
def test_forward_and_backward_compile_fullgraph_and_match_eager(case):
    """fullgraph=True forward + backward (AOT autograd traces the backward too) equals eager, fp32."""
    from nestor_ds.engine.loss import LossConfig

    preset, over = CASES[case]
    _, model, x, y, mask = _model_and_batch(preset, over)
    fn = _loss_fn(model, LossConfig())
    loss = fn(x, y, mask)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, y, mask)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in eager:
            torch.testing.assert_close(p.grad, eager[n], atol=1e-5, rtol=1e-4, msg=n)


def test_regions_and_state_dict_keys():
    """Regional compile: blocks (static) or the AFNO blocks inside them (dropless); state_dict keys unchanged."""
    afno = build_model(get_preset("afno-tiny", {"num_datasets": 3}))  # with the dataset head (stays eager)
    static = build_model(get_preset("nestor-tiny", STATIC))
    dropless = build_model(get_preset("nestor-tiny"))
    assert static_routing(afno) and static_routing(static) and not static_routing(dropless)
    assert [n for n, _ in compile_regions(afno, True)] == ["encoder", "blocks.0", "blocks.1", "head"]
    assert [n for n, _ in compile_regions(static, True)] == ["encoder", "blocks.0", "blocks.1", "head"]
    assert [n for n, _ in compile_regions(dropless, False)] == [
        "encoder",
        "blocks.0.moe.shared.0",
        "blocks.1.moe.shared.0",
        "head",
    ]
    keys = list(static.state_dict())
    plan = apply_compile(static, True, False, torch.device("cpu"))
    assert plan.regions and list(static.state_dict()) == keys
    assert not any("_orig_mod" in k for k in static.state_dict())


def test_cuda_graphs_fall_back_with_exactly_one_line(caplog):
    caplog.set_level(logging.INFO, logger="nestor_ds")
    for preset, over, why in (("afno-tiny", {}, "need a CUDA device"), ("nestor-tiny", {}, "need a CUDA device")):
        caplog.clear()
        plan = apply_compile(build_model(get_preset(preset, over)), True, True, torch.device("cpu"))
        lines = [r.getMessage() for r in caplog.records if "cuda_graphs" in r.getMessage()]
        assert len(lines) == 1 and why in lines[0] and not plan.cuda_graphs, lines
    from nestor_ds.engine.compile import cuda_graphs_blocker

    assert "dropless" in cuda_graphs_blocker(torch.device("cuda"), static=False)
    assert cuda_graphs_blocker(torch.device("cuda"), static=True) is None


def test_cuda_graphs_need_compile():
    from nestor_ds.engine.train_config import TrainConfig

    with pytest.raises(ConfigError, match="train.cuda_graphs needs train.compile"):
        TrainConfig(cuda_graphs=True).validate()
    TrainConfig(cuda_graphs=True, compile=True).validate()


def test_compiled_training_resumes_exactly(tiny_shards, tmp_path):
    """train.compile under the DeepSpeed engine (ZeRO-2, 1 rank, Inductor): a run stopped at step 2 and resumed
    continues the uninterrupted compiled run exactly; checkpoints hold the plain parameter names."""
    from nestor_ds.engine.trainer import run_training

    from train_fixtures import ds_config, tiny_config

    root, shards = tiny_shards
    path = tiny_config(
        tmp_path,
        shards,
        model={"preset": "afno-tiny"},
        train={"max_steps": 4, "ckpt_every": 100, "input_noise": 5e-4, "compile": True, "log_every": 3},
        tracking={"enabled": False},
    )
    ds = str(ds_config(tmp_path, stage=2))
    run_training(load_config(path), ds, run_name="full")
    run_training(load_config(path, ["train.stop_at=2"]), ds, run_name="cut")
    cut = run_training(load_config(path), ds, run_name="cut", resume="auto")
    assert cut.steps == 4

    def losses(name):
        return [
            json.loads(line)["train/loss"]
            for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]

    a, b = losses("full"), losses("cut")
    assert len(a) == len(b) == 4 and a == b, (a, b)
    states = torch.load(
        tmp_path / "runs" / "full" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
        weights_only=True,
        map_location="cpu",
    )
    keys = list(states["module"])
    assert "blocks.0.filter.w1" in keys and not any("_orig_mod" in k for k in keys)
