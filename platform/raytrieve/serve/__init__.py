"""Ray Serve: hybrid retrieval (dense + sparse recall, fusion, cross-encoder rerank) and
embedding / rerank endpoints over HTTP. ``fusion`` is plain Python; the rest imports Ray."""
