"""The `pcbench` command: run, status, report, train, compress, eval, export, tasks, bench."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

from pcbench.spec.config import SpecError


def _resources(args) -> dict:
    return {"partition": args.partition, "account": args.account, "gpus_per_node": args.gpus,
            "cpus_per_task": args.cpus, "timeout_min": args.time, "mem_gb": args.mem,
            "nodes": args.nodes, "qos": args.qos, "gpu_mem_gb": args.gpu_mem}


def _grid_and_store(args):
    from pcbench.util import outputs
    from pcbench.grid import load_grid
    from pcbench.run.launch import store_for

    grid = load_grid(args.grid)
    store = store_for(grid, args.results, args.work)
    outputs.check_dir_path(store.root, "results directory")
    outputs.check_dir_path(store.work, "work directory")
    return grid, store


class Problems(Exception):
    """Several one-line problems found before anything ran (`pcbench: error: ...` each)."""

    def __init__(self, problems: list):
        self.problems = problems
        super().__init__("; ".join(map(str, problems)))


def _writable(path: Path, what: str) -> None:
    """`path` (or the directory it would be created in) can be written."""
    import os

    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    for p in [existing, existing / "runs"] if existing == path else [existing]:
        if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
            raise SpecError(what, f"{p} is not writable")


def _claim_store(store) -> None:
    """The results and work directories are pcbench's (or new) and writable, before any run."""
    from pcbench.util import outputs

    dirs = ((store.root, "results", "results directory"), (store.work, "work", "work directory"))
    for path, kind, what in dirs:
        outputs.claim(path, kind, what)
        _writable(path, what)
    for path, kind, what in dirs:
        outputs.ensure_dir(path, kind, what)


def cmd_run(args) -> int:
    from pcbench.run import launch, preflight
    from pcbench.run.views import dry_run_table, status_table
    from pcbench.util.paths import check_cache

    check_cache()  # before the store, a prepare or a dry run's facts (which would only skip it)
    _check_track_timeout()
    grid, store = _grid_and_store(args)
    if args.track is not None:
        _track_grid(grid, args.track)
    problems = preflight.check_grid(grid, store, args.only, _resources(args), args.executor)
    if args.executor == "local":  # its environment variables, before the store or a prepare is written
        from pcbench.run.executors.local import check_environment

        problems += check_environment(args.parallel)
    if args.no_prepare:  # the stores must be there already: say which are not, before any job
        from pcbench.run.prepare import missing_stores

        todo = [r for r in grid.select(args.only) if store.state(r.id) != "completed"]
        problems += [SpecError("data", m.split(": ", 1)[1]) for m in missing_stores(grid, todo)]
    if args.dry_run:
        try:
            print(dry_run_table(grid, store, args.only, args.retry_failed, _resources(args), args.executor))
        except Exception:  # noqa: BLE001 - a run the checks refused (e.g. a config no model) cannot be planned
            if not problems:
                raise
        if problems:
            raise Problems(problems)
        print("checks before the first job: ok")
        return 0
    if problems:
        raise Problems(problems)
    _claim_store(store)
    from pcbench.run import executors
    from pcbench.train import interrupts

    ex = executors.named(args.executor)
    with interrupts.graceful():
        try:
            out = launch.submit(grid, store, args.executor, only=args.only, retry_failed=args.retry_failed,
                                resources=_resources(args), progress=None, parallel=args.parallel,
                                prepare=not args.no_prepare, workers=args.workers)
            if args.wait:
                ex.wait(out, store)
        except interrupts.Interrupted as e:
            _say(f"pcbench: interrupted by {e.name}: {ex.interrupted(e)}; run the same command again to resume")
            return e.exit_code
    print(f"{len(out.submitted)} run(s) {ex.verb}, "
          f"{len(out.skipped)} skipped, {len(out.failed)} failed, {len(out.blocked)} blocked"
          + (f", {len(out.interrupted)} interrupted" if out.interrupted else ""))
    if not out.submitted and out.skipped and all(store.state(r) == "completed" for r in out.skipped):
        print(f"nothing to do: every selected run is already completed in {store.root} "
              "(to run the grid yourself, give another store: --results DIR)")
    print(status_table(grid, store, args.only))
    return 1 if out.failed or out.blocked or out.interrupted else 0


