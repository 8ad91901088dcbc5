"""Leaf utilities: atomic writes and locks (`atomic`), cache and work paths (`paths`), devices
(`devices`), "did you mean" suggestions (`suggest`), the bad-input error (`errors`), pcbench's own
outputs and their markers (`outputs`), the training processes' allocator (`allocator`), quiet logs
(`quiet`: third-party progress bars off), the sha256 of what pcbench wrote, checked when read back
(`verify`).

Imports nothing of pcbench but `pcbench.__version__`; every other room may import it."""
