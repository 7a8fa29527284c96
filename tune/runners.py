"""Where jobs run: in this process, or as Ray tasks (an in-process local Ray, or a cluster).

A runner's map(jobs) yields (index, result) as jobs finish; a Ray job whose worker died is retried
by Ray (`retries` times) and then comes back as a JobFailed instead of a result. An error of the
user's (a bad parameter, a missing file) is raised as it was raised in the job.
"""
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, replace

from ..common import VERSION
from ..common.errors import BadParameter, MbmergeError
from .jobs import run_job
from .rungs import JobFailed


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    """Where a tune's trials run (make): in this process (no ray, one job); as Ray tasks on a cluster
    (ray: its address, or "local" for an in-process Ray of this machine), or on a local Ray running
    `jobs` trials at once. Each Ray task holds cpus_per_trial CPUs (default: 1, or the cores over jobs)
    and gpus_per_trial GPUs (default: 1 when the cluster has GPUs); a task whose worker died is run
    again `retries` times. verbose: Ray's own logging too."""
    ray: str | None = None
    jobs: int = 1
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    retries: int = 2
    verbose: bool = False


class Local:
    """Jobs one after another, in this process."""
    concurrency = 1

    def map(self, jobs):
        for i, job in enumerate(jobs):
            yield i, run_job(job)

    def close(self):
        pass


class RayRunner:
    """Jobs as Ray tasks, each holding cpus_per_trial CPUs and gpus_per_trial GPUs of its node."""

    def __init__(self, address: str | None = None, *, cpus_per_trial: float = 1, gpus_per_trial: float | None = None,
                 retries: int = 2, num_cpus: int | None = None, verbose: bool = False):
        self.started = not _ray().is_initialized()
        self.quiet = contextlib.ExitStack()     # Ray's warnings while it runs trials too (a worker that died)
        self.quiet.enter_context(quiet_ray(verbose))
        try:
            ray = self.ray = start_ray(address, num_cpus, verbose)
        except BaseException:
            self.quiet.close()
            raise
        if gpus_per_trial is None:
            gpus_per_trial = 1 if ray.cluster_resources().get("GPU", 0) else 0
        self.cpus, self.gpus = cpus_per_trial, gpus_per_trial
        self.remote = ray.remote(run_job).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                                  max_retries=retries, retry_exceptions=False)
        self.retries = retries

    @property
    def concurrency(self) -> int:
        """Trials the cluster runs at once: its CPUs (or GPUs) over a trial's share."""
        res = self.ray.cluster_resources()
        fits = [res.get("CPU", 0) / self.cpus if self.cpus else None,
                res.get("GPU", 0) / self.gpus if self.gpus else None]
        return max(1, int(min(f for f in fits if f is not None)) if any(f is not None for f in fits) else 1)

    def map(self, jobs):
        from ray.exceptions import RayTaskError
        threads = max(1, int(self.cpus))
        pending = {self.remote.remote(_threads(job, threads)): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                result = self.ray.get(done[0])
            except RayTaskError as e:     # the job raised: the user's error is said as it was raised
                cause = getattr(e, "cause", None)
                if isinstance(cause, MbmergeError):
                    raise cause from None
                yield i, JobFailed(f"job failed on a Ray worker: {cause or e}".splitlines()[0])
                continue
            except self.ray.exceptions.RayError as e:     # the worker died (killed, out of memory, node lost)
                yield i, JobFailed(f"Ray worker died ({type(e).__name__}) after {self.retries} retries")
                continue
            if result["version"] != VERSION:
                raise BadParameter(f"a Ray node runs mbmerge {result['version']}, this driver {VERSION}: "
                                   f"install the same version on every node")
            yield i, result

    def close(self):
        if self.started:
            self.ray.shutdown()
        self.quiet.close()


def _ray():
    try:
        import ray
    except ImportError:
        raise BadParameter("--ray and --jobs need Ray: pip install 'mbmerge[tune]'") from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False):
    """The ray module, connected: to the cluster at `address`, else an in-process local Ray on this
    machine's cores (num_cpus of them; default all); as it is when already connected. Ray's own lines
    (its start-up and token-authentication warnings, workers' output) reach the user only if verbose."""
    ray = _ray()
    if not ray.is_initialized():
        # Ray puts the driver's working folder on its workers' sys.path: from a checkout of mbmerge,
        # its top-level folders would shadow installed packages (kernels/ hides the Hub's `kernels`)
        with contextlib.chdir(tempfile.gettempdir()), quiet_ray(verbose):
            ray.init(address=None if address == "local" else address, num_cpus=None if address else num_cpus,
                     **ray_options(verbose))
    return ray


def ray_options(verbose: bool) -> dict:
    """ray.init's output settings: no dashboard; workers' output and Ray's logging only if verbose."""
    return {"include_dashboard": False, "log_to_driver": verbose, "configure_logging": verbose,
            **({"logging_level": logging.INFO} if verbose else {})}


@contextlib.contextmanager
def quiet_ray(verbose: bool):
    """Ray's loggers held at ERROR while it starts, unless verbose: with configure_logging off they have
    no handler, and Python's last-resort one prints their warnings (Ray 2.5x: 'Token authentication
    is enabled for this Ray cluster...' on every local start) on the user's stderr."""
    if verbose:
        yield
        return
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _threads(job, threads):
    return job if job.threads else replace(job, threads=threads)


def make(settings: RunnerSettings = RunnerSettings()):
    """The runner of a tune: Local, Ray at an address ('local' or None: in-process), or with jobs > 1 and
    no address a local Ray running `jobs` trials at once, each with its share of the cores."""
    ray, jobs, cpus_per_trial = settings.ray, settings.jobs, settings.cpus_per_trial
    if ray is None and jobs <= 1:
        return Local()
    cores = os.cpu_count() or 1
    if cpus_per_trial is None:
        cpus_per_trial = max(1, cores // jobs) if ray in (None, "local") and jobs > 1 else 1
    address = None if ray in (None, "local") else ray
    return RayRunner(address, cpus_per_trial=cpus_per_trial, gpus_per_trial=settings.gpus_per_trial,
                     retries=settings.retries, verbose=settings.verbose,
                     num_cpus=min(cores, int(cpus_per_trial * jobs)) if jobs > 1 and address is None else None)
