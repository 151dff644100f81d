"""Every config in configs/ parses with the CLI and carries the paper's recipe; one fast_dev_run per cell kind."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.training.cli import EleAttCLI, main, quiet_lightning
from pipeline.nn.eleatt import EleAttGRU, EleAttLSTM, EleAttRNN

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPECTED = {
    # name: (dataset folder under data/, cell, num_layers, hidden_size, batch_size)
    "tiny": ("tiny", "lstm", 1, 32, 16),
    "features_lstm": ("", "lstm", 1, 512, 32),
    "ucf101_rgb": ("ucf101", "lstm", 1, 512, 32),
    "hmdb51_rgb": ("hmdb51", "lstm", 1, 512, 32),
    "ucf101_flow": ("ucf101", "lstm", 1, 512, 32),
    "hmdb51_flow": ("hmdb51", "lstm", 1, 512, 32),
    "jhmdb_rgb": ("jhmdb", "lstm", 1, 512, 32),  # the paper: 1 layer of 512, batch 32
    "ntu60_rgb_cs": ("ntu60", "lstm", 3, 512, 256),  # the paper: 3 layers of 512, batch 256
    "ntu60_rgb_cv": ("ntu60", "lstm", 3, 512, 256),
    "kinetics400_rgb": ("kinetics400", "lstm", 3, 512, 256),
    # skeletons: the paper's 3 x 100 EleAtt-GRU (and the plain GRU, _gru), batch 256, lr 5e-3
    **{f"ntu60_skeleton_{p}{a}{g}": ("ntu60", "gru", 3, 100, 256)
       for p in ("cs", "cv") for a in ("", "_aug") for g in ("", "_gru")},
    # the derived skeleton streams (bone, joint/bone motion) and NTU 120: the same recipe on other feature folders
    **{f"ntu60_skeleton_{p}_{s}": ("ntu60", "gru", 3, 100, 256)
       for p in ("cs", "cv") for s in ("bone", "joint_motion", "bone_motion")},
    **{f"ntu120_skeleton_{p}{s}": ("ntu120", "gru", 3, 100, 256)
       for p in ("cs", "cset") for s in ("", "_bone", "_joint_motion", "_bone_motion")},
}


# Settings of other commands (`eleatt extract|flow --config`), not of `fit`: tests/test_arguments.py parses them.
COMMAND_CONFIGS = {"extract_rgb_resnet50": "extract", "flow_dis": "flow"}


def test_every_config_is_covered():
    """A config nobody states expectations for is untested: add it to EXPECTED or E2E (and remove gone ones)."""
    found = {p.stem for p in CONFIGS.glob("*.yaml")}
    expected = set(EXPECTED) | set(E2E) | set(COMMAND_CONFIGS)
    assert not found - expected, f"configs without expectations in EXPECTED/E2E: {sorted(found - expected)}"
    assert not expected - found, f"EXPECTED/E2E names missing configs: {sorted(expected - found)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_the_papers_recipe(name, capsys, tmp_path):
    dataset, cell, layers, hidden, batch = EXPECTED[name]
    text = (CONFIGS / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    for key in ("train_list", "val_list", "test_list", "features_dir"):
        assert raw["data"][key].startswith(f"data/{dataset}/" if dataset else "data/"), (name, key)
    assert main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--data.features_dir", str(tmp_path),
                 "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["features_dir"] == str(tmp_path)  # the override wins
    model, data = config["model"], config["data"]
    assert (model["cell"], model["num_layers"], model["hidden_size"], data["batch_size"]) == (cell, layers, hidden, batch)
    assert config["trainer"]["gradient_clip_val"] == 1.0
    assert config["optimizer"]["class_path"] == "torch.optim.Adam"
    scheduler = config["lr_scheduler"]
    assert scheduler["class_path"].endswith("ReduceLROnPlateau")
    assert (scheduler["init_args"]["factor"], scheduler["init_args"]["monitor"], scheduler["init_args"]["mode"]) == (
        0.1, "val/top1", "max")
    assert model["monitor"] == "val/top1"
    if name != "tiny":  # tiny trades the recipe for seconds-long test runs
        lr = 5e-3 if "_skeleton_" in name else 1e-3  # the paper's rates: 5e-3 on skeletons, 1e-3 on RGB features
        assert config["optimizer"]["init_args"]["lr"] == lr and model["dropout"] == 0.5
    if "_skeleton_" in name:  # the gate is what `_gru` takes away; `_aug` adds the +-35 degree rotation
        assert model["attention_layers"] == (0 if name.endswith("_gru") else None)
        assert (data["augment"], data["rotation_degrees"]) == (
            "skeleton_rotation" if "_aug" in name else "none", 35.0)
        assert (data["num_steps"], data["normalize"]) == (100, "none")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if "_skeleton_" in n and not n.endswith(("_aug", "_gru"))))
def test_skeleton_stream_configs_are_the_joint_recipe_on_their_stream_folder(name):
    """The skeleton streams differ only in their feature folder and lists, so their scores fuse like for like."""
    bench, _, protocol, *stream = name.split("_")
    stream = "_".join(stream)
    joint = yaml.safe_load((CONFIGS / "ntu60_skeleton_cs.yaml").read_text())
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    folder = f"features_{stream}" if stream else "features"
    assert config["data"].pop("features_dir") == f"data/{bench}/skeleton/{folder}"
    for key in ("train", "val", "test"):
        assert config["data"].pop(f"{key}_list") == f"data/{bench}/skeleton/lists/{protocol}/{key}.txt"
        joint["data"].pop(f"{key}_list")
    joint["data"].pop("features_dir")
    assert config == joint


@pytest.mark.parametrize("dataset", ["ucf101", "hmdb51"])
def test_flow_config_is_the_rgb_recipe_on_flow_features(dataset):
    """The two streams differ only in their feature folder, so their scores fuse like for like."""
    rgb = yaml.safe_load((CONFIGS / f"{dataset}_rgb.yaml").read_text())
    flow = yaml.safe_load((CONFIGS / f"{dataset}_flow.yaml").read_text())
    assert (rgb["data"].pop("features_dir"), flow["data"].pop("features_dir")) == (
        f"data/{dataset}/features/rgb", f"data/{dataset}/features/flow")
    assert flow == rgb


@pytest.mark.parametrize("cell, kind", [("lstm", EleAttLSTM), ("gru", EleAttGRU), ("rnn", EleAttRNN)])
def test_fast_dev_run_per_cell_kind(cell, kind, order_features, tmp_path):
    lists = order_features["lists"]
    with quiet_lightning():
        cli = EleAttCLI(args=[
            "fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.features_dir", str(order_features["features"]),
            "--data.train_list", str(lists / "train.txt"), "--data.val_list", str(lists / "val.txt"),
            "--model.cell", cell, "--model.num_layers", "2", "--trainer.fast_dev_run", "true",
            "--trainer.default_root_dir", str(tmp_path), "--run_name", "dev",
        ])
    assert isinstance(cli.model.net.rnn, kind) and cli.model.net.rnn.num_layers == 2
    assert (cli.model.hparams.input_size, cli.model.hparams.num_classes) == (8, 4)  # linked from the data
    assert cli.trainer.global_step == 1  # one optimiser step ran
    assert not list(tmp_path.rglob("*.ckpt"))  # fast_dev_run writes no checkpoint


# end to end (TSN-style ResNet-50, 8 segments): name -> (modality, in_chans of the backbone)
E2E = {"ucf101_rgb_e2e": ("rgb", 3), "ucf101_flow_e2e": ("flow", 10)}


@pytest.mark.parametrize("name", sorted(E2E))
def test_end_to_end_config_parses_with_the_tsn_recipe(name, capsys, tmp_path):
    modality, _ = E2E[name]
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for key in ("train_list", "val_list", "test_list", "video_root"):
        assert raw["data"][key].startswith("data/ucf101/"), (name, key)
    assert main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--data.video_root", str(tmp_path),
                 "--model.backbone", "resnet18", "--model.weights", "none", "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    assert data["video_root"] == str(tmp_path) and model["weights"] == "none"  # the overrides win
    assert model["backbone"] == "resnet18" and "backbone" not in data  # linked: the data follows the model
    assert (data["modality"], data["num_segments"], model["partial_bn"], model["freeze"]) == (modality, 8, True, "none")
    assert raw["model"]["backbone"] == "resnet50" and raw["data"]["num_segments"] == 8
    assert (model["cell"], model["hidden_size"], model["dropout"], model["monitor"]) == ("lstm", 512, 0.5, "val/top1")
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config.get("optimizer") is None  # the model sets two groups
    if modality == "flow":
        assert data["flow_length"] == 5
