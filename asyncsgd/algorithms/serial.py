"""Single-process mini-batch SGD with momentum: the baseline the distributed modes are measured against."""
from __future__ import annotations

import time

import numpy

from asyncsgd.data import BatchStream
from asyncsgd.data.augment import make_augmenter
from asyncsgd.runtime.faults import fault_point
from asyncsgd.algorithms.common import Evaluations, StopRule, TrainingSplit, options_as_trained, schedule_budget
from asyncsgd.algorithms.resume import Checkpointer

__all__ = ["run"]


def run(comm, net, src, opts, stop, backend, reporter, *, plan=None, model_name="model", checkpointer=None,
        resume=None):
    """Train ``net`` on ``src`` in this process with SGDOptions ``opts`` until ``stop``; return the summary dict
    (``comm`` is unused).

    ``plan`` is the run's RunPlan (asyncsgd.plan; made here from the arguments when None): its ``options`` and
    ``stop`` carry the model's defaults.  ``resume`` is a loaded checkpoint (asyncsgd.io.checkpoint.Checkpoint) to
    continue from, or None.
    """
    if plan is None:
        from asyncsgd.plan import plan_for
        plan = plan_for("serial", None, src, opts, stop, model_name=model_name, resumed=resume is not None)
    opts, stop_opts = plan.options, plan.stop
    xp = backend.xp
    split = TrainingSplit(src, opts.validation, opts.seed)
    x, y = split.share(0, 1)
    # the training net evaluates its own parameters (evaluation does not touch the gradients or the momentum)
    evaluate = Evaluations(net, split, backend, patience=stop_opts.patience, selection_margin=opts.selection_margin)
    schedule, budget = schedule_budget(opts, stop_opts, n_train=len(y))
    velocity = xp.zeros_like(net.params)
    samples = steps = 0
    if resume is not None:
        net.params[...] = backend.to_device(resume.params)
        velocity[...] = backend.to_device(resume.state["momentum"])
        samples, steps = int(resume.data_position["samples"]), int(resume.data_position["steps"])
    start_samples = samples
    # re-seeded from the position, so a resumed run does not replay the order it already saw
    stream = BatchStream(x, y, opts.batch_size, seed=opts.seed + steps)
    rng = numpy.random.default_rng(opts.seed + 1 + steps)
    checkpointer = checkpointer or Checkpointer(None, net.n_params, {"seed": opts.seed})
    augment = make_augmenter(opts.augment, src, seed=opts.seed + 3000 + steps)
    stop = StopRule(stop_opts, samples_per_epoch=len(y))

    def save_checkpoint():
        checkpointer.save(params=backend.to_host(net.params), state={"momentum": backend.to_host(velocity)},
                          version=steps, data_position={"samples": samples, "steps": steps})

    last_eval = time.monotonic()
    loss_ewma = None
    accuracy = test_loss = None
    compute_s = 0.0
    lr = schedule.lr
    for xb, yb in stream:
        t0 = time.perf_counter()
        fault_point("step")
        if budget is not None:  # the rate at the position before this step (a resumed run continues the schedule)
            lr = schedule.rate(budget.fraction(samples, stop.elapsed()))
        loss = net.loss_and_grad(backend.to_device(augment(xb)), backend.to_device(yb), rng=rng)
        if not numpy.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {steps}: lower --lr (now {lr:.3g}, peak {opts.lr})")
        backend.sgd_update(net.params, net.grads, lr=lr, momentum=opts.momentum, velocity=velocity)  # fused on GPU
        compute_s += time.perf_counter() - t0
        steps += 1
        samples += len(yb)
        loss_ewma = loss if loss_ewma is None else 0.95 * loss_ewma + 0.05 * loss
        epoch_end = stream.samples_seen % len(y) < len(yb)
        finished = stop.done(samples, steps)
        if checkpointer.due():
            save_checkpoint()
        if finished or epoch_end or time.monotonic() - last_eval >= opts.eval_every:
            figures = evaluate(backend.to_host(net.params), time=stop.elapsed(), samples=samples, steps=steps)
            test_loss, accuracy = figures["test_loss"], figures["test_accuracy"]
            last_eval = time.monotonic()
            if reporter is not None:
                reporter.record({"time": stop.elapsed(), "samples": samples, "steps": steps, "epoch": stream.epoch,
                                 "loss": loss_ewma, **figures, "lr": lr,
                                 "samples_per_s": (samples - start_samples) / max(stop.elapsed(), 1e-9),
                                 "per_worker_samples_per_s": [(samples - start_samples) / max(stop.elapsed(), 1e-9)],
                                 "fraction_done": stop.fraction(samples, steps)})
            if finished or stop.done(samples, steps, evaluate.deciding_accuracy):
                break
            if evaluate.should_stop and stop.stop_early():
                break
    if checkpointer.path:
        save_checkpoint()  # the final one
    fault_point("end")
    wall = stop.elapsed()
    return evaluate.finish({
        "mode": "serial", "model": model_name, "data": src.name, "test_accuracy": accuracy, "test_loss": test_loss,
        "final_loss": loss_ewma, "samples": samples, "steps": steps, "samples_per_s": (samples - start_samples) / wall,
        "compute_samples_per_s": samples / max(compute_s, 1e-9), "checkpoints": checkpointer.written, "wall_s": wall, "epochs": samples / len(y),
        "stop_reason": stop.reason, "workers": 1, "servers": 0, "n_params": int(net.n_params),
        "layout": net.param_layout(), "lr_schedule": str(schedule), "final_lr": lr,
        **options_as_trained(opts),
    }, backend.to_host(net.params))