def _say(line: str) -> None:
    """One line on stderr, if it can still be written (after SIGHUP the terminal may be gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _track_grid(grid, track: list[str]) -> None:
    """`--track`: every train run of the grid (and every run a sweep adds) streams to `track`
    instead of its spec's `train.track`; run ids do not change (tracking is not part of them)."""
    import dataclasses

    from pcbench.grid.expansion import deep_merge

    defaults = deep_merge(grid.spec.defaults, {"train": {"track": list(track)}})
    grid.spec = dataclasses.replace(grid.spec, defaults=defaults)
    for run in grid.runs:
        if run.kind == "train":
            run.spec = dataclasses.replace(run.spec, train=dataclasses.replace(run.spec.train, track=list(track)))
def cmd_prepare(args) -> int:
    """`pcbench prepare GRID`: build every token store the selected runs read, with N workers."""
    from pcbench.run.prepare import prepare_grid

    grid, store = _grid_and_store(args)
    todo = grid.select(args.only)
    done = prepare_grid(grid, todo, workers=args.workers)
    for p in done:
        print(f"{p.ref.label()}: {p.manifest['n_tokens']:,} tokens, {len(p.manifest['shards'])} shards "
              f"({len(p.built)} built, {len(p.redone)} redone, {len(p.kept)} kept) at {p.path}")
    if not done:
        print("no token stores to prepare")
    return 0


def cmd_status(args) -> int:
    from pcbench.run.views import status_table

    grid, store = _grid_and_store(args)
    if not args.watch:
        print(status_table(grid, store, args.only))
        return 0
    return _watch(grid, store, args.only, args.interval)


SETTLED = ("completed", "failed")  # states a run keeps without another `pcbench run`
IDLE_REFRESHES = 3  # `status --watch`: refreshes in a row with no run in flight before it stops


def _watch(grid, store, only: Optional[str], interval: float) -> int:
    """`pcbench status --watch`: the table again every `interval` s (the screen cleared on a terminal)
    until every run is completed or failed, or no run has been in flight for `IDLE_REFRESHES`
    refreshes (pending runs that nothing launches); Ctrl-C stops it (exit 0)."""
    import time

    from pcbench.run.views import status_view

    tty, idle = sys.stdout.isatty(), 0
    try:
        while True:
            text, counts = status_view(grid, store, only)
            if tty:
                print("\033[H\033[2J", end="")
            print(f"{grid.name}, {time.strftime('%H:%M:%S')} (every {interval:g} s; Ctrl-C stops)\n{text}", flush=True)
            idle = 0 if counts.get("running") or counts.get("submitted") else idle + 1
            if all(s in SETTLED for s in counts):
                print(f"grid {grid.name} done", flush=True)
                return 0
            if idle >= IDLE_REFRESHES:
                print(f"no run of grid {grid.name} in flight: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} "
                      "(pcbench run GRID starts or resumes the rest)", flush=True)
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        print(flush=True)
        return 0


def cmd_report(args) -> int:
    """`pcbench report GRID`: GRID is a grid YAML (only its `name` and `results_dir` are read) or a grid name."""
    from pcbench.util import outputs
    from pcbench.spec.config import load_yaml
    from pcbench.report import build_report

    outputs.check_dir_path(Path(args.out), "--out")
    name, results = args.grid, args.results
    path = Path(args.grid)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data = load_yaml(path) or {}
        name = data.get("name") or path.stem
        if args.results == "results" and data.get("results_dir"):  # the flag's default: the grid's own store
            results = data["results_dir"]
    name = args.name or name
    outputs.check_dir_path(Path(results), "--results")
    if not (Path(results) / name / "runs").is_dir():
        raise SpecError("report", f"no results for grid {name!r} under {results}/ (run it first: pcbench run GRID)")
    outputs.claim(Path(args.out) / name, "report", "--out")
    _writable(Path(args.out) / name, "--out")
    out = build_report(Path(results), name, out_root=Path(args.out),
                       progress=lambda m: print(f"[pcbench] {m}", file=sys.stderr, flush=True))
    print(f"report written to {out}")
    return 0


