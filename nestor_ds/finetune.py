"""Fine-tune a pre-trained NESTOR checkpoint on a downstream dataset, with the same engine as pre-training.

    python -m nestor_ds.finetune --ds_config ds_configs/zero2.json --config configs/finetune_demo.yaml \\
        --pretrained runs/demo-pretrain/checkpoints
    deepspeed --num_gpus 2 --module nestor_ds.finetune --ds_config ds_configs/zero2.json \\
        --pretrained model.safetensors ...

``--pretrained`` takes a DeepSpeed checkpoint (root or tag directory; ZeRO 0-2, any world size or ep_size) or a
file exported by ``python -m nestor_ds.checkpoint``. The model architecture comes from the checkpoint; the fields
that follow the data (channels, T_in, T_ar, resolution) come from this run's data section, and the YAML's
``model`` section may override the rest. Tensors that no longer fit are re-initialised and reported.
"""

from __future__ import annotations

from typing import Any

from nestor_ds.cli import base_parser, restart_resume, run_cli
from nestor_ds.errors import UserError


def build_finetune_config(raw: dict[str, Any], config_path: str | None, pretrained_model: dict[str, Any]):
    """This run's YAML (+ --set overrides) over the checkpoint's model config (``merge_model_config``: the
    data-bound fields follow this run's data; a preset named in the YAML replaces the checkpoint's architecture)."""
    from nestor_ds.config import ConfigError, config_from_dict

    try:
        return config_from_dict(raw, base_model=pretrained_model)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{config_path}: {e}") from None


def main() -> int:
    parser = base_parser(__doc__, default_config="configs/finetune_demo.yaml")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="DeepSpeed checkpoint directory or exported .safetensors (default: finetune.pretrained in the YAML)",
    )
    parser.add_argument(
        "--load",
        choices=("all", "embedding+blocks", "blocks"),
        default=None,
        help="which pre-trained parts to load (default: finetune.load)",
    )
    parser.add_argument(
        "--freeze",
        default=None,
        metavar="PART[,PART]",
        help="freeze parts: routers, experts, shared_afno, embedding (default: finetune.freeze)",
    )
    args = parser.parse_args()

    from nestor_ds.checkpoint.load import load_local_state
    from nestor_ds.engine import run_training
    from nestor_ds.engine.transfer import freeze, load_pretrained_parts
    from nestor_ds.log import get_logger

    log = get_logger("nestor_ds.finetune")
    extra = list(args.overrides)
    if args.pretrained:
        extra.append(f"finetune.pretrained={args.pretrained}")
    if args.load:
        extra.append(f"finetune.load={args.load}")
    if args.freeze is not None:
        extra.append(f"finetune.freeze=[{args.freeze}]")
    # this run's YAML and overrides, read once; the pre-trained architecture goes under it
    from nestor_ds.config import deep_merge, parse_overrides, read_yaml

    raw = deep_merge(read_yaml(args.config) if args.config else {}, parse_overrides(extra))
    pretrained = (raw.get("finetune") or {}).get("pretrained")
    if not pretrained:
        raise UserError("no pre-trained checkpoint: pass --pretrained PATH (or set finetune.pretrained)")
    state, source_cfg, source = load_local_state(pretrained)
    cfg = build_finetune_config(raw, args.config, source_cfg["model"])

    def prepare(model, cfg, dist_info):
        report = load_pretrained_parts(model, state, cfg.finetune.load)
        frozen = freeze(model, cfg.finetune.freeze)
        if dist_info.is_main:
            log.info(
                "fine-tuning from %s\n%s%s",
                source,
                report.summary(),
                f"\n  frozen: {len(frozen)} tensors ({', '.join(cfg.finetune.freeze)})" if frozen else "",
            )
        loaded = set(report.loaded)
        params = dict(model.named_parameters())
        return {
            "pretrained": ([p for n, p in params.items() if n in loaded], cfg.finetune.pretrained_lr_multiplier),
            "new": ([p for n, p in params.items() if n not in loaded], cfg.finetune.new_lr_multiplier),
        }

    result = run_training(
        cfg,
        args.ds_config,
        entry="finetune",
        run_name=args.run_name or "finetune",
        resume=restart_resume(args.resume, cfg, "finetune", args.run_name or "finetune"),  # torchrun restarts
        prepare=prepare,
        parent_run_id=source_cfg.get("mlflow_run_id") or None,
        evaluate_before=True,
    )
    before = result.final_eval.get("before", {}).get("mean", {})
    after = result.final_eval.get("after", {}).get("mean", {})
    import torch.distributed as dist

    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if before and after and is_main:  # every rank holds the same report; say it once
        log.info(
            "fine-tuning: mean one-step L2RE %.4f -> %.4f, rollout L2RE %.4f -> %.4f",
            before["l2re_1step"],
            after["l2re_1step"],
            before["l2re_rollout"],
            after["l2re_rollout"],
        )
    return 0


def cli() -> None:
    """``nestor-finetune``: the console command of ``python -m nestor_ds.finetune`` (same arguments, same errors)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
