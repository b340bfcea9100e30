"""Cross-encoder scoring of many (query, document) pairs as a Ray Data job: chunks of pairs
through an actor pool of CrossEncoders (a GPU each when the cluster has GPUs)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from raytrieve.model_ref import ShippedModel, local_folder
from raytrieve.progress import Stage

# Pairs per Ray Data row: large enough to amortize the row's overhead, small enough that
# several actors share a job of a few thousand pairs.
CHUNK = 512


class ScorePairs:
    def __init__(
        self,
        model_path: str | ShippedModel,
        max_seq_length: int | None,
        batch_size: int,
        device: str,
        threads: int,
        token_budget: int | None = None,
        dtype: str = "float32",
    ) -> None:
        import torch

        from raytrieve.encoders import load_encoder

        torch.set_num_threads(threads)
        folder = local_folder(model_path)
        self.model = load_encoder("cross", folder, device=device, max_seq_length=max_seq_length, dtype=dtype)
        self.batch_size, self.token_budget = batch_size, token_budget

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = [
            np.asarray(
                self.model.predict(
                    [tuple(p) for p in json.loads(payload)],
                    batch_size=self.batch_size,
                    token_budget=self.token_budget,
                    show_progress_bar=False,
                ),
                dtype=np.float32,
            ).tobytes()
            for payload in batch["payload"]
        ]
        return {"chunk": batch["chunk"], "scores": np.array(scores, dtype=object)}


def score_pairs(
    pairs: Sequence[tuple[str, str]],
    model_path: str | ShippedModel,
    *,
    max_seq_length: int | None = None,
    batch_size: int = 32,
    token_budget: int | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    dtype: str = "float32",
    progress: Stage | None = None,
) -> np.ndarray:
    """Scores of ``pairs`` in input order (float32 numbers; the model computes in ``dtype``, as
    the candidates it is compared with were scored); ``progress`` counts the pairs scored."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    if not pairs:
        return np.zeros(0, np.float32)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    threads = max(1, int(cpus_per_actor))
    rows = [
        {"chunk": i, "payload": json.dumps(list(pairs[s : s + CHUNK]))}
        for i, s in enumerate(range(0, len(pairs), CHUNK))
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ScorePairs,
        fn_constructor_kwargs={
            "model_path": model_path,
            "max_seq_length": max_seq_length,
            "batch_size": batch_size,
            "token_budget": token_budget,
            "device": "cuda" if use_gpu else "cpu",
            "threads": threads,
            "dtype": dtype,
        },
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        batch_size=1,
        batch_format="numpy",
        runtime_env={
            "env_vars": {
                "OMP_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false",
                **({"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]} if "HF_HUB_OFFLINE" in os.environ else {}),
            }
        },
    )
    parts: dict[int, np.ndarray] = {}
    for r in ds.iter_rows():  # as each chunk is scored
        parts[int(r["chunk"])] = np.frombuffer(r["scores"], dtype=np.float32)
        if progress is not None:
            progress.update(len(parts[int(r["chunk"])]))
    return np.concatenate([parts[i] for i in range(len(rows))])
