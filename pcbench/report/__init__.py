"""Reports from a grid's results store: tables (markdown + CSV), figures (PNG), REPORT.md.

    build_report(results_root, grid, out_root) -> out_root/<grid>/
        REPORT.md          what was run, tables, figures, trend verdicts, failed runs
        tables/*.md|.csv   pair tables (Table 1 / A.2 layout, paper numbers beside ours on paper grids),
                           gaps, trends, LR sweep, importance, bases, downstream, recovery, cost, runs
        figures/*.png      loss vs tokens, gap vs tokens / base ratio, downstream, recovery, curves

What it holds, in order, is one list: `contents.PARTS` (each part's tables and REPORT.md text) and
`contents.FIGURES`. It reads `<results_root>/<grid>/` (through `pcbench.store`) and nothing else (never the grid YAML); the same store gives
byte-identical tables and REPORT.md. The report is built in a temp dir and installed as a pcbench
output (`pcbench.util.outputs`): it replaces its own earlier files (and drops those it no longer makes),
never anything else in `out_root/<grid>/`, and refuses a non-empty directory that is not a report.

May import: `store`, `spec`, `util` (torch-free). Imported by `run` (numbers' format) and `cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from pcbench.util import outputs
from pcbench.util.atomic import write_text

__all__ = ["build_report"]


def build_report(results_root: Path, grid: str, out_root: Path = Path("paper_figures"),
                 progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write the report of grid `grid` (store `<results_root>/<grid>`) under `out_root/<grid>/`; return that dir.
    `progress` (e.g. the CLI's stderr) hears one line as reading starts, then one per step."""
    say = progress or (lambda _: None)
    root = Path(results_root) / grid
    if not root.is_dir():  # before any heavy import: bad input fails at once
        raise FileNotFoundError(f"no results store for grid {grid!r} at {root}")
    final = outputs.claim(Path(out_root) / grid, "report", "report --out")
    say(f"report of grid {grid}: reading {root}")
    from pcbench.report.load import load_study

    study = load_study(Path(results_root), grid)
    with outputs.staging(final) as out:
        _build(study, out, say)
        outputs.install(out, final, "report", "report --out")
    return final


def _build(study, out: Path, say: Callable[[str], None]) -> None:
    """Every file of the report, written under `out`: each part's tables, the figures, REPORT.md."""
    from pcbench.report import contents, markdown

    later = f" ({len(study.earlier)} of an earlier version of the grid, not counted)" if study.earlier else ""
    say(f"{len(study.runs)} runs read{later}; computing the tables")
    inp = contents.Inputs(study)
    built = [(part, part.tables(inp)) for part in contents.PARTS]
    for part, tables in built:
        for t in tables:
            _write_table(out / "tables", t, part.formats)
    say(f"{sum(len(ts) for _, ts in built)} tables written; drawing the figures")
    inp.figures = _draw(inp, contents.FIGURES, out / "figures", say)
    write_text(out / "REPORT.md", markdown.report(inp, built))


CSV_DIGITS = 12


def csv_text(df) -> str:
    """A table's CSV as a report writes it: every float to `CSV_DIGITS` significant digits (still
    written as a float), since a fit's last bits differ between BLAS builds and CPUs (the scaling
    report's claims.csv did between an Intel and an AMD VM) and the regenerated report must not."""
    def cut(v):
        return float(f"{v:.{CSV_DIGITS}g}") if isinstance(v, float) else v

    return df.apply(lambda col: col.map(cut) if col.dtype.kind in "fO" else col).to_csv(index=False)


def _write_table(d: Path, t, formats: tuple[str, ...]) -> None:
    if "md" in formats:
        write_text(d / f"{t.name}.md", f"# {t.title}\n\n{t.markdown.rstrip()}\n" + "".join(f"\n_{n}_\n" for n in t.notes))
    if "csv" in formats:
        write_text(d / f"{t.name}.csv", csv_text(t.data))


def _draw(inp, figures: list, d: Path, say: Callable[[str], None]) -> list[tuple[str, str]]:
    """Draw each figure (one per pair stage where its file name has `{stage}`): (file, caption) of those drawn."""
    from pcbench.report import tables

    made = []
    for f in figures:
        for stage in tables.pair_stages(inp.study) if "{stage}" in f.file else [None]:
            name, caption = f.file.format(stage=stage), f.caption.format(stage=stage)
            if f.draw(inp, d / name, stage) is not None:
                made.append((name, caption))
                say(f"figure {name}")
    return made
