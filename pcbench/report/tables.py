"""Tables from a Study: each a markdown layout (as in the paper) and a tidy frame (CSV).

Pair tables follow the paper's Table 1 / Table A.2: rows are compression level, then the label
columns that define the base (model, ratio, ...), then the method; columns are retraining
tokens. Several seeds: mean ± s.d. (n). The better of an HPR/PC pair is bold only where the
difference exceeds the pair's combined standard error (the s.e. of each mean: s.d./sqrt(n) over
seeds; for downstream scores also lm-eval's sampling s.e.); with no s.e. known (one seed of a loss)
the lower loss is bold. Downstream scores carry their tasks' chance level (`chance.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from pcbench.spec.methods import COMPARED
from pcbench.report import fmt, reference, stats
from pcbench.report.chance import average_chance, chance
from pcbench.report.load import Study

METHODS = COMPARED  # the paired comparison (baseline, proposed), from the registry
NOT_KEYS = {"method", "seed", "tokens", "compression"}
PAPER_COLS = ["paper_loss", "paper_position", "paper_lost", "paper_known", "paper_source"]
PAPER_GRIDS = {"paper_gpt2": "Table A.2 (and Table 3)", "paper_llama3_1b": "the poster's Llama-3.2-1B table"}


@dataclass
class Table:
    """One output table: `markdown` to read, `data` (tidy) to write as CSV."""

    name: str
    title: str
    markdown: str
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)


# -- which runs go where -----------------------------------------------------------------------
def compress_runs(study: Study) -> pd.DataFrame:
    t = study.train
    return t[t.method.isin(METHODS)] if len(t) else t


def sweep_stages(study: Study) -> list[str]:
    """Stages that are learning-rate sweeps: named *sweep*, or compress runs whose lr label varies."""
    t = compress_runs(study)
    out = []
    for stage, df in t.groupby("stage", sort=True):
        varies = "lr" in df.columns and df["lr"].dropna().nunique() > 1
        if "sweep" in str(stage).lower() or varies:
            out.append(stage)
    return out


def pair_stages(study: Study) -> list[str]:
    """Stages with PC/HPR runs that are not sweeps (each gets a Table-A.2-like table)."""
    sweeps = set(sweep_stages(study))
    return sorted(s for s in compress_runs(study).stage.unique() if s not in sweeps)


def own_labels(df: pd.DataFrame) -> set[str]:
    """Label names that these runs carry in their own run.json (axes of their stage or inherited)."""
    return {k for s in df.get("label_keys", pd.Series(dtype=str)).dropna() for k in str(s).split(",") if k}


def cell_keys(df: pd.DataFrame, labels: list[str]) -> list[str]:
    """Row keys of a pair table: compression, then the runs' other labels (not method, seed, tokens)."""
    own = own_labels(df)
    return ["compression"] + [c for c in labels if c not in NOT_KEYS and c in own and c in df.columns]


def stage_runs(study: Study, stage: str) -> tuple[pd.DataFrame, list[str]]:
    df = compress_runs(study)
    df = df[df.stage == stage]
    return df, cell_keys(df, study.labels)


# -- the paper's numbers next to ours --------------------------------------------------------------
def _paper_variant(df: pd.DataFrame) -> pd.Series:
    return np.where(df.base_id.notna(), "dataset alignment", "standard")


