"""The GPU and 16-core checks of asyncsgd, prepared to run in one go on a lent accelerator machine (docs/DEVICE.md).

    python benchmarks/device_check.py OUT [--cpu-dry-run] [--steps a,b] [--timeout STEP=S] [--budget S]
                                          [--wheels .whl] [--site DIR]

Steps, in this order; each has its own timeout, cut to what is left of --budget (default 450 s), and a failing
step never stops the next ones:

  install       pip-installs the wheels carried in --wheels (benchmarks/fetch_device_wheels.sh) into --site, and
                unpacks MPICH's libraries there (pip --target drops a wheel's data files outside the package);
  preflight     versions, the GPU's name from CuPy, CPUs, and that mpiexec starts ranks of the MPI mpi4py loads;
  kernels       ASYNCSGD_REQUIRE_GPU=1 pytest of the CUDA kernels and CupyOps against numpy (tests/backends/test_cuda_kernels.py,
                the tests marked gpu: float32 within 1e-5 relative error);
  gpu_downpour  Downpour on FSDD with 1 server + 5 GPU workers sharing the GPU (--device gpu), its accuracy;
  bench_gpu     benchmarks/bench_gpu.py: conv against cuDNN, top-k against a sort, GPU worker step against CPU;
  scaling       benchmarks/bench_scaling.py throughput: samples/s with 1, 2, 5, 10 workers, a core each;
  tta           benchmarks/bench_scaling.py tta: time to 95% FSDD test accuracy with 1 and 5 workers;
  cpu_downpour  the gpu_downpour run on CPU workers, the accuracy the GPU run must reach.

OUT receives summary.json and summary.md (rewritten after every step), logs/ (one log per step, and each step's
JSON) and logs.tar.gz of logs/.  With --cpu-dry-run the GPU steps are marked skipped after a rehearsal of their
command (test collection, the same job on CPU, bench_gpu's no-GPU exit) and the CPU steps run at small sizes, so the
whole finishes in a few minutes on a 2-core machine.  Needs only the standard library; exit status 0 when no step
failed, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("install", "preflight", "kernels", "gpu_downpour", "bench_gpu", "scaling", "tta", "cpu_downpour")
GPU_STEPS = ("kernels", "gpu_downpour", "bench_gpu")
# Seconds per step on the lent machine; all of them together are cut to --budget, in this order.
TIMEOUTS = {"install": 60, "preflight": 45, "kernels": 110, "gpu_downpour": 110, "bench_gpu": 90,
            "scaling": 120, "tta": 130, "cpu_downpour": 70}
DRY_TIMEOUTS = {"install": 60, "preflight": 45, "kernels": 60, "gpu_downpour": 60, "bench_gpu": 30,
                "scaling": 60, "tta": 130, "cpu_downpour": 60}
MIN_STEP_S = 10            # a step is not started with less time than this left
EXTERNAL_DEPS = {"numpy"}  # required by carried wheels but the machine's own (CuPy is built against it)
MANYLINUX = (["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)])

PREFLIGHT = r"""
import json, os, platform, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable}
def version(name):
    try:
        module = __import__(name)
        return getattr(module, "__version__", "?")
    except Exception as e:
        return f"not importable: {type(e).__name__}: {e}"[:200]
for name in ("numpy", "mpi4py", "h5py", "pytest", "cupy"):
    info[name] = version(name)
try:
    from mpi4py import MPI
    info["mpi_library"] = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
