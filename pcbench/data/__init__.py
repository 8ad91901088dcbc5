"""Data: packaged text assets (`assets`), the corpus registry and readers (`corpora`), tokenizers
(`tokenizer`), token stores and the training sampler (`tokens`), the local lm-eval task suite
(`tasks/`) and the packaged BPE files (`bpe/`).

May import: `util`. Imported by `spec` (the corpus registry, which stays torch-free), `models`,
`evaluate`, `train`, `run`, `cli`."""
