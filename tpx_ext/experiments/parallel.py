"""The runs of an experiment tool (control, frozen), in this process or in spawned workers."""

from typing import Callable, Dict, List, Sequence


def run_jobs(worker: Callable[[tuple], Dict], jobs: Sequence[tuple], workers: int,
             name: Callable[[Dict], str]) -> List[Dict]:
    """worker(job) for every job, `workers` at once in spawned processes (1: here), printing
    a line as each finishes; the records in the order of `jobs`. `worker` must be a
    module-level function (spawned processes import it)."""
    records: List[Dict] = []
    if workers <= 1:
        for i, job in enumerate(jobs):
            records.append(worker(job))
            print(f"done {i + 1}/{len(jobs)}: {name(records[-1])}", flush=True)
        return records
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        for i, rec in enumerate(pool.imap(worker, jobs)):
            records.append(rec)
            print(f"done {i + 1}/{len(jobs)}: {name(rec)}", flush=True)
    return records
