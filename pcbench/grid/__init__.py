"""Declarative grids: one YAML describes a study; expansion gives concrete runs and their DAG.

A grid has stages (e.g. pretrain -> compress -> eval). A stage has axes (their product gives its
runs), may start `from` every run of another stage (filtered by `where`), and fills a run spec
from templates: `${expr}` is a small arithmetic expression over the run's labels (axis values,
inherited from the parent run), `params` (the model's exact parameter count) and `parent` (the
parent run: `parent.id`, `parent.spec...`). `overrides` set fields for runs whose labels match;
`exclude` drops combinations. A stage can `tune` one field from another stage's best run (e.g.
each method's best learning rate from a sweep), resolved when the run starts; a sweep stage can
`extend` itself beyond an edge best until that best is bracketed (`pcbench/sweep.py`).

Run ids are `<stage>-<hash>` of the resolved spec, so adding an axis value or editing another
stage never renames existing runs.

The package, one concern a module (none imports torch):
    schema.py     the typed grid (`GridSpec`, `StageSpec`, `Resources`, `Run`, `Grid`), YAML loading, checks
    templates.py  the `${...}` expression language
    expansion.py  stages x axes -> runs: overrides, exclude, tune dependencies, ids, `load_grid`
    selection.py  label conditions and `--only` filters
    fieldpath.py  dotted field paths on typed specs: `tune.field` read and patched (`jobs.py`)

May import: `store`, `spec`, `util` (torch-free). Imported by `train`, `run`, `cli`.
"""

from pcbench.spec.config import from_dict
from pcbench.grid.expansion import expand, load_grid, references
from pcbench.grid.schema import Grid, GridSpec, Resources, Run, merged_resources, validate_extend
from pcbench.grid.selection import label_matches

__all__ = ["Grid", "GridSpec", "Resources", "Run", "expand", "from_dict", "label_matches", "load_grid",
           "merged_resources", "references", "validate_extend"]
