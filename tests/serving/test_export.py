"""`eleatt export`: exported models (ONNX via onnxruntime, torch.export, TorchScript) equal eager PyTorch, and the
eager export model equals what classify computes from features."""
import json

import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.data.sequences import FeatureNormalizer
from pipeline.serving.export import FORMATS, ExportError, build_models, export_module, load_exported
from pipeline.training.module import EleAttClassifier, load_classifier

D, C, H = 8, 4, 6
SHAPES = ((1, 1), (3, 5), (2, 9))  # (batch, steps): none of them the example the exporter traced with (2, 3)


def _save_checkpoint(path, cell="lstm", pooling="last", normalize="standard", settings=None, **kw):
    """A freshly built classifier saved with the keys a Lightning checkpoint of `eleatt fit` has."""
    torch.manual_seed(0)
    model = EleAttClassifier(input_size=D, num_classes=C, cell=cell, hidden_size=H, num_layers=2, pooling=pooling,
                             class_names=[f"c{i}" for i in range(C)], extraction_settings=settings, **kw)
    normalizer = {"mode": normalize, "mean": None, "std": None}
    if normalize == "standard":
        normalizer.update(mean=torch.randn(D), std=torch.rand(D) + 0.5)
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "datamodule_hyper_parameters": {"normalize": normalize, "num_steps": 4},
                "FeatureDataModule": {"normalizer": normalizer}}, path)
    return path


def _inputs(batch, steps, seed=0, frame=(D,)):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[-1] = steps
    return torch.randn(batch, steps, *frame, generator=gen), lengths


def _suffix(fmt):
    return {"onnx": ".onnx", "exported": ".pt2", "torchscript": ".ts"}[fmt]


def _needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="the `export` extra (onnx) is not installed")
        pytest.importorskip("onnxruntime", reason="the `export` extra (onnxruntime) is not installed")


@pytest.mark.parametrize("cell,pooling,normalize", [("lstm", "last", "standard"), ("gru", "mean", "l2"),
                                                    ("rnn", "last", "none")])
def test_eager_export_model_equals_classify(tmp_path, cell, pooling, normalize):
    ckpt = _save_checkpoint(tmp_path / "m.ckpt", cell=cell, pooling=pooling, normalize=normalize,
                            attention_layers=1)
    module, info = build_models(ckpt)
    classifier = load_classifier(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    normalizer = FeatureNormalizer(normalize)
    normalizer.load_state_dict(checkpoint["FeatureDataModule"]["normalizer"])
    assert info["class_names"] == [f"c{i}" for i in range(C)] and info["normalize"] == normalize
    for impl in ("reference", "fast"):
        classifier.net.rnn.impl = impl
        for batch, steps in SHAPES:
            feats, lengths = _inputs(batch, steps)
            with torch.no_grad():
                want = classifier.video_probs(normalizer(feats), lengths)  # what classify computes, one view
                got = module(feats, lengths)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sequence_export_equals_eager(tmp_path, fmt, cell):
    _needs(fmt)
    ckpt = _save_checkpoint(tmp_path / "m.ckpt", cell=cell)
    module, info = build_models(ckpt)
    path = export_module(module, info, fmt, tmp_path / f"model{_suffix(fmt)}")
    assert json.loads((tmp_path / f"model{_suffix(fmt)}.json").read_text())["input_names"] == ["features", "lengths"]
    run = load_exported(path, fmt)
    for batch, steps in SHAPES:
        feats, lengths = _inputs(batch, steps, seed=batch * 10 + steps)
        with torch.no_grad():
            want = module(feats, lengths)
        (got,) = run(feats, lengths)
        assert got.shape == (batch, C)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_step_export_streams_the_sequence_prediction(tmp_path, fmt):
    _needs(fmt)
    ckpt = _save_checkpoint(tmp_path / "m.ckpt", cell="lstm", attention_layers=1)
    seq_model, _ = build_models(ckpt)
    module, info = build_models(ckpt, step=True)
    path = export_module(module, info, fmt, tmp_path / f"step{_suffix(fmt)}")
    run = load_exported(path, fmt)
    for batch, steps in ((1, 4), (3, 2)):
        feats, _ = _inputs(batch, steps, seed=steps)
        h = c = torch.zeros(2, batch, H)
        for t in range(steps):
            with torch.no_grad():
                want = module(feats[:, t], h, c)
            probs, h, c = run(feats[:, t], h, c)
            for w, g in zip(want, (probs, h, c)):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        with torch.no_grad():
            whole = seq_model(feats, torch.full((batch,), steps))
        torch.testing.assert_close(probs, whole, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory):
    from pipeline.nn.backbone import FrameEncoder

    encoder = FrameEncoder("test_resnet", weights="none")
    settings = {"backbone": "test_resnet", "weights": "none", "data_config": encoder.data_config,
                "sampling": {}, "views": "center", "dtype": "float16", "modality": "rgb"}
    path = tmp_path_factory.mktemp("bb") / "m.ckpt"
    torch.manual_seed(0)
    model = EleAttClassifier(input_size=encoder.num_features, num_classes=C, cell="lstm", hidden_size=H,
                             extraction_settings=settings)
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "datamodule_hyper_parameters": {"normalize": "l2"}}, path)
    return path, encoder


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=pytest.mark.slow),
                                 pytest.param("exported", marks=pytest.mark.slow), "torchscript"])
