"""Ray Serve: hybrid retrieval (dense + sparse recall, fusion, cross-encoder rerank) and
embedding / rerank endpoints over HTTP. ``fusion``, ``schemas`` and ``search`` (the /search
pipeline) need neither Ray nor an HTTP server; the rest imports Ray."""
