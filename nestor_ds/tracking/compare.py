"""Side-by-side terminal table of MLflow runs (pre-train vs fine-tune vs scratch, NESTOR vs the AFNO baseline).

Runs are columns, quantities are rows, so a dozen per-dataset rows still fit a terminal. Values are the last
logged value of each metric. Per dataset: which data the run used (`data/<name>`: the context -- train,
pretrain (a fine-tune's parent data), eval -- and the first 8 characters of the MLflow dataset digest, equal
digests meaning the same shards mixed with the same weight), then its L2RE rows. Examples:

    python -m nestor_ds.tracking.compare                                    # latest 6 runs of experiment nestor-ds
    python -m nestor_ds.tracking.compare --run demo-pretrain --run demo-finetune --run 9c1b...   # run names or ids
    python -m nestor_ds.tracking.compare --filter "tags.nestor.entry = 'finetune'"              # MLflow search filter
    python -m nestor_ds.tracking.compare --metrics train/grad_norm,perf/mfu
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from nestor_ds.cli import run_cli
from nestor_ds.compat import metric_objs

PROG = "python -m nestor_ds.tracking.compare"
DEFAULT_URI = "sqlite:///mlflow.db"

# Where each header row is looked up, in order: tags, then params, then metrics.
# where the engine puts them (tags first, then the flattened run parameters)
PRESET_KEYS = ("nestor.preset", "preset", "config.preset")
PARAM_COUNT_KEYS = ("nestor.params_total", "total_params")
ACTIVE_COUNT_KEYS = ("nestor.params_active", "active_params")
BASE_METRICS = ("train/loss", "train/rel_l2", "perf/samples_per_s", "perf/tflops", "perf/mfu")
EVAL_RE = re.compile(r"^(?P<prefix>eval|eval_before)/(?P<ds>.+)/(?P<kind>l2re_1step|l2re_rollout)$")
CONTEXT_SHORT = {"training": "train", "pretraining": "pretrain", "evaluation": "eval"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help=f"MLflow store (default $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    p.add_argument("--experiment", default="nestor-ds", help="experiment to list when no --run is given")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="run name (newest run of that name in --experiment) or run id; repeatable; default: latest runs",
    )
    p.add_argument(
        "--filter",
        default="",
        metavar="EXPR",
        help="MLflow search filter for --experiment, e.g. \"tags.nestor.entry = 'finetune'\"",
    )
    p.add_argument("--max-runs", type=int, default=6, help="how many latest runs to show without --run")
    p.add_argument("--metrics", default="", help="extra metric rows, comma-separated (e.g. train/grad_norm,perf/mfu)")
    p.add_argument("--no-eval", action="store_true", help="hide the per-dataset eval rows")
    return p.parse_args(argv)


def _lookup(run, keys: tuple[str, ...]) -> str:
    """First of `keys` found in the run's tags, params or metrics; '-' if none."""
    for source in (run.data.tags, run.data.params, run.data.metrics):
        for key in keys:
            if key in source:
                return _fmt(source[key])
    return "-"


def _fmt(value) -> str:
    """Compact number formatting: 4 significant digits, parameter counts in M."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    v = float(value)
    if v != v:
        return "nan"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v:.4g}"


def fetch_runs(client, args) -> list:
    """The runs named by --run (names or ids, in that order), else the latest --max-runs of --experiment
    matching --filter."""
    exp = client.get_experiment_by_name(args.experiment)
    if args.run:
        return [_find_run(client, exp, r) for r in args.run]
    if exp is None:
        raise LookupError(f"experiment '{args.experiment}' not found")
    return client.search_runs(
        [exp.experiment_id],
        filter_string=args.filter,
        order_by=["attributes.start_time DESC"],
        max_results=args.max_runs,
    )


def _find_run(client, exp, name_or_id: str):
    """Newest run called `name_or_id` in the experiment, else the run with that id."""
    if exp is not None:
        quoted = name_or_id.replace("'", "\\'")
        named = client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{quoted}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if named:
            return named[0]
    try:
        return client.get_run(name_or_id)
    except Exception:  # noqa: BLE001
        where = f"experiment '{exp.name}'" if exp is not None else "the store"
        raise LookupError(f"no run named or with id '{name_or_id}' in {where}") from None


def dataset_cells(run) -> dict[str, str]:
    """{dataset name: "train 9b191e04, eval 9b191e04"} from the run's MLflow dataset inputs."""
    cells: dict[str, list[str]] = {}
    for d in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "-")
        short = "+".join(CONTEXT_SHORT.get(c, c) for c in context.split("+"))
        cells.setdefault(d.dataset.name, []).append(f"{short} {d.dataset.digest[:8]}")
    return {k: ", ".join(sorted(v)) for k, v in cells.items()}


def build_table(runs: list, extra_metrics: list[str], show_eval: bool = True) -> list[list[str]]:
    """Rows of [label, value per run]."""
    rows = [
        ["run id"] + [r.info.run_id[:12] for r in runs],
        ["name"] + [r.info.run_name or "-" for r in runs],
        ["entry"] + [r.data.tags.get("nestor.entry", "-") for r in runs],
        ["status"] + [r.info.status for r in runs],
        ["preset"] + [_lookup(r, PRESET_KEYS) for r in runs],
        ["params total"] + [_lookup(r, PARAM_COUNT_KEYS) for r in runs],
        ["params active"] + [_lookup(r, ACTIVE_COUNT_KEYS) for r in runs],
        ["last step"]
        + [str(max((m.step for m in metric_objs(r) if not m.key.startswith("system/")), default="-")) for r in runs],
    ]
    for key in list(BASE_METRICS) + [m for m in extra_metrics if m not in BASE_METRICS]:
        rows.append([key] + [_fmt(r.data.metrics[key]) if key in r.data.metrics else "-" for r in runs])
    if show_eval:
        data = [dataset_cells(r) for r in runs]
        eval_keys = {k for r in runs for k in r.data.metrics if EVAL_RE.match(k)}
        datasets = sorted({EVAL_RE.match(k)["ds"] for k in eval_keys} | {ds for cells in data for ds in cells})
        for ds in datasets:  # one block per dataset: the data each run used, then its errors
            if any(ds in cells for cells in data):
                rows.append([f"data/{ds}"] + [cells.get(ds, "-") for cells in data])
            for key in sorted(
                (k for k in eval_keys if EVAL_RE.match(k)["ds"] == ds),
                key=lambda k: (EVAL_RE.match(k)["prefix"] != "eval_before", EVAL_RE.match(k)["kind"]),
            ):
                rows.append([key] + [_fmt(r.data.metrics[key]) if key in r.data.metrics else "-" for r in runs])
    return rows


def render(rows: list[list[str]]) -> str:
    """Left-aligned labels, right-aligned values, one header rule under the run ids."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        print(f"{PROG}: error: no MLflow database at {uri[len('sqlite:///') :]}", file=sys.stderr)
        return 2
    try:
        runs = fetch_runs(MlflowClient(uri), args)
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        msg = str(exc).strip().splitlines()
        print(f"{PROG}: error: {type(exc).__name__}: {msg[0] if msg else ''}"[:400], file=sys.stderr)
        return 2
    if not runs:
        print(f"{PROG}: error: experiment '{args.experiment}' has no runs", file=sys.stderr)
        return 1
    extra = [m.strip() for m in args.metrics.split(",") if m.strip()]
    print(render(build_table(runs, extra, show_eval=not args.no_eval)))
    return 0


if __name__ == "__main__":
    run_cli(main)
