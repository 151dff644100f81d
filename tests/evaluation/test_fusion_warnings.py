"""`eleatt fuse --search-weights` says when its pick ignores a stream (weight 0) or rests on few videos."""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.fusion import main, search_warnings
from pipeline.evaluation.scores import write_scores


def test_search_warnings():
    assert search_warnings({"weights": [1.0, 1.5], "videos": 30}, ["rgb.npz", "flow.npz"]) == []
    warnings = search_warnings({"weights": [1.0, 0.0], "videos": 12}, ["rgb.npz", "flow.npz"])
    assert len(warnings) == 2
    assert warnings[0].startswith("the search gave flow.npz weight 0: the fused scores ignore that stream")
    assert warnings[1].startswith("weights picked on only 12 labelled validation videos (fewer than 30)")
    assert "--weights 1 1.5" in warnings[1]


def test_fuse_warns_on_stderr(tmp_path, capsys):
    labels = np.array([0, 1, 0, 1])
    good = np.eye(2, dtype=np.float32)[labels] * 0.8 + 0.1  # right on every video
    bad = np.eye(2, dtype=np.float32)[1 - labels] * 0.8 + 0.1  # wrong on every video: weight 0 is best
    videos = [f"v{i}" for i in range(4)]
    for name, scores in (("rgb", good), ("flow", bad)):
        for stage in ("val", "test"):
            write_scores(tmp_path / f"{name}_{stage}.npz", videos, scores, labels, ["a", "b"])
    assert main(["--scores", str(tmp_path / "rgb_test.npz"), str(tmp_path / "flow_test.npz"), "--search-weights",
                 str(tmp_path / "rgb_val.npz"), str(tmp_path / "flow_val.npz"), "--out", str(tmp_path / "f.npz"),
                 "--no-plot"]) == 0
    out, err = capsys.readouterr()
    assert "picked weights 1 : 0 on validation (4 labelled videos" in out
    assert f"eleatt fuse: warning: the search gave {tmp_path / 'flow_val.npz'} weight 0" in err
    assert "eleatt fuse: warning: weights picked on only 4 labelled validation videos" in err
