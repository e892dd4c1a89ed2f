"""Shared test set-up: offline always, small deterministic models."""

from __future__ import annotations

import os

# A hub lookup otherwise hangs ~25 s before failing; no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    small forwards run many times faster at one thread than at two on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    from modeldiff.testing import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_ht(tokenizer):
    """A 2-layer random HookedTransformer (d_model 64). Treat as read-only."""
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer)


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct GGUF. Missing file = a broken set-up, so this fails rather than skips."""
    from modeldiff.testing import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct through modeldiff.load_model (TransformerBridge). Treat as read-only."""
    from modeldiff.models import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """SmolLM2-135M-Instruct as transformers de-quantizes it (float32, eager attention): the
    independent reference. Each GGUF load takes ~20-40 s, so the session shares one; treat it as
    read-only (copy.deepcopy it to change it, about a second)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent,
        gguf_file=smollm2_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
