"""docs/adapters.md's complete custom adapter runs as written, in under 50 lines."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_adapter_example_runs_and_steers():
    from modeldiff.adapters import registered_adapters, unregister_adapter

    *_, adapter_code, usage = _blocks()
    start = adapter_code.index("@register_adapter")
    assert len(adapter_code[start:].strip().splitlines()) < 50  # the promise on the page
    scope: dict = {}
    try:
        exec(compile(adapter_code + usage, str(DOC), "exec"), scope)
        assert registered_adapters()[0] == "toy"
        acts = scope["acts"]
        [site] = acts
        assert acts[site][0].shape == (len(scope["tok"]("hello world")["input_ids"]), 16)
        assert scope["steered"] != scope["plain"]
        # the model is back to its plain self: no hook left on any block
        assert all(not b._forward_hooks for b in scope["toy"].blocks)
        with torch.no_grad():
            ids = torch.tensor([[5, 6, 7]])
            x = scope["toy"].embed(ids)
            for block in scope["toy"].blocks:
                x = x + block(x)
            ref = x
        torch.testing.assert_close(
            scope["collect"](scope["toy"], [[5, 6, 7]], site, progress=False)[site][0], ref[0]
        )
    finally:
        if "ToyAdapter" in scope:
            unregister_adapter(scope["ToyAdapter"])