def cmd_train(args) -> int:
    from pcbench.run import preflight
    from pcbench.spec.config import load_run_spec
    from pcbench.util import outputs

    spec = load_run_spec(args.spec)
    from pcbench.util.paths import check_cache

    check_cache()  # before --out is created
    _check_track_timeout()
    if args.track is not None:
        import dataclasses

        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, track=args.track))
    if spec.model.path:
        _check_model(spec.model.path, "model.path", tokenizer=spec.data.tokenizer == "model")
    if spec.compress is not None:
        config = preflight.base_config(spec.model, spec.data.tokenizer, spec.data.seq_len)
        if config is not None:
            preflight.check_compression(config, spec.compress.compression, spec.compress.align,
                                        "compress.compression")
    out = outputs.ensure_dir(args.out, "train", "--out")
    from pcbench import tracking
    from pcbench.grid.expansion import run_id
    from pcbench.run.prepare import prepare_spec
    from pcbench.train.loop import RunPaths, train

    prepare_spec(spec)  # the prepare stage of this one run: training only reads
    rid = run_id("train", "train", spec, None)  # as a grid's stage `train` would name it
    from pcbench.train import interrupts

    with interrupts.graceful():  # SIGINT/SIGTERM/SIGHUP/SIGQUIT: every rank stops after the same step
        try:
            with interrupts.group_closed_at_an_agreed_end():
                rec = train(spec, RunPaths(record=out / "record", work=out / "work", export=out / "model"),
                            tracked=tracking.RunInfo(rid, "train", out / "work"))
        except interrupts.Interrupted as e:
            kept = "its checkpoints are kept, the same command resumes it" if spec.train.ckpt_every else \
                "no checkpoint (train.ckpt_every: 0), the same command starts again"
            _say(f"pcbench: {e}; {kept}")
            return e.exit_code
    if _main_rank():  # the other ranks' records lack the export and its held-out loss (NaN there)
        print(json.dumps({k: _finite_or_none(rec[k]) for k in ("train_loss_last100", "heldout_loss", "export_path")
                          if k in rec}))
    return 0


def _main_rank() -> bool:
    """Whether this process is rank 0 (or alone): the one that prints a command's result."""
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0


def _finite_or_none(v):
    """`v`, or None for a NaN/inf float (JSON has neither: a summary line stays valid JSON)."""
    import math

    return None if isinstance(v, float) and not math.isfinite(v) else v


def _spec_from_flags(cls: type, args, where: str, fields: dict):
    """A `cls` spec through the one loader (`config.load_spec`): `fields` and the spec flags given
    (`_spec_flag`) set over the dataclass defaults; a refused field is named by the flag that set it."""
    from pcbench.spec.config import load_spec

    given = {f: getattr(args, dest) for f, (_, dest) in args.spec_flags.items() if getattr(args, dest) is not None}
    try:
        return load_spec(cls, {}, where, {**fields, **given})
    except SpecError as e:
        flag = {f"{where}.{f}": flag for f, (flag, _) in args.spec_flags.items()}.get(e.path)
        if flag is None:
            raise
        raise SpecError(flag, e.reason) from None


