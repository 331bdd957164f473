"""The run's plan (asyncsgd.plan): every run-level fact resolved once, in one frozen object that the algorithms read."""
import dataclasses

import pytest

import asyncsgd
from asyncsgd import DownpourOptions, OptionError, SandblasterOptions, SGDOptions, Stop
from asyncsgd import plan as planning
from asyncsgd.data.synthetic import SyntheticSource


def _job(mode, options, stop=Stop(), checkpoint=None, size=6):
    options, stop = planning.check_inputs(mode, options, stop, checkpoint)
    return planning.plan_job(mode, options, stop, checkpoint, size), options, stop


def test_the_plan_is_frozen_and_leaves_the_given_options_alone():
    src = SyntheticSource(n_train=400, seed=0)
    given = DownpourOptions(servers=1, overlap="push", fault_tolerance="off")
    job, options, stop = _job("downpour", given, Stop(epochs=30))
    plan = planning.plan_run(job, options, stop, src=src, model_name="speech_cnn", n_params=1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.warm_start_steps = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.job.fault_tolerant = True
    with pytest.raises(TypeError):
        plan.config["lr"] = 1.0  # a read-only view: the summary and the checkpoints record one config
    assert (plan.workers, plan.servers, plan.size) == (5, 1, 6)
    # the model's defaults, filled once with the job's replica count (5 Downpour workers: batch 16, lr 0.003)
    assert plan.options.batch_size == 16 and plan.options.lr == pytest.approx(0.003) and plan.options.momentum == 0.9
    assert given.lr is None and given.batch_size is None  # nothing written back
    assert plan.stop == Stop(epochs=30)
    assert plan.config["lr"] is None and plan.config["mode"] == "downpour" and plan.config["data"] == src.name
    # DistBelief's warm start: 9% of 30 epochs of the 360 training rows over 5 workers, in steps of 16
    assert plan.n_train == 360 and plan.warm_start_steps == round(0.09 * 30 * 360 / 16)
    resumed = planning.plan_run(job, options, stop, src=src, model_name="speech_cnn", resumed=True)
    assert resumed.warm_start_steps == 0


def test_fault_tolerance_and_the_store_transport_are_decided_once(monkeypatch):
    from asyncsgd.runtime import env
    reads = []
    real = env.store_transport

    def counting(environ=None):
        reads.append(1)
        return real(environ)

    monkeypatch.setattr(env, "store_transport", counting)
    monkeypatch.setenv("ASYNCSGD_STORE", "messages")
    monkeypatch.setenv("OMPI_MCA_mpi_ft_enable", "1")  # 'auto' is on under ULFM: the served store is rebuilt too
    job, options, stop = _job("downpour", DownpourOptions(), Stop(steps=10))
    from asyncsgd.ulfm.policy import ulfm_enabled
    ulfm = ulfm_enabled()  # True under Open MPI (the marker is set above), False under MPICH
    assert job.store == "messages" and job.fault_tolerant is ulfm and reads == [1]
    plan = planning.plan_run(job, options, stop, src=SyntheticSource(n_train=200), model_name="logreg")
    assert plan.store == "messages" and plan.fault_tolerant is ulfm and reads == [1]  # not read again
    with pytest.raises(OptionError, match="adagrad needs the RMA store"):
        _job("downpour", DownpourOptions(optimizer="adagrad"))
    monkeypatch.setenv("ASYNCSGD_STORE", "bogus")
    with pytest.raises(ValueError, match="not a store transport"):
        _job("downpour", DownpourOptions())
    assert _job("sync", SGDOptions(fault_tolerance="off"))[0].store == "rma"  # only Downpour has a store


@pytest.mark.parametrize("mode, options, size, field, match", [
    ("serial", SGDOptions(), 2, None, "runs in one process"),
    ("sync", SGDOptions(), 1, None, "needs at least 2 MPI ranks"),
    ("downpour", DownpourOptions(servers=3), 3, "servers", "3 leaves no worker among 3 ranks"),
    ("downpour", DownpourOptions(kill_ranks={5: 1.0}, fault_tolerance="off"), 3, "kill_ranks", "names rank 5"),
])
def test_rank_counts_are_one_planning_step(mode, options, size, field, match):
    with pytest.raises(ValueError, match=match) as err:
        _job(mode, options, size=size)
    assert getattr(err.value, "field", None) == field


def test_rules_between_option_sets_live_in_the_plan():
    from asyncsgd.options import CheckpointOptions
    with pytest.raises(OptionError, match="not sandblaster"):
        planning.check_inputs("sandblaster", SandblasterOptions(), Stop(), CheckpointOptions(path="ck.h5"))
    with pytest.raises(OptionError, match="patience needs a validation split"):
        planning.check_inputs("serial", SGDOptions(validation=0), Stop(patience=2), None)
    with pytest.raises(TypeError, match="takes SGDOptions"):
        planning.check_inputs("sync", DownpourOptions(), None, None)
    with pytest.raises(ValueError, match="unknown mode"):
        planning.check_inputs("async", None, None, None)
    assert asyncsgd.MODES == planning.MODES  # the one list of modes (the command line's --mode choices too)
    from asyncsgd import cli
    assert cli.MODES is planning.MODES


def test_overlap_is_resolved_in_the_plan(monkeypatch):
    """A fault-tolerant run keeps its pushes inline: the plan says so once, with the reason the workers warn with."""
    from asyncsgd.algorithms.downpour import overlap
    monkeypatch.setattr(overlap, "overlap_refusal", lambda *, fault_tolerant=False:
                        "fault tolerance ..." if fault_tolerant else None)
    src = SyntheticSource(n_train=200)
    job = planning.JobShape("downpour", 4, 3, 1, True, "rma")
    options, stop = DownpourOptions(overlap="all"), Stop(steps=5)
    plan = planning.plan_run(job, options, stop, src=src, model_name="logreg")
    assert plan.overlap == "off" and plan.overlap_off_reason == "fault tolerance ..."
    plan = planning.plan_run(dataclasses.replace(job, fault_tolerant=False), options, stop, src=src,
                             model_name="logreg")
    assert plan.overlap == "all" and plan.overlap_off_reason is None


def test_prepare_resolves_the_defaults_once(monkeypatch, tmp_path):
    """Through the API: sgd_defaults runs once per run (in the plan), and the summary reads the plan."""
    calls = []
    real = planning.sgd_defaults

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(planning, "sgd_defaults", counting)
    run = asyncsgd.prepare("serial", "logreg", "synthetic:200", SGDOptions(lr_schedule="constant"), Stop(steps=3))
    assert isinstance(run.plan, planning.RunPlan) and run.options.lr is None and run.plan.options.lr == 0.01
    result = run.execute()
    assert len(calls) == 1
    assert result.summary["peak_lr"] == 0.01 and result.summary["steps"] == 3
    assert result.summary["config"] == run.config == dict(run.plan.config)
