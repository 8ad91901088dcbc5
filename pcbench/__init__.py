"""pcbench: a reproduction and benchmark harness for Projected Compression.

The package is laid out as the pipeline (spec -> grid -> run -> store -> report) over the layers
that train and compress. Each room is one package (or one module); a room imports only rooms
listed before it (`tests/test_layers.py` checks this list against every import):

    util      leaf utilities: atomic writes, locks, paths, devices, errors, pcbench's outputs
    tracking  the trackers a run streams to (TensorBoard, wandb, MLflow), one registry (no torch)
    data      corpora, tokenizers, token stores and the sampler, the local lm-eval task suite
    spec      typed run specs, model families and presets, the method registry (no torch)
    store     the results store: records of runs (no torch)
    card      the model card (README.md) of every exported model (no torch)
    grid      grids: stages x axes -> runs and their DAG (no torch)
    report    tables, figures and REPORT.md from the store alone (no torch)
    models    model families built on stock transformers classes
    compress  the compression map, importance, plans, pruning, projected compression
    methods   the compression methods' builders (registered in `spec.methods`)
    evaluate  held-out loss and lm-eval scoring
    train     the one training loop, parallelism, checkpoints, memory plan, interrupts
    run       launching a grid: executors, jobs, liveness, fork server, sweeps, preflight
    bench     benchmarks writing results/bench/*.json
    cli       the `pcbench` command
"""

__version__ = "0.1.0"


def load_study(grid, results=None):
    """A grid's results as the report reads them, for a notebook (imports no torch):

        import pcbench
        study = pcbench.load_study("experiments/mini.yaml")   # or a grid name, results="results"
        study.train[["id", "method", "compression", "loss", "heldout"]]

    `grid`: a grid YAML (its `name` and `results_dir` are read) or a grid name; `results`: the results
    root (default: the grid's `results_dir`, else `results`). Returns `pcbench.report.load.Study`:
    `runs`, `train`, `evals`, `events` (DataFrames), `curves(ids)` and `recovery(ids)`."""
    from pcbench.report.load import open_study  # the root stays light: the report is imported here

    return open_study(grid, results)