def cmd_compress(args) -> int:
    from pcbench.run import preflight
    from pcbench.spec.config import RunSpec
    from pcbench.spec.presets import PRESETS
    from pcbench.util import outputs
    from pcbench.util.paths import check_cache

    check_cache()  # before --out is created
    _check_track_timeout()
    out = Path(args.out).resolve()
    outputs.claim(out, "model", "--out", replace=args.force)
    work = outputs.claim(out.with_name(out.name + ".pcbench"), "compress-work", "--out (its state dir)")
    if args.base in PRESETS and PRESETS[args.base].weights not in (None, "path"):
        model = {"model.name": args.base}
    elif Path(args.base).exists():
        _check_model(args.base, "--base", hub_ok=False, tokenizer=args.tokenizer == "model")
        model = {"model.name": "hf", "model.path": str(Path(args.base).resolve())}
    else:
        raise SpecError("--base", f"{args.base!r} is neither a checkpoint directory nor a preset "
                        f"({', '.join(n for n, p in PRESETS.items() if p.weights and p.weights != 'path')})"
                        + ("" if args.base in PRESETS else ": no such path, it does not exist"))
    spec = _spec_from_flags(RunSpec, args, "compress", {**model, "compress.method": args.method})
    config = preflight.base_config(spec.model, spec.data.tokenizer, spec.data.seq_len)
    if config is not None:
        preflight.check_compression(config, spec.compress.compression, spec.compress.align, "--compression")
    _fresh_compress_state(work, spec)
    from pcbench import tracking
    from pcbench.grid.expansion import run_id
    from pcbench.run.prepare import prepare_spec
    from pcbench.train.loop import RunPaths, train

    prepare_spec(spec)  # the prepare stage of this one run: training only reads
    rid = run_id("compress", "train", spec, None)  # as a grid's stage `compress` would name it
    rec = train(spec, RunPaths(record=work / "record", work=work, export=out),
                tracked=tracking.RunInfo(rid, "compress", work))
    plan = rec.get("plan", {})
    print(json.dumps({"export": str(out), "method": args.method, "requested": args.compression,
                      "achieved": plan.get("achieved"), "params_before": plan.get("params_before"),
                      "params_after": plan.get("params_after"), "train_loss_last100": rec["train_loss_last100"],
                      "heldout_loss": rec["heldout_loss"]}, indent=2))
    return 0


def _fresh_compress_state(work: Path, spec) -> None:
    """`compress` resumes its own interrupted run from `work`; state of another spec is dropped."""
    import hashlib

    from pcbench.util import outputs
    from pcbench.spec.config import to_dict

    what = to_dict(spec)
    what["train"].pop("track", None)  # where it reports is not what it computes (keys as before)
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if outputs.kind_of(work) == "compress-work" and (outputs.read_marker(work) or {}).get("spec") != key:
        for name in ("record", "ckpt", "plan.json", "tracking.json"):  # pcbench's own files only
            p = work / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    outputs.write_marker(work, "compress-work", spec=key)


def _check_track_timeout() -> None:
    """A bad `$PCBENCH_TRACK_TIMEOUT` is refused before any work (read when a run's trackers close)."""
    from pcbench import tracking

    tracking.track_timeout()


def _check_model(path: str, field: str, **kw) -> None:
    """A checkpoint named on the command line or in a spec (`field`) is whole (`check_model_dir`,
    `kw` its options) and, a pcbench model, has the files its marker recorded: a damaged one is bad
    input (`SpecError`, rc 2), refused before torch is imported."""
    from pcbench.run import preflight
    from pcbench.util.outputs import verify_output
    from pcbench.util.verify import Damaged

    if Path(path).is_dir():  # a pcbench model's recorded sha256s first: they name any damage exactly
        try:
            verify_output(path, "model")
        except Damaged as e:
            raise SpecError(field, str(e)) from None
    preflight.check_model_dir(path, field, **kw)


def cmd_eval(args) -> int:
    from pcbench.spec.config import EvalSpec

    spec = _spec_from_flags(EvalSpec, args, "eval", {"model": args.model})
    _check_model(args.model, "model", hub_ok=False, tokenizer=True)  # before torch is imported
    from pcbench.evaluate import lm_eval_scores

    try:
        scores = lm_eval_scores(spec)
    except RuntimeError as e:  # e.g. a hub task whose dataset cannot be fetched offline
        print(f"pcbench: error: {e}", file=sys.stderr)
        return 1
    from pcbench import card

    card.add_scores(args.model, scores)  # a pcbench model's card gains its scores
    print(json.dumps(scores, indent=2, sort_keys=True))
    return 0


def cmd_export(args) -> int:
    from pcbench.util import outputs

    grid, store = _grid_and_store(args)
    out = outputs.claim(args.out, "model", "OUT", replace=args.force)
    if args.run not in grid.by_id():
        raise SpecError("run", f"{args.run} is not a run of grid {grid.name}")
    final = store.final(args.run)
    if final is None or "export_path" not in final:
        raise SpecError("run", f"{args.run} has no exported model (state: {store.state(args.run)})")
    src = Path(final["export_path"])
    problem = store.export_check(args.run, final)  # the files its record names, by sha256
    if problem is not None:
        from pcbench.util.verify import Damaged

        advice = ("run the grid again to rebuild it" if store.export_here(final) else
                  f"it was made outside this store's work directory {store.work}, and `pcbench run` "
                  "rebuilds it only for a run that loads it")
        if isinstance(problem, Damaged):
            problem.args = (f"{problem}; nothing copied ({advice})",)
            raise problem
        if str(problem).startswith("gone"):
            raise SpecError("run", f"the export of {args.run} is {problem} ({advice})")
        raise SpecError("run", f"the export of {args.run} at {src}: {problem} ({advice})")
    with outputs.staging(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(outputs.MARKER))
        from pcbench import card

        card.keep_users_card(tmp, out)
        outputs.install(tmp, out, "model", "OUT")
    print(args.out)
    return 0


