"""The configuration reference: every key of a run config with its type, default and meaning, from the code.

    python -m nestor_ds.config_reference                                    # print it (Markdown)
    python -m nestor_ds.config_reference --out docs/configuration.md        # write it
    python -m nestor_ds.config_reference --out docs/configuration.md --check   # exit 1 if the file is stale

Where each part comes from, so that the reference cannot drift from the code:
- the keys: ``RunConfig``'s fields, walked at run time into every nested dataclass (``model.moe``) and list of
  dataclasses (``data.datasets[]``); the classes are found through the fields' types, wherever their modules live;
- type and default: the dataclass field (its annotation as written, its default or default factory);
- meaning: the comments beside the field in the class's source (``inspect.getsource``): a trailing ``# ...`` on the
  field's line, and a block of comment lines right above the field; a block between two fields that both have
  trailing comments continues the first's instead (a comment too long for one line);
- a field of ``RunConfig`` whose comment starts ``from <key> in YAML`` is documented under that key (the run keeps
  ``model.moe.ep_size`` and ``model.preset`` beside the model it builds);
- the presets table: each preset of the registry, counted by ``nestor_ds.model.flops.account`` on the meta device.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALIAS_RE = re.compile(r"^from ([\w.]+) in YAML\b[:;,]?\s*(.*)$")
REGENERATE = "python -m nestor_ds.config_reference --out docs/configuration.md"


@dataclass
class Key:
    """One documented key: dotted path, type as written in the code, default (JSON) and meaning."""

    path: str
    type: str
    default: str
    meaning: str


@dataclass
class Section:
    """The keys of one dataclass, reached at `path` (``data``, ``model.moe``, ``data.datasets[]``)."""

    path: str
    cls: type
    keys: list[Key] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """The first paragraph of the class's docstring, in one line."""
        doc = inspect.getdoc(self.cls) or ""
        if doc.startswith(f"{self.cls.__name__}("):  # no docstring: the signature dataclasses put there
            return ""
        return " ".join(doc.split("\n\n", 1)[0].split())


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment text} from the class's source (the rules in the module docstring)."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
    fields = [
        (n.target.id, n.lineno, n.end_lineno or n.lineno)
        for n in node.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]
    trailing: dict[int, str] = {}  # line -> text of a comment after code
    standalone: dict[int, str] = {}  # line -> text of a comment line
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (standalone if not lines[row - 1][:col].strip() else trailing)[row] = text
    own = {name: " ".join(trailing[r] for r in range(a, b + 1) if r in trailing) for name, a, b in fields}
    lead: dict[str, list[str]] = {name: [] for name, _, _ in fields}
    more: dict[str, list[str]] = {name: [] for name, _, _ in fields}
    starts = {a: name for name, a, _ in fields}
    ends = {b: name for name, _, b in fields}
    row = 1
    while row <= len(lines):
        if row not in standalone:
            row += 1
            continue
        first = row
        while row in standalone:
            row += 1
        block = [standalone[r] for r in range(first, row)]
        prev, nxt = ends.get(first - 1), starts.get(row)
        if nxt is not None and not (own[nxt] and prev is not None and own[prev]):
            lead[nxt] += block
        elif prev is not None:
            more[prev] += block
    return {name: " ".join(t for t in (*lead[name], own[name], *more[name]) if t) for name, _, _ in fields}


