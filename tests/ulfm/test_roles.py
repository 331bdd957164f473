"""asyncsgd.ulfm.roles: who hosts which shard and which worker is which after ranks die."""
import pytest

from asyncsgd.ulfm.roles import reassign_roles


def test_roles_after_a_worker_and_a_server_die():
    # 6 ranks, 2 servers: server rank 1 and worker rank 4 die; worker rank 2 moves up to host shard 1.
    got = reassign_roles(6, [1, 4], 2)
    assert got == {0: (0, ("server", 0), ("server", 0)),
                   2: (1, ("worker", 0), ("server", 1)),
                   3: (2, ("worker", 1), ("worker", 0)),
                   5: (3, ("worker", 3), ("worker", 1))}
    with pytest.raises(ValueError, match="rank 0 died"):
        reassign_roles(4, [0], 1)
    with pytest.raises(ValueError, match="at least one worker"):
        reassign_roles(3, [2], 2)
