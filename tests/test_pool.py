"""Several processes on one machine (encoders/pool.py): sentence-transformers'
start_multi_process_pool / encode(pool=) / predict(pool=) / device=[...] / stop_multi_process_pool.
The reference is the same model in this process, whose outputs the parity tests hold equal to
sentence-transformers'. Four worker processes in all (each imports torch and transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import SENTENCES

from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
from raytrieve.encoders import pool as workers
from raytrieve.encoders.batching import Pretokenized, slice_inputs
from raytrieve.errors import InputError

TEXTS = [s * (1 + i % 3) for i, s in enumerate(SENTENCES * 3)]  # several lengths: chunks sort differently


@pytest.fixture(scope="module")
def dense(tiny_models):
    return DenseEncoder(tiny_models["dense"], device="cpu")


def _boom(encoder, chunk, device):
    raise ValueError("boom")


class _Local(torch.nn.Identity):
    def __reduce__(self):  # as a lambda or a closure is: no pickle
        raise TypeError("cannot pickle this activation")


def test_dense_pool_gives_the_rows_of_one_process(dense, tiny_dirs, tiny_models):
    pool = dense.start_multi_process_pool(["cpu", "cpu"])
    try:
        assert len(pool["processes"]) == 2 and all(p.is_alive() for p in pool["processes"])
        want = dense.encode(TEXTS)
        got = dense.encode(TEXTS, pool=pool, chunk_size=4)  # chunks across both workers, out of order
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        # What encode makes of the rows runs once, on all of them: int8 buckets from the whole batch.
        kw = dict(normalize_embeddings=True, precision="int8", prompt="query: ")
        np.testing.assert_array_equal(dense.encode_multi_process(TEXTS, pool, **kw), dense.encode(TEXTS, **kw))
        got = dense.encode_query(TEXTS[:5], pool=pool, convert_to_tensor=True, truncate_dim=16)
        torch.testing.assert_close(got, dense.encode_query(TEXTS[:5], convert_to_tensor=True, truncate_dim=16))
        ids = dense.input_module().tokenize_ids(TEXTS)
        np.testing.assert_allclose(dense.encode(Pretokenized(ids), pool=pool, chunk_size=5), want, atol=1e-6, rtol=0)
        assert dense.encode([], pool=pool).shape == (0, 32)
        assert dense.encode(TEXTS[0], pool=pool).shape == (32,)
        with pytest.raises(InputError, match="chunk_size must be a positive integer, got 0"):
            dense.encode(TEXTS, pool=pool, chunk_size=0)
        with pytest.raises(InputError, match="give pool= or a list of devices, not both"):
            dense.encode(TEXTS, pool=pool, device=["cpu"])
        # Results a stopped earlier call left in the queue are not this call's rows.
        pool["output"].put((-1, 0, torch.full((len(TEXTS), 32), 7.0)))
        np.testing.assert_allclose(dense.encode(TEXTS, pool=pool, chunk_size=len(TEXTS)), want, atol=1e-6, rtol=0)
        # An error in a worker reaches the caller with the worker's traceback.
        with pytest.raises(ValueError, match="boom") as raised:
            workers.run(pool, TEXTS, _boom, slice_inputs, 4, False)
        assert "in the pool's worker on cpu" in "".join(getattr(raised.value, "__notes__", []))
        # An argument the queue could not pickle was dropped by its thread, and the call waited forever.
        cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
        with pytest.raises(InputError, match="a pool's workers get the call's arguments pickled"):
            cross.predict(list(zip(TEXTS, TEXTS)), pool=pool, activation_fn=_Local())
        # Workers that died (killed, out of memory) are an error naming them, not a wait without end.
        for p in pool["processes"]:
            p.kill()
            p.join()
        with pytest.raises(RuntimeError, match=r"multi-process pool worker\(s\) died: pid \d+ \(exit code -9\), "
                                               r"pid \d+ \(exit code -9\); stop the pool"):
            dense.encode(TEXTS, pool=pool, chunk_size=4)
    finally:
        dense.stop_multi_process_pool(pool)
    for p in pool["processes"]:  # joined and closed: a closed process refuses to be asked
        with pytest.raises(ValueError, match="process object is closed"):
            p.is_alive()
    with pytest.raises(InputError, match="pool must be what start_multi_process_pool"):
        dense.encode(TEXTS, pool={"processes": []})
    with pytest.raises(InputError, match=r"target_devices: 'gpu0' is not a torch device"):
        dense.start_multi_process_pool(["gpu0"])
    int8 = DenseEncoder(tiny_models["dense"], device="cpu")  # torch cannot pickle its quantised layers to a worker
    int8.set_dtype("int8")
    with pytest.raises(InputError, match=r"an int8 model \(quantised in place\) cannot be sent to worker processes"):
        int8.start_multi_process_pool(["cpu"])


def test_cross_and_sparse_on_a_list_of_devices(tiny_models, tiny_dirs):
    """device=[...] starts a pool for the one call, as sentence-transformers. The cross-encoder
    runs in bfloat16 with its float32 head (a forward hook: pickled to the worker with the model)."""
    cross = CrossEncoder(tiny_dirs["cls1"], device="cpu")
    cross.set_dtype("bfloat16")
    pairs = list(zip(TEXTS, TEXTS[1:]))
    want = cross.predict(pairs, batch_size=64)
    got = cross.predict(pairs, device=["cpu"], batch_size=64)  # one worker, one batch: the same batch here
    np.testing.assert_array_equal(got, want)
    sparse = SparseEncoder(tiny_models["sparse"], device="cpu")
    want = sparse.encode(TEXTS, max_active_dims=8)
    got = sparse.encode(TEXTS, max_active_dims=8, device=["cpu"], chunk_size=3)
    assert got.is_sparse
    torch.testing.assert_close(got.to_dense(), want.to_dense(), atol=1e-6, rtol=0)
