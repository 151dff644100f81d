"""pipeline.evaluation.plots pictures and pipeline.serving.visualize's gates / prefix predictions, on small hand-made inputs."""
import numpy as np
import pytest
import torch

from tests.helpers import image_is_blank
from pipeline.evaluation.plots import plot_attention, plot_curves, plot_probabilities, read_metrics, select_elements
from pipeline.serving.visualize import gates_and_probabilities

METRICS = """epoch,step,train/loss_epoch,train/loss_step,train/top1,val/loss,val/mca,val/top1,val/top5
0,0,,2.5,,,,,
0,1,,2.3,,,,,
0,1,,,,2.2,0.1,0.125,0.5
0,1,2.4,,0.0,,,,
1,2,,2.0,,,,,
1,3,,1.8,,,,,
1,3,,,,1.7,0.4,0.5,0.9
1,3,1.9,,0.3,,,,
"""


def _png_size(path):
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path)).shape[:2]


def test_read_metrics_takes_epoch_values(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    metrics = read_metrics(tmp_path)  # the run folder or the file
    assert metrics["train/loss"] == {0: 2.4, 1: 1.9}  # the epoch mean, not the step values
    assert metrics["val/top1"] == {0: 0.125, 1: 0.5}
    assert metrics["val/loss"] == {0: 2.2, 1: 1.7}
    assert "train/loss_step" not in metrics
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_metrics(tmp_path / "missing")


def test_curves_of_two_streams(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    other = {"train/loss": {0: 2.0, 1: 1.0, 2: 0.5}, "val/loss": {0: 2.1, 1: 1.5, 2: 1.0},
             "val/top1": {0: 0.3, 1: 0.6, 2: 0.9}}
    path = plot_curves({"RGB": tmp_path, "flow": other}, tmp_path / "curves.png")
    assert path.is_file() and not image_is_blank(path)
    assert _png_size(path) == (400, 1100)


def test_attention_picture_rows_and_elements(tmp_path):
    rng = np.random.default_rng(0)
    gates = [rng.uniform(size=(12, 8)).astype(np.float32), rng.uniform(size=(9, 8)).astype(np.float32)]
    frames = [rng.integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8), None]
    path = plot_attention(gates, tmp_path / "attention.png", titles=["a", "b"], frames=frames)
    assert not image_is_blank(path)
    height, width = _png_size(path)
    assert height == round(100 * (0.6 + 2.3 * 2)) and width > 1000  # one row per video
    with pytest.raises(ValueError, match="element counts"):
        plot_attention([gates[0], gates[0][:, :4]], tmp_path / "bad.png")
    # only the most varying elements are drawn when there are many, in element order
    wide = np.full((10, 100), 0.5, dtype=np.float32)
    wide[:, [3, 50, 97]] = np.linspace(0, 1, 10)[:, None]
    assert select_elements([wide], 3).tolist() == [3, 50, 97]
    assert select_elements([wide], 200).tolist() == list(range(100))


def test_probabilities_over_time(tmp_path):
    probs = np.full((10, 4), 0.25)
    probs[:, 2] = np.linspace(0.25, 0.9, 10)
    probs[:, [0, 1, 3]] = ((1 - probs[:, 2]) / 3)[:, None]
    path = plot_probabilities(probs, tmp_path / "p.png", class_names=list("abcd"), true_label=2)
    assert not image_is_blank(path) and _png_size(path) == (400, 800)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_prefix_probabilities_are_the_model_on_the_first_steps(pooling):
    """Row t of the probabilities is exactly what the classifier says when given only the first t + 1 steps, and
    the gates are those EleAttLSTM returns for the video."""
    from pipeline.nn.classifier import SequenceClassifier

    net = SequenceClassifier(6, 5, hidden_size=8, num_layers=2, pooling=pooling, proj_size=4).eval()
    seq = torch.randn(2, 7, 6)  # (V, T, D): two views
    gates, probs = gates_and_probabilities(net, seq, layer=2)
    assert gates.shape == (7, 8) and probs.shape == (7, 5)
    with torch.no_grad():
        for t in range(1, 8):
            expected = net(seq[:, :t]).softmax(-1).mean(0)  # views averaged, as `test` does
            np.testing.assert_allclose(probs[t - 1], expected.numpy(), rtol=1e-5, atol=1e-6)
        _, _, all_gates = net.rnn(net.proj(seq), return_attention=True)
    np.testing.assert_allclose(gates, all_gates[1][0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="--layer 3"):
        gates_and_probabilities(net, seq, layer=3)
    with pytest.raises(ValueError, match="no element-wise attention"):
        gates_and_probabilities(SequenceClassifier(6, 5, hidden_size=8, attention_layers=0).eval(), seq)
    with pytest.raises(ValueError, match="eval mode"):
        gates_and_probabilities(net.train(), seq)


def test_video_frames_are_spread_evenly_in_order(tmp_path):
    from pipeline.serving.visualize import video_frames
    from preprocessing.synthetic import write_lossless_video

    frames = np.stack([np.full((16, 24, 3), 20 * t, np.uint8) for t in range(10)])  # frame t is all 20 t
    write_lossless_video(tmp_path / "v.mp4", frames)
    picked = video_frames(tmp_path / "v.mp4", 4)
    assert picked.shape == (4, 16, 24, 3) and picked.dtype == np.uint8
    assert [int(f.mean().round()) for f in picked] == [0, 60, 120, 180]  # frames 0, 3, 6, 9
