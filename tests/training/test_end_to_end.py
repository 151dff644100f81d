"""End-to-end training (pipeline.training.end_to_end + pipeline.training.clip_data) on generated videos with timm's test_resnet:
the loss goes down, frozen weights and BatchNorm statistics stay put while fine-tuned ones move, the CLI runs
`fit`/`test` on `data.video_root`, and under DDP (2 CPU processes, gloo) test scores each video once."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import folder_stack

from pipeline.training.clip_data import VideoDataModule
from pipeline.training.cli import is_end_to_end, main
from pipeline.training.end_to_end import VideoEleAttClassifier, load_video_classifier
from pipeline.evaluation.scores import accuracy_summary, read_scores

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["grow", "shrink", "move_right", "move_left"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from preprocessing.synthetic import make_dataset

    out = tmp_path_factory.mktemp("e2e")
    make_dataset(out, videos_per_class=4, num_frames=16, size=48, seed=0, classes=CLASSES)
    return out


def data_module(videos: Path, **kw) -> VideoDataModule:
    args = dict(train_list=str(videos / "train.txt"), val_list=str(videos / "val.txt"),
                test_list=str(videos / "test.txt"), backbone="test_resnet", frame_size=32, num_segments=4,
                batch_size=4, num_workers=0)
    return VideoDataModule(str(videos), **{**args, **kw})


def model(dm: VideoDataModule, **kw) -> VideoEleAttClassifier:
    args = dict(num_classes=dm.num_classes, backbone="test_resnet", weights="none", hidden_size=16, dropout=0.0,
                lr=0.01, backbone_lr=0.01, lr_patience=0, class_names=dm.class_names,
                extraction_settings=dm.extraction_settings)
    return VideoEleAttClassifier(**{**args, **kw})


class LossLog(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(videos, tmp_path, epochs=4, **kw):
    pl.seed_everything(0, verbose=False)
    dm = data_module(videos, val_list=None)
    net = model(dm, **kw)
    before = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}
    log = LossLog()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
                         default_root_dir=tmp_path)
    trainer.fit(net, dm)
    return net, before, log.losses


def changed(net, before, prefix: str) -> dict[str, bool]:
    after = net.encoder.state_dict()
    return {k: not torch.equal(after[k], before[k]) for k in before if k.startswith(prefix)}


def test_fine_tuning_lowers_the_loss_and_moves_every_backbone_tensor(videos, tmp_path):
    net, before, losses = fit(videos, tmp_path)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    moved = changed(net, before, "model.")
    assert all(moved[k] for k in moved if k.endswith(("weight", "running_mean"))), [k for k, v in moved.items() if not v]
    groups = net.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["stack", "backbone"]


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(videos, tmp_path):
    net, before, losses = fit(videos, tmp_path, epochs=2, freeze="all")
    assert not any(changed(net, before, "").values())  # weights, running_mean/var, num_batches_tracked
    assert [g["name"] for g in net.configure_optimizers().param_groups] == ["stack"]
    net.train()
    assert not any(m.training for m in net.encoder.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.net.training


def test_partial_freeze_and_partial_bn(videos, tmp_path):
    # freeze=1: the stem (conv1.*) and layer1 stay put; layer2 on train
    net, before, _ = fit(videos, tmp_path, epochs=1, freeze=1)
    moved = changed(net, before, "model.")
    assert not any(v for k, v in moved.items() if k.startswith(("model.conv1", "model.layer1")))
    assert any(v for k, v in moved.items() if k.startswith("model.layer2") and k.endswith("weight"))
    # partial BN: only the first BatchNorm keeps learning its statistics
    net, before, _ = fit(videos, tmp_path, epochs=1, partial_bn=True)
    stats = changed(net, before, "model.")
    bns = [k[: -len(".running_mean")] for k in stats if k.endswith("running_mean")]
    assert stats[f"{bns[0]}.running_mean"] and not any(stats[f"{b}.running_mean"] for b in bns[1:])
    assert not any(stats[f"{b}.weight"] for b in bns[1:])
    with pytest.raises(ValueError, match="freeze=9: test_resnet has a stem and 4 stages"):
        model(data_module(videos), freeze=9)


def test_activation_checkpointing_gives_the_same_gradients(videos):
    dm = data_module(videos)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    grads, reference = [], model(dm).state_dict()
    for ckpt in (False, True):
        net = model(dm, activation_checkpointing=ckpt, partial_bn=True)
        net.load_state_dict(reference)
        net.train()
        loss = torch.nn.functional.cross_entropy(net(batch["feats"], batch["lengths"]), batch["labels"])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.encoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_video_checkpoint_round_trip(videos, tmp_path):
    dm = data_module(videos)
    net = model(dm, freeze=0)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams)}, path)
    loaded = load_video_classifier(path)
    assert loaded.hparams.extraction_settings["backbone"] == "test_resnet"
    assert loaded.hparams.extraction_settings["sampling"]["num_segments"] == 4
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    net.eval()
    torch.testing.assert_close(loaded.video_probs(batch["feats"], batch["lengths"]),
                               net.video_probs(batch["feats"], batch["lengths"]))


def e2e_args(videos: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "ucf101_rgb_e2e.yaml"), "--data.video_root", str(videos),
            "--data.train_list", str(videos / "train.txt"), "--data.val_list", str(videos / "val.txt"),
            "--data.test_list", str(videos / "test.txt"), "--model.backbone", "test_resnet", "--model.weights", "none",
            "--model.hidden_size", "16", "--data.frame_size", "32", "--data.num_segments", "4",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
            *extra]


def printed(stage: str, out: str) -> dict[str, float]:
    line = re.search(rf"^{stage}: top1 .*$", out, re.M).group(0)
    return {k: float(v) for k, v in re.findall(r"(top\d|mca) ([\d.]+)", line)}


@pytest.fixture(scope="module")
def e2e_run(videos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e_runs")
    assert main(["fit", *e2e_args(videos, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
                                  "--run_name", "run")]) == 0
    return root / "run"


def test_cli_fit_and_test_on_videos(e2e_run, videos, capsys):
    assert is_end_to_end(["fit", "--config", str(REPO / "configs" / "ucf101_rgb_e2e.yaml")])
    assert not is_end_to_end(["fit", "--config", str(REPO / "configs" / "ucf101_rgb.yaml")])
    assert (e2e_run / "best.ckpt").is_file() and (e2e_run / "last.ckpt").is_file()
    ckpt = torch.load(e2e_run / "best.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["extraction_settings"]["options"]["end_to_end"] is True
    capsys.readouterr()
    assert main(["test", *e2e_args(videos, "--ckpt_path", str(e2e_run / "best.ckpt"))]) == 0
    out = capsys.readouterr().out
    scores = read_scores(e2e_run / "scores_test.npz")
    assert len(scores["videos"]) == 4 and list(scores["classes"]) == CLASSES
    assert printed("test", out) == pytest.approx(accuracy_summary(scores["scores"], scores["labels"]), abs=5e-5)


@pytest.mark.slow
def test_two_process_ddp_test_scores_each_video_once(e2e_run, videos, tmp_path):
    """`eleatt test` with DDP on 2 CPU processes (gloo) on an odd list: the scores file holds each video once, in
    list order, and equals a one-process run."""
    from pipeline.data.lists import ListEntry, read_list, write_list

    entries = read_list(videos / "test.txt") + read_list(videos / "val.txt")[:1]  # 5 videos: shares 3 + 2 (+1 pad)
    entries[0] = ListEntry(entries[0].path, (entries[0].label + 1) % 4)  # the padded repeat would change metrics
    odd = tmp_path / "odd.txt"
    write_list(odd, entries)
    (tmp_path / "classes.txt").write_text((videos / "classes.txt").read_text())
    runs = {}
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        (tmp_path / name).mkdir()
        ckpt = tmp_path / name / "best.ckpt"
        ckpt.write_bytes((e2e_run / "best.ckpt").read_bytes())
        args = e2e_args(videos, "--data.test_list", str(odd), "--data.eval_batch_size", "2", "--ckpt_path", str(ckpt))
        if extra:
            i = args.index("--trainer.devices")
            del args[i:i + 2]
        result = subprocess.run([sys.executable, "-m", "pipeline", "test", *args, *extra], cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_scores(tmp_path / name / "scores_test.npz")
        assert printed("test", result.stdout) == pytest.approx(
            accuracy_summary(runs[name]["scores"], runs[name]["labels"]), abs=5e-5)
    assert list(runs["ddp"]["videos"]) == [e.path for e in entries]
    np.testing.assert_array_equal(runs["ddp"]["labels"], runs["one"]["labels"])
    np.testing.assert_allclose(runs["ddp"]["scores"], runs["one"]["scores"], atol=1e-5)


def test_classify_on_an_end_to_end_checkpoint_agrees_with_test(e2e_run, videos, capsys):
    from pipeline.serving.classify import VideoClassifier

    if not (e2e_run / "scores_test.npz").is_file():
        assert main(["test", *e2e_args(videos, "--ckpt_path", str(e2e_run / "best.ckpt"))]) == 0
    scores = read_scores(e2e_run / "scores_test.npz")
    classifier = VideoClassifier(e2e_run / "best.ckpt", device="cpu")
    assert classifier.class_names == CLASSES
    for video, expected in zip(scores["videos"], scores["scores"]):
        pred = classifier(videos / str(video), topk=2)
        assert pred.ok, pred.error
        np.testing.assert_allclose(pred.scores, expected, atol=1e-5)


@pytest.mark.slow
def test_train_benchmark_quick(capsys):
    from pipeline.benchmarks import train

    assert train.main(["--quick", "--workers", "0"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("end to end", "features"))}
    assert set(rows) == {"end", "features"}
    for r in rows.values():
        assert float(r[-3]) > 0 and 0 <= float(r[-1].rstrip("%")) <= 100  # clips/s, data wait share


FLOW_FOLDER = """
import sys
import numpy as np
from pathlib import Path
from pipeline.data.flow_files import FlowFolder, quantize
from pipeline.data.lists import ListEntry, write_classes, write_list

