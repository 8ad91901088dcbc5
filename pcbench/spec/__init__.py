"""Specs: the typed run spec and its loader (`config`), model families and size presets as data
(`presets`), the compression-method registry (`methods`). Torch-free.

May import: `util`, and `data` for the corpus registry. Imported by every room above it."""
