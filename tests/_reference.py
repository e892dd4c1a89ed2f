"""Independent references shared by several test modules."""

from __future__ import annotations

import torch

from modeldiff._hooks import add_hook


def plain_logits(model, ids):
    """The model's own forward on token ids: TransformerLens returns logits, transformers an output."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def reference_greedy(model, prompt, direction, site, coefficient, positions, n):
    """Greedy decoding without any cache, re-running the full sequence with an explicit mask."""
    ids = list(prompt)
    p = len(prompt)
    for _ in range(n):
        length = len(ids)
        if positions == "all":
            sel = torch.ones(length, dtype=torch.bool)
        elif positions == "prompt":
            sel = torch.arange(length) < p
        elif positions == "generated":
            sel = torch.arange(length) >= p
        else:
            sel = torch.isin(torch.arange(length), torch.tensor(positions))

        def add(x, hook, sel=sel):
            return x + sel[None, :, None].to(x.dtype) * (coefficient * direction)

        h = add_hook(model, site, add)
        try:
            with torch.no_grad():
                logits = plain_logits(model, torch.tensor([ids]))
        finally:
            h.remove()
        ids.append(int(logits[0, -1].argmax()))
    return ids[p:]