def attach_paper(df: pd.DataFrame, grid: str) -> pd.DataFrame:
    """Add paper_* columns to run rows of a paper grid (matched on model, ratio, level, method, tokens)."""
    df = df.copy()
    if grid == "paper_gpt2":
        ref = pd.concat([reference.table_a2(), reference.table3()], ignore_index=True)
        on = ["model", "ratio", "importance", "compression", "method", "tokens"]
        ours = pd.DataFrame({"model": df["model"].map(reference.paper_model) if "model" in df else None,
                             "ratio": pd.to_numeric(df.get("base_ratio"), errors="coerce"),
                             "importance": df.importance})
    elif grid == "paper_llama3_1b":
        ref = reference.poster()
        on = ["variant", "compression", "method", "tokens"]
        ours = pd.DataFrame({"variant": _paper_variant(df)}, index=df.index)
    else:
        for c in PAPER_COLS:
            df[c] = math.nan if c in ("paper_loss", "paper_known") else None
        return df
    ours["compression"] = df.compression.round(4)
    ours["method"] = df.method
    ours["tokens"] = df.tokens.round()
    ref = ref.assign(compression=ref.compression.round(4), tokens=ref.tokens.round())
    ref = ref.drop_duplicates(on, keep="first").rename(columns={
        "loss": "paper_loss", "position": "paper_position", "lost": "paper_lost",
        "known_loss": "paper_known", "source": "paper_source"})
    m = ours.reset_index().merge(ref[on + PAPER_COLS], on=on, how="left").set_index("index")
    for c in PAPER_COLS:
        df[c] = m[c].reindex(df.index)
    return df


# -- aggregation ---------------------------------------------------------------------------------
BOLD_RULE = ("**bold**: the better of the HPR/PC pair, only where the difference exceeds the pair's combined "
             "standard error")


def mark_better(out: pd.DataFrame, pair: list[str], lower_is_better: bool = True) -> pd.Series:
    """True for the better method of each HPR/PC pair (rows grouped by `pair`) whose means differ by more
    than their combined s.e. (`se` column; a pair with no s.e. known is decided by the means alone)."""
    better = pd.Series(False, index=out.index)
    for _, g in out[out.method.isin(METHODS)].groupby(pair, dropna=False, sort=False):
        if len(g) != 2 or set(g.method) != set(METHODS):
            continue
        a, b = g.iloc[0], g.iloc[1]
        if stats.clearly_apart(a["mean"], b["mean"], a["se"], b["se"]):
            better[g["mean"].idxmin() if lower_is_better else g["mean"].idxmax()] = True
    return better


def aggregate(df: pd.DataFrame, keys: list[str], value: str = "loss", lower_is_better: bool = True,
              se: Optional[str] = None) -> pd.DataFrame:
    """Mean / s.d. / n / s.e. over seeds per (keys, tokens, method), with `better` marking the better of each
    pair (see `mark_better`). s.e. of a mean: s.d./sqrt(n) over seeds; with `se` (a column of each run's own
    sampling s.e.) the larger of that and sqrt(sum se^2)/n."""
    cols = keys + ["tokens", "method"]
    df = df[df[value].notna()]
    if df.empty:
        return pd.DataFrame(columns=cols + ["mean", "std", "n", "se", "seeds", "runs", "better"])
    g = df.groupby(cols, dropna=False, sort=True)
    out = g[value].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    out["se"] = out["std"] / np.sqrt(out["n"])
    if se is not None:
        sampling = g[se].agg(lambda s: math.sqrt(float((s**2).sum())) / len(s) if s.notna().all() else math.nan)
        out["se"] = np.fmax(out["se"], sampling)
    out["seeds"] = g["seed"].agg(lambda s: ",".join(str(x) for x in sorted(set(s))))
    out["runs"] = g["id"].agg(lambda s: ",".join(sorted(s)))
    for c in PAPER_COLS:
        if c in df.columns:
            out[c] = g[c].first()
    out = out.reset_index()
    out["better"] = mark_better(out, keys + ["tokens"], lower_is_better)
    out["method"] = pd.Categorical(out.method, [m for m in METHODS if m in set(out.method)] +
                                   sorted(set(out.method) - set(METHODS)), ordered=True)
    out = out.sort_values(cols, kind="stable").reset_index(drop=True)
    out["method"] = out.method.astype(str)
    return out


AT_CHANCE = "†"


def _cell(mean: float, std: float, n: int, better: bool, digits: int = 4) -> str:
    s = fmt.num(mean, digits)
    s = f"**{s}**" if better else s
    if n > 1:
        s += f" ± {fmt.num(std, digits)} (n={n})"
    return s


