"""Running a grid: the launcher (`launch`), executors (`executors/`), the job a run becomes
(`jobs`), liveness of submitted work (`liveness`), the local fork server (`forkserver`),
self-extending sweeps (`sweep`), the prepare stage (`prepare`: token stores, fetched datasets and
weights, before any job), checks before the first job (`preflight`), the background data
prefetch (`prefetch`), and the dry-run and status tables (`views`).

May import every room below it (`train` and down, `report.fmt` for numbers). Imported by `cli`."""
