"""Reports from a grid's results store: tables (markdown + CSV), figures (PNG), REPORT.md.

    build_report(results_root, grid, out_root) -> out_root/<grid>/
        REPORT.md          what was run, tables, figures, trend verdicts, failed runs
        tables/*.md|.csv   pair tables (Table 1 / A.2 layout, paper numbers beside ours on paper grids),
                           gaps, trends, LR sweep, importance, bases, downstream, recovery, cost, runs
        figures/*.png      loss vs tokens, gap vs tokens / base ratio, downstream, recovery, curves

It reads `<results_root>/<grid>/` and nothing else (never the grid YAML); the same store gives
byte-identical tables and REPORT.md. The report is built in a temp dir and installed as a pcbench
output (`pcbench.outputs`): it replaces its own earlier files (and drops those it no longer makes),
never anything else in `out_root/<grid>/`, and refuses a non-empty directory that is not a report.
"""

from __future__ import annotations

from pathlib import Path

from pcbench import outputs
from pcbench.atomic import write_text

__all__ = ["build_report"]


def build_report(results_root: Path, grid: str, out_root: Path = Path("paper_figures")) -> Path:
    """Write the report of grid `grid` (store `<results_root>/<grid>`) under `out_root/<grid>/`; return that dir."""
    from pcbench.report.load import load_study

    study = load_study(Path(results_root), grid)
    if not study.root.is_dir():
        raise FileNotFoundError(f"no results store for grid {grid!r} at {study.root}")
    final = outputs.claim(Path(out_root) / grid, "report", "report --out")
    with outputs.staging(final) as out:
        _build(study, out)
        outputs.install(out, final, "report", "report --out")
    return final


def _build(study, out: Path) -> None:
    """Every file of the report, written under `out`."""
    from pcbench.report import markdown, scaling, tables, trends, tuning

    cells, paired, keys_by = trends.gaps(study)
    slopes = trends.token_slopes(cells, paired, keys_by)
    effect = trends.ratio_effect(cells, keys_by)
    sections = {
        "pair": [t for s in tables.pair_stages(study)
                 for t in (tables.pair_table(study, s), tables.table1_view(study, s)) if t is not None],
        "trend": trends.trend_tables(cells, slopes, effect),
        "headline": trends.headline(cells),
        "verdict_ratio": trends.verdict_ratio(effect),
        "verdict_tokens": trends.verdict_tokens(slopes),
        "lr_sweep": tables.lr_sweep_table(study),
        "lr_used": tables.lr_used_table(study) if len(tables.compress_runs(study)) else None,
        "importance": tables.importance_table(study),
        "base": tables.base_table(study),
        "downstream": tables.downstream_tables(study),
        "recovery": tables.recovery_table(study),
        "cost": tables.cost_table(study),
        "failed": tables.failed_table(study),
        "claims": scaling.claims_table(study),  # the opening table (scaling grids only)
        "tuning": tuning.tuning_table(study),   # tuned values, flagged where their sweep does not bracket them
    }
    written: set[Path] = set()
    all_tables = [t for v in sections.values() for t in (v if isinstance(v, list) else [v])
                  if isinstance(v, (list, tables.Table)) and isinstance(t, tables.Table)]
    for t in all_tables:
        written |= _write_table(out / "tables", t)
    runs = study.runs.sort_values("id").drop(columns=["status_time", "started"], errors="ignore")
    written.add(_write(out / "tables" / "runs.csv", runs.to_csv(index=False)))
    if study.grid in tables.PAPER_GRIDS:
        from pcbench.report import reference

        written.add(_write(out / "tables" / "paper_reference.csv", reference.all_tables().to_csv(index=False)))
    sections["figures"] = _figures(study, cells, keys_by, out / "figures", written)
    write_text(out / "REPORT.md", markdown.report(study, sections))


def _write(path: Path, text: str) -> Path:
    write_text(path, text)
    return path


def _write_table(d: Path, t) -> set[Path]:
    md = f"# {t.title}\n\n{t.markdown.rstrip()}\n" + "".join(f"\n_{n}_\n" for n in t.notes)
    return {_write(d / f"{t.name}.md", md), _write(d / f"{t.name}.csv", t.data.to_csv(index=False))}


def _figures(study, cells, keys_by, d: Path, written: set[Path]) -> list[tuple[str, str]]:
    from pcbench.report import figures, tables

    made = []
    jobs = [(f"loss_vs_tokens_{s}.png", f"Loss vs retraining tokens, stage {s} (the paper's Figure 2)",
             lambda p, s=s: figures.loss_vs_tokens(study, s, p)) for s in tables.pair_stages(study)]
    jobs += [("gap_vs_tokens.png", "PC - HPR gap vs retraining tokens",
              lambda p: figures.gap_vs_tokens(cells, keys_by, p)),
             ("gap_vs_ratio.png", "PC - HPR gap vs base tokens-per-parameter",
              lambda p: figures.gap_vs_ratio(cells, p)),
             ("downstream.png", "Downstream average vs tokens (the poster's Figure 2)",
              lambda p: figures.downstream(study, p)),
             ("recovery.png", "PC recovery dynamics", lambda p: figures.recovery(study, p)),
             ("curves.png", "Training curves", lambda p: figures.curves(study, p))]
    for name, caption, fn in jobs:
        path = fn(d / name)
        if path is not None:
            written.add(path)
            made.append((name, caption))
    return made
