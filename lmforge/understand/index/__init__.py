"""Your documents -> a local index -> ranked chunks: chunking with source spans (chunk.py), the
on-disk store (store.py), exact, approximate, BM25 and hybrid search (search.py), the `index build |
add | info | verify` verbs (build.py) and `index tune` (tune.py). Layout and guarantees: docs/search.md.

The package itself holds only the search modes, so the command line's parser can name them
without importing numpy, SQLite or the model code."""

MODES = ("dense", "bm25", "hybrid")
# hybrid: measured far better than dense alone on the bundled retrieval task with a raw model (nDCG@10
# 0.290 against 0.063; BM25 alone 0.533 there). An index's own default replaces it once `lmforge index
# tune` has measured one on held-out pairs (after a full contrastive stage: hybrid with k 1 and BM25 weight
# 0.3, 0.725 against dense 0.707 and plain hybrid 0.686): docs/search.md "Which mode by default"
DEFAULT_MODE = "hybrid"

__all__ = ["MODES", "DEFAULT_MODE"]
