"""The identification seed sweep (examples/seed_sweep.py): it runs only unfinished seeds,
refuses a directory made by another command, and reports each metric's mean over seeds with the
bootstrap interval of the mean."""

import json
import sys

import numpy as np
import pytest

from examples import seed_sweep
from inference.statistics import mean, stratified_bootstrap

#: a stand-in example: writes rows whose numbers depend on the seed, and counts its runs
FAKE = """
import json, pathlib, sys
seed, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = out / "runs.txt"
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
rows = [{"model": "vrkn", "latents": "filtered", "r2": 0.9 + 0.01 * seed, "flag": True,
         "curve": [1, 2]},
        {"model": "vrkn", "latents": "z_0", "r2": 0.5 - 0.1 * seed, "nan": float("nan")}]
if seed != 3:  # a row one seed lacks is left out of the aggregate
    rows.append({"model": "mean frame", "latents": "-", "mse": 1.0 + seed})
(out / "results.json").write_text(json.dumps({"rows": rows}))
"""


@pytest.fixture
def fake_example(monkeypatch):
    def command(example, arguments, seed, out):
        return [sys.executable, "-c", FAKE, str(seed), str(out)]

    monkeypatch.setattr(seed_sweep, "command", command)


def test_sweep_aggregates_over_seeds_and_runs_only_unfinished_seeds(tmp_path, fake_example):
    argv = ["pendulum_sysid", "--seeds", "0,1,3", "--out", str(tmp_path), "--", "--steps", "5"]
    result = seed_sweep.main(argv)
    assert result["seeds"] == [0, 1, 3] and result["arguments"] == ["--steps", "5"]
    rows = result["rows"]
    assert set(rows) == {"vrkn / filtered", "vrkn / z_0"}  # "mean frame" lacks seed 3
    r2 = rows["vrkn / filtered"]["r2"]
    values = [0.90, 0.91, 0.93]
    assert r2["per_seed"] == pytest.approx(values)
    assert r2["mean"] == pytest.approx(np.mean(values))
    ci = stratified_bootstrap(np.array(values), statistic=mean)
    assert (r2["low"], r2["high"]) == pytest.approx((ci.low, ci.high))
    assert r2["low"] <= r2["mean"] <= r2["high"] and (r2["min"], r2["max"]) == (0.90, 0.93)
    assert set(rows["vrkn / filtered"]) == {"r2"}  # booleans, lists and NaN are no metrics
    assert set(rows["vrkn / z_0"]) == {"r2"}
    table = (tmp_path / "table.md").read_text()
    assert "| vrkn / filtered | r2 | **0.9133**" in table
    # seed 1 was killed mid-run: its command is recorded, its results are not
    (tmp_path / "s1" / "results.json").unlink()
    again = seed_sweep.main(argv)
    assert [(tmp_path / f"s{s}" / "runs.txt").read_text() for s in (0, 1, 3)] == ["x", "xx", "x"]
    assert again == json.loads((tmp_path / "results.json").read_text()) == result


def test_sweep_refuses_a_directory_of_another_command(tmp_path, fake_example):
    seed_sweep.main(["lvssf_pendulum", "--seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="holds a run of"):
        seed_sweep.main(["lvssf_pendulum", "--seeds", "0", "--out", str(tmp_path), "--",
                         "--steps", "7"])  # fmt: skip
    with pytest.raises(SystemExit):  # the sweep sets each seed's --seed and --out itself
        seed_sweep.main(["lvssf_pendulum", "--out", str(tmp_path), "--", "--seed", "1"])


@pytest.mark.slow
def test_sweep_runs_a_real_example(tmp_path):
    """The examples take ``--seed`` and ``--out`` and write the rows the sweep reads."""
    argv = ["--quick", "--configs", "none-known", "--test-length", "12"]
    sweep = ["lvssf_pendulum", "--seeds", "0,1", "--out", str(tmp_path), "--"]
    result = seed_sweep.main([*sweep, *argv])
    row = result["rows"]["none-known"]
    for s, seed_dir in enumerate(("s0", "s1")):
        done = json.loads((tmp_path / seed_dir / "results.json").read_text())
        assert done["settings"]["seed"] == s
        assert row["mse_angle"]["per_seed"][s] == pytest.approx(done["rows"][0]["mse_angle"])
