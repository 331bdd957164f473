"""asyncsgd.ulfm.policy: whether a run can run through dead ranks (Open MPI's launcher marker)."""
from asyncsgd.ulfm import policy


def test_ulfm_detected_from_the_launcher_marker():
    assert not policy.ulfm_enabled({})
    assert not policy.ulfm_enabled({policy.FT_ENV: "0"})
    expected = "open mpi" in policy.MPI.Get_library_version().lower()
    assert policy.ulfm_enabled({policy.FT_ENV: "1"}) is expected  # the marker counts under Open MPI only
