"""Tables from a Study: each a markdown layout (as in the paper) and a tidy frame (CSV).

Pair tables follow the paper's Table 1 / Table A.2: rows are compression level, then the label
columns that define the base (model, ratio, ...), then the method; columns are retraining
tokens; the better of each HPR/PC pair is bold. Several seeds: mean ± s.d. (n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from pcbench.report import fmt, reference
from pcbench.report.load import Study

METHODS = ("hpr", "pc")
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
def aggregate(df: pd.DataFrame, keys: list[str], value: str = "loss", lower_is_better: bool = True) -> pd.DataFrame:
    """Mean / s.d. / n over seeds per (keys, tokens, method), with `better` marking the better of each pair."""
    cols = keys + ["tokens", "method"]
    df = df[df[value].notna()]
    if df.empty:
        return pd.DataFrame(columns=cols + ["mean", "std", "n", "seeds", "runs", "better"])
    g = df.groupby(cols, dropna=False, sort=True)
    out = g[value].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    out["seeds"] = g["seed"].agg(lambda s: ",".join(str(x) for x in sorted(set(s))))
    out["runs"] = g["id"].agg(lambda s: ",".join(sorted(s)))
    for c in PAPER_COLS:
        if c in df.columns:
            out[c] = g[c].first()
    out = out.reset_index()
    pair = keys + ["tokens"]
    best = out.groupby(pair, dropna=False)["mean"].transform("min" if lower_is_better else "max")
    both = out.groupby(pair, dropna=False)["method"].transform(lambda s: set(METHODS) <= set(s))
    out["better"] = (out["mean"] == best) & both.astype(bool)
    out["method"] = pd.Categorical(out.method, [m for m in METHODS if m in set(out.method)] +
                                   sorted(set(out.method) - set(METHODS)), ordered=True)
    out = out.sort_values(cols, kind="stable").reset_index(drop=True)
    out["method"] = out.method.astype(str)
    return out


def _cell(mean: float, std: float, n: int, better: bool, digits: int = 4) -> str:
    s = fmt.num(mean, digits)
    s = f"**{s}**" if better else s
    if n > 1:
        s += f" ± {fmt.num(std, digits)} (n={n})"
    return s


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
                r[fmt.tokens(t)] = "" if c.empty else _cell(c["mean"].iloc[0], c["std"].iloc[0], int(c.n.iloc[0]),
                                                            bool(c.better.iloc[0]), digits)
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
    notes = ["Training cross-entropy, mean of the last 100 steps (lower is better); **bold**: the better of "
             "the HPR/PC pair; several seeds: mean ± s.d. (n)."]
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
                 ["As Table 1 of the paper (the 80:1 rows of Table A.2)."] + [PAPER_NOTE])


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
    long["best"] = long["mean"] == long.groupby(keys, dropna=False)["mean"].transform("min")
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
                 ["Training loss (last 100 steps) by learning rate; **bold**: the best rate of each row."])


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
    """Run id of each base -> a short name from its labels ("ratio=80")."""
    out = {}
    for r in study.runs.to_dict("records"):
        labs = [c for c in str(r.get("label_keys") or "").split(",") if c]
        out[r["id"]] = ", ".join(f"{c}={fmt.value(c, r[c])}" for c in labs) or r["id"]
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
    notes = ["Same base, level and budget, different importance scores. **bold**: the better of HPR/PC."]
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
def downstream_tables(study: Study) -> list[Table]:
    """Eval averages laid out like the pair tables (higher is better), one per scored stage."""
    ev = study.evals
    if ev.empty:
        return []
    out = []
    ev = ev[ev.method.isin(METHODS)]
    tasks = sorted(c for c in ev.columns if c.startswith("task:"))
    for stage, df in ev.groupby("parent_stage", sort=True):
        keys = cell_keys(df, study.labels)
        long = aggregate(df, keys, value="average", lower_is_better=False)
        tl = df.melt(id_vars=["id", "parent", *keys, "tokens", "method", "seed"], value_vars=tasks,
                     var_name="task", value_name="score").dropna(subset=["score"])
        tl["task"] = tl.task.str.removeprefix("task:")
        long = long.merge(tl.groupby(keys + ["tokens", "method", "task"], dropna=False).score.mean()
                          .unstack("task").reset_index(), on=keys + ["tokens", "method"], how="left")
        out.append(Table(f"downstream_{stage}", f"Downstream average (eval of stage `{stage}`)",
                         pair_markdown(long, keys), long,
                         [f"Mean of each task's primary metric ({', '.join(t[5:] for t in tasks)}); higher is "
                          "better; **bold**: the better of the pair."]))
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


def failed_table(study: Study) -> Table:
    r = study.runs
    f = r[r.state == "failed"] if len(r) else r
    labs = [c for c in study.labels if c in f.columns]
    data = f[["id", "stage", *labs, "error"]].sort_values("id").reset_index(drop=True) if len(f) else \
        pd.DataFrame(columns=["id", "stage", "error"])
    md = pd.DataFrame({"run": data.id, "stage": data.stage,
                       "labels": [", ".join(f"{c}={fmt.value(c, row[c])}" for c in labs if not fmt.is_nan(row[c]))
                                  for _, row in data.iterrows()],
                       "error": [fmt.value("error", e)[:200] for e in data.error]})
    return Table("failed", "Failed runs", fmt.md_table(md), data)
