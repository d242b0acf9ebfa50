"""run.json holds plain JSON: what a job records from numpy and torch is read back as numbers and lists."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_run_json_holds_plain_numbers_for_numpy_and_torch_values(tmp_path):
    torch = pytest.importorskip("torch")
    from visionsweep.runinfo import RunRecord, Status

    record = RunRecord(tmp_path, where=tmp_path)
    record.update(metrics={"val/acc": torch.tensor(0.5), "epochs": np.int64(3), "loss": np.float32(0.25)},
                  class_counts=np.array([4, 5]), thresholds=torch.tensor([0.5, 0.75]), dtype=np.float32)
    record.finish(Status.OK)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["metrics"] == {"val/acc": 0.5, "epochs": 3, "loss": 0.25}
    assert data["class_counts"] == [4, 5] and data["thresholds"] == [0.5, 0.75]
    assert data["where"] == str(tmp_path) and data["status"] == "ok"
    assert data["dtype"] == str(np.float32)  # a class is named, not called (np.float32.tolist needs an instance)
