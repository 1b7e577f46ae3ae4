"""Your documents -> a local index -> ranked chunks: chunking with source spans (chunk.py), the
on-disk store (store.py), exact, approximate, BM25 and hybrid search (search.py), and the
`index build | add | info | verify` verbs (build.py). Layout and guarantees: docs/search.md.

The package itself holds only the search modes, so the command line's parser can name them
without importing numpy, SQLite or the model code."""

MODES = ("dense", "bm25", "hybrid")
DEFAULT_MODE = "hybrid"  # measured best on the bundled retrieval task (search.py, docs/search.md)

__all__ = ["MODES", "DEFAULT_MODE"]
