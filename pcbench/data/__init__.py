"""Data: packaged text assets (`assets`), the corpus registry and readers (`corpora`), tokenizers
(`tokenizer`), token stores and the training sampler (`tokens`; sharded stores built by the prepare
stage: `shards`; memory-flat window orders: `sampler`; the background batch prefetch: `loader`), the local lm-eval task suite
(`tasks/`) and the packaged BPE files (`bpe/`).

May import: `util`. Imported by `spec` (the corpus registry, which stays torch-free), `models`,
`evaluate`, `train`, `run`, `cli`."""
