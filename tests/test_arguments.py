"""Every command's `--config FILE` and `--print_config` (pipeline/arguments.py): values from the file, flags after it
override it, `--print_config` prints the effective settings as YAML and runs nothing, unknown keys and bad files are
one line and exit 2; the argparse behaviour of the flags (names, defaults, types, messages, groups) is kept."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as eleatt

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> int:
    """`eleatt ...` in process; --help, --print_config and usage errors end in SystemExit in most commands."""
    try:
        return eleatt(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


# command, the config file, flags after --config, and literal values --print_config must show: from the file, from
# the flags (a flag overriding the file's value), and defaults (neither in the file nor on the command line).
CASES = {
    "prepare": (
        ["prepare", "ucf101"],
        "splits_dir: lists/ucfTrainTestlist\nsplit: 2\nval_fraction: 0.2\nseed: 3\ndrop_missing: true\next: ''\n",
        ["--out", "lists/split2", "--seed", "5"],
        {"splits_dir": "lists/ucfTrainTestlist", "split": 2, "val_fraction": 0.2, "seed": 5, "drop_missing": True,
         "ext": "", "out": "lists/split2", "check_root": None},
    ),
    "prepare synthetic": (
        ["prepare", "synthetic"],
        "classes: [grow, shrink]\nframes: 12\nsize: 32\n",
        ["--out", "synth", "--size", "48"],
        {"classes": ["grow", "shrink"], "frames": 12, "size": 48, "out": "synth", "videos_per_class": 6, "fps": 12},
    ),
    "extract": (
        ["extract"],
        "backbone: resnet50\nweights: none\nnum_segments: 8\nbatch_size: 16\ndevices: 2\nprecision: bf16\n"
        "no_progress: true\n",
        ["--list", "train.txt", "--root", "videos", "--out", "feats", "--batch-size", "32"],
        {"backbone": "resnet50", "weights": "none", "num_segments": 8, "fps": None, "batch_size": 32, "devices": "2",
         "precision": "bf16", "no_progress": True, "list": "train.txt", "modality": "rgb", "views": "center"},
    ),
    "flow": (
        ["flow"],
        "method: farneback\nworkers: 3\nshort_side: 128\nno_progress: true\njpg_prefix: flow_\n",
        ["--out", "flow", "--workers", "5"],
        {"method": "farneback", "workers": 5, "short_side": 128, "no_progress": True, "jpg_prefix": "flow_",
         "out": "flow", "bound": 20.0, "preset": "fast", "list": None},
    ),
    "classify": (
        ["classify"],
        "videos: [a.mp4, b.mp4]\nckpt: rgb.ckpt\nweights: [1, 2]\ntopk: 3\njson: true\n",
        ["--batch-size", "8", "--topk", "4"],
        {"videos": ["a.mp4", "b.mp4"], "ckpt": ["rgb.ckpt"], "weights": ["1", "2"], "topk": 4, "json": True,
         "batch_size": 8, "mode": "prob", "device": "auto"},
    ),
    "classify --stream": (
        ["classify", "--stream", "/dev/video0"],
        "ckpt: rgb.ckpt\nevery: 2.5\ninput_format: v4l2\nrealtime: true\n",
        ["--topk", "2"],
        {"stream": "/dev/video0", "ckpt": "rgb.ckpt", "every": 2.5, "input_format": "v4l2", "realtime": True,
         "topk": 2, "plot": None},
    ),
    "fuse": (
        ["fuse"],
        "scores: [rgb.npz, flow.npz]\nweights: [1, 2]\nmode: logit\nno_plot: true\n",
        ["--out", "fused2.npz"],
        {"scores": ["rgb.npz", "flow.npz"], "weights": [1.0, 2.0], "mode": "logit", "no_plot": True,
         "out": "fused2.npz", "search_weights": None},
    ),
    "export": (
        ["export"],
        "ckpt: run/best.ckpt\nformat: torchscript\nstep: true\nout: model.ts\n",
        ["--out", "other.ts"],
        {"ckpt": "run/best.ckpt", "format": "torchscript", "step": True, "out": "other.ts", "with_backbone": False},
    ),
    "visualize": (
        ["visualize"],
        "ckpt: run/best.ckpt\nfeatures: a.npy\nlayer: 2\n",
        ["--video", "a.mp4"],  # the command line's choice of the exclusive pair replaces the file's
        {"ckpt": "run/best.ckpt", "features": None, "video": "a.mp4", "layer": 2, "device": "cpu"},
    ),
    "demo": (
        ["demo"],
        "quick: true\nepochs: 2\nseed: 1\nout: runs/a\n",
        ["--seed", "4"],
        {"quick": True, "epochs": 2, "seed": 4, "out": "runs/a", "weights": "none", "stack": None},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_values_flags_override_and_print_config(name, tmp_path, capsys):
    command, text, flags, expected = CASES[name]
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert run([*command, "--config", str(config), *flags, "--print_config"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert {key: printed[key] for key in expected} == expected
    assert "config" not in printed and err == ""
    # what it prints is a config: read back, it gives the same settings
    again = tmp_path / "again.yaml"
    again.write_text(out)
    assert run([*command, "--config", str(again), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_key_is_one_line_naming_it(name, tmp_path, capsys):
    command, text, flags, _ = CASES[name]
    config = tmp_path / "c.yaml"
    config.write_text(text + "short_sid: 256\n")
    assert run([*command, "--config", str(config), *flags]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "unknown key 'short_sid'" in err and str(config) in err, err
    assert err.startswith(f"eleatt {command[0]}") and out == ""


@pytest.mark.parametrize("command", [["flow", "--out", "o"], ["prepare", "ntu", "--videos", "v", "--out", "o"],
                                     ["classify", "--stream", "x", "--ckpt", "c"], ["fuse", "--scores", "a.npz"]])
@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("method: [dis\n", "not valid YAML"),
    ("just words\n", "not a YAML mapping"),
    ("", "not a YAML mapping"),
])
def test_a_missing_or_broken_config_is_one_line(command, content, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    if content is not None:
        config.write_text(content)
    assert run([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err and f"--config {config}" in err, err


def test_bad_values_in_a_config_name_the_key_as_argparse_would_the_flag(tmp_path, capsys):
    for text, message in (("workers: many\n", "workers: invalid int value: 'many'"),
                          ("method: dys\n", "method: 'dys' not among choices"),
                          ("bound: [1, 2]\n", "bound: invalid float value: [1, 2]"),
                          ("workers: true\n", "workers: invalid int value: True"),  # not 1
                          ("no_progress: maybe\n", "no_progress")):
        (tmp_path / "c.yaml").write_text(text)
        assert run(["flow", "--out", "o", "--config", str(tmp_path / "c.yaml")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    (tmp_path / "c.yaml").write_text("val_fraction: 1.5\n")  # the command's own type function checks the file too
    assert run(["prepare", "ucf101", "--splits-dir", "s", "--out", "o", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "val_fraction: 1.5: a fraction in [0, 1) is needed" in capsys.readouterr().err


def test_flags_and_messages_stay_argparse(capsys):
    """Dashed flags, one-line argparse messages (exit 2), help texts as written (exit 0)."""
    cases = [(["flow", "--out", "o", "--workers", "x"], "eleatt flow: error: argument --workers: invalid int value: 'x'"),
             (["flow", "--out", "o", "--method", "x"],
              "eleatt flow: error: argument --method: invalid choice: 'x' (choose from 'dis', 'farneback', 'tvl1', 'raft')"),
             (["flow", "--out", "o", "--bogus"], "eleatt flow: error: unrecognized arguments: --bogus"),
             (["extract", "--list", "l", "--root", "r", "--out", "o", "--backbone", "b", "--fps", "5", "--num-segments",
               "3"], "eleatt extract: error: argument --num-segments: not allowed with argument --fps"),
             (["prepare", "ucf101", "--out", "x"], "eleatt prepare ucf101: error: the following arguments are required: "
                                                   "--splits-dir"),
             (["prepare"], "eleatt prepare: error: the following arguments are required: DATASET"),
             (["fuse"], "eleatt fuse: error: the following arguments are required: --scores"),
             (["visualize", "--ckpt", "c"], "eleatt visualize: error: one of the arguments --features --video is "
                                            "required")]
    for argv, line in cases:
        assert run(argv) == 2, argv
        assert capsys.readouterr().err == line + "\n"
    assert run(["flow", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # whatever the terminal's width
    assert text.startswith("usage: eleatt flow [-h] [--config CONFIG] [--list LIST]")  # argparse's usage line
    assert "--short-side SHORT_SIDE" in text and "(default 256; 0 keeps" in text and "--config CONFIG" in text
    assert "--print_config" in text and "type: int" not in text and "(default: " not in text
    assert run(["visualize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(--features FEATURES | --video VIDEO)" in text  # the required group, as declared


def test_parse_args_gives_argparse_namespaces(tmp_path):
    from preprocessing.flow import build_parser as flow_parser
    from preprocessing.prepare import build_parser as prepare_parser

    (tmp_path / "c.yaml").write_text("workers: 3\nshort_side: 128\n")
    args = flow_parser().parse_args(["--config", str(tmp_path / "c.yaml"), "--out", "o", "--short-side", "64"])
    assert type(args) is argparse.Namespace and (args.workers, args.short_side, args.out) == (3, 64, "o")
    assert not hasattr(args, "config")
    args = prepare_parser().parse_args(["folder", "--root", "r", "--out", "o", "--extensions", "mp4"])
    assert type(args) is argparse.Namespace and args.dataset == "folder"
    assert (args.root, args.out, args.extensions, args.test_fraction) == (Path("r"), Path("o"), ["mp4"], 0.2)


def test_exclusive_options_from_a_config(tmp_path, capsys):
    from pipeline.serving.visualize import build_parser

    config = tmp_path / "c.yaml"
    config.write_text("ckpt: c.ckpt\nvideo: a.mp4\n")
    args = build_parser().parse_args(["--config", str(config)])  # the required one of the group, from the file
    assert (args.video, args.features) == ("a.mp4", None)
    config.write_text("ckpt: c.ckpt\nvideo: a.mp4\nfeatures: a.npy\n")
    assert run(["visualize", "--config", str(config)]) == 2
    assert "argument --video: not allowed with argument --features" in capsys.readouterr().err
    config.write_text("num_segments: 8\n")
    assert run(["extract", "--list", "l", "--root", "r", "--out", "o", "--backbone", "b", "--config", str(config),
                "--fps", "5", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["fps"], printed["num_segments"]) == (5.0, None)


def test_a_config_runs_the_command(tmp_path, capsys):
    """Not only printed: the settings of the file reach the command (prepare folder, a real run)."""
    root = tmp_path / "videos"
    for cls in ("a", "b"):
        for i in range(4):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"{cls}{i}.mp4").write_bytes(b"")
            (root / cls / f"{cls}{i}.avi").write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text(f"root: {root}\ntest_fraction: 0.5\nval_fraction: 0.0\nextensions: .avi\n")
    assert run(["prepare", "folder", "--config", str(config), "--out", str(tmp_path / "lists")]) == 0
    capsys.readouterr()
    train = (tmp_path / "lists" / "train.txt").read_text().splitlines()
    test = (tmp_path / "lists" / "test.txt").read_text().splitlines()
    assert len(train) == len(test) == 4 and all(".avi " in line for line in train + test)


@pytest.mark.parametrize("name, command", [("extract_rgb_resnet50", ["extract", "--list", "l", "--root", "r"]),
                                           ("flow_dis", ["flow", "--list", "l", "--root", "r"])])
def test_shipped_command_configs(name, command, tmp_path, capsys):
    """configs/ holds settings of `extract` and `flow` too (tests/training/test_configs.py leaves them to this)."""
    path = REPO / "configs" / f"{name}.yaml"
    settings = yaml.safe_load(path.read_text())
    assert run([*command, "--config", str(path), "--out", str(tmp_path / "o"), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {key: printed[key] for key in settings} == settings
    assert not {"list", "root", "out"} & set(settings)  # data paths belong on the command line


def test_jsonargparse_is_imported_only_to_parse():
    code = ("import sys, pipeline.cli, pipeline.arguments, preprocessing.flow, pipeline.evaluation.fusion; "
            "print('jsonargparse' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"