def _type_text(f: dataclasses.Field) -> str:
    """The annotation as written (postponed annotations are strings), else a readable form of the type."""
    t = f.type
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _element_dataclass(hint: Any) -> type | None:
    """The dataclass of a ``list[SomeDataclass]`` annotation, else None."""
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def sections(root: type | None = None) -> list[Section]:
    """Every dataclass reached from `root` (default RunConfig), depth first, with its documented keys."""
    if root is None:
        from nestor_ds.config import RunConfig

        root = RunConfig
    out: list[Section] = []
    aliases: list[tuple[str, Key]] = []  # (key the YAML uses, documented key)

    def walk(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        sec = Section(path, cls)
        out.append(sec)
        nested: list[tuple[type, str]] = []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            dotted = f"{path}.{f.name}" if path else f.name
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                nested.append((hint, dotted))
                continue
            key = Key(dotted, _type_text(f), _default_text(f), comments.get(f.name, ""))
            alias = ALIAS_RE.match(key.meaning)
            if alias:
                aliases.append((alias.group(1), dataclasses.replace(key, path=alias.group(1), meaning=alias.group(2))))
                continue
            element = _element_dataclass(hint)
            if element is not None:
                key.meaning = f"{key.meaning} (a list of mappings with the keys of `{dotted}[]`)".strip()
                nested.append((element, f"{dotted}[]"))
            sec.keys.append(key)
        for sub, dotted in nested:
            walk(sub, dotted)

    walk(root, "")
    for yaml_key, key in aliases:
        parent = yaml_key.rsplit(".", 1)[0] if "." in yaml_key else ""
        sec = next((s for s in out if s.path == parent), out[0])
        at = next((i for i, k in enumerate(sec.keys) if k.path == yaml_key), None)
        if at is None:  # a key only the YAML has (model.preset): first in its section
            sec.keys.insert(0, key)
        else:  # the run's value replaces the built section's (model.moe.ep_size: "auto" resolves to an int)
            meaning = "; ".join(m for m in (sec.keys[at].meaning, key.meaning) if m)
            sec.keys[at] = dataclasses.replace(key, meaning=meaning)
    return [s for s in out if s.keys]


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped; `*` and `<` too, which would start emphasis or an HTML tag."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "\\<")


def _meaning(text: str) -> str:
    """A comment as a cell; a `code span` the generator added keeps its characters."""
    parts = text.split("`")
    return "`".join(_cell(p) if i % 2 == 0 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e6:.3f} M"


def _gflops(n: int) -> str:
    return f"{n / 1e9:.2f}" if n >= 1e9 else f"{n / 1e9:.4f}"


def presets_table() -> str:
    """Markdown table of every model preset: size, total and active parameters, FLOPs per sample (the package's
    own accounting, ``nestor_ds.model.flops.account``, on a model built on the meta device)."""
    from nestor_ds.model import get_preset, list_presets
    from nestor_ds.model.flops import account

    rows = [
        "| preset | arch | grid | width | depth | total params | active params per sample | forward GFLOPs per sample "
        "| training GFLOPs per sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in list_presets():
        cfg = get_preset(name)
        acc = account(cfg)
        rows.append(
            f"| {name} | {cfg.arch} | {cfg.resolution}x{cfg.resolution} | {cfg.width} | {cfg.depth} | "
            f"{_params(acc.total_params)} | {_params(acc.active_params)} | {_gflops(acc.flops_per_sample)} | "
            f"{_gflops(3 * acc.flops_per_sample)} |"
        )
    return "\n".join(rows)


PRESETS_NOTE = (
    "Counted by `python -m nestor_ds.model --preset NAME --json` at the preset's grid, `t_in` 10 and 4 channels. "
    "Active parameters per sample: the shared parts plus the top-k image experts, each with its top-k routed and "
    "its shared token experts (what one token passes through); total = active for the AFNO baselines. FLOPs: "
    "matmuls and convolutions (2 x multiply-accumulates), attention and FFTs; training = 3 x forward."
)


def render(root: type | None = None) -> str:
    """The whole reference as Markdown."""
    secs = sections(root)
    out = [
        "# Configuration reference",
        "",
        "Every key of a run config (the YAML of `--config`; `--set a.b=c` overrides any of them on the command "
        "line), with its type, its default and what it does, generated from the dataclasses that hold the "
        f"defaults next to the code they configure: `{REGENERATE}` (do not edit by hand; a test checks that this "
        "file is current). ZeRO stage, precision, micro-batch and gradient accumulation are not here: they are "
        "DeepSpeed's, in the `--ds_config` JSON.",
        "",
        "Sections: " + ", ".join(f"`{s.path or '(top level)'}`" for s in secs) + ", and the model presets.",
        "",
    ]
    for sec in secs:
        out += [f"## `{sec.path or '(top level)'}` ({sec.cls.__name__})", ""]
        if sec.summary:
            out += [sec.summary, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in sec.keys:
            default = "required" if k.default == "required" else _code(k.default)
            out.append(f"| {_code(k.path)} | {_code(k.type)} | {default} | {_meaning(k.meaning)} |")
        out.append("")
    out += ["## Model presets (`model.preset`)", "", PRESETS_NOTE, "", presets_table(), ""]
    return "\n".join(out)


def stale_summary(current: str, wanted: str, path: str) -> str:
    """One line saying how `current` (the file) differs from `wanted` (the generator's output)."""
    a, b = current.splitlines(), wanted.splitlines()
    changed = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    first = changed[0][1] + 1 if changed else 1
    removed = sum(i2 - i1 for _, i1, i2, _, _ in changed)
    added = sum(j2 - j1 for _, _, _, j1, j2 in changed)
    return (
        f"{path} is stale: {removed} line(s) to replace with {added} from the code, first at line {first}; "
        f"regenerate with `{REGENERATE}`"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nestor_ds.config_reference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, help="write the reference to this file (default: print it)")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare --out (default docs/configuration.md) with the code instead of writing; exit 1 if stale",
    )
    args = p.parse_args(argv)
    text = render()
    if args.check:
        path = Path(args.out or "docs/configuration.md")
        current = path.read_text() if path.is_file() else ""
        if current != text:
            print(stale_summary(current, text, str(path)), file=sys.stderr)
            return 1
        print(f"{path} is current")
        return 0
    if args.out is None:
        sys.stdout.write(text)
        return 0
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