def cmd_tasks(args) -> int:
    from pcbench.util import outputs
    from pcbench.data.tasks import build_tasks

    if args.out:
        outputs.claim(args.out, "tasks", "--out")
    print(build_tasks(Path(args.out) if args.out else None))
    return 0


def cmd_bench(args) -> int:
    if args.which == "throughput":
        from pcbench.bench.throughput import main as bench_main
    elif args.which == "gpu-check":
        from pcbench.bench.gpu_check import main as bench_main
    elif args.which == "data":
        from pcbench.bench.data import main as bench_main
    elif args.which == "memory":
        from pcbench.bench.memory import main as bench_main
    else:
        from pcbench.bench.step_cost import main as bench_main
    return bench_main(args.rest)


def _number(typ, least, strict: bool = False):
    """An argparse type: a `typ` >= `least` (> when `strict`)."""
    def parse(text: str):
        try:
            v = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if typ is int else ' number'}: {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < least or (strict and v == least):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {least}, got {text}")
        return v
    parse.__name__ = typ.__name__
    return parse


def _spec_flag(sp: argparse.ArgumentParser, cls: type):
    """`flag(name, fields, help, **kw)`: add to `sp` a flag setting the fields (space-separated dotted
    paths) of spec class `cls`. Left out, a field keeps its dataclass default, shown in the help;
    a `Literal` field's values are the choices. `sp`'s `spec_flags` maps each field to its flag."""
    from pcbench.spec.config import field_choices, field_default

    table: dict[str, tuple[str, str]] = {}
    sp.set_defaults(spec_flags=table)

    def flag(name: str, fields: str, help: str, **kw) -> None:
        first = fields.split()[0]
        choices = field_choices(cls, first)
        if choices:
            kw.setdefault("choices", list(choices))
        kw.setdefault("default", None)
        shown = field_default(cls, first) if kw["default"] is None else kw["default"]
        if isinstance(shown, list):
            shown = ",".join(shown)
        if not kw.get("required") and shown is not None and "(default" not in help:
            help = f"{help} (default: {shown})"
        action = sp.add_argument(name, help=help, **kw)
        table.update({f: (name, action.dest) for f in fields.split()})
    return flag


def _track_flag(sp: argparse.ArgumentParser, flag=None) -> None:
    """`--track a,b`: the trackers (`pcbench.tracking.TRACKERS`) the runs stream to; `none`: none."""
    from pcbench import tracking

    def parse(text: str) -> list[str]:
        try:
            return tracking.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    help = f"trackers to stream to, comma-separated: {', '.join(tracking.TRACKERS)} or none (default: the spec's)"
    if flag is not None:  # a spec flag (`compress`): sets train.track
        flag("--track", "train.track", help.replace("the spec's", "none"), type=parse)
    else:
        sp.add_argument("--track", type=parse, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    from pcbench.spec.config import EvalSpec, RunSpec

    p = argparse.ArgumentParser(prog="pcbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def grid_args(sp, only=True):
        sp.add_argument("grid", help="grid YAML (experiments/*.yaml)")
        sp.add_argument("--results", help="results root (default: the grid's results_dir or ./results)")
        sp.add_argument("--work", help="work root for checkpoints/weights (default: $PCBENCH_WORK)")
        if only:
            sp.add_argument("--only", help="filter: a stage name or key=value[,key=value] on run labels")

    sp = sub.add_parser("prepare", help="build the token stores a grid's runs read (before any training job)")
    grid_args(sp)
    sp.add_argument("--workers", type=_number(int, 1), help="worker processes (default: the CPUs this process may use)")
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("run", help="run or submit a grid")
    grid_args(sp)
    from pcbench.run.executors import EXECUTORS  # the registry

    sp.add_argument("--executor", default="local", choices=list(EXECUTORS))
    sp.add_argument("--dry-run", action="store_true", help="print the expanded grid and GPU-hours; touch nothing")
    sp.add_argument("--retry-failed", action="store_true")
    sp.add_argument("--parallel", type=lambda v: v if v == "auto" else _number(int, 1)(v),
                    help="local: runs at once (default auto: as many as fit the cores at the CPU runs' threads; 1: one at a time)")
    sp.add_argument("--wait", action="store_true", help="slurm: wait for the submitted jobs")
    _track_flag(sp)
    sp.add_argument("--no-prepare", action="store_true",
                    help="do not build the token stores first (refused when one is missing)")
    sp.add_argument("--workers", type=_number(int, 1), help="prepare: worker processes (default: the CPUs usable)")
    for flag, typ, h in (("--partition", str, "SLURM partition"), ("--account", str, "SLURM account"),
                         ("--qos", str, "SLURM QOS"), ("--gpus", _number(int, 0), "GPUs per node"),
                         ("--cpus", _number(int, 1), "CPUs per task"),
                         ("--time", _number(int, 1), "time limit in minutes"),
                         ("--mem", _number(float, 0, strict=True), "memory in GB"),
                         ("--nodes", _number(int, 1), "nodes per job"),
                         ("--gpu-mem", _number(float, 0, strict=True),
                          "GB per GPU: refuse runs whose memory plan exceeds it")):
        sp.add_argument(flag, type=typ, help=h)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("status", help="table of a grid's runs and their states")
    grid_args(sp)
    sp.add_argument("--watch", action="store_true",
                    help="refresh the table until the grid is done (every run completed or failed, or none in flight)")
    sp.add_argument("--interval", type=_number(float, 0, strict=True), default=10.0,
                    help="seconds between refreshes with --watch (default: 10)")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("report", help="tables, figures and REPORT.md from a grid's records")
    sp.add_argument("grid", help="grid YAML (its name picks results/<name>)")
    sp.add_argument("--results", default="results")
    sp.add_argument("--name", help=argparse.SUPPRESS)
    sp.add_argument("--out", default="paper_figures")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("train", help="train one run spec (YAML)")
    sp.add_argument("spec")
    sp.add_argument("--out", required=True)
    _track_flag(sp)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("compress", help="compress a base model with PC or HPR (or pc-naive) and export it")
    sp.add_argument("--base", required=True, help="HF checkpoint directory or preset (smollm2-135m)")
    from pcbench.spec import methods  # the registry (torch-free)

    sp.add_argument("--method", required=True, choices=methods.names(), type=methods.argument)
    flag = _spec_flag(sp, RunSpec)
    flag("--compression", "compress.compression", "share of all parameters removed", type=float, required=True)
    flag("--steps", "train.steps", "optimiser steps (0: prune/project and export)", type=int, required=True)
    sp.add_argument("--out", required=True, help="where the compressed HF checkpoint is written")
    sp.add_argument("--force", action="store_true", help="replace an earlier pcbench model at --out (only its files)")
    flag("--importance", "compress.importance", "which dimensions are kept")
    flag("--sides", "compress.sides", "PC: which sides of each matrix are projected")
    flag("--residual", "compress.residual", "PC: train the residual R", action=argparse.BooleanOptionalAction)
    flag("--distill", "compress.distill", "distillation alpha (0: off)", type=float)
    flag("--seed", "train.seed compress.importance_seed", "seed of training and of random importance", type=int)
    flag("--lr", "optim.lr", "peak learning rate", type=float)
    flag("--batch-size", "train.batch_size", "rows per optimiser step", type=int)
    flag("--micro-batch-size", "train.micro_batch_size", "rows per forward/backward (default: all)", type=int)
    flag("--seq-len", "data.seq_len", "tokens per row", type=int)
    flag("--corpus", "data.corpus", "training corpus")
    flag("--tokenizer", "data.tokenizer", "`model`: the base checkpoint's own tokenizer", default="model")
    flag("--eval-batches", "data.eval_batches", "held-out batches for the loss", type=int)
    flag("--ckpt-every", "train.ckpt_every", "checkpoint every N steps (0: never)", type=int)
    flag("--threads", "train.threads", "torch CPU threads (default: torch's)", type=int)
    _track_flag(sp, flag)
    sp.set_defaults(fn=cmd_compress)

    sp = sub.add_parser("eval", help="score a checkpoint with lm-eval (local task suite by default)")
    sp.add_argument("model", help="HF checkpoint directory")
    flag = _spec_flag(sp, EvalSpec)
    flag("--tasks", "tasks", "comma-separated lm-eval tasks", type=lambda v: v.split(","))
    flag("--batch-size", "batch_size", "rows per lm-eval batch", type=int)
    flag("--limit", "limit", "examples per task (default: all)", type=int)
    flag("--threads", "threads", "torch CPU threads (default: torch's)", type=int)
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("export", help="copy a run's exported HF checkpoint")
    grid_args(sp, only=False)
    sp.add_argument("run")
    sp.add_argument("out")
    sp.add_argument("--force", action="store_true", help="replace an earlier pcbench model at OUT (only its files)")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("tasks", help="build the local lm-eval task suite; prints its include path")
    sp.add_argument("--out", default=None)
    sp.set_defaults(fn=cmd_tasks)

    sp = sub.add_parser("bench", help="benchmarks (write JSON under results/bench/)")
    sp.add_argument("which", choices=["throughput", "step-cost", "memory", "gpu-check", "data"])
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_bench)
    return p


def _one_line(e: BaseException) -> Optional[str]:
    """The one-line message of an expected error, None for an unexpected one (a bug: traceback)."""
    import subprocess

    # Training's and the asset fetch's own errors, looked up only where they ran (importing costs torch).
    from pcbench.util.verify import Damaged

    expected = [SpecError, Damaged] + [getattr(sys.modules[m], n) for m, n in
                              (("pcbench.train.loop", "NonFiniteLoss"), ("pcbench.train.checkpoint", "CorruptCheckpoint"),
                               ("pcbench.data.assets", "AssetError"))
                              if m in sys.modules]
    if isinstance(e, tuple(expected)):
        return str(e)
    if isinstance(e, OSError) and (e.filename or e.strerror):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}" + (f" (and {e.filename2})" if e.filename2 else "")
    if isinstance(e, subprocess.CalledProcessError):
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        tail = "; ".join(ln.strip() for ln in err.splitlines() if ln.strip())[-500:]
        return f"{' '.join(map(str, e.cmd)) if isinstance(e.cmd, list) else e.cmd} failed ({e.returncode}): {tail}"
    if type(e).__name__ == "FailedJobError":  # submitit: sbatch refused a submission
        return "sbatch refused a submission: " + "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[-500:]
    return None


def main(argv: Optional[list[str]] = None) -> int:
    """Expected errors (bad input, a refused output path, the file system, the scheduler) end as one
    line `pcbench: error: ...` and a non-zero exit (2: bad input, 1: the environment or a failed
    run). Anything else is a bug: one line too, and its traceback when PCBENCH_DEBUG=1."""
    import os

    from pcbench.util import quiet

    quiet.third_party_bars()  # before any library is imported: the processes it starts inherit it
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from pcbench.util import allocator, crashes

    allocator.tune()  # for the commands that train or score in this process (no effect on the rest)
    crashes.enable()  # a native crash (a heap error, a segfault) leaves each thread's Python stack
    try:
        return args.fn(args)
    except Problems as e:
        for p in e.problems:
            print(f"pcbench: error: {p}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run stops through pcbench.train.interrupts)
        print("pcbench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line
        line = _one_line(e)
        if line is None and os.environ.get("PCBENCH_DEBUG") == "1":
            raise
        if line is None:
            print(f"pcbench: error: unexpected {type(e).__name__}: {' '.join(str(e).split())[:500]} "
                  "(a bug: PCBENCH_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 1
        print(f"pcbench: error: {' '.join(line.split())}", file=sys.stderr)
        return 2 if isinstance(e, SpecError) else 1


if __name__ == "__main__":
    sys.exit(main())
