"""Selecting runs by their labels: `--only` filters, `from ... where`, `exclude`, `overrides.when`.

A condition maps a label to one value or a list of accepted values; a label matches when it equals
one of them as text or as a number (`0.5` matches `"0.5"` and `0.50`). `--only` is the same
condition written `stage=compress,method=pc|hpr` (a bare word is a stage name); a selection brings
every run the chosen runs depend on, in dependency order.
"""

from __future__ import annotations

from typing import Optional

from pcbench.spec.config import SpecError


def select(runs: list, only: Optional[str]) -> list:
    """The runs (in order) matching the filter `only` (all when empty), plus every run they depend on."""
    if not only:
        return list(runs)
    conds = parse_filter(only)
    chosen = {r.id for r in runs if all(label_matches(_labels_with_stage(r), k, v) for k, v in conds.items())}
    if not chosen:
        raise SpecError("--only", f"{only!r} matches no run")
    by_id = {r.id: r for r in runs}
    stack = list(chosen)
    while stack:
        for d in by_id[stack.pop()].deps:
            if d not in chosen:
                chosen.add(d)
                stack.append(d)
    return [r for r in runs if r.id in chosen]


def _labels_with_stage(run) -> dict:
    return {"stage": run.stage, "id": run.id, **run.labels}


def parse_filter(only: str) -> dict[str, list[str]]:
    """`stage=compress,method=pc|hpr` (or a bare stage name) -> {label: accepted values}."""
    conds: dict[str, list[str]] = {}
    for part in only.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            conds.setdefault("stage", []).append(part)
            continue
        k, v = part.split("=", 1)
        conds.setdefault(k.strip(), []).extend(x.strip() for x in v.split("|"))
    return conds


def label_matches(labels: dict, key: str, wanted) -> bool:
    """Does label `key` equal `wanted` (one value or a list of them), as text or as a number?"""
    if key not in labels:
        return False
    wanted = wanted if isinstance(wanted, list) else [wanted]
    have = labels[key]
    return any(str(have) == str(w) or _num_eq(have, w) for w in wanted)


def matches(labels: dict, cond: dict) -> bool:
    """Do `labels` meet every entry of a condition (`where`, `exclude`, `when`)?"""
    return all(label_matches(labels, k, v if isinstance(v, list) else [v]) for k, v in cond.items())


def _num_eq(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