def _row_cell(r: pd.Series, digits: int = 4) -> str:
    """One aggregated row as a cell: loss rows mean ± s.d. (n); score rows (with `chance`) mean ± s.e.,
    † when not clearly above chance."""
    if "chance" not in r.index:
        return _cell(r["mean"], r["std"], int(r["n"]), bool(r["better"]), digits)
    s = fmt.num(r["mean"], digits)
    s = f"**{s}**" if r["better"] else s
    if not fmt.is_nan(r["se"]):
        s += f" ± {fmt.num(r['se'], digits)}"
    if int(r["n"]) > 1:
        s += f" (n={int(r['n'])})"
    flag = r.get("at_chance")
    return s + (f" {AT_CHANCE}" if isinstance(flag, (bool, np.bool_)) and flag else "")


def _paper_cell(row: Optional[pd.Series], better: bool) -> str:
    if row is None or (fmt.is_nan(row.get("paper_loss")) and fmt.is_nan(row.get("paper_position"))):
        return ""
    if not fmt.is_nan(row.paper_loss):
        s = fmt.num(row.paper_loss)
        s = f"**{s}**" if better else s
        return s + (" (i)" if row.paper_position == "inferred" else "")
    known = "" if fmt.is_nan(row.paper_known) else f" ({fmt.num(row.paper_known)} T3)"
    return "lost" + known


def _paper_better(sub: pd.DataFrame) -> set[str]:
    """Methods whose paper cell is the better of the pair (a lost cell is the worse one)."""
    if sub.empty or "paper_loss" not in sub.columns:
        return set()
    vals = {r.method: (r.paper_known if fmt.is_nan(r.paper_loss) else r.paper_loss) for r in sub.itertuples()}
    lost = {r.method for r in sub.itertuples() if fmt.is_nan(r.paper_loss) and r.paper_position == "lost"}
    present = {m: v for m, v in vals.items() if not fmt.is_nan(v)}
    if len(present) == 2:
        best = min(present.values())
        return {m for m, v in present.items() if v == best and m not in lost}
    if len(present) == 1 and lost:
        return set(present) - lost
    return set()


LOSS_BOLD = (f"{BOLD_RULE} (s.e. of a mean: s.d./sqrt(n) over seeds; a single seed gives none, so a pair of "
             "single-seed cells is decided by the lower loss alone).")
PAPER_NOTE = ("Paper rows: the paper's own numbers. (i): the cell's column is inferred (our text copy lost the "
              "row's empty cells; surviving HPR values fill the first columns, PC values the last); lost: the "
              "worse of the pair, missing from our copy (not invented); T3: the same cell as given in Table 3.")


def pair_markdown(long: pd.DataFrame, keys: list[str], digits: int = 4, paper: bool = False) -> str:
    """Wide layout: one row per (keys, method), one column per token budget; bold = better of the pair."""
    if long.empty:
        return fmt.md_table(long)
    toks = sorted(long.tokens.dropna().unique())
    combos = long[keys].drop_duplicates()
    rows = []
    for _, combo in combos.iterrows():
        mask = np.logical_and.reduce([(long[k] == combo[k]) | (long[k].isna() & pd.isna(combo[k])) for k in keys])
        sub = long[mask]
        head = {k: fmt.value(k, combo[k]) for k in keys}
        methods = list(dict.fromkeys(sub.method))
        for m in methods:
            r = {**head, "method": fmt.value("method", m)}
            for t in toks:
                c = sub[(sub.method == m) & (sub.tokens == t)]
                r[fmt.tokens(t)] = "" if c.empty else _row_cell(c.iloc[0], digits)
            rows.append(r)
        has_paper = paper and "paper_loss" in sub.columns and (
            sub.paper_loss.notna().any() or sub.paper_position.notna().any())
        if has_paper:
            for m in methods:
                r = {**head, "method": f"{fmt.value('method', m)} (paper)"}
                for t in toks:
                    c = sub[sub.tokens == t]
                    cm = c[c.method == m]
                    r[fmt.tokens(t)] = "" if cm.empty else _paper_cell(cm.iloc[0], m in _paper_better(c))
                rows.append(r)
    return fmt.md_table(pd.DataFrame(rows))


