"""Using a model on text: embed (pooling, batched embedding), index (chunk, store, search), ask
(answers with citations), classify, topics. See docs/embeddings.md."""
