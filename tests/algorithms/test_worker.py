"""DownpourWorker's offer to a recovery (asyncsgd.algorithms.downpour.worker): the parameters as fetched, without the
replica's own local steps since, so a shard restored from them counts none of those steps twice (the worker still
pushes them to the rebuilt store)."""
from __future__ import annotations

import numpy as np
import pytest

from asyncsgd.options import DownpourOptions, NoDecay
from asyncsgd.runtime.mpi import polled_barrier
from asyncsgd.schedule import Constant
from asyncsgd.store import ShardedParameters
from fakes import IntegerNet
from mpi_checks import agree

pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2, 3)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_replica_offered_is_the_last_fetch_without_the_local_steps(comm, momentum):
    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.backends import select_ops

    # n_fetch 2, n_push 3: at most safe points the replica holds unpushed steps and steps pushed after its fetch
    cfg = DownpourOptions(lr_schedule=Constant(), staleness=NoDecay(), optimizer="sgd", sparsity=1.0,
                          momentum=momentum, lr=0.5, n_fetch=2, n_push=3, overlap="off")
    n = 30
    failures = []
    with ShardedParameters(comm, n, n_servers=1) as store:
        if comm.rank >= 1:
            net = IntegerNet(n, 7 + comm.rank)
            worker = DownpourWorker(cfg, net, store, select_ops("cpu"), seed=0, offers_replica=True)
            fetched = None
            for step in range(14):
                if worker.steps % cfg.n_fetch == 0:
                    worker.fetch()
                    fetched = (net.params.copy(), worker.base_version)
                worker.step(None, None)
                worker.steps += 1
                if worker.steps % cfg.n_push == 0:
                    worker.push()
                offer, version = worker.fetched_params()
                if version != fetched[1] or not np.allclose(offer, fetched[0], rtol=0, atol=1e-5):
                    failures.append(f"step {step}: offered version {version} / fetched {fetched[1]}, "
                                    f"max difference {np.abs(offer - fetched[0]).max()}")
                if offer.dtype != np.float32 or offer is net.params:
                    failures.append(f"step {step}: the offer is not a float32 copy")
            worker.finish()
        polled_barrier(comm)
    agree(comm, failures)


def test_without_offers_replica_there_is_no_offer():
    from asyncsgd.algorithms.downpour.worker import DownpourWorker
    from asyncsgd.backends import select_ops

    class NoStore:
        poll_s = None

    cfg = DownpourOptions(lr_schedule=Constant(), staleness=NoDecay(), lr=0.1, overlap="off")
    worker = DownpourWorker(cfg, IntegerNet(4, 0), NoStore(), select_ops("cpu"), seed=0)
    with pytest.raises(RuntimeError, match="offers_replica"):
        worker.fetched_params()