def pair_table(study: Study, stage: str) -> Table:
    """Table A.2 layout for one stage of PC/HPR runs (our numbers; the paper's beside them on paper grids)."""
    df, keys = stage_runs(study, stage)
    df = attach_paper(df, study.grid)
    long = aggregate(df, keys)
    paper = bool(study.grid in PAPER_GRIDS and len(long) and
                 (long.paper_loss.notna().any() or long.paper_position.notna().any()))
    notes = [f"Training cross-entropy, mean of the last 100 steps (lower is better); several seeds: mean ± s.d. "
             f"(n). {LOSS_BOLD}"]
    if paper:
        notes.append(PAPER_NOTE)
    title = f"Stage `{stage}`: HPR vs PC by retraining tokens" + (
        f" (ours vs {PAPER_GRIDS[study.grid]})" if paper else "")
    return Table(f"table_{stage}", title, pair_markdown(long, keys, paper=paper), long, notes)


def table1_view(study: Study, stage: str) -> Optional[Table]:
    """paper_gpt2 only: the paper's Table 1 layout (the 80:1 rows of Table A.2), ours beside the paper's."""
    df, keys = stage_runs(study, stage)
    if study.grid != "paper_gpt2" or "ratio" not in keys or df.empty:
        return None
    df = attach_paper(df[pd.to_numeric(df["ratio"], errors="coerce") == 80], study.grid)
    if df.empty:
        return None
    keys = [k for k in keys if k != "ratio"]
    long = aggregate(df, keys)
    return Table(f"table1_{stage}", f"Stage `{stage}`, 80:1 bases: the paper's Table 1 layout",
                 pair_markdown(long, keys, paper=True), long,
                 ["As Table 1 of the paper (the 80:1 rows of Table A.2). " + LOSS_BOLD] + [PAPER_NOTE])


# -- bases ----------------------------------------------------------------------------------------
def base_table(study: Study) -> Table:
    """Pretraining (and fine-tuning) runs: the paper's base-model loss table."""
    t = study.train
    b = t[t.method == "pretrain"] if len(t) else t
    own = own_labels(b)
    labels = [c for c in study.labels if c in own and c in b.columns]
    cols = ["stage", *labels, "id", "params", "tokens_seen", "loss", "heldout"]
    data = b[cols].copy() if len(b) else pd.DataFrame(columns=cols)
    data["tokens_per_param"] = data.tokens_seen / data.params
    if study.grid == "paper_gpt2" and len(data):
        ref = reference.base_losses()
        key = lambda m, r: (reference.paper_model(m), float(r))  # noqa: E731
        lut = {(r.model, float(r.ratio)): r.loss for r in ref.itertuples()}
        data["paper_loss"] = [lut.get(key(m, r), math.nan) for m, r in
                              zip(data.get("model", [None] * len(data)), data.get("ratio", [math.nan] * len(data)))]
    data = data.sort_values(["stage", *labels, "id"]).reset_index(drop=True)
    md = pd.DataFrame({
        "stage": data.stage, **{c: [fmt.value(c, v) for v in data[c]] for c in labels},
        "params": [f"{int(p):,}" for p in data.params], "tokens": [fmt.tokens(v) for v in data.tokens_seen],
        "tokens/param": [f"{v:.1f}" for v in data.tokens_per_param],
        "loss (last 100)": [fmt.num(v) for v in data.loss], "held-out loss": [fmt.num(v) for v in data.heldout],
        **({"paper loss": [fmt.num(v) for v in data.paper_loss]} if "paper_loss" in data else {}),
    })
    return Table("base_models", "Base models (pretraining runs)", fmt.md_table(md), data,
                 ["loss: training CE over the last 100 steps; held-out: CE on the held-out text."])


