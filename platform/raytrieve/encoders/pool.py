"""Several processes on one machine, as sentence-transformers' ``start_multi_process_pool``:
``encode(texts, pool=pool)`` / ``predict(pairs, pool=pool)`` split the inputs into chunks that
worker processes (one per target device) run through the same batched inference as one process
(``batching.run_batches``), and the rows come back in input order. What each method makes of
the rows afterwards (quantization, numpy, sparse dicts) runs once, on the whole result.

For one machine with several GPUs, or a script ported from sentence-transformers. Corpora
beyond one machine go through the encoding job (``raytrieve encode``) instead.

Workers start with spawn (no fork of a process that may hold CUDA or a tokenizer's threads) and
get the model once, pickled, its tensors in shared memory; CPU workers share the cores
(``torch.set_num_threads``) instead of each taking all of them.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import queue
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.multiprocessing as mp
from torch import Tensor

from raytrieve.errors import InputError

if TYPE_CHECKING:
    from raytrieve.encoders.base import Encoder

Pool = dict[str, Any]  # {"input": Queue, "output": Queue, "processes": [Process]}: sentence-transformers' shape

_calls = itertools.count()  # a call's id, carried by its chunks and their results

# One chunk's work: (model, inputs, device) -> rows on the CPU (a picklable partial of run_batches).
Job = Callable[..., Tensor]


def default_devices() -> list[str]:
    """Every GPU; without one, two CPU workers (sentence-transformers starts four, which on a
    small machine only makes them fight over the cores)."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * 2


def start(encoder: Encoder, target_devices: Sequence[str | torch.device] | None = None) -> Pool:
    """A pool of one worker process per entry of ``target_devices`` ("cuda:0", "cpu", ...).
    The model moves to the CPU here (as sentence-transformers does), so that workers copy it
    from shared memory onto their own device."""
    devices = [str(d) for d in (default_devices() if target_devices is None else target_devices)]
    if not devices:
        raise InputError("target_devices is empty; name at least one device, e.g. ['cpu', 'cpu'] or ['cuda:0']")
    for d in devices:
        try:
            torch.device(d)
        except RuntimeError as e:
            raise InputError(f"target_devices: {d!r} is not a torch device ({e}); e.g. 'cpu' or 'cuda:0'") from None
    if getattr(encoder, "backend", "torch") == "onnx":
        raise InputError(
            "a pool runs the torch model; set_backend('torch') first (ONNX Runtime uses every core already)"
        )
    if getattr(encoder, "dtype", "float32") == "int8":
        # torch's shared-memory pickling cannot carry dynamically quantised layers.
        raise InputError(
            "an int8 model (quantised in place) cannot be sent to worker processes; start the pool from the model "
            "in float32 or bfloat16, or encode int8 in this process"
        )
    encoder.to("cpu")
    cpu_workers = sum(torch.device(d).type == "cpu" for d in devices)
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, cpu_workers))  # the cores this process may use
    ctx = mp.get_context("spawn")
    inputs, outputs = ctx.Queue(), ctx.Queue()
    inputs.cancel_join_thread()  # exiting with chunks still queued (workers gone) must not wait on them
    processes = []
    for device in devices:
        p = ctx.Process(target=_work, args=(device, threads, encoder, inputs, outputs), daemon=True)
        p.start()
        processes.append(p)
    return {"input": inputs, "output": outputs, "processes": processes}


def stop(pool: Pool) -> None:
    """Stop the workers of ``pool`` and close its queues."""
    for p in pool["processes"]:
        p.terminate()
    for p in pool["processes"]:
        p.join()
        p.close()
    pool["input"].cancel_join_thread()
    pool["input"].close()
    pool["output"].close()


def check(pool: Any) -> Pool:
    if not (isinstance(pool, dict) and {"input", "output", "processes"} <= set(pool)):
        raise InputError("pool must be what start_multi_process_pool() returned")
    return pool


def run(
    pool: Pool,
    inputs: Sequence[Any],
    job: Job,
    slice_inputs: Callable[[Any, int, int], Any],
    chunk_size: int | None,
    show_progress_bar: bool | None,
) -> Tensor:
    """``job`` over ``inputs`` in chunks on the pool's workers; the rows joined in input order.
    Each chunk carries this call's id: results a stopped earlier call left behind (Ctrl-C, an
    error) are dropped, not taken for this call's rows."""
    n = len(inputs)
    workers = len(pool["processes"])
    if chunk_size is None:
        chunk_size = max(1, min(math.ceil(n / workers / 10), 5000))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    try:  # the queue pickles in a thread of its own, which would drop the chunk and leave us waiting
        ForkingPickler.dumps(job)
    except Exception as e:
        raise InputError(
            f"a pool's workers get the call's arguments pickled, and these cannot be ({e}); pass functions and "
            "modules defined at a module's top level (not a lambda or a closure), or leave out pool / device=[...]"
        ) from None
    call = next(_calls)
    starts = range(0, n, chunk_size)
    for i, lo in enumerate(starts):
        pool["input"].put((call, i, job, slice_inputs(inputs, lo, min(n, lo + chunk_size))))
    results: list[Any] = [None] * len(starts)
    chunks: Any = range(len(starts))
    if show_progress_bar:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="Chunks")
    for _ in chunks:
        while True:
            of, i, out = _result(pool)
            if of == call:
                break
        results[i] = out.tensor() if isinstance(out, _SparseRows) else out
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    joined = torch.cat(results)
    return joined.coalesce() if joined.is_sparse else joined


class _SparseRows:
    """A coalesced sparse COO tensor as its indices, values and size."""

    def __init__(self, rows: Tensor) -> None:
        self.indices, self.values, self.size = rows.indices(), rows.values(), tuple(rows.shape)

    def tensor(self) -> Tensor:
        return torch.sparse_coo_tensor(self.indices, self.values, self.size, is_coalesced=True, check_invariants=True)


def _result(pool: Pool, poll_s: float = 1.0) -> tuple[int, int, Any]:
    """The next chunk's result; a worker that died (killed, out of memory) is an error, not a hang."""
    while True:
        try:
            return pool["output"].get(timeout=poll_s)
        except queue.Empty:
            dead = [p for p in pool["processes"] if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    "multi-process pool worker(s) died: "
                    + ", ".join(f"pid {p.pid} (exit code {p.exitcode})" for p in dead)
                    + "; stop the pool (stop_multi_process_pool) and start a new one"
                ) from None


def _work(device: str, threads: int, encoder: Encoder, inputs: Any, outputs: Any) -> None:
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    while True:
        call, i, job, chunk = inputs.get()
        try:
            rows = job(encoder, chunk, device=device).cpu()
            # A sparse tensor travels as its parts: torch's own rebuild of one warns on every call.
            outputs.put((call, i, _SparseRows(rows.coalesce()) if rows.is_sparse else rows))
        except Exception as e:  # sent back and raised by the caller, with the worker's traceback
            cast(Any, e).add_note(f"in the pool's worker on {device}:\n" + "".join(traceback.format_exception(e)))
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:  # one that cannot travel goes as text
                e = RuntimeError("".join(traceback.format_exception(e)))
            outputs.put((call, i, e))
