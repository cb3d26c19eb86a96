"""Shared fixtures: the embedded model and a tiny random model, loaded once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

from probes.models import load_model

DEVICE = os.environ.get("WORKBENCH_TEST_DEVICE", "cpu")  # set to "cuda" to run the suite on a GPU


@pytest.fixture(scope="session")
def device():
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def embedded():
    torch.manual_seed(0)
    return load_model("embedded", device=DEVICE)


@pytest.fixture(scope="session")
def tiny():
    return load_model("random:llama-tiny", device=DEVICE)
