"""Compression methods' builders: one module per method with `build(base, plan, spec, device,
teacher) -> Trainable` (`hpr`, `pc`, `pc_naive`). They are registered, with their labels and plot
styles, in `pcbench.spec.methods`, which imports a builder by name only when a run builds it.

May import: `compress`, `models`, `spec`, `util`. Imported (by name) by `spec.methods.build`."""