def test_backbone_export_equals_eager(tmp_path, backbone_ckpt, fmt):
    _needs(fmt)
    ckpt, encoder = backbone_ckpt
    module, info = build_models(ckpt, with_backbone=True)
    assert info["backbone"]["name"] == "test_resnet"
    path = export_module(module, info, fmt, tmp_path / f"bb{_suffix(fmt)}")
    run = load_exported(path, fmt)
    size = tuple(info["backbone"]["input_size"][1:])
    for batch, steps in ((1, 1), (2, 3)):
        images, lengths = _inputs(batch, steps, seed=batch, frame=(3, *size))
        with torch.no_grad():
            want = module(images, lengths)
            # the same as the features path: backbone, float16 storage, then the feature model
            feats = encoder(images.flatten(0, 1)).half().float().view(batch, steps, -1)
            torch.testing.assert_close(module.model(feats, lengths), want, atol=1e-6, rtol=0)
        (got,) = run(images, lengths)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_refusals(tmp_path):
    mean = _save_checkpoint(tmp_path / "mean.ckpt", pooling="mean")
    with pytest.raises(ExportError, match="without --step"):
        build_models(mean, step=True)
    with pytest.raises(ExportError, match="does not record the backbone"):
        build_models(mean, with_backbone=True)
    with pytest.raises(ValueError, match=r"\.pt2"):
        module, info = build_models(mean)
        export_module(module, info, "exported", tmp_path / "model.bin")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of an EleAtt classifier"):
        build_models(tmp_path / "foreign.ckpt")


