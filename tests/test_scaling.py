"""The scaling-trend estimator (pcbench/report/scaling.py): synthetic gaps with a known slope and
crossover are recovered within their intervals (and the intervals cover the truth at about their
nominal rate), the fit on the paper's numbers, the verdict rule, and the opening table from a store."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pcbench.report import scaling
from pcbench.report.load import load_study

# the truth: gap = A + B log2(tokens) + C log2(ratio) + D log2(params) + E compression
A, B, C, D, E = 0.30, -0.012, -0.006, -0.004, 0.02
TOKENS = [4e5, 8e5, 1.6e6, 3.2e6, 6.4e6]   # 16x
RATIOS = [20, 80, 320]
PARAMS = [1.6e5, 6.4e5]
LEVELS = [0.35, 0.5, 0.65]


def truth(tokens, ratio, params, compression) -> float:
    return A + B * math.log2(tokens) + C * math.log2(ratio) + D * math.log2(params) + E * compression


def true_crossover(ratio, params, compression=0.5) -> float:
    return -(A + C * math.log2(ratio) + D * math.log2(params) + E * compression) / B


def synthetic(rng, sd=0.004) -> pd.DataFrame:
    rows = [{"tokens": t, "ratio": r, "params": p, "compression": c, "gap": truth(t, r, p, c) + rng.normal(0, sd)}
            for t, r, p, c in itertools.product(TOKENS, RATIOS, PARAMS, LEVELS)]
    return pd.DataFrame(rows)


def test_known_slope_and_crossover_recovered_within_interval():
    fit = scaling.fit_gap(synthetic(np.random.default_rng(0)))
    assert fit.terms == list(scaling.TERMS) and fit.n == 90 and fit.df == 85
    for term, want in zip(scaling.TERMS, (B, C, D, E)):
        est, lo, hi = fit.estimate(term)
        assert lo < want < hi and lo < est < hi, term
    g, lo, hi = fit.crossover({"log2_ratio": math.log2(80), "log2_params": math.log2(6.4e5), "compression": 0.5})
    assert lo < true_crossover(80, 6.4e5) < hi and hi - lo < 2  # within a factor of 4 in tokens


def test_interaction_kept_only_where_justified_and_crossover_follows_it():
    rng = np.random.default_rng(3)
    cells = synthetic(rng)
    lt, lr = np.log2(cells.tokens), np.log2(cells.ratio)
    cells["gap"] += 0.004 * (lt - lt.mean()) * (lr - lr.mean())  # the token slope flattens with the ratio
    fit = scaling.fit_gap(cells, interactions=scaling.INTERACTIONS)
    assert "log2_tokens*log2_ratio" in fit.terms
    assert "log2_tokens*log2_params (not justified)" in fit.dropped
    est, lo, hi = fit.estimate("log2_tokens*log2_ratio")
    assert lo < 0.004 < hi
    est, lo, hi = fit.estimate("log2_tokens")  # centred: the average token slope is still B
    assert lo < B < hi
    # per base: slope B + 0.004 (log2 r - mean), crossover where the gap with the interaction is 0
    for r in RATIOS:
        x = {"log2_tokens": 0.0, "log2_ratio": math.log2(r), "log2_params": math.log2(6.4e5), "compression": 0.5}
        s_true = B + 0.004 * (math.log2(r) - lr.mean())
        s_est, s_lo, s_hi = fit.token_slope(x)
        assert s_lo < s_true < s_hi
        g0 = truth(1.0, r, 6.4e5, 0.5) - 0.004 * lt.mean() * (math.log2(r) - lr.mean())
        g, glo, ghi = fit.crossover(x)
        assert glo < -g0 / s_true < ghi
    plain = scaling.fit_gap(synthetic(np.random.default_rng(4)), interactions=scaling.INTERACTIONS)
    assert not [t for t in plain.terms if "*" in t]


def test_intervals_cover_the_truth_at_about_95_percent():
    """200 seeded replications: each coefficient's and the crossover's 95% interval covers the truth
    in 90-99% of them (nominal 95%; binomial s.d. 1.5%)."""
    hits = {t: 0 for t in (*scaling.TERMS, "crossover")}
    n = 200
    x0 = {"log2_ratio": math.log2(20), "log2_params": math.log2(1.6e5), "compression": 0.5}
    want_x = true_crossover(20, 1.6e5)
    for seed in range(n):
        fit = scaling.fit_gap(synthetic(np.random.default_rng(1000 + seed)))
        for term, want in zip(scaling.TERMS, (B, C, D, E)):
            _, lo, hi = fit.estimate(term)
            hits[term] += lo <= want <= hi
        _, lo, hi = fit.crossover(x0)
        hits["crossover"] += lo <= want_x <= hi
    rates = {k: v / n for k, v in hits.items()}
    print("coverage over 200 replications:", rates)
    assert all(0.90 <= r <= 0.99 for r in rates.values()), rates


def test_fit_on_the_papers_numbers(capsys):
    a2 = scaling.paper_cells(poster=False)
    both = scaling.paper_cells(poster=True)
    # Table A.2: 30 pairs at 20:1 (2 sizes x 3 levels x 5 budgets) + the 2 80:1 pairs whose HPR cell
    # Table 3 gives; the poster adds 3 levels x 4 budgets
    assert len(a2) == 32 and (a2.ratio == 80).sum() == 2 and len(both) == 44
    assert np.allclose(a2.gap, a2.pc - a2.hpr)
    lines = []
    for name, cells in (("Table A.2 (+ Table 3)", a2), ("Table A.2 + poster", both)):
        fit = scaling.fit_gap(cells, label=name, interactions=scaling.INTERACTIONS)
        assert not [d for d in fit.dropped if "*" not in d] and fit.df == len(cells) - len(fit.terms) - 1
        # OLS: residuals orthogonal to every column of the design
        X = np.array([fit.row(x) for x in scaling.covariates(cells).to_dict("records")])
        assert np.allclose(X.T @ (cells.gap.to_numpy() - X @ fit.coef), 0, atol=1e-9)
        lines.append(f"{name}: {fit.n} cells, df {fit.df}, residual s.d. {fit.sigma:.5f}, "
                     f"left out: {fit.dropped or 'none'}")
        for t in fit.names():
            est, lo, hi = fit.estimate(t)
            assert lo < est < hi
            lines.append(f"  {t:12s} {est:+.5f} [{lo:+.5f}, {hi:+.5f}]  {scaling.decide(est, lo, hi)}")
        for r in scaling.crossovers(fit, cells).itertuples():
            at = "" if math.isnan(r.tokens) else f"{r.tokens:.3g} [{r.tokens_lo:.3g}, {r.tokens_hi:.3g}] tokens, "
            lines.append(f"  crossover {r.ratio:.0f}:1 {r.params:.3g} params: {at}{r.note} "
                         f"(token slope there {r.slope:+.5f} [{r.slope_lo:+.5f}, {r.slope_hi:+.5f}])")
    print("\n".join(lines))


def test_verdict_rule():
    assert scaling.decide(-0.02, -0.03, -0.01) == "supported"
    assert scaling.decide(0.02, 0.01, 0.03) == "not supported"
    assert scaling.decide(0.02, 0.01, 0.03, claim_negative=False) == "supported"
    assert scaling.decide(0.001, -0.004, 0.0045) == "no effect at this scale, bounded"
    v = scaling.decide(-0.004, -0.012, 0.004)  # half-width 0.008: 4x the replicates exclude 0
    assert v.startswith("not decided") and "4x" in v
    assert scaling.replicates_needed(0.0, -0.01, 0.01) == pytest.approx(4.0)  # to fit within +-0.005
    assert scaling.decide(math.nan, math.nan, math.nan).startswith("no estimate")


# -- the opening table from a store ---------------------------------------------------------------
def _w(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True))


def _final(kind, loss, tokens, params):
    return {"kind": kind, "tokens": tokens, "steps": 10, "train_loss_last100": loss,
            "model": {"params": {"total": params}}, "base": {"params": {"total": params}}}


def make_scaling_store(results: Path, rng, seeds=(0, 1), sd=0.002) -> Path:
    root = results / "scal"
    for r, p in itertools.product(RATIOS, PARAMS):
        bid = f"base-r{r}-p{int(p)}"
        _w(root / "runs" / bid / "run.json", {"id": bid, "stage": "base", "kind": "train",
                                               "labels": {"ratio": r, "size": int(p)}, "spec": {}, "deps": []})
        _w(root / "runs" / bid / "status.json", {"state": "completed"})
        _w(root / "runs" / bid / "final.json", _final("pretrain", 4.0, int(r * p), int(p)))
        for c, t, s in itertools.product(LEVELS, TOKENS, seeds):
            hpr = 3.0 - 0.05 * math.log2(t) + rng.normal(0, sd)
            for m, loss in (("hpr", hpr), ("pc", hpr + truth(t, r, p, c) + rng.normal(0, sd))):
                rid = f"compress-{r}-{int(p)}-{c}-{int(t)}-{s}-{m}"
                _w(root / "runs" / rid / "run.json", {
                    "id": rid, "stage": "compress", "kind": "train", "deps": [bid],
                    "labels": {"ratio": r, "size": int(p), "method": m, "compression": c, "tokens": int(t), "seed": s},
                    "spec": {"model": {"name": "hf", "path": f"run:{bid}"}, "train": {"tokens": int(t), "seed": s},
                             "compress": {"method": m, "compression": c}}})
                _w(root / "runs" / rid / "status.json", {"state": "completed"})
                _w(root / "runs" / rid / "final.json", _final(m, loss, int(t), int(p)))
    return root


def test_claims_table_from_the_store(tmp_path):
    make_scaling_store(tmp_path, np.random.default_rng(5))
    study = load_study(tmp_path, "scal")
    cells = scaling.our_cells(study)
    assert len(cells) == 90 and (cells.n == 2).all()
    assert set(cells.ratio) == set(map(float, RATIOS)) and set(cells.params) == set(PARAMS)
    t = scaling.claims_table(study)
    d = t.data[t.data.claim != "crossover"].set_index("term")
    for term, want in (("log2_tokens", B), ("log2_ratio", C), ("log2_params", D)):
        assert d.loc[term, "ours_lo"] < want < d.loc[term, "ours_hi"]
        assert d.loc[term, "verdict"] == "supported"  # all three true slopes are negative and large
        assert d.loc[term, "paper_a2_verdict"] and d.loc[term, "paper_all_verdict"]
    xo = t.data[(t.data.claim == "crossover") & (t.data.fit == "ours")]
    assert len(xo) == 6
    for r in xo.itertuples():
        assert r.lo < true_crossover(r.ratio, r.params) < r.hi
    assert t.markdown.splitlines()[0].startswith("| claim | the paper's numbers, fitted | ours | verdict |")
    print(t.markdown)


def test_report_opens_with_the_claims_table_only_where_it_applies(tmp_path):
    from pcbench.report import build_report

    make_scaling_store(tmp_path / "res", np.random.default_rng(6), seeds=(0,))
    text = (build_report(tmp_path / "res", "scal", tmp_path / "out") / "REPORT.md").read_text()
    first = next(line for line in text.splitlines() if line.startswith("## "))
    assert first == "## The paper's claims: fitted on its numbers and on ours"
    assert (tmp_path / "out" / "scal" / "tables" / "claims.csv").is_file()
    # one base size only: no claims table
    study = load_study(tmp_path / "res", "scal")
    study.train = study.train[~study.train.base_id.fillna("").str.endswith("p640000")]
    study.train = study.train[study.train.id.str.endswith("p640000") == False]  # noqa: E712
    assert scaling.claims_table(study) is None


def test_expected_halfwidths_match_a_fit_at_its_own_sigma():
    cells = synthetic(np.random.default_rng(8))
    fit = scaling.fit_gap(cells)
    want = scaling.expected_halfwidths(cells.drop(columns="gap"), fit.sigma)
    for t in scaling.TERMS:
        est, lo, hi = fit.estimate(t)
        assert want[t] == pytest.approx((hi - lo) / 2, rel=1e-9)