root = Path(sys.argv[1])
folder = FlowFolder(root / "flows")
rng = np.random.default_rng(0)
lists = {"train": [], "test": []}
for label, direction in enumerate((1.0, -1.0)):
    for k in range(6):
        flow = rng.normal(0, 1, size=(10, 2, 24, 24)).astype(np.float32)
        flow[:, 1] += 3.0 * direction  # vertical motion carries the class (a mirror flips only x)
        video = f"c{label}/v{k}.avi"
        folder.write_quantized(video, quantize(flow, 20.0), 20.0)
        lists["train" if k < 4 else "test"].append(ListEntry(video, label))
for split, entries in lists.items():
    write_list(root / f"{split}.txt", entries)
write_classes(root / "classes.txt", ["down", "up"])
"""


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory) -> Path:
    """A generated flow folder: 2 classes told apart by the direction of vertical motion (+3 / -3 px, noisy),
    4 + 2 videos per class of 10 frame pairs at 24 px, with train/test lists and classes.txt.

    Written in a fresh process: once decord is loaded in a process (other tests use it), OpenCV's PNG encoder there
    fails ("libpng error: bad parameters to zlib") and the flow files come out damaged."""
    root = tmp_path_factory.mktemp("flow")
    subprocess.run([sys.executable, "-c", FLOW_FOLDER, str(root)], cwd=REPO, check=True, timeout=120)
    return root


def test_flow_stream_end_to_end(flow_folder, tmp_path):
    from pipeline.data.flow_files import FlowFolder
    from pipeline.data.transforms import eval_views

    pl.seed_everything(0, verbose=False)
    dm = VideoDataModule(str(flow_folder / "flows"), train_list=str(flow_folder / "train.txt"),
                         test_list=str(flow_folder / "test.txt"), modality="flow", flow_length=2,
                         backbone="test_resnet", frame_size=16, num_segments=3, batch_size=4, num_workers=0)
    assert dm.in_chans == 4 and dm.data_config["input_size"] == (4, 16, 16)
    assert dm.extraction_settings["modality"] == "flow" and dm.extraction_settings["stack"] == 2
    dm.setup("test")
    sample = dm.datasets["test"][0]  # 10 pairs, 3 segments: stacks start at pairs 1, 5, 8 (centres)
    stacks = folder_stack(FlowFolder(flow_folder / "flows"), "c0/v4.avi", [1, 5, 8], length=2)  # (3, 4, 24, 24) in [-1, 1]
    expected = eval_views(torch.from_numpy(stacks).permute(0, 2, 3, 1), dm.data_config, "center")
    torch.testing.assert_close(sample["feats"], expected)
    net = VideoEleAttClassifier(num_classes=2, backbone="test_resnet", weights="none", in_chans=dm.in_chans,
                                hidden_size=16, dropout=0.0, lr=0.01, backbone_lr=0.01, lr_patience=0,
                                class_names=dm.class_names, extraction_settings=dm.extraction_settings)
    log = LossLog()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
                         default_root_dir=tmp_path)
    trainer.fit(net, dm)
    assert np.mean(log.losses[-2:]) < np.mean(log.losses[:2]), log.losses
    trainer.test(net, dm, verbose=False)
    scores = read_scores(tmp_path / "scores_test.npz")
    assert len(scores["videos"]) == 4 and scores["scores"].shape == (4, 2)


@pytest.mark.slow
def test_two_process_ddp_fit_writes_one_run_folder(videos, tmp_path):
    """`eleatt fit` with DDP on 2 CPU processes and no --run_name: both ranks train in the one run folder that rank 0
    named (Lightning's child process inherits it), which holds best.ckpt, last.ckpt and metrics.csv."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "fit", *e2e_args(videos, "--trainer.max_epochs", "1",
                                                           "--trainer.default_root_dir", str(tmp_path)),
         "--trainer.strategy", "ddp", "--trainer.devices", "2"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    assert {"best.ckpt", "last.ckpt", "metrics.csv"} <= {p.name for p in runs[0].iterdir()}


