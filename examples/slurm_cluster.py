"""Reduce a night on a SLURM cluster with dask-jobqueue (``pip install 'ccdcal[dask]' dask-jobqueue``).

Each SLURM job runs one dask worker process with 8 cores and 24 GB; ccdcal's tasks read and
write the shared filesystem themselves, so the folders must be visible at the same paths on
the login node and on every compute node. Run it on the login node:

    python examples/slurm_cluster.py /shared/raw/2026-11-25 /shared/reduced/2026-11-25 --jobs 10

PBS: use ``dask_jobqueue.PBSCluster`` with the same arguments (``account`` is ``project``
there); other batch systems have their own class (LSF, SGE, HTCondor).
"""

from __future__ import annotations

import argparse


def make_cluster(*, queue: str | None = None, account: str | None = None, cores: int = 8,
                 memory: str = "24GB", walltime: str = "02:00:00", **extra):
    """A SLURMCluster whose jobs are ccdcal workers: one process per job, all its cores as
    threads (numba's kernels use them), ``--memory`` of ccdcal well below the job's memory."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=queue, account=account, cores=cores, processes=1, memory=memory, walltime=walltime,
        job_name="ccdcal", local_directory="$TMPDIR",
        worker_extra_args=["--lifetime", "110m", "--lifetime-stagger", "5m"],  # leave before walltime
        **extra)


def main() -> None:
    import ccdcal

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw")
    parser.add_argument("out")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (= dask workers)")
    parser.add_argument("--queue")
    parser.add_argument("--account")
    args = parser.parse_args()
    cluster = make_cluster(queue=args.queue, account=args.account)
    cluster.scale(jobs=args.jobs)
    try:
        result = ccdcal.reduce(args.raw, args.out, scheduler=cluster.scheduler_address,
                               options=ccdcal.ReduceOptions(memory="8GiB", dask_report=True))
        print(f"{len(result.masters)} masters, {len(result.lights)} lights; on {result.executor}")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