# -- learning rates -------------------------------------------------------------------------------
def lr_sweep_table(study: Study) -> Optional[Table]:
    """Loss by learning rate per method in sweep stages; the best lr of each row in bold."""
    stages = sweep_stages(study)
    if not stages:
        return None
    t = compress_runs(study)
    t = t[t.stage.isin(stages)].copy()
    t["lr"] = t["lr_used"]
    keys = ["stage"] + [c for c in cell_keys(t, study.labels) if c != "lr"] + ["method"]
    g = t.groupby(keys + ["lr"], dropna=False, sort=True)
    long = g["loss"].agg(["mean", "std", "count"]).rename(columns={"count": "n"}).reset_index()
    long["se"] = long["std"] / np.sqrt(long["n"])
    long["best"] = False
    for _, sub in long.groupby(keys, dropna=False, sort=False):
        top = sub.sort_values("mean", kind="stable")
        if len(top) == 1 or stats.clearly_apart(top["mean"].iloc[0], top["mean"].iloc[1], top.se.iloc[0],
                                                top.se.iloc[1]):
            long.loc[top.index[0], "best"] = True
    lrs = sorted(long.lr.unique())
    rows = []
    for combo, sub in long.groupby(keys, dropna=False, sort=True):
        r = {k: fmt.value(k, v) for k, v in zip(keys, combo)}
        for lr in lrs:
            c = sub[sub.lr == lr]
            r[f"lr {lr:g}"] = "" if c.empty else _cell(c["mean"].iloc[0], c["std"].iloc[0], int(c.n.iloc[0]),
                                                       bool(c.best.iloc[0]))
        rows.append(r)
    return Table("lr_sweep", "Learning-rate sweep", fmt.md_table(pd.DataFrame(rows)), long,
                 ["Training loss (last 100 steps) by learning rate; **bold**: the best rate of each row, only where "
                  "it beats the next best by more than their combined standard error (s.d./sqrt(n) over seeds; "
                  "single seeds give none, and the lowest loss is bold)."])


def lr_used_table(study: Study) -> Table:
    """Which learning rate each method ran with, per stage (tuned rates name the sweep run they came from)."""
    t = compress_runs(study)
    rows = []
    for (stage, method), df in t.groupby(["stage", "method"], sort=True):
        for lr, d in df.groupby("lr_used", sort=True):
            src = sorted({x for x in d.tuned_from if isinstance(x, str)})
            rows.append({"stage": stage, "method": method, "lr": lr, "runs": len(d),
                         "tuned_from": ",".join(src) if src else ""})
    data = pd.DataFrame(rows, columns=["stage", "method", "lr", "runs", "tuned_from"])
    md = data.assign(method=[fmt.value("method", m) for m in data.method], lr=[f"{v:g}" for v in data.lr],
                     tuned_from=[s if s else "(grid value)" for s in data.tuned_from])
    return Table("lr_used", "Learning rate used, per stage and method", fmt.md_table(md), data)


# -- importance (Table 3) --------------------------------------------------------------------------
def base_names(study: Study) -> dict[str, str]:
    """Run id of each base -> a short name from its labels ("80:1 base", fmt.phrases of its labels)."""
    out = {}
    for r in study.runs.to_dict("records"):
        labs = [c for c in str(r.get("label_keys") or "").split(",") if c]
        out[r["id"]] = fmt.phrases(labs, [r[c] for c in labs]) or r["id"]
    return out


def importance_table(study: Study) -> Optional[Table]:
    """Cells run with more than one importance score (the paper's Table 3), across stages."""
    sweeps = set(sweep_stages(study))
    t = compress_runs(study)
    t = t[~t.stage.isin(sweeps)].copy()
    if t.empty or t.importance.nunique() < 2:
        return None
    names = base_names(study)
    t["base"] = [names.get(b, b) if isinstance(b, str) else m for b, m in zip(t.base_id, t.model_name)]
    cell = ["base", "compression", "tokens"]
    n_imp = t.groupby(cell, dropna=False)["importance"].transform("nunique")
    t = attach_paper(t[n_imp > 1], study.grid)
    keys = ["base", "compression", "importance"]
    long = aggregate(t, keys)
    # within one importance the better of HPR/PC is marked; best importance per method is listed in data
    long["best_importance"] = long["mean"] == long.groupby(["base", "compression", "tokens", "method"])[
        "mean"].transform("min")
    paper = study.grid == "paper_gpt2"
    notes = [f"Same base, level and budget, different importance scores. {LOSS_BOLD}"]
    if paper:
        notes.append(PAPER_NOTE.replace("T3: the same cell as given in Table 3.", "").strip())
    return Table("importance", "Importance scores (the paper's Table 3)", pair_markdown(long, keys, paper=paper),
                 long, notes)


