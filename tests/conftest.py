"""Shared test set-up: the repository root on sys.path (``import core``), fixture paths, determinism."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.use_deterministic_algorithms(True, warn_only=True)


def fixture_path(group: str, name: str) -> str:
    return os.path.join(FIXTURES, group, name)


def load_json(group: str, name: str) -> dict:
    with open(fixture_path(group, name)) as f:
        return json.load(f)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 1e-5, what: str = "") -> None:
    """|actual - expected| <= atol + rtol |expected|, the fixtures' criterion, with a readable failure."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = ((actual - expected).abs() - (atol + rtol * expected.abs())).max().item()
    assert excess <= 0, f"{what}: max |diff| {(actual - expected).abs().max().item():.3g} exceeds atol {atol:g} + rtol {rtol:g}|ref|"
