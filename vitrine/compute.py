"""Where the per-photo work runs: a Dask client from `compute.scheduler`, in one place.

compute.scheduler: "" starts a local cluster (one single-threaded worker process per core) that
the caller closes with the client; "synchronous" means in the calling process (no client);
anything else is the address of a running Dask scheduler ("tcp://host:8786"). collect's ingest
stream, dedupe's feature pass and the catalog scoring run all go through `local_cluster`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitrine.config import params_block

SYNCHRONOUS = "synchronous"


@params_block
class ComputeConfig:
    scheduler: str = ""  # "" = local Dask processes, "synchronous", or "tcp://host:8786"


# Dask's periodic housekeeping (event-loop ticks, the workers' statistical profiler sampling
# every 10 ms, memory polls every 100 ms, work stealing) costs ~14% of a core on a local
# cluster, idle or not; these settings bring it to ~1%. Stealing is not needed: the callers
# keep only a few equal-sized batches in flight.
_QUIET_LOCAL_CLUSTER = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.scheduler.work-stealing": False,
}


def start_method() -> str:
    """How local worker processes start: forked, unless this process has ONNX Runtime loaded.

    Forked workers start in 0.2 s instead of 1.2 s: spawned ones re-import the calling module
    (for a stage, pandas and all) before they can take a task, and the stages' own work before
    their cluster starts (Pillow, numpy, torch's imports) holds no threads or locks that a fork
    could copy half-taken. ONNX Runtime's does: a worker forked from a process that had run an
    inference session (the service, a notebook, the test suite) hung for good in its first
    Session.run of the scoring model, so such a process spawns its workers.
    """
    return "spawn" if "onnxruntime" in sys.modules else "fork"


_FORK_HOOK: list[bool] = []  # registered once per process


def _fresh_offload_pool() -> None:
    """In a forked child: Dask's offload pool (it deserializes messages over 10 MiB, such as
    dedupe's 13 MB model) as new. The inherited one counts the parent's thread, which the
    child does not have, once the parent has used it (a second cluster in one process):
    the child's large messages would then wait on it forever."""
    from concurrent.futures import ThreadPoolExecutor

    import distributed.utils

    distributed.utils._offload_executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="Dask-Offload"
    )


def pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings (a batch's photos) as one uint8 array and the end offset of each: Dask
    ships numpy arrays without copying them, bytes objects one by one (the measured cost:
    vitrine.ingest.sources._Packed)."""
    ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8), ends


def unpack(payload: np.ndarray, ends: np.ndarray) -> Iterator[bytes]:
    """The byte strings that pack put in payload/ends, in order."""
    start = 0
    for end in ends.tolist():
        yield payload[start:end].tobytes()
        start = end


def local_cluster(n_workers: int = 0) -> Any:
    """A dask.distributed.LocalCluster: one single-threaded worker process per core (the
    per-photo work is CPU-bound and holds the GIL), no dashboard, quiet housekeeping.

    ingest_stream starts one itself when config.scheduler is ""; start one here to keep it
    across several streams (pass `Client(cluster)` as ingest_stream's client).
    """
    import dask
    from dask.distributed import LocalCluster  # heavy: only when needed

    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_fresh_offload_pool)
        _FORK_HOOK.append(True)
    settings = {**_QUIET_LOCAL_CLUSTER, "distributed.worker.multiprocessing-method": start_method()}
    with dask.config.set(settings):
        return LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # The scheduler serves HTTP (health, metrics) even without a dashboard, on 8787
            # unless told otherwise: a random port avoids clashing with other clusters.
            scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"},
        )


@dataclass
class Connection:
    """A client to the cluster compute.scheduler names, and what was started for it."""

    client: Any  # dask.distributed.Client
    owned: list[Any] = field(default_factory=list)  # closed by close(), client first

    def workers(self) -> int:
        """Worker threads the cluster has now (at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def close(self) -> None:
        for thing in self.owned:
            thing.close()


def connect(scheduler: str, n_workers: int = 0, *, quiet: bool = True) -> Connection:
    """A client for `scheduler` ("" or an address; "synchronous" has none: the caller runs the
    work itself). n_workers: a local cluster's worker processes, 0 = one per core.
    quiet: the cluster's start and stop, logged at INFO, would bury the callers' progress bars
    (forked local workers inherit the level); its warnings and errors still show."""
    if scheduler == SYNCHRONOUS:
        raise ValueError("compute.scheduler 'synchronous' runs in process: no client to connect")
    from dask.distributed import Client

    if quiet:
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        client = Client(scheduler, set_as_default=False)
        return Connection(client, [client])
    cluster = local_cluster(n_workers)
    # Results come straight from the workers rather than via the scheduler.
    client = Client(cluster, set_as_default=False, direct_to_workers=True)
    return Connection(client, [client, cluster])