# -- cost ------------------------------------------------------------------------------------------
def cost_table(study: Study) -> Table:
    """Per method and level: throughput, FLOPs (PC's fixed per-step cost vs the per-token cost), time."""
    t = study.train.copy()
    if t.empty:
        return Table("cost", "Cost", fmt.md_table(t), t)
    t["token_flops_per_step"] = t.flops_per_token * t.tokens_per_step
    t["compression"] = t.compression.fillna(0.0)
    g = t.groupby(["method", "compression"], sort=True)
    data = pd.DataFrame({
        "runs": g.size(), "tokens_per_s": g.tokens_per_s.mean(), "train_flops": g.train_flops.sum(),
        "flops_per_token": g.flops_per_token.mean(), "token_flops_per_step": g.token_flops_per_step.mean(),
        "fixed_flops_per_step": g.fixed_flops_per_step.mean(), "wall_seconds": g.wall_seconds.sum(),
        "wall_seconds_mean": g.wall_seconds.mean()}).reset_index()
    data["fixed_share"] = data.fixed_flops_per_step / data.token_flops_per_step
    md = pd.DataFrame({
        "method": [fmt.value("method", m) for m in data.method],
        "compression": ["-" if m == "pretrain" else fmt.value("compression", c)
                        for m, c in zip(data.method, data.compression)],
        "runs": data.runs, "tokens/s (mean)": [f"{v:,.0f}" for v in data.tokens_per_s],
        "train FLOPs (sum)": [fmt.sci(v) for v in data.train_flops],
        "per-token FLOPs / step": [fmt.sci(v) for v in data.token_flops_per_step],
        "fixed FLOPs / step": [fmt.sci(v) for v in data.fixed_flops_per_step],
        "fixed / per-token": [f"{v:.2%}" for v in data.fixed_share],
        "wall (sum)": [fmt.duration(v) for v in data.wall_seconds],
        "wall (mean)": [fmt.duration(v) for v in data.wall_seconds_mean]})
    return Table("cost", "Cost per method", fmt.md_table(md), data,
                 ["fixed FLOPs / step: PC's projection cost per optimiser step (0 for HPR); per-token FLOPs / "
                  "step: FLOPs per token x tokens per step. tokens/s depends on the machine's load."])


# -- downstream ------------------------------------------------------------------------------------
def eval_tasks(ev: pd.DataFrame) -> list[str]:
    return sorted(c[5:] for c in ev.columns if c.startswith("task:"))


def eval_frame(study: Study) -> pd.DataFrame:
    """Eval runs of PC/HPR models, each task's score with its sampling s.e. (`se:<task>`: lm-eval's stderr
    where recorded, else the binomial s.e. from the sample count), the average's s.e. (`average_se`,
    tasks taken as independent) and chance level (`chance`: of the tasks the run scored)."""
    ev = study.evals
    if ev.empty or "method" not in ev:
        return ev
    ev = ev[ev.method.isin(METHODS)].copy()
    tasks = eval_tasks(ev)
    for t in tasks:
        score = ev[f"task:{t}"].astype(float)
        rec = ev[f"se:{t}"].astype(float) if f"se:{t}" in ev else pd.Series(math.nan, index=ev.index)
        n = ev[f"n:{t}"].astype(float) if f"n:{t}" in ev else pd.Series(math.nan, index=ev.index)
        ev[f"se:{t}"] = [r if not math.isnan(r) else stats.binomial_se(p, k) for r, p, k in zip(rec, score, n)]
    avg_se, lvl = [], []
    for _, r in ev.iterrows():
        scored = [t for t in tasks if not fmt.is_nan(r[f"task:{t}"])]
        ses = [r[f"se:{t}"] for t in scored]
        avg_se.append(math.sqrt(sum(x * x for x in ses)) / len(ses) if ses and not any(map(math.isnan, ses))
                      else math.nan)
        lvl.append(average_chance(scored))
    ev["average_se"], ev["chance"] = avg_se, lvl
    return ev


