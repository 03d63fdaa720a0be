"""Where jobs run. `backend.map(fn, jobs)` calls fn(*job) for every job and returns the
results in job order; nothing else about a backend shows in the numbers. A job must be a
pure function of its arguments (dtmem's jobs pin torch to one thread), so that a job
gives the same result in this process, in a worker process, on a Ray node, or when Ray
runs it again after its worker died.

- LocalBackend(workers): this process for 1 worker, else that many spawned processes,
  started at the first map and kept until `close` (a run's generations reuse them).
- RayBackend(address, workers): Ray tasks of one CPU each, on the cluster at `address`
  or on a local Ray of `workers` CPUs started at the first map. The `ray` extra; the
  nodes of a cluster must share this repository's file system (NAMM files and cells are
  paths).
"""

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor

from dtmem.errors import UserError

BACKENDS = ("local", "ray")


class Backend:
    in_process = False
    """whether jobs run in this process (where their progress bars can show)"""

    def map(self, fn, jobs):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_backend(kind="local", address=None, workers=None):
    """The backend that --backend, --address and --workers ask for."""
    if kind == "ray":
        return RayBackend(address, workers)
    if address:
        raise UserError("--address joins a Ray cluster; add --backend ray")
    return LocalBackend(workers or 1)


class LocalBackend(Backend):
    def __init__(self, workers=1):
        self.workers = workers
        self.in_process = workers == 1
        self.pool = None

    def map(self, fn, jobs):
        if self.in_process:
            return [fn(*job) for job in jobs]
        if self.pool is None:
            # Spawned, not forked: a fork of a process that has run torch's thread pool can
            # hang. Workers ignore Ctrl-C: the driver alone stops, saves and says so.
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        futures = [self.pool.submit(fn, *job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            for process in self.pool._processes.values():  # no public way to stop a job
                process.terminate()
            self.close()
            raise

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


class RayBackend(Backend):
    RETRIES = 3
    """runs of a job after the first whose worker process died (killed, out of memory);
    a job's own exception is not retried: it would only raise again"""

    def __init__(self, address=None, workers=None):
        if address and workers:
            raise UserError("--workers sizes the local Ray that dtmem starts; a cluster at "
                            "--address runs as many jobs at once as it has CPUs")
        self.address, self.workers = address, workers
        self.joined = False  # whether this backend joined Ray, so that close leaves it
        self.remote = {}  # fn -> its Ray task, made once per function

    def ray(self):
        try:
            import ray
        except ImportError:
            raise UserError('the ray backend needs Ray: pip install "dtmem[ray]"') from None
        if not ray.is_initialized():  # else: a Ray this process already joined
            # "local" starts a new Ray even where `ray start` left one running.
            try:
                ray.init(address=self.address or "local", num_cpus=self.workers,
                         include_dashboard=False, logging_level="warning")
            except (ConnectionError, ValueError) as e:  # no cluster there, or not an address
                if not self.address:
                    raise
                raise UserError(f"cannot join Ray at {self.address} ({type(e).__name__}: "
                                f"{e}); give the head node's host:port (`ray status` there "
                                "shows it), or drop --address to start a local Ray") from None
            self.joined = True
        return ray

    def map(self, fn, jobs):
        ray = self.ray()
        if fn not in self.remote:
            self.remote[fn] = ray.remote(fn).options(num_cpus=1, max_retries=self.RETRIES)
        # An argument many jobs share (a checkpoint, the statistics) goes to the object
        # store once, not once per job; a task is handed the value of each reference.
        stored = {}  # id(argument) -> its object reference
        for job in jobs:
            for arg in job:
                if id(arg) not in stored:
                    stored[id(arg)] = ray.put(arg)
        futures = [self.remote[fn].remote(*(stored[id(arg)] for arg in job)) for job in jobs]
        try:
            return ray.get(futures)
        except KeyboardInterrupt:
            for future in futures:
                ray.cancel(future, force=True)
            raise
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.RayTaskError):  # the job's own exception
                raise
            # Ray itself failed: a worker died past its retries, the raylet or a node
            # was lost. Nothing of this map is kept; what callers saved before stays.
            raise UserError(f"Ray failed while running jobs ({type(e).__name__}: a job's "
                            f"worker died in each of its {self.RETRIES + 1} runs, or a node "
                            "was lost); check the machine's memory or the cluster (`ray "
                            "status`), then run the command again (evolve: --resume)") from None

    def close(self):
        if self.joined:  # leaves a cluster; stops a local Ray
            import ray

            ray.shutdown()
            self.joined = False
