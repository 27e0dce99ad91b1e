"""The Kalman benchmark's worker jobs after a deadlock (``benchmarks.kalman.run_with_retries``):
retried in a fresh process up to ``retries`` times, records kept or redone as each job needs,
every configuration ending with a record. A scripted worker stands in for the process."""

from benchmarks import kalman as bench


class ScriptedWorker:
    """``run(job)`` yields the next attempt's scripted messages and remembers the job."""

    def __init__(self, *attempts):
        self.attempts, self.jobs = list(attempts), []

    def run(self, job):
        self.jobs.append(job)
        yield from self.attempts.pop(0)


def timing(structure, impl="ours-seq"):
    return {"record": {"impl": impl, "structure": structure, "status": "ok", "median_s": 1.0}}


BASE = dict(impl="ours-seq", d=4, T=32, batch=8, unroll=1)


def test_timing_job_retries_only_the_structures_still_pending(capsys):
    worker = ScriptedWorker(
        [{"start": "diag", "phase": "compile"}, timing("diag"), {"stalled": 30.0}],
        [timing("dense")],
    )
    printed = []
    records = bench.run_job(worker, {"kind": "time"}, ["diag", "dense"], BASE, printed.append)
    assert [j["structures"] for j in worker.jobs] == [["diag", "dense"], ["dense"]]
    retried = [(r["structure"], r["deadlocks_retried"]) for r in records]
    assert retried == [("diag", 0), ("dense", 1)]
    assert printed == records
    assert "ours-seq d=4 T=32: worker deadlocked (compiling), retrying" in capsys.readouterr().out


def test_timing_job_gives_up_after_the_retries_with_a_record_per_structure():
    stall = [{"start": "diag", "phase": "compile"}, {"stalled": 30.0}]
    worker = ScriptedWorker(stall, stall, stall, stall)
    records = bench.run_job(worker, {}, ["diag", "dense"], BASE, lambda r: None, retries=2)
    assert len(worker.jobs) == 3 and len(worker.attempts) == 1
    assert [(r["structure"], r["status"]) for r in records] == [("diag", "skipped"),
                                                                 ("dense", "skipped")]  # fmt: skip
    assert {r["reason"] for r in records} == {"deadlocked 3 times in XLA:CPU (compiling)"}


def test_a_timeout_is_not_retried():
    worker = ScriptedWorker([{"start": "diag", "phase": "warm-up"}, {"timeout": 12.0}], [])
    records = bench.run_job(worker, {}, ["diag"], BASE, lambda r: None)
    assert len(worker.jobs) == 1
    assert records[0]["reason"] == "timed out after 12 s (warm-up call)"


def test_interleaved_job_redoes_every_record_after_a_deadlock():
    job = {"impls": ["ours-seq", "dynamax-seq", "hand-seq"], "structure": "diag", "d": 4,
           "T": 32, "batch": 8}  # fmt: skip
    worker = ScriptedWorker(
        [timing("diag", "ours-seq"), {"start": "dynamax-seq", "phase": "compile"},
         {"stalled": 30.0}],
        [timing("diag", "ours-seq"), timing("diag", "dynamax-seq"), {"died": -9}],
    )  # fmt: skip
    records = bench.run_interleaved_job(worker, job, lambda r: None)
    assert len(worker.jobs) == 2
    assert [(r["impl"], r["status"]) for r in records] == [
        ("ours-seq", "ok"), ("dynamax-seq", "ok"), ("hand-seq", "skipped")]  # fmt: skip
    assert records[-1]["reason"] == "worker died (exit code -9, out of memory?)"


def test_accuracy_job_keeps_the_records_of_the_last_attempt(capsys):
    diff = {"mean": 1e-12, "cov": 1e-12, "loglik": 1e-10}
    record = {"record": {"d": 4, "structure": "diag", "impl": "ours-seq", "max_abs_diff": diff,
                         "agree": True}}  # fmt: skip
    worker = ScriptedWorker([record, {"stalled": 30.0}], [record])
    records = bench.run_accuracy_job(worker, {"d": 4, "structure": "diag"})
    assert records == [record["record"]] and len(worker.jobs) == 2
    assert "accuracy check failed" not in capsys.readouterr().out
