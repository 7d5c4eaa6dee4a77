import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from saekit.scripts import cli


@dataclass
class ToyConfig:
    """A toy verb."""

    out: str
    """Where to write the result."""
    steps: int = 10
    """How many steps to take."""
    arch: Literal["a", "b"] = "a"
    """Which architecture."""
    at: list[int] = field(default_factory=lambda: [1, 2])
    """Steps at which something happens."""
    fast: bool = True
    """Go fast."""
    lr: float | None = None
    """Learning rate; None picks one."""


def run_toy(cfg: ToyConfig) -> None:
    with open(cfg.out, "w") as f:
        json.dump(cfg.__dict__, f)


@pytest.fixture
def toy(monkeypatch):
    """The CLI machinery tested on a toy verb, without loading any model."""
    monkeypatch.setitem(cli.COMMANDS, "toy", ("a toy", ToyConfig, run_toy))


def test_flags_defaults_and_help_come_from_the_dataclass(toy, tmp_path, capsys):
    out = tmp_path / "o.json"
    cli.main(["toy", "--out", str(out), "--steps", "3", "--at", "5", "7", "--no-fast"])
    assert json.loads(out.read_text()) == {
        "out": str(out),
        "steps": 3,
        "arch": "a",
        "at": [5, 7],
        "fast": False,
        "lr": None,
    }
    with pytest.raises(SystemExit):
        cli.main(["toy", "--help"])
    text = capsys.readouterr().out
    assert "How many steps to take. (default: 10)" in " ".join(text.split())
    assert "{a,b}" in text


def test_config_file_supplies_fields_and_flags_win(toy, tmp_path):
    out = tmp_path / "o.json"
    conf = tmp_path / "c.yaml"
    conf.write_text(f"out: {out}\nsteps: 42\narch: b\nlr: 0.5\n")
    cli.main(["toy", "--config", str(conf), "--steps", "7"])
    got = json.loads(out.read_text())
    assert (got["steps"], got["arch"], got["lr"]) == (7, "b", 0.5)


def test_unknown_config_field_is_one_line_and_exit_2(toy, tmp_path, capsys):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"out": "x", "stepz": 3}))
    with pytest.raises(SystemExit) as e:
        cli.main(["toy", "--config", str(conf)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stepz" in err[0]


def test_saekit_help_lists_working_verbs():
    r = subprocess.run([sys.executable, "-m", "saekit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for verb in cli.COMMANDS:
        assert verb in r.stdout
