"""What a report holds, in order: `PARTS` (its tables and REPORT.md's sections) and `FIGURES`.

The one list both the file writer (`build_report`: every table of every part under tables/) and
REPORT.md (`markdown.report`: every part's text, in this order) iterate. A new table is one builder
(usually in `tables.py`) and one `Part` here; a new figure one drawing function (`figures.py`) and one
`Figure` here.

    Part(name, tables, text, formats)
        tables(inp) -> [Table]          what it writes: tables/<table.name>.md and .csv (`formats`)
        text(inp, tables) -> [str]      its REPORT.md blocks (joined by newlines; [] where it has nothing)
    Figure(file, caption, draw)         figures/<file>; `{stage}` in file and caption: one per pair stage
        draw(inp, path, stage) -> path, or None where there is nothing to draw
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

from pcbench.report import distill, figures, markdown, reference, scaling, tables, trends, tuning
from pcbench.report.load import Study
from pcbench.report.tables import PAPER_GRIDS, Table


@dataclass
class Inputs:
    """A Study and what several parts compute from it (each once): the gaps, their trends, the figures drawn."""

    study: Study
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file, caption), set once drawn

    @cached_property
    def gaps(self):
        """(cells, paired per-seed gaps, keys by stage): `trends.gaps`."""
        return trends.gaps(self.study)

    @property
    def cells(self):
        return self.gaps[0]

    @property
    def keys_by(self) -> dict[str, list[str]]:
        return self.gaps[2]

    @cached_property
    def claims(self) -> Optional[Table]:
        """The opening claims table (`scaling.claims_table`; None outside scaling grids)."""
        return scaling.claims_table(self.study)

    @cached_property
    def slopes(self):
        return trends.token_slopes(*self.gaps)

    @cached_property
    def effect(self):
        return trends.ratio_effect(self.cells, self.keys_by)


Tables = Callable[[Inputs], list[Table]]
Text = Callable[[Inputs, list[Table]], list[str]]


@dataclass(frozen=True)
class Part:
    """A part of the report: its tables (none for a text-only part) and its REPORT.md text."""

    name: str
    tables: Tables = lambda inp: []
    text: Text = lambda inp, ts: []
    formats: tuple[str, ...] = ("md", "csv")  # ("csv",): data only, not shown as a table


@dataclass(frozen=True)
class Figure:
    """A figure of the report (REPORT.md links each one drawn, in this order, under its caption)."""

    file: str
    caption: str
    draw: Callable[[Inputs, Path, Optional[str]], Optional[Path]]


def _some(*items) -> list[Table]:
    """The tables among `items` (a builder's None: no table)."""
    return [t for t in items if t is not None]


def titled(level: int = 2) -> Text:
    """Each table under its own title."""
    return lambda inp, ts: [markdown.table_md(t, level=level) for t in ts]


def section(heading: str, empty: Optional[str] = None) -> Text:
    """A `## heading` over the tables (or the line `empty`; no section without either)."""
    def text(inp: Inputs, ts: list[Table]) -> list[str]:
        if not ts and empty is None:
            return []
        return [f"## {heading}", ""] + ([markdown.table_md(t) for t in ts] or [empty, ""])
    return text


def _pair_tables(inp: Inputs) -> list[Table]:
    s = inp.study
    return _some(*(t for st in tables.pair_stages(s) for t in (tables.pair_table(s, st), tables.table1_view(s, st))))


def _lr_tables(inp: Inputs) -> list[Table]:
    s = inp.study
    return _some(tables.lr_sweep_table(s), tables.lr_used_table(s) if len(tables.compress_runs(s)) else None)


def _runs_table(inp: Inputs) -> list[Table]:
    runs = inp.study.runs.sort_values("id").drop(columns=["status_time", "started"], errors="ignore")
    return [Table("runs", "Runs", "", runs)]


def _paper_table(inp: Inputs) -> list[Table]:
    if inp.study.grid not in PAPER_GRIDS:
        return []
    return [Table("paper_reference", "The paper's numbers", "", reference.all_tables())]


PARTS: list[Part] = [
    Part("claims", lambda i: _some(i.claims), titled()),  # opens the report (scaling grids)
    Part("runs", _runs_table, lambda i, ts: ["## What was run", "", markdown.runs_summary(i.study)],
         formats=("csv",)),
    Part("headline", text=lambda i, ts: markdown.headline_md(trends.headline(i.cells))),
    Part("verdicts", text=lambda i, ts: markdown.claims_verdicts_md() if i.claims is not None else
         markdown.verdicts_md(trends.verdict_ratio(i.effect), trends.verdict_tokens(i.slopes))),
    Part("results", _pair_tables, section("Results", empty="No completed PC/HPR runs yet.")),
    Part("distill", lambda i: _some(distill.distill_table(i.study)), titled()),
    Part("trends", lambda i: trends.trend_tables(i.cells, i.slopes, i.effect), section("Trends")),
    Part("learning_rates", _lr_tables, lambda i, ts: markdown.learning_rates_md(ts)),
    Part("tuning", lambda i: _some(tuning.tuning_table(i.study)), titled()),  # flags tuned values at a sweep's edge
    Part("importance", lambda i: _some(tables.importance_table(i.study)), titled()),
    Part("base", lambda i: [tables.base_table(i.study)], titled()),
    Part("downstream", lambda i: tables.downstream_tables(i.study), titled()),
    Part("recovery", lambda i: _some(tables.recovery_table(i.study)), titled()),
    Part("cost", lambda i: [tables.cost_table(i.study)], titled()),
    Part("figures", text=lambda i, ts: markdown.figures_md(i.figures)),
    Part("failed", lambda i: [tables.failed_table(i.study)], lambda i, ts: markdown.failed_md(ts[0])),
    Part("damaged", lambda i: _some(tables.damaged_table(i.study)), titled()),
    Part("earlier", lambda i: _some(tables.earlier_table(i.study)), titled()),
    Part("paper_reference", _paper_table, lambda i, ts: [markdown.reference_md(i.study.grid)], formats=("csv",)),
]

FIGURES: list[Figure] = [
    Figure("loss_vs_tokens_{stage}.png", "Loss vs retraining tokens, stage {stage} (the paper's Figure 2)",
           lambda i, p, stage: figures.loss_vs_tokens(i.study, stage, p)),
    Figure("gap_vs_tokens.png", "PC - HPR gap vs retraining tokens",
           lambda i, p, _: figures.gap_vs_tokens(i.cells, i.keys_by, p)),
    Figure("gap_vs_ratio.png", "PC - HPR gap vs base tokens-per-parameter",
           lambda i, p, _: figures.gap_vs_ratio(i.cells, p)),
    Figure("downstream.png", "Downstream average vs tokens (the poster's Figure 2)",
           lambda i, p, _: figures.downstream(i.study, p)),
    Figure("recovery.png", "PC recovery dynamics", lambda i, p, _: figures.recovery(i.study, p)),
    Figure("curves.png", "Training curves", lambda i, p, _: figures.curves(i.study, p)),
]
