"""Training: the one loop for every method (`loop`), DDP and FSDP2 (`parallel`, `distributed`),
checkpoints (`checkpoint`, `dcp_checkpoint`), the memory plan (`memory`), interrupts
(`interrupts`).

May import: `evaluate`, `methods`, `compress`, `models`, `grid`, `store`, `spec`, `data`, `util`.
Imported by `run`, `bench`, `cli`."""
