"""``raytrieve evaluate``: retrieval evaluation of a user's own data, every stage of the
pipeline (dense, sparse, fused, reranked) with NDCG, MRR, MAP, Recall and Precision at k and
paired bootstrap intervals between stages and between runs.

    data.py     the evaluation set (BEIR folder, or files with named columns), checked first
    run.py      rankings per stage: in process, through an index, fusion and rerank as /search does
    remote.py   every stage of a running Serve app from its /search answers
    scoring.py  per-query metrics and paired bootstrap intervals (also the demo's)
    report.py   the report: metrics, intervals, table, JSON, markdown, chart, --compare
    command.py  the command's arguments and the run in order

Importing the package is light (no torch, no Ray): each step imports what it needs.
"""
