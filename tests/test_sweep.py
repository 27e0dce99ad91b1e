"""The seed sweep (examples/sweep.py): a killed sweep continues its unfinished runs, and the
aggregate is the IQM with its stratified bootstrap interval over the seeds' final returns."""

import json

import numpy as np

from examples import sweep
from inference.statistics import stratified_bootstrap
from rl import runner
from rl.runner import RunConfig

ARGS = ["--agents", "random", "--tasks", "cartpole-swingup", "--variants", "none",
        "--seeds", "0,1", "--env-steps", "2000", "--eval-every", "100"]  # fmt: skip


def test_a_killed_sweep_resumes_and_aggregates_over_seeds(tmp_path):
    # seed 0 was interrupted after its first episode (as a killed sweep leaves it)
    cfg = RunConfig(agent="random", variant=None, seed=0, env_steps=2000, eval_every=100)
    first = tmp_path / sweep.cell_name("random", None, "cartpole-swingup", "none", 0)
    partial = runner.run(cfg, first, progress=False, video=False, compilation_cache=False,
                         stop_after_episodes=1)  # fmt: skip
    assert not partial["finished"]
    head = (first / "metrics.jsonl").read_text().splitlines()
    table = sweep.main([*ARGS, "--out", str(tmp_path)])
    # resumed, not restarted: the interrupted run's records are kept and continued
    lines = (first / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(head)] == head and len(lines) > len(head)
    finals = [json.loads((tmp_path / sweep.cell_name("random", None, "cartpole-swingup",
                                                     "none", s) / "summary.json").read_text())
              for s in (0, 1)]  # fmt: skip
    assert all(f["finished"] for f in finals)
    row = table["random-cartpole-swingup-none"]
    ref = stratified_bootstrap(np.array([f["final_eval_return"] for f in finals]))
    assert (row["iqm"], row["low"], row["high"], row["seeds"]) == tuple(ref)
    assert [c[0] for c in row["curve"]] == [1000, 2000]  # environment steps of the evaluations
    assert (tmp_path / "table.md").read_text().count("| random-cartpole-swingup-none |") == 1
    assert (tmp_path / "returns.png").stat().st_size > 0
    # a second call reads the finished runs back and changes nothing
    again = sweep.main([*ARGS, "--out", str(tmp_path)])
    assert again == json.loads(json.dumps(table))
