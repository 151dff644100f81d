"""Configs found by name outside the checkout (pipeline/arguments.py: `resolve_config`, `eleatt configs`): `--config
NAME`, `NAME.yaml` or `configs/NAME.yaml` find the packaged config when no such file is where the command runs, for
the commands' parsers and for the Lightning CLI alike; a file of that name there wins; an unknown name is one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.arguments import PACKAGED_CONFIGS, packaged_configs, resolve_config
from tests.test_arguments import run

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_configs_are_the_checkouts():
    assert sorted(packaged_configs()) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert "tiny" in packaged_configs() and "ucf101_rgb" in packaged_configs()


@pytest.mark.parametrize("value", ["flow_dis", "flow_dis.yaml", "configs/flow_dis.yaml"])
def test_a_command_finds_a_packaged_config_by_name(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no configs/ here
    assert resolve_config(value) == str(PACKAGED_CONFIGS / "flow_dis.yaml")
    assert run(["flow", "--config", value, "--out", "o", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["method"], printed["short_side"], printed["workers"], printed["backend"]) == ("dis", 256, 2, "pyav")


def test_a_file_where_the_command_runs_wins_and_unknown_names_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("flow_dis.yaml").write_text("workers: 7\n")
    assert resolve_config("flow_dis.yaml") == "flow_dis.yaml" and resolve_config("flow_dis") == str(
        PACKAGED_CONFIGS / "flow_dis.yaml")  # the bare name is not a file here: the packaged one
    assert run(["flow", "--config", "flow_dis.yaml", "--out", "o", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["workers"] == 7
    assert resolve_config("elsewhere/flow_dis.yaml") == "elsewhere/flow_dis.yaml"  # a path of the user's own
    assert run(["flow", "--config", "no_such_config", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config no_such_config: file not found" in err and "eleatt configs" in err


def test_fit_finds_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    from pipeline.training.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "tiny", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["hidden_size"] == 32 and printed["trainer"]["max_epochs"] == 20
    assert main(["fit", "--config=configs/tiny.yaml", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["num_steps"] == 8
    assert main(["fit", "--config", "tinny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config tinny: no such file, and no packaged config of that name" in err


def test_eleatt_configs_lists_and_prints(capsys):
    assert run(["configs"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("(", " "))}
    assert set(packaged_configs()) <= set(lines)
    assert "Tests and smoke runs: a tiny EleAtt-LSTM" in lines["tiny"]  # its first comment line
    assert run(["configs", "tiny"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "tiny.yaml").read_text()
    assert run(["configs", "configs/tiny.yaml"]) == 0 and capsys.readouterr().out.startswith("# Tests and smoke")
    assert run(["configs", "tinny"]) == 2
    assert "no packaged config named 'tinny'" in capsys.readouterr().err
