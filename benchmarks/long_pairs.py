"""Memory and time to tokenize reranker pairs whose query and document are both long, against
sentence-transformers' CrossEncoder on the same pairs, in fresh processes, interleaved.

    .venv/bin/python benchmarks/long_pairs.py                      # 8 pairs of 6,000 words, 3 rounds
    .venv/bin/python benchmarks/long_pairs.py --pairs 32 --words 2000 --rounds 2

A fast tokenizer truncating a pair "longest first" keeps each text's cut-off tokens as
overflowing pieces and pairs every piece of one text with every piece of the other, so memory
grows with the product of the two lengths. raytrieve cuts both texts at a word boundary first
(``fast_tokenizer.cut_long_pairs``) to the same ids. Each side runs in its own process (its own
``ru_maxrss``) and tokenizes only (no forward pass): the shipped ms-marco MiniLM-L12 reranker's
tokenizer at max_length 256 through raytrieve's input tokenizer, and sentence-transformers'
``CrossEncoder.tokenizer`` called as its ``predict`` calls it (``padding=True,
truncation=True``), both on one batch. Prints one JSON line per side and round: peak resident
MB above the process's baseline, seconds, and whether the ids equal (raytrieve's side checks
them against Hugging Face's own truncation of the whole pairs on the first pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
side, n, words, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from raytrieve.model_ref import resolve_model
path = str(resolve_model("ms-marco-minilm-l12-v2"))
query = " ".join(f"word{i % 97}" for i in range(words))
pairs = [(query, " ".join(f"term{(i * 7 + j) % 89}" for i in range(words))) for j in range(n)]
if side == "raytrieve":
    from raytrieve.encoders.tokenizer_only import load_input_tokenizer
    tok = load_input_tokenizer(path, kind="cross", max_seq_length=max_length)
    run = lambda: tok.tokenize_ids(pairs)["input_ids"]
else:
    from sentence_transformers import CrossEncoder
    model = CrossEncoder(path, max_length=max_length, device="cpu")
    run = lambda: model.tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True,
                                  max_length=max_length)["input_ids"]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
ids = run()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
same = None
if side == "raytrieve":
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(path)
    few = pairs[:2]  # the oracle itself takes the product's memory: two pairs
    want = hf([a for a, _ in few], [b for _, b in few], truncation="longest_first", max_length=max_length)["input_ids"]
    same = [list(r) for r in ids[:2]] == want
print(json.dumps({"side": side, "pairs": n, "words": words, "peak_mb_above_baseline": round(peak - base),
                  "seconds": round(seconds, 2), "ids_equal_hf_whole_pairs": same}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--words", type=int, default=6000, help="words in the query and in each document")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    for _ in range(args.rounds):
        for side in ("raytrieve", "sentence-transformers"):  # interleaved
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, side, str(args.pairs), str(args.words), str(args.max_length)],
                capture_output=True, text=True, env=env, check=True,
            ).stdout
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
