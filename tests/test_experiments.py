"""Every paper's experiment script runs end to end at SCALE=toy (phantoms, a few steps), so none can
rot: data, training, generation or translation, scoring and the table at the end."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {  # script -> files its run must leave, and text its table must print
    "davoodi": (["table4a/table.txt", "table4b/results.json", "fakes/normal"], "Table 4b"),
    "noori2024": (["dcgan/loss_curve.png", "fakes"], "Loss_D"),
    "dhawan2024": (["acgan/checkpoints/last.pt", "table1/table.txt"], "real+fake"),
    "lugotorres2023": (["cyclegan_pneumonia/metrics.csv"], "normal -> pneumonia"),
    "lugotorres2024": (["translated", "judge/real/seed0/model.pt"], "domain FID"),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_experiment_runs_at_toy_scale(name, tmp_path):
    env = {**os.environ, "SCALE": "toy", "OUT": str(tmp_path / name)}
    env.pop("FID_WEIGHTS", None)
    result = subprocess.run(["bash", f"experiments/{name}.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    files, text = EXPECTED[name]
    assert all((tmp_path / name / f).exists() for f in files), files
    assert text in result.stdout, result.stdout[-2000:]


def test_a_wrong_scale_or_missing_data_is_one_line(tmp_path):
    for env, message in (({"SCALE": "huge"}, "SCALE=huge"), ({"SCALE": "cpu", "KERMANY": ""}, "KERMANY")):
        result = subprocess.run(["bash", "experiments/noori2024.sh"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "OUT": str(tmp_path / "x"), **env})
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