def mark_chance(long: pd.DataFrame, pair: list[str]) -> pd.DataFrame:
    """`at_chance`: the score is not above its chance level by more than 2 s.e. (None: chance or s.e.
    unknown); a pair (rows grouped by `pair`) whose two scores are both at chance has no winner."""
    long = long.copy()
    long["at_chance"] = pd.Series([None if fmt.is_nan(c) or fmt.is_nan(se) else bool(m - c <= 2 * se)
                                   for m, c, se in zip(long["mean"], long["chance"], long["se"])],
                                  index=long.index, dtype=object)
    if len(long):
        both = long.groupby(pair, dropna=False)["at_chance"].transform(lambda s: bool(s.eq(True).all()))
        long["better"] = long["better"] & ~both.astype(bool)
    return long


def _chance_note(tasks: list[str], level: float) -> str:
    known = [f"{t} {fmt.value('chance', chance(t))}" for t in tasks if not math.isnan(chance(t))]
    unknown = [t for t in tasks if math.isnan(chance(t))]
    out = f"Chance level: {', '.join(known)}" if known else "Chance level: unknown"
    if len(tasks) > 1 and not math.isnan(level):
        out += f"; of the average {fmt.num(level)}"
    if unknown:
        out += f" (not known for {', '.join(unknown)})"
    return out + f"; {AT_CHANCE}: not above chance by more than 2 s.e. (indistinguishable from guessing)."


SCORE_NOTE = (f"higher is better; mean ± s.e. (lm-eval's sampling s.e.; over seeds the larger of that and "
              f"s.d./sqrt(n)); {BOLD_RULE}, and never between two scores at chance.")


def downstream_tables(study: Study) -> list[Table]:
    """Per scored stage: the eval average laid out like the pair tables, and each task's score beside its
    chance level (higher is better; bold and † as in SCORE_NOTE / _chance_note)."""
    ev = eval_frame(study)
    if ev.empty:
        return []
    out = []
    tasks = eval_tasks(ev)
    for stage, df in ev.groupby("parent_stage", sort=True):
        keys = cell_keys(df, study.labels)
        long = aggregate(df, keys, value="average", lower_is_better=False, se="average_se")
        long = long.merge(df.groupby(keys + ["tokens", "method"], dropna=False).chance.first().reset_index(),
                          on=keys + ["tokens", "method"], how="left")
        long = mark_chance(long, keys + ["tokens"])
        tl = df.melt(id_vars=["id", "parent", *keys, "tokens", "method", "seed"], value_vars=[f"task:{t}" for t in tasks],
                     var_name="task", value_name="score").dropna(subset=["score"])
        tl["task"] = tl.task.str.removeprefix("task:")
        long = long.merge(tl.groupby(keys + ["tokens", "method", "task"], dropna=False).score.mean()
                          .unstack("task").reset_index(), on=keys + ["tokens", "method"], how="left")
        level = average_chance(tasks)
        out.append(Table(f"downstream_{stage}", f"Downstream average (eval of stage `{stage}`)",
                         pair_markdown(long, keys), long,
                         [f"Mean of each task's primary metric ({', '.join(tasks)}); {SCORE_NOTE}",
                          _chance_note(tasks, level)]))
        se = df.melt(id_vars=["id"], value_vars=[f"se:{t}" for t in tasks], var_name="task", value_name="score_se")
        se["task"] = se.task.str.removeprefix("se:")
        tl = tl.merge(se, on=["id", "task"], how="left")
        tl["chance"] = [chance(t) for t in tl.task]
        per = mark_chance(aggregate(tl, keys + ["task", "chance"], value="score", lower_is_better=False,
                                    se="score_se"), keys + ["task", "chance", "tokens"])
        out.append(Table(f"downstream_tasks_{stage}", f"Downstream scores per task (eval of stage `{stage}`)",
                         pair_markdown(per, keys + ["task", "chance"]), per,
                         [f"Each task's primary metric; {SCORE_NOTE}", _chance_note(tasks, level)]))
    return out


