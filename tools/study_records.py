"""A study's trial records on disk: one JSON per finished trial while the study runs, packed into one compressed
file for the repository, and a CSV of every trial's final numbers.

    python -m tools.study_records docs/study/cpu32 --pack     # trials/*.json -> trials.jsonl.xz (+ trials.csv)

A study directory (``tools/study.py`` writes it, ``tools/study_report.py`` reads it) holds:
- ``trials/<id>.json``: the record of a finished trial; the study skips a trial whose record exists;
- ``trials.jsonl.xz``: records packed for the repository, one JSON line each. A packed record's loss curves are
  thinned to about ``CURVE_POINTS`` rows (every ``loss_curve_stride``-th logging step, and the last); the full curves
  are each run's ``metrics.jsonl`` in the study's work directory and its MLflow run. Rerunning the study
  (``python -m tools.study --spec <spec>``) writes full records again;
- ``trials.csv``: one row per trial with its final numbers (written with the report).
A record in ``trials/`` wins over a packed one of the same id.
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
from pathlib import Path
from typing import Any

PACKED = "trials.jsonl.xz"
SUMMARY = "trials.csv"
CURVE_POINTS = 200


def _packed(out: Path) -> list[dict[str, Any]]:
    path = out / PACKED
    if not path.is_file():
        return []
    with lzma.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_trials(out: Path) -> list[dict[str, Any]]:
    """Every trial record of the study in `out`: ``trials/*.json``, then packed ones of other ids; in the order of
    their file names (``<id>.json``), whichever form they are in."""
    records = {p.stem: json.loads(p.read_text()) for p in (out / "trials").glob("*.json")}
    for record in _packed(out):
        records.setdefault(record["id"], record)
    return [records[i] for i in sorted(records, key=lambda i: f"{i}.json")]


def trial_ids(out: Path) -> set[str]:
    """Ids of the finished trials in `out` (a study skips them)."""
    return {p.stem for p in (out / "trials").glob("*.json")} | {r["id"] for r in _packed(out)}


def thin_curves(record: dict[str, Any], points: int = CURVE_POINTS) -> dict[str, Any]:
    """The record with every ``loss_curve`` in it (nested records too: a gap pair's product and bare loop, a
    transfer's pre-training and scratch runs) cut to every n-th row and the last, about `points` rows."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "loss_curve" and isinstance(value, list) and len(value) > points:
            stride = -(-len(value) // points)
            kept = value[::stride]
            out[key] = kept + ([value[-1]] if (len(value) - 1) % stride else [])
            out["loss_curve_stride"] = stride
        else:
            out[key] = thin_curves(value, points) if isinstance(value, dict) else value
    return out


def pack(out: Path) -> Path:
    """Move the records of ``out/trials/*.json`` into ``out/trials.jsonl.xz`` (merged with the records it holds;
    loss curves thinned), then delete the JSON files. Returns the packed file."""
    records = load_trials(out)
    path, tmp = out / PACKED, out / f"{PACKED}.tmp"
    with lzma.open(tmp, "wt", preset=9) as f:
        for record in records:
            f.write(json.dumps(thin_curves(record), separators=(",", ":")) + "\n")
    tmp.replace(path)
    trials = out / "trials"
    for p in trials.glob("*.json"):
        p.unlink()
    if trials.is_dir() and not any(trials.iterdir()):
        trials.rmdir()
    return path


COLUMNS = (
    "id kind model seed budget_s steps train_seconds train_flops samples_per_s final_loss test_l2re_1step "
    "test_l2re_rollout val_l2re_1step val_l2re_rollout bare_steps bare_test_l2re_1step bare_test_l2re_rollout "
    "scratch_test_l2re_1step scratch_test_l2re_rollout"
).split()


def summary_row(t: dict[str, Any]) -> dict[str, Any]:
    """A trial's final numbers: its own (a gap pair's: the product's), plus the bare loop's (gap) or the
    from-scratch run's (transfer). Test = ``evaluate`` on the test split; val = the trainer's last evaluation."""
    main = t.get("product", t)

    def mean(record: dict[str, Any] | None, split: str, key: str) -> Any:
        return (((record or {}).get(split) or {}).get("mean") or {}).get(key)

    row = {k: t.get(k) for k in ("id", "kind", "model", "seed", "budget_s")}
    row |= {k: main.get(k) for k in ("steps", "train_seconds", "train_flops", "samples_per_s", "final_loss")}
    for split, name in (("test", "test"), ("validation", "val")):
        for key in ("l2re_1step", "l2re_rollout"):
            row[f"{name}_{key}"] = mean(main, split, key)
    bare, scratch = t.get("bare"), t.get("scratch")
    row["bare_steps"] = (bare or {}).get("steps")
    for key in ("l2re_1step", "l2re_rollout"):
        row[f"bare_test_{key}"] = mean(bare, "test", key)
        row[f"scratch_test_{key}"] = mean(scratch, "test", key)
    return row


def write_summary(trials: list[dict[str, Any]], path: Path) -> Path:
    """``trials.csv``: one row per trial (``summary_row``), empty cells where a number does not apply."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for t in trials:
            w.writerow({k: "" if v is None else v for k, v in summary_row(t).items()})
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.study_records", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="study directory (holding trials/ or trials.jsonl.xz)")
    p.add_argument("--pack", action="store_true", help="pack trials/*.json into trials.jsonl.xz and delete them")
    args = p.parse_args(argv)
    if args.pack:
        print(pack(args.out))
    print(write_summary(load_trials(args.out), args.out / SUMMARY))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
