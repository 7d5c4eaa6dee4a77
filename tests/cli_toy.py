"""A toy verb for tests/test_cli.py: the CLI machinery is tested without loading any model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal


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


def run(cfg: ToyConfig) -> None:
    with open(cfg.out, "w") as f:
        json.dump(cfg.__dict__, f)