def test_cli(tmp_path, capsys):
    ckpt = _save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "m.ts"
    assert cli_main(["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "check: max |exported - eager|" in printed
    worst = float(printed.split("= ")[-1].split()[0])
    assert worst < 1e-4
    assert cli_main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert cli_main(["export", "--ckpt", str(ckpt), "--step", "--format", "torchscript", "--out", str(out),
                     "--weights", "none"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# --with-backbone: the features go through float16 as extraction stores them, as classify does. Checked where the
# rounding moves the output: standard normalisation with a std 3 % of the features' spread over frames, so
# float16's rounding of these small features (~0.02, rounded by up to ~3e-5) shifts the stack's inputs visibly.
# ---------------------------------------------------------------------------------------------------------------
T_HALF = 5


@pytest.fixture(scope="module")
def half_store_ckpt(tmp_path_factory):
    """(checkpoint, uint8 frames (T, 40, 40, 3), normalised images (T, 3, h, w), float32 features (T, D), mean,
    std). The features and the statistics are computed here with the backbone alone."""
    import numpy as np

    from pipeline.data.transforms import eval_views
    from pipeline.nn.backbone import FrameEncoder

    encoder = FrameEncoder("test_resnet", weights="none")
    frames = np.random.default_rng(0).integers(0, 256, (T_HALF, 40, 40, 3), dtype=np.uint8)
    images = eval_views(frames, encoder.data_config, "center")[0]  # (T, 3, h, w): the centre view
    with torch.no_grad():
        feats = encoder(images).float()  # (T, D) float32, before storage
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-4) * 0.03
    settings = {"backbone": "test_resnet", "weights": "none", "data_config": encoder.data_config,
                "sampling": {"mode": "all", "fps": None, "num_segments": None}, "views": "center",
                "dtype": "float16", "precision": "32", "modality": "rgb"}
    torch.manual_seed(1)
    model = EleAttClassifier(input_size=encoder.num_features, num_classes=C, cell="lstm", hidden_size=H,
                             num_layers=2, attention_layers=1, class_names=[f"c{i}" for i in range(C)],
                             extraction_settings=settings)
    with torch.no_grad():
        model.net.head.weight.mul_(10)  # sharper probabilities: input changes show in them
    path = tmp_path_factory.mktemp("half") / "m.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(),
                "datamodule_hyper_parameters": {"normalize": "standard", "num_steps": 0},
                "FeatureDataModule": {"normalizer": {"mode": "standard", "mean": mean, "std": std}}}, path)
    return path, frames, images, feats, mean, std


def _stack_probs(ckpt, feats, mean, std):
    """Probabilities (T, C) after each step of the checkpoint's own stack (SequenceClassifier.stream) on features
    (T, D), standardised by hand."""
    net = load_classifier(ckpt).net.eval()
    with torch.no_grad():
        logits, _ = net.stream(((feats - mean) / std)[None])  # (1, T, C)
    return logits[0].float().softmax(-1)


def test_backbone_exports_round_features_through_float16_as_classify(tmp_path, half_store_ckpt):
    import numpy as np

    from pipeline.serving.classify import VideoClassifier

    ckpt, frames, images, feats, mean, std = half_store_ckpt
    want = _stack_probs(ckpt, feats.half().float(), mean, std)  # (T, C): float16 storage, then the stack
    unrounded = _stack_probs(ckpt, feats, mean, std)
    # here the round trip changes the output after every step by far more than the tolerances below
    assert (want - unrounded).abs().amax(-1).min() > 2e-3

    video = VideoClassifier(ckpt, device="cpu")  # what classify computes from these frames
    for t in (1, 3, T_HALF):
        np.testing.assert_allclose(video.scores(video.encode(frames[:t])), want[t - 1].numpy(), atol=1e-5, rtol=0)

    seq, seq_info = build_models(ckpt, with_backbone=True)
    step, step_info = build_models(ckpt, with_backbone=True, step=True)
    seq_run = load_exported(export_module(seq, seq_info, "torchscript", tmp_path / "seq.ts"), "torchscript")
    step_run = load_exported(export_module(step, step_info, "torchscript", tmp_path / "step.ts"), "torchscript")
    # whole sequence: two videos in a batch, all 5 frames and the first 3 (padded)
    batch = images[None].repeat(2, 1, 1, 1, 1)
    lengths = torch.tensor([T_HALF, 3])
    for run in (seq, seq_run):
        with torch.no_grad():
            (got,) = run(batch, lengths) if run is seq_run else (run(batch, lengths),)
        torch.testing.assert_close(got, want[[T_HALF - 1, 2]], atol=1e-5, rtol=0)
    # one step at a time from a zero state: the probabilities after every frame
    for run in (step, step_run):
        h = c = torch.zeros(step_info["num_layers"], 1, H)
        for t in range(T_HALF):
            with torch.no_grad():
                probs, h, c = run(images[t:t + 1], h, c)
            torch.testing.assert_close(probs[0], want[t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell,pooling", [("lstm", "mean"), ("gru", "last")])
def test_padded_steps_never_reach_the_prediction(tmp_path, cell, pooling):
    """A batch of sequences of different lengths, padded with large values: each row's probabilities are those of
    its own unpadded sequence alone (the other tests' random lengths all came out full)."""
    ckpt = _save_checkpoint(tmp_path / "m.ckpt", cell=cell, pooling=pooling, attention_layers=1)
    module, _ = build_models(ckpt)
    classifier = load_classifier(ckpt).eval()
    normalizer = FeatureNormalizer("standard")
    normalizer.load_state_dict(torch.load(ckpt, weights_only=True)["FeatureDataModule"]["normalizer"])
    feats, _ = _inputs(3, 6, seed=3)
    lengths = torch.tensor([6, 2, 4])
    for b, n in enumerate(lengths.tolist()):
        feats[b, n:] = 50.0  # padding that would move any output it reached
    with torch.no_grad():
        got = module(feats, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = classifier.video_probs(normalizer(feats[b:b + 1, :n]), torch.tensor([n]))  # (1, C)
            torch.testing.assert_close(got[b:b + 1], alone, atol=1e-5, rtol=0)
        # and the padding would show if it were read: the same rows taken at full length differ
        assert (module(feats, torch.full((3,), 6))[1:] - got[1:]).abs().max() > 1e-3