except Exception as e:
    info["mpi_library"] = f"unavailable: {type(e).__name__}: {e}"[:300]
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    info["gpu"] = {"count": n, "name": props["name"].decode(), "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                   "compute_capability": f"{props['major']}.{props['minor']}",
                   "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                   "cuda_driver": cupy.cuda.runtime.driverGetVersion()}
except Exception as e:
    info["gpu"] = f"none: {type(e).__name__}: {e}"[:300]
print("PREFLIGHT " + json.dumps(info))
"""
# One write per line: with PYTHONUNBUFFERED, print() writes its pieces one by one and two ranks' pieces interleave.
MPI_PROBE = "import sys; from mpi4py import MPI; sys.stdout.write(f'MPI_SIZE {MPI.COMM_WORLD.Get_size()}\\n')"


class Check:
    """Runs the steps, keeps the summary, writes it after every step."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.t0 = time.monotonic()
        self.python = sys.executable
        self.site = None               # the --target folder, once installed for this Python
        self.mpiexec = None
        self.summary = {"title": "asyncsgd device check", "mode": "cpu-dry-run" if args.cpu_dry_run else "full",
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget,
                        "host": host_info(), "versions": {}, "device": None, "steps": [], "goals": []}

    # ---------------------------------------------------------------- plumbing

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def env(self, **extra) -> dict:
        """The environment of every step: the installed site first, this checkout, one BLAS thread per process."""
        env = dict(os.environ)
        paths = [REPO] + ([self.site] if self.site else [])
        env["PYTHONPATH"] = os.pathsep.join(paths[::-1] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if self.site:
            env["PATH"] = os.path.join(self.site, "bin") + os.pathsep + env.get("PATH", "")
            lib = os.path.join(self.site, "lib")
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
            libmpi = os.path.join(lib, "libmpi.so.12")
            if os.path.exists(libmpi):
                env["MPI4PY_LIBMPI"] = libmpi      # not the system's libmpi, nor the linker script libmpi.so
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def run(self, argv, log, timeout, env=None, append=False):
        """Run ``argv`` in REPO with its output in ``log``; return (exit status, or None on timeout, output)."""
        with open(log, "a" if append else "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env or self.env(),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(0.05, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            f.write(f"\n[exit status {rc if rc is not None else f'none: killed after {timeout:.0f} s'}]\n")
        with open(log) as f:
            return rc, f.read()

    def save(self):
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.summary["goals"] = goals(self.summary)
        write_atomic(os.path.join(self.out, "summary.json"), json.dumps(self.summary, indent=1) + "\n")
        write_atomic(os.path.join(self.out, "summary.md"), markdown(self.summary))
        tmp = os.path.join(self.out, "logs.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        os.replace(tmp, os.path.join(self.out, "logs.tar.gz"))

    # ---------------------------------------------------------------- the loop

    def main(self) -> int:
        selected = self.args.steps or list(STEPS)
        timeouts = dict(DRY_TIMEOUTS if self.args.cpu_dry_run else TIMEOUTS)
        timeouts.update(self.args.timeout)
        for name in STEPS:
            entry = {"name": name, "status": "skipped", "seconds": 0.0, "log": None, "reason": None,
                     "figures": {}}
            self.summary["steps"].append(entry)
            if name not in selected:
                entry["reason"] = "not selected (--steps)"
            elif self.left() < MIN_STEP_S:
                entry["reason"] = f"no time left in the {self.args.budget:g} s budget"
            else:
                timeout = min(timeouts[name], self.left() - 2)
                entry["log"] = os.path.join("logs", f"{name}.log")
                log = os.path.join(self.out, entry["log"])
                t = time.monotonic()
                print(f"device_check: {name} (timeout {timeout:.0f} s) ...", flush=True)
                try:
                    status, reason, figures = getattr(self, "step_" + name)(log, timeout)
                except Exception as e:         # a bug in a step must not cost the later ones
                    status, reason, figures = "failed", f"{type(e).__name__}: {e}", {}
                    with open(log, "a") as f:
                        f.write(f"\ndevice_check: step raised {type(e).__name__}: {e}\n")
                entry.update(status=status, reason=reason, figures=figures, seconds=round(time.monotonic() - t, 1))
            print(f"device_check: {name}: {entry['status']}" + (f" ({entry['reason']})" if entry["reason"] else ""),
                  flush=True)
            self.save()
        self.save()
        print(markdown(self.summary))
        return 1 if any(s["status"] == "failed" for s in self.summary["steps"]) else 0

    def gpu_skip(self, log, argv, timeout, check, env=None):
        """Dry run of a GPU step: run its command as a rehearsal, report 'skipped' with the rehearsal's verdict."""
        rc, out = self.run(argv, log, timeout, env=env)
        ok, what = check(rc, out)
        return "skipped", f"needs a GPU (--cpu-dry-run); rehearsal {'ok' if ok else 'FAILED'}: {what}", \
            {"rehearsal": "ok" if ok else "failed"}

    # ---------------------------------------------------------------- steps

    def step_install(self, log, timeout):
        wheels = sorted(glob.glob(os.path.join(self.args.wheels, "*.whl")))
        with open(log, "w") as f:
            f.write(f"wheels in {self.args.wheels}:\n" + "".join(f"  {os.path.basename(w)}\n" for w in wheels))
        if not wheels:
            return "skipped", f"no wheels in {self.args.wheels}: this Python's own packages are used", {}
        # The CPython version the binary wheels are for ("312"); another one than this Python's makes a rehearsal.
        tags = {m.group(1) for w in wheels for m in [re.search(r"-cp(\d+)-", os.path.basename(w))] if m}
        here = f"{sys.version_info.major}{sys.version_info.minor}"
        cross = bool(tags) and tags != {here}
        wanted = f"{sorted(tags)[0][0]}.{sorted(tags)[0][1:]}" if tags else platform.python_version()
        problems = check_wheel_set(wheels, wanted)
        figures = {"wheels": [os.path.basename(w) for w in wheels], "python": wanted, "problems": problems}
        site = self.args.site + ("-cross" if cross else "")
        shutil.rmtree(site, ignore_errors=True)
        argv = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", site]
        if cross:          # rehearsal on another Python: install the same files for the wheels' Python
            argv += ["--python-version", wanted, "--implementation", "cp",
                     "--only-binary=:all:"] + [a for p in MANYLINUX for a in ("--platform", p)]
        rc, out = self.run(argv + wheels, log, timeout, env=dict(os.environ), append=True)
        if rc != 0:
            return "failed", f"pip install exit status {rc}", figures
        unpacked = unpack_wheel_libs(wheels, site)
        mpiexec = os.path.join(site, "bin", "mpiexec")
        with open(log, "a") as f:
            f.write(f"unpacked {len(unpacked)} library files into {site}/lib\n")
            f.write("".join(f"wheel set: {p}\n" for p in problems))
        figures["site"] = site
        if not os.access(mpiexec, os.X_OK):
            problems.append(f"{mpiexec} missing: carry the mpich wheel")
        if cross:
            return ("ok" if not problems else "failed"), \
                f"installed for Python {wanted} into {site}; not used by this Python {platform.python_version()}" \
                + (f"; {'; '.join(problems)}" if problems else ""), figures
        self.site = site
        self.mpiexec = mpiexec if os.access(mpiexec, os.X_OK) else None
        return ("ok" if not problems else "failed"), ("; ".join(problems) or None), figures

    def step_preflight(self, log, timeout):
        rc, out = self.run([self.python, "-c", PREFLIGHT], log, timeout / 2)
        line = next((ln for ln in out.splitlines() if ln.startswith("PREFLIGHT ")), None)
        if line is None:
            return "failed", f"the version probe failed (exit status {rc})", {}
        info = json.loads(line[len("PREFLIGHT "):])
        gpu = info.pop("gpu")
        self.summary["versions"] = info
        self.summary["device"] = gpu
        problems = [f"{k} {v}" for k, v in info.items() if str(v).startswith("not importable")
                    and not (k == "cupy" and self.args.cpu_dry_run)]
        if not isinstance(gpu, dict) and not self.args.cpu_dry_run:
            problems.append(f"no GPU: {gpu}")
        mpiexec = self.find_mpiexec()
        info["mpiexec"] = mpiexec
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
        info["mpiexec_version"] = next((" ".join(ln.split()) for ln in (version.stdout + version.stderr).splitlines()
                                        if "version" in ln.lower()), "?")
        rc, out = self.run([mpiexec, "-n", "2", self.python, "-c", MPI_PROBE], log, timeout / 2,
                           env=self.env(MPIEXEC_TIMEOUT=str(int(timeout / 2))), append=True)
        sizes = re.findall(r"^MPI_SIZE (\d+)", out, re.M)
        if sizes != ["2", "2"]:
            problems.append(f"mpiexec -n 2 started ranks of sizes {sizes or 'none'} (exit status {rc}): mpiexec and "
                            f"mpi4py's MPI differ")
        figures = {"python": info["python"], "mpi_library": info["mpi_library"],
                   "gpu": gpu["name"] if isinstance(gpu, dict) else None}
        return ("failed" if problems else "ok"), ("; ".join(problems) or None), figures

    def find_mpiexec(self) -> str:
        """The installed MPICH's mpiexec, else the one beside this Python, else the one on PATH."""
        if self.mpiexec:
            return self.mpiexec
        here = os.path.join(os.path.dirname(self.python), "mpiexec")
        return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")

    def step_kernels(self, log, timeout):
        junit = os.path.join(self.logs, "kernels.xml")
        argv = [self.python, "-m", "pytest", "-p", "pytest_timeout", "-p", "no:cacheprovider", "tests/backends/test_cuda_kernels.py",
                "-m", "gpu", "-q", "-rfEs", "-o", "junit_family=xunit2", "--junitxml", junit]
        # The image's own pytest plugins are not ours to depend on: load only pytest-timeout.
        env = self.env(ASYNCSGD_REQUIRE_GPU="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        if self.args.cpu_dry_run:
            def collected(rc, out):
                m = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", out)
                return rc == 0 and m is not None and int(m.group(1)) > 0, \
                    f"{m.group(0) if m else 'no tests'} by -m gpu (exit status {rc})"
            return self.gpu_skip(log, argv[:-4] + ["--collect-only"], timeout, collected, env=env)
        rc, out = self.run(argv, log, timeout, env=env)
        counts = junit_counts(junit)
        if rc is None:
            return "failed", "timed out", counts
        ok = rc == 0 and counts.get("tests", 0) > 0 and counts.get("failures", 0) + counts.get("errors", 0) == 0
        return ("ok" if ok else "failed"), (None if ok else f"pytest exit status {rc}"), counts

    def scaling_argv(self, command, timeout, *args):
        return [self.python, "benchmarks/bench_scaling.py", command, "--mpiexec", self.find_mpiexec(),
                "--deadline", f"{max(5.0, timeout - 5):.0f}"] + list(args)

    def bench_step(self, log, timeout, command, name, *args):
        """Run one bench_scaling.py command; return its status and JSON record."""
        path = os.path.join(self.logs, f"{name}.json")
        argv = self.scaling_argv(command, timeout, *args, "--json", path,
                                 "--log-dir", os.path.join(self.logs, name))
        rc, out = self.run(argv, log, timeout)
        record = load_json(path)
        runs = [r for r in record.get("runs", []) if r.get("status") == "ok"]
        if rc == 0 and runs:
            return "ok", None, record
        return "failed", ("timed out" if rc is None else f"exit status {rc}") + f", {len(runs)} job(s) measured", \
            record

    def step_gpu_downpour(self, log, timeout):
        limit = max(10.0, min(75.0, timeout - 45))
        if self.args.cpu_dry_run:
            argv = self.scaling_argv("train", timeout, "--workers", "2", "--device", "cpu", "--epochs", "1",
                                     "--limit", "10", "--log-dir", os.path.join(self.logs, "gpu_downpour"))
            return self.gpu_skip(log, argv, timeout, lambda rc, out: (rc == 0, f"the job on CPU: exit status {rc}"))
        status, reason, record = self.bench_step(log, timeout, "train", "gpu_downpour", "--workers", "5",
                                                 "--device", "gpu", "--epochs", "30", "--limit", f"{limit:g}")
        return status, reason, first_run(record)

    def step_cpu_downpour(self, log, timeout):
        dry = self.args.cpu_dry_run
        limit = 20.0 if dry else max(10.0, min(60.0, timeout - 15))
        status, reason, record = self.bench_step(log, timeout, "train", "cpu_downpour",
                                                 "--workers", "2" if dry else "5", "--device", "cpu",
                                                 "--epochs", "2" if dry else "30", "--limit", f"{limit:g}")
        return status, reason, first_run(record)

    def step_bench_gpu(self, log, timeout):
        path = os.path.join(self.logs, "bench_gpu.json")
        argv = [self.python, "benchmarks/bench_gpu.py", "--json", path]
        if self.args.cpu_dry_run:
            return self.gpu_skip(log, argv, timeout, lambda rc, out: (
                rc == 2 and "needs a CUDA GPU" in out, f"exit status {rc} without a GPU (2 expected)"))
        rc, out = self.run(argv, log, timeout)
        record = load_json(path)
        if rc == 0 and record:
            return "ok", None, record
        return "failed", "timed out" if rc is None else f"exit status {rc}", record

    def step_scaling(self, log, timeout):
        dry = self.args.cpu_dry_run
        return self.bench_step(log, timeout, "throughput", "scaling", "--workers", "1,2" if dry else "1,2,5,10",
                               "--seconds", "4" if dry else "15")

    def step_tta(self, log, timeout):
        dry = self.args.cpu_dry_run
        workers = ["1", "2"] if dry else ["1", "5"]
        limit = max(10.0, min(60.0, (timeout - 20) / len(workers) - 10))
        return self.bench_step(log, timeout, "tta", "tta", "--workers", ",".join(workers), "--target", "0.95",
                               "--limit", f"{limit:g}")


# -------------------------------------------------------------------- helpers

def host_info() -> dict:
    info = {"hostname": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
            if m:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def check_wheel_set(wheels, python_version: str = "3.12") -> list[str]:
    """Return what is wrong with a wheel set: two versions of one package, a dependency that none provides.

    Dependencies are read from each wheel's METADATA and their markers evaluated for Linux x86_64 and
    ``python_version``; they are checked only where ``packaging`` is importable (it is on the lent machine).
    """
    problems, names = [], {}
    requires = []
    for w in wheels:
        name = re.sub(r"[-_.]+", "-", os.path.basename(w).split("-")[0]).lower()
        if name in names:
            problems.append(f"two wheels of {name}: {names[name]} and {os.path.basename(w)}")
        names[name] = os.path.basename(w)
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires += [(name, ln.split(":", 1)[1].strip()) for ln in z.read(meta).decode().splitlines()
                         if ln.startswith("Requires-Dist:")]
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return problems
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    for owner, text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = re.sub(r"[-_.]+", "-", req.name).lower()
        if dep not in names and dep not in EXTERNAL_DEPS:
            problems.append(f"{owner} needs {text}, which no carried wheel provides")
    return problems


def unpack_wheel_libs(wheels, site) -> list[str]:
    """Unpack the ``*.data/data/lib`` files of the wheels (MPICH's libmpi) into site/lib; return their paths.

    ``pip install --target`` keeps a wheel's packages and scripts but drops the data files meant for the
    environment's prefix; mpi4py finds libmpi there through MPI4PY_LIBMPI / LD_LIBRARY_PATH (Check.env).
    """
    done = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if len(parts) > 3 and parts[0].endswith(".data") and parts[1:3] == ["data", "lib"] \
                        and not info.is_dir():
                    dest = os.path.join(site, "lib", *parts[3:])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with z.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    mode = (info.external_attr >> 16) & 0o777
                    os.chmod(dest, mode or 0o644)
                    done.append(dest)
    return done


def junit_counts(path) -> dict:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def load_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def first_run(record) -> dict:
    runs = [r for r in record.get("runs", []) if r.get("status") == "ok"]
    return runs[0] if runs else {}


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _step(summary, name) -> dict:
    return next((s for s in summary["steps"] if s["name"] == name), {"status": "skipped", "figures": {}})


def goals(summary) -> list[dict]:
    """The issue's goals against the figures measured so far (met: True, False, or None when not measured)."""
    out = []

    def add(goal, measured, met):
        out.append({"goal": goal, "measured": measured, "met": met})

    k = _step(summary, "kernels")
    if k["status"] != "skipped" and k["figures"]:
        f = k["figures"]
        bad = f.get("failures", 0) + f.get("errors", 0)
        add("every kernel and CupyOps test matches numpy (float32 rel. error < 1e-5)",
            f"{f.get('tests', 0) - bad - f.get('skipped', 0)} passed, {bad} failed, {f.get('skipped', 0)} skipped",
            bad == 0 and f.get("tests", 0) > 0)
    g, c = _step(summary, "gpu_downpour")["figures"], _step(summary, "cpu_downpour")["figures"]
    if g.get("test_accuracy") is not None:
        ref = c.get("test_accuracy")
        add("GPU Downpour reaches the CPU run's accuracy (within 0.01)",
            f"GPU {g['test_accuracy']:.4f}, CPU {ref:.4f}" if ref is not None else f"GPU {g['test_accuracy']:.4f}",
            None if ref is None else g["test_accuracy"] >= ref - 0.01)
    b = _step(summary, "bench_gpu")["figures"]
    for layer in b.get("conv", []):
        if layer.get("speed_vs_ref") is not None:
            add(f"conv fwd+bwd {layer['model']} {layer['layer']} >= 0.8x cuDNN ({layer['reference']})",
                f"{layer['speed_vs_ref']:.2f}x", layer["speed_vs_ref"] >= 0.8)
    sel = b.get("select", {})
    if sel.get("speedup_vs_sort") is not None:
        add(f"top-k of {sel['n']:,} at {sel['fraction']:g} >= 3x faster than a sort",
            f"{sel['speedup_vs_sort']:.1f}x (argpartition: {sel['speedup_vs_partition']:.1f}x)",
            sel["speedup_vs_sort"] >= 3)
    # Both goals are set for 5 workers; a run without 5 (the dry run) shows its largest count, judged by no one.
    runs = {r["workers"]: r for r in _step(summary, "scaling")["figures"].get("runs", [])
            if r.get("efficiency") is not None}
    w = 5 if 5 in runs else max(runs, default=None)
    if w is not None:
        add(f"throughput efficiency at 5 CPU workers, a core each, >= 0.90",
            f"{runs[w]['efficiency']:.3f}" + ("" if w == 5 else f" at {w} workers"),
            runs[w]["efficiency"] >= 0.90 if w == 5 else None)
    speedups = {int(k): v for k, v in _step(summary, "tta")["figures"].get("speedup", {}).items()}
    w = 5 if 5 in speedups else max(speedups, default=None)
    if w is not None:
        add("time to 95% on FSDD, 5 workers against 1, >= 4x",
            f"{speedups[w]:.2f}x" + ("" if w == 5 else f" at {w} workers"), speedups[w] >= 4 if w == 5 else None)
    return out


def _fmt_figures(name, f) -> str:
    """One line of the key figures of a step for the Markdown table."""
    if not f:
        return ""
    if name == "install":
        return f"{len(f.get('wheels', []))} wheels" + (f"; {'; '.join(f['problems'])}" if f.get("problems") else "")
    if name == "preflight":
        return f"Python {f.get('python')}, {f.get('mpi_library')}, GPU: {f.get('gpu') or 'none'}"
    if name == "kernels" and "rehearsal" not in f:
        return ", ".join(f"{k} {v}" for k, v in f.items())
    if name in ("gpu_downpour", "cpu_downpour"):
        if "test_accuracy" not in f:
            return ""
        return (f"{f['workers']} workers: accuracy {f['test_accuracy']:.4f}, {f['epochs']:.1f} epochs in "
                f"{f['wall_s']:.1f} s, {f['samples_per_s']:.0f} samples/s")
    if name == "bench_gpu":
        parts = [f"{c['layer']}@{c['model']}: {c['ours_ms']:.3f} ms vs {c['ref_ms']:.3f}" if c.get("ref_ms")
                 else f"{c['layer']}@{c['model']}: {c['ours_ms']:.3f} ms" for c in f.get("conv", [])]
        s = f.get("select", {})
        if s:
            parts.append(f"top-k {s['exact_ms']:.2f} ms vs sort {s['sort_ms']:.2f} ms")
        w = f.get("worker_step", {})
        if w:
            parts.append(f"worker step GPU {w['gpu_ms']:.2f} ms vs CPU {w['cpu_ms']:.1f} ms")
        return "; ".join(parts)
    if name == "scaling":
        return "; ".join(f"{r['workers']}w {r['samples_per_s']:.0f}/s eff {r['efficiency']:.2f}"
                         for r in f.get("runs", []) if r.get("status") == "ok" and r.get("efficiency") is not None)
    if name == "tta":
        return "; ".join(f"{r['workers']}w " + (f"{r['time_to_target']:.1f} s" if r.get("time_to_target") is not None
                                               else "not reached")
                         for r in f.get("runs", []) if r.get("status") == "ok")
    return ""              # a dry run's rehearsal: its verdict is in the reason


def markdown(summary) -> str:
    v, dev, host = summary["versions"], summary["device"], summary["host"]
    dev_txt = (f"{dev['name']} ({dev['memory_gib']} GiB, CC {dev['compute_capability']}, CUDA runtime "
               f"{dev['cuda_runtime']}, driver {dev['cuda_driver']})" if isinstance(dev, dict) else str(dev))
    lines = [f"# {summary['title']} ({summary['mode']})", "",
             f"{summary['date']}, {summary.get('elapsed_s', 0):.0f} s of a {summary['budget_s']:g} s budget; "
             f"commit {host.get('commit')}.", "",
             f"- device: {dev_txt}",
             f"- CPUs: {host.get('cpus')} ({host.get('model_name', '?')}; {host.get('threads_per_core', '?')} "
             f"thread(s) per core, {host.get('cores_per_socket', '?')} core(s) per socket, "
             f"{host.get('sockets', '?')} socket(s))",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "cupy", "mpi4py", "h5py",
                                                                "pytest") if k in v),
             f"- MPI: {v.get('mpi_library', '?')}; mpiexec {v.get('mpiexec', '?')} ({v.get('mpiexec_version', '?')})",
             "", "| step | status | s | log | figures / reason |", "|---|---|---|---|---|"]
    for s in summary["steps"]:
        text = "; ".join(t for t in (_fmt_figures(s["name"], s["figures"]), s["reason"] or "") if t)
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['log'] or ''} | "
                     f"{text.replace('|', '/')} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in summary["goals"]:
        met = {True: "yes", False: "**no**", None: "?"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
    if not summary["goals"]:
        lines.append("| (no goal measured in this run) | | |")
    return "\n".join(lines) + "\n"


def _timeout_override(text):
    name, _, secs = text.partition("=")
    if name not in STEPS or not secs:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS with STEP one of {', '.join(STEPS)}, got {text!r}")
    try:
        return name, float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS, got {text!r}") from None


def _steps(text):
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown) if unknown else repr(text)}; "
                                         f"choose from {', '.join(STEPS)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="device_check",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", help="output folder (created): summary.json, summary.md, logs/, logs.tar.gz")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="skip the GPU steps after rehearsing their commands; run the CPU steps at small sizes")
    ap.add_argument("--steps", type=_steps, default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--timeout", type=_timeout_override, action="append", default=[], metavar="STEP=S",
                    help="override one step's timeout (repeatable)")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for all steps together (default 450, so the whole stays under 8 minutes)")
    ap.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="folder of carried wheels (default .whl)")
    ap.add_argument("--site", default="/tmp/asyncsgd-device-site", help="pip --target folder for the wheels")
    args = ap.parse_args(argv)
    args.timeout = dict(args.timeout)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