def test_an_unreadable_video_is_counted_not_fatal(videos, tmp_path):
    from pipeline.data.lists import ListEntry, read_list, write_list

    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    entries = read_list(videos / "train.txt")[:3]
    write_list(tmp_path / "train.txt", [ListEntry(str((videos / e.path).resolve()), e.label) for e in entries]
               + [ListEntry(str(tmp_path / "broken.mp4"), 0)])
    (tmp_path / "classes.txt").write_text((videos / "classes.txt").read_text())
    pl.seed_everything(0, verbose=False)
    dm = VideoDataModule("/", train_list=str(tmp_path / "train.txt"), backbone="test_resnet", frame_size=32,
                         num_segments=2, batch_size=4, num_workers=0)
    net = model(dm)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"train: \d+ unreadable videos skipped"):
        trainer.fit(net, dm)
    assert trainer.callback_metrics["train/skipped_videos"] >= 1 and trainer.global_step == 1


# -- the two learning rates reach the optimizer -------------------------------------------------------------------
LR, BACKBONE_LR = 2e-3, 3e-4  # different, so that a group given the other one's rate shows


def _groups(net: VideoEleAttClassifier):
    configured = net.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    return optimizer, {g["name"]: g for g in optimizer.param_groups}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_backbone_and_stack_groups_step_with_their_own_learning_rates(optimizer, weight_decay):
    torch.manual_seed(0)
    net = VideoEleAttClassifier(num_classes=3, backbone="test_resnet", weights="none", hidden_size=8, dropout=0.0,
                                lr=LR, backbone_lr=BACKBONE_LR, optimizer=optimizer, lr_patience=2,
                                weight_decay=weight_decay)
    opt, groups = _groups(net)  # with a schedule (lr_patience > 0): the dict form
    assert [g["name"] for g in opt.param_groups] == ["stack", "backbone"]
    assert groups["stack"]["lr"] == 2e-3 and groups["backbone"]["lr"] == 3e-4
    assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    if optimizer == "sgd":
        assert groups["stack"]["momentum"] == 0.9 and groups["backbone"]["momentum"] == 0.9
    # every trainable parameter in exactly one group: the encoder's in "backbone", the rest in "stack"
    assert _ids(groups["backbone"]["params"]) == _ids(net.encoder.parameters())
    assert _ids(groups["stack"]["params"]) == _ids(net.net.parameters())
    assert len(groups["backbone"]["params"]) == 45 and len(groups["stack"]["params"]) == 9

    assert groups["stack"]["weight_decay"] == groups["backbone"]["weight_decay"] == weight_decay
    # One step: SGD's first step (momentum buffer = gradient + wd * p) moves p by -lr * (g + wd * p); AdamW's first
    # step decays p by lr * wd * p and moves it by -lr * g / (|g| + eps), i.e. by lr where the gradient is not tiny.
    # So the step size is the group's rate.
    opt, _ = _groups(net)
    net.train()
    clips = torch.randn(2, 2, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(net(clips, torch.tensor([2, 2])), torch.tensor([0, 2]))
    loss.backward()
    probes = {"backbone": net.encoder.model.conv1[0].weight, "stack": net.net.head.weight}  # the stem conv, the head
    before = {k: p.detach().clone() for k, p in probes.items()}
    opt.step()
    for name, rate in (("backbone", 3e-4), ("stack", 2e-3)):
        p, grad = probes[name], probes[name].grad
        delta = p.detach() - before[name]
        big = grad.abs() > 1e-4
        assert big.sum() > 10, name
        if optimizer == "sgd":
            expected = -rate * (grad + weight_decay * before[name])
            torch.testing.assert_close(delta, expected, rtol=1e-3, atol=5e-8)  # float32 rounding of p
        else:
            expected = -rate * weight_decay * before[name] - rate * grad.sign()
            torch.testing.assert_close(delta[big], expected[big], rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_parameters_are_in_no_group(optimizer):
    kw = dict(num_classes=3, backbone="test_resnet", weights="none", hidden_size=8, lr=LR, backbone_lr=BACKBONE_LR,
              optimizer=optimizer, lr_patience=0)
    # freeze=1: the stem (conv1, bn1) and layer1 are frozen; layer2-4 train at backbone_lr
    net = VideoEleAttClassifier(freeze=1, **kw)
    opt, groups = _groups(net)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("stack", 2e-3), ("backbone", 3e-4)]
    names = {id(p): n for n, p in net.named_parameters()}
    in_backbone = sorted(names[id(p)] for p in groups["backbone"]["params"])
    assert len(in_backbone) == 30  # layer2: 9, layer3: 12, layer4: 9 tensors
    assert all(n.startswith(("encoder.model.layer2.", "encoder.model.layer3.", "encoder.model.layer4."))
               for n in in_backbone)
    grouped = _ids(p for g in opt.param_groups for p in g["params"])
    frozen = [n for n, p in net.named_parameters() if n.startswith(("encoder.model.conv1", "encoder.model.bn1",
                                                                     "encoder.model.layer1"))]
    assert len(frozen) == 15 and not any(id(dict(net.named_parameters())[n]) in grouped for n in frozen)
    # partial BN on top: the BatchNorms after the first leave the backbone group too (layer2-4 keep 10 conv weights)
    net = VideoEleAttClassifier(freeze=1, partial_bn=True, **kw)
    _, groups = _groups(net)
    assert len(groups["backbone"]["params"]) == 10 and all(p.dim() == 4 for p in groups["backbone"]["params"])
    # freeze=all: one group, the stack's, at lr; no backbone parameter anywhere
    net = VideoEleAttClassifier(freeze="all", **kw)
    opt, _ = _groups(net)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("stack", 2e-3)]
    assert _ids(opt.param_groups[0]["params"]) == _ids(net.net.parameters())


def test_cli_fit_gives_the_optimizer_both_learning_rates(e2e_run):
    # configs/ucf101_rgb_e2e.yaml: sgd, lr 0.01 (stack, head), backbone_lr 0.001, partial BN; 2 epochs (no decay yet)
    ckpt = torch.load(e2e_run / "last.ckpt", weights_only=True, map_location="cpu")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["lr"], g["momentum"]) for g in groups] == [("stack", 0.01, 0.9), ("backbone", 0.001, 0.9)]
    # test_resnet with partial BN: 17 trainable backbone tensors (the first BatchNorm's 2 and 15 conv weights)
    assert len(groups[1]["params"]) == 17 and len(groups[0]["params"]) == 9
