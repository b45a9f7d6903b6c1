"""The study's report: tables and PNG figures from the trial records that ``tools/study.py`` writes
(``trials/<id>.json``, or packed in ``trials.jsonl.xz``: ``tools/study_records.py``).

    python -m tools.study_report docs/study/cpu32 --spec configs/study_cpu32.yaml

Numbers are means over seeds with their standard deviation (n = number of seeds). Test numbers come from
``nestor_ds.evaluate`` on the test split; validation numbers (the only ones hyper-parameters may be chosen on)
from the trainer's final evaluation of the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from tools import study_records
from tools.study_figures import (
    figure_heatmap,
    figure_rollout_growth,
    figure_vs_cost,
    mean_std,
    specialisation_over_training,
)


def fmt(values: list[float], digits: int = 4) -> str:
    """ "mean ± std" over seeds; one value alone (no spread to show) as itself."""
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "n/a"
    return (
        f"{m:.{digits}f}"
        if sum(v is not None and math.isfinite(v) for v in values) == 1
        else f"{m:.{digits}f} ± {s:.{digits}f}"
    )


def load_trials(out: Path) -> list[dict[str, Any]]:
    """The study's trial records, JSON files or packed (``tools/study_records.py``)."""
    return study_records.load_trials(out)


def _groups(trials: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    g: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        if t["kind"] == "matrix":
            g[(t["model"], float(t["budget_s"]))].append(t)
    return dict(sorted(g.items()))


def _val(t: dict[str, Any], key: str) -> float | None:
    return (t.get("validation") or {}).get("mean", {}).get(key)


def _flops(t: dict[str, Any]) -> float | None:
    return t.get("train_flops")


def bare_loop_section(trials: list[dict[str, Any]]) -> list[str]:
    """Product vs `tools/bare_loop.py` on the same trial config, run side by side: the product must be within 5%."""
    by_key = defaultdict(list)
    for t in trials:
        if t["kind"] == "gap":
            by_key[(t["model"], float(t["budget_s"]))].append(t)
    if not by_key:
        return []
    lines = [
        "## Product vs a bare loop",
        "",
        "Each pair trains one trial config twice at the same time, one thread each: through the product "
        "(`nestor_ds.train`) and by `tools/bare_loop.py` (the same model, initial weights, loss, optimizer, schedule "
        "and clipping; the training trajectories in memory, uniformly random windows; no DeepSpeed, no stream, no "
        "logging), both scored by `nestor_ds.evaluate` on the test split. Ratio = mean product / mean bare "
        "(target <= 1.05).",
        "",
        "| model | budget s | n | product test 1-step | bare test 1-step | ratio 1-step | product rollout "
        "| bare rollout | ratio rollout | product steps | bare steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, b), ts in sorted(by_key.items()):
        p = [t["product"] for t in ts]
        q = [t["bare"] for t in ts]

        def col(side, key):
            return [r["test"]["mean"][key] for r in side]

        r1 = statistics.fmean(col(p, "l2re_1step")) / statistics.fmean(col(q, "l2re_1step"))
        rr = statistics.fmean(col(p, "l2re_rollout")) / statistics.fmean(col(q, "l2re_rollout"))
        lines.append(
            f"| {m} | {b:.0f} | {len(ts)} | {fmt(col(p, 'l2re_1step'))} | {fmt(col(q, 'l2re_1step'))} | {r1:.3f} | "
            f"{fmt(col(p, 'l2re_rollout'))} | {fmt(col(q, 'l2re_rollout'))} | {rr:.3f} | "
            f"{statistics.fmean(r['steps'] for r in p):.0f} | {statistics.fmean(r['steps'] for r in q):.0f} |"
        )
    return [*lines, ""]


def power_law(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of log(err) = a + b log(x) through the (x, err) points (least squares; None with < 2 distinct x)."""
    pts = [(math.log(x), math.log(e)) for x, e in points if x and e and x > 0 and e > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


def crossing(fit_a: tuple[float, float] | None, fit_b: tuple[float, float] | None) -> float | None:
    """x where two power laws cross (None when parallel, missing, or crossing at a non-finite x)."""
    if fit_a is None or fit_b is None or abs(fit_a[1] - fit_b[1]) < 1e-9:
        return None
    x = (fit_a[0] - fit_b[0]) / (fit_b[1] - fit_a[1])
    return math.exp(x) if abs(x) < 700 else None


def head_to_head_section(spec: dict[str, Any], groups) -> list[str]:
    """NESTOR vs AFNO pairs of the spec's `compare:` at equal wall-clock, and where their curves cross in time, steps
    and FLOPs (two-point power laws per model over the budgets: an extrapolation, labelled as one)."""
    pairs = [tuple(p) for p in spec.get("compare") or [] if all(any(m == g[0] for g in groups) for m in p)]
    if not pairs:
        return []
    budgets = sorted({b for _, b in groups})
    lines = [
        "## NESTOR vs AFNO at equal wall-clock",
        "",
        "Ratio = mean NESTOR test L2RE / mean AFNO test L2RE at the same budget (< 1: NESTOR wins). Crossings: each "
        "model's mean test one-step L2RE over the budgets fitted as a power law of training time, optimizer steps "
        "and training FLOPs; the x where the two lines meet (beyond the budgets run it is an extrapolation). "
        "'Step cost needed': the time per step at which NESTOR's steps at the largest budget would take no longer "
        "than AFNO needs (on its fit) to reach NESTOR's error.",
        "",
        "| AFNO | NESTOR | "
        + " | ".join(f"ratio 1-step / rollout at {b:.0f} s" for b in budgets)
        + " | crossing: time s "
        "| steps | TFLOPs | NESTOR ms/step now | step cost needed ms |",
        "|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|",
    ]

    def mean(ts, f):
        return statistics.fmean(f(t) for t in ts)

    for a, n in pairs:
        cells, fits = [], {}
        for b in budgets:
            ta, tn = groups.get((a, b)), groups.get((n, b))
            if not ta or not tn:
                cells.append("n/a")
                continue
            r1 = mean(tn, lambda t: t["test"]["mean"]["l2re_1step"]) / mean(
                ta, lambda t: t["test"]["mean"]["l2re_1step"]
            )
            rr = mean(tn, lambda t: t["test"]["mean"]["l2re_rollout"]) / mean(
                ta, lambda t: t["test"]["mean"]["l2re_rollout"]
            )
            cells.append(f"{r1:.3f} / {rr:.3f}")
        for m in (a, n):
            rows = [(b, groups[(m, b)]) for b in budgets if (m, b) in groups]
            err = [(b, mean(ts, lambda t: t["test"]["mean"]["l2re_1step"])) for b, ts in rows]
            fits[m] = {
                "time": power_law(err),
                "steps": power_law([(mean(ts, lambda t: t["steps"]), e) for (_, ts), (_, e) in zip(rows, err)]),
                "flops": power_law([(mean(ts, lambda t: _flops(t) or 0), e) for (_, ts), (_, e) in zip(rows, err)]),
            }
        cross = {k: crossing(fits[a][k], fits[n][k]) for k in ("time", "steps", "flops")}
        top = budgets[-1]
        needed = now = None
        if (n, top) in groups and (a, top) in groups and fits[a]["steps"]:
            tn, ta = groups[(n, top)], groups[(a, top)]
            e_n = mean(tn, lambda t: t["test"]["mean"]["l2re_1step"])
            a_fit, b_fit = fits[a]["steps"]
            steps_a = math.exp((math.log(e_n) - a_fit) / b_fit)  # AFNO steps to reach NESTOR's error
            ms_a = 1e3 * top / mean(ta, lambda t: t["steps"])
            now = 1e3 * top / mean(tn, lambda t: t["steps"])
            needed = steps_a * ms_a / mean(tn, lambda t: t["steps"])

        def show(x, scale=1.0, digits=0):
            return "n/a" if x is None else f"{x / scale:.{digits}f}"

        lines.append(
            f"| {a} | {n} | " + " | ".join(cells) + f" | {show(cross['time'])} | {show(cross['steps'])} | "
            f"{show(cross['flops'], 1e12, 2)} | {show(now, digits=2)} | {show(needed, digits=2)} |"
        )
    return [*lines, ""]


def search_section(spec: dict[str, Any], trials: list[dict[str, Any]]) -> list[str]:
    """The recipe search: each variant's validation score against its base model's, same seeds and budget."""
    search = [t for t in trials if t["kind"] == "search"]
    if not search:
        return []
    order = list((spec.get("search") or {}).get("variants") or {})
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in sorted(search, key=lambda t: order.index(t["model"]) if t["model"] in order else len(order)):
        by_variant[t["model"]].append(t)
    lines = [
        "## Recipe search (validation split only)",
        "",
        "Each variant is a model of the matrix with the overrides shown, trained like a matrix trial and scored by "
        "the trainer's final evaluation of the validation split; the test split is not read. Ratio = mean "
        "validation one-step L2RE / that of the first variant of the same architecture (the baseline row).",
        "",
        "| variant | arch | overrides vs its base | n | steps | GFLOPs/sample | val 1-step | val rollout "
        "| ratio 1-step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first: dict[str, float] = {}
    for v, ts in by_variant.items():
        model = ts[0].get("overrides", {}).get("model", {})
        arch = "afno" if str(model.get("preset", "")).startswith("afno") else "nestor"
        one = statistics.fmean(_val(t, "l2re_1step") for t in ts)
        first.setdefault(arch, one)
        st = ts[0].get("stats") or {}
        lines.append(
            f"| {v} | {arch} | {ts[0].get('describe', '')} | {len(ts)} | "
            f"{statistics.fmean(t['steps'] for t in ts):.0f} | "
            f"{st.get('flops_per_sample', 0) / 1e9:.4f} | {fmt([_val(t, 'l2re_1step') for t in ts])} | "
            f"{fmt([_val(t, 'l2re_rollout') for t in ts])} | {one / first[arch]:.3f} |"
        )
    return [*lines, ""]


def write_report(spec: dict[str, Any], out: Path) -> Path:
    """report.md, trials.csv and figures in `out` from its trial records."""
    trials = load_trials(out)
    groups = _groups(trials)
    lines = [
        f"# Study `{spec['name']}`",
        "",
        f"Generated by `python -m tools.study --spec <spec>` from {len(trials)} trial records (`trials/<id>.json`, "
        "or packed in `trials.jsonl.xz`; each trial's final numbers: `trials.csv`). "
        "Mean ± std over seeds. Test = `nestor_ds.evaluate` on the test split (windows: every start frame; "
        "rollout over the windows with the horizon inside the trajectory); validation = the trainer's final "
        "evaluation of the validation split cut from the training files.",
        "",
    ]
    d = spec["data"]
    lines += [
        f"Data: {', '.join(d['families'])} at {d['resolution']}², {d['frames']} frames, t_in {d['t_in']}, "
        f"{d['train']} train / {d['val']} validation / {d['test']} test trajectories per family; "
        f"seeds {spec['seeds']}; budgets {spec['budgets_s']} s of training time (evaluation excluded); "
        + (
            f"trials ran {spec['parallel']} at a time side by side (the models of one seed and budget), "
            f"{((spec.get('common') or {}).get('train') or {}).get('threads_per_rank', 'default')} thread(s) each."
            if int(spec.get("parallel", 1)) > 1
            else "trials ran one at a time."
        ),
        "",
    ]
    if not groups:
        lines.append("No finished matrix trial yet.")
    else:
        lines += [
            "## Accuracy and cost at equal wall-clock",
            "",
            "| model | budget s | n | test 1-step | test rollout | val 1-step | steps | samples/s | "
            "train TFLOPs | active params | GFLOPs/sample |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (m, b), ts in groups.items():
            st = ts[0].get("stats") or {}
            one_step = fmt([t["test"]["mean"]["l2re_1step"] for t in ts])
            rollout = fmt([t["test"]["mean"]["l2re_rollout"] for t in ts])
            val = fmt([_val(t, "l2re_1step") for t in ts])
            steps = statistics.fmean(t["steps"] for t in ts)
            rate = statistics.fmean(t["samples_per_s"] for t in ts)
            tflops = statistics.fmean((_flops(t) or 0) for t in ts) / 1e12
            lines.append(
                f"| {m} | {b:.0f} | {len(ts)} | {one_step} | {rollout} | {val} | {steps:.0f} | {rate:.1f} | "
                f"{tflops:.2f} | {st.get('active_params', 0) / 1e6:.3f}M | {st.get('flops_per_sample', 0) / 1e9:.3f} |"
            )
        top = max(b for _, b in groups)
        datasets = sorted({ds for ts in groups.values() for t in ts for ds in t["test"]["datasets"]})
        lines += [
            "",
            f"## Per dataset at the largest budget ({top:.0f} s), test one-step / rollout",
            "",
            "| model | " + " | ".join(datasets) + " |",
            "|---|" + "---|" * len(datasets),
        ]
        for (m, b), ts in groups.items():
            if b == top:
                cells = [
                    f"{fmt([t['test']['datasets'][ds]['l2re_1step'] for t in ts], 3)} / "
                    f"{fmt([t['test']['datasets'][ds]['l2re_rollout'] for t in ts], 3)}"
                    for ds in datasets
                ]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        figure_vs_cost(groups, out / "l2re_vs_time.png", "budget")
        figure_vs_cost(groups, out / "l2re_vs_flops.png", "flops")
        figure_rollout_growth(groups, out / "rollout_growth.png")
        lines += [
            "",
            "![L2RE vs wall-clock](l2re_vs_time.png)",
            "",
            "![L2RE vs FLOPs](l2re_vs_flops.png)",
            "",
            "![rollout error growth](rollout_growth.png)",
            "",
        ]
        nestor = [t for (m, b), ts in groups.items() if b == top for t in ts if t.get("expert_usage")]
        if nestor and figure_heatmap(nestor[0], out / "expert_heatmap.png"):
            mis: dict[tuple[str, str], list[float]] = defaultdict(list)  # (model, block) -> MI of each seed
            for t in nestor:
                for block, u in t["expert_usage"].items():
                    mis[(t["model"], block)].append(u.get("mi_bits"))
            lines += [
                "## Expert specialisation",
                "",
                f"Mutual information between dataset and image expert at the end of training at {top:.0f} s (bits; "
                "0 = no specialisation, log2(min(#datasets, #experts)) = full; counted over the last usage record, "
                "or the whole run for a trial without `train.usage_every`): "
                + "; ".join(f"{m} block {b}: {fmt(v, 3)}" for (m, b), v in sorted(mis.items()))
                + f". Heat map: {nestor[0]['id']}.",
                "",
                "![dataset x image expert](expert_heatmap.png)",
                "",
            ]
            curves = nestor + [t for t in trials if t["kind"] == "usage"]  # matrix and `usage:` trials
            lines += specialisation_over_training(curves, out / "specialisation_over_training.png")
    lines += head_to_head_section(spec, groups)
    lines += search_section(spec, trials)
    lines += bare_loop_section(trials)
    transfer = [t for t in trials if t["kind"] == "transfer"]
    if transfer:
        lines += [
            "## Transfer: pre-train on the other families, fine-tune on the held-out one",
            "",
            f"Held out: {transfer[0]['held_out']}; fine-tune budget {transfer[0]['budget_s']} s, the same "
            "budget for training from scratch.",
            "",
            "| model | n | fine-tuned test 1-step | scratch test 1-step | fine-tuned rollout | scratch rollout |",
            "|---|---|---|---|---|---|",
        ]
        by_model = defaultdict(list)
        for t in transfer:
            by_model[t["model"]].append(t)
        for m, ts in sorted(by_model.items()):
            lines.append(
                f"| {m} | {len(ts)} | {fmt([t['test']['mean']['l2re_1step'] for t in ts])} | "
                f"{fmt([t['scratch']['test']['mean']['l2re_1step'] for t in ts])} | "
                f"{fmt([t['test']['mean']['l2re_rollout'] for t in ts])} | "
                f"{fmt([t['scratch']['test']['mean']['l2re_rollout'] for t in ts])} |"
            )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    # the spec and which trials the report read; each trial's record is trials/<id>.json or a line of trials.jsonl.xz
    (out / "study.json").write_text(json.dumps({"spec": spec, "trials": [t["id"] for t in trials]}, indent=1))
    study_records.write_summary(trials, out / study_records.SUMMARY)
    return path


def main() -> None:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="study directory holding trials/ or trials.jsonl.xz")
    p.add_argument("--spec", required=True, help="the study YAML")
    a = p.parse_args()
    print(write_report(yaml.safe_load(Path(a.spec).read_text()), Path(a.out)))


if __name__ == "__main__":
    main()