# -- recovery --------------------------------------------------------------------------------------
def recovery_table(study: Study) -> Optional[Table]:
    """PC runs: share of the projections' mass on the dimensions hard pruning dropped, at the last step."""
    t = study.train
    pc = t[t.method == "pc"] if len(t) else t
    rec = study.recovery(list(pc.id)) if len(pc) else pd.DataFrame()
    if rec.empty:
        return None
    last = rec.sort_values(["run", "step"]).groupby("run").tail(1).set_index("run")
    cols = sorted(c for c in last.columns if c.startswith("recovery/") and c.endswith("/mean"))
    data = pc.set_index("id")[["stage", "compression", "tokens", "seed", "base_ratio"]].join(
        last[["step"] + cols], how="inner").reset_index().rename(columns={"index": "id"})
    keys = ["stage", "base_ratio", "compression", "tokens"]
    agg = data.groupby(keys, dropna=False)[cols].mean().reset_index()
    md = pd.DataFrame({"stage": agg.stage, "base ratio": [fmt.value("ratio", v) for v in agg.base_ratio],
                       "compression": [fmt.value("compression", v) for v in agg.compression],
                       "tokens": [fmt.tokens(v) for v in agg.tokens],
                       **{c.split("/")[1] + " (mean share)": [f"{v:.2%}" for v in agg[c]] for c in cols}})
    return Table("recovery", "Recovery: PC projection mass on hard-pruned dimensions (last step)",
                 fmt.md_table(md), data,
                 ["Share of each projection's squared mass on base dimensions that hard pruning dropped, mean over "
                  "tensors (0 at step 0, when PC equals hard pruning); mean over seeds."])


def damaged_table(study: Study) -> Optional[Table]:
    """Runs whose records are damaged (unreadable, or not what was sealed): left out of every other
    table, each named with the path at fault (relative to the store). None when there are none."""
    r = study.runs
    d = r[r.state == "damaged"] if len(r) else r
    if not len(d):
        return None
    data = d[["id", "stage", "error"]].sort_values("id").reset_index(drop=True)
    here = f"{Path(study.root).resolve()}/"  # paths in the store named from its root: a report holds no machine's paths
    data["error"] = [e.replace(here, "").replace(f"{study.root}/", "") if isinstance(e, str) else e for e in data.error]
    md = pd.DataFrame({"run": data.id, "stage": data.stage, "problem": [fmt.value("error", e) for e in data.error]})
    return Table("damaged", "Damaged runs (not counted; `pcbench run` reruns them)", fmt.md_table(md), data)


def earlier_table(study: Study) -> Optional[Table]:
    """Runs in the store that the grid no longer has (an earlier version of it): not counted. None when none."""
    if not study.earlier:
        return None
    data = pd.DataFrame([{"id": e["id"], "stage": e["stage"], "state": e["state"],
                          "labels": fmt.phrases(sorted(e["labels"]), [e["labels"][k] for k in sorted(e["labels"])])}
                         for e in sorted(study.earlier, key=lambda e: e["id"])])
    return Table("earlier", "Runs of an earlier version of the grid, not counted", fmt.md_table(
        data.rename(columns={"id": "run"})), data)


def failed_table(study: Study) -> Table:
    r = study.runs
    f = r[r.state == "failed"] if len(r) else r
    labs = [c for c in study.labels if c in f.columns]
    data = f[["id", "stage", *labs, "error"]].sort_values("id").reset_index(drop=True) if len(f) else \
        pd.DataFrame(columns=["id", "stage", "error"])
    md = pd.DataFrame({"run": data.id, "stage": data.stage,
                       "labels": [fmt.phrases(labs, [row[c] for c in labs]) for _, row in data.iterrows()],
                       "error": [fmt.value("error", e)[:200] for e in data.error]})
    return Table("failed", "Failed runs", fmt.md_table(md), data)
