"""Checkpoints of a running diff, so a killed run resumes to exactly the uninterrupted result.

A checkpoint is one safetensors file: the running statistics of both models (their tagged state
dicts, prefixed ``base.`` and ``finetuned.``), the index of the next batch to run and the outlier
count, plus a JSON *run fingerprint* in the file's metadata (prompts, positions and batch plan,
site, SAE and model fingerprints, options). Resuming with a run whose fingerprint differs is
refused with a message naming each difference. Files are written atomically
(:func:`modeldiff._io.atomic_path`): a kill during a write leaves the previous checkpoint intact.

:func:`~modeldiff.diff_latents` uses this module through ``checkpoint=`` and ``checkpoint_every=``
(see docs/scale.md); the helpers here are public for other long runs.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from modeldiff.stats import SiteStats
    >>> path = Path(tempfile.mkdtemp()) / "run.ckpt"
    >>> fp = {"site": "blocks.0.hook_resid_post", "n_batches": 4}
    >>> save_checkpoint(path, fp, {"base": SiteStats(3, 2)}, {"next_batch": 2})
    >>> stats, counters = load_checkpoint(path, fp)
    >>> counters["next_batch"], type(stats["base"]).__name__
    (2, 'SiteStats')
    >>> load_checkpoint(path, {**fp, "site": "blocks.1.hook_resid_post"})
    Traceback (most recent call last):
    ...
    modeldiff.errors.ArgumentError: ...site (checkpoint: 'blocks.0.hook_resid_post', this run: 'blocks.1.hook_resid_post')...
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._io import atomic_path
from .errors import ArgumentError, FileFormatError, damaged_file
from .stats import stat_from_state_dict

__all__ = [
    "fingerprint_differences",
    "hash_selection",
    "load_checkpoint",
    "model_fingerprint",
    "save_checkpoint",
]

FORMAT = "modeldiff.checkpoint/1"
_META_KEY = "modeldiff.checkpoint"
_COUNTER = "counter."


def model_fingerprint(model: Any, n_values: int = 64) -> str:
    """A short hash of a model's parameters: each one's name, shape, dtype and ``n_values`` evenly
    spaced values (as float32), so two models that differ anywhere but in untouched weights differ.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> a, b = tiny_hooked_transformer(), tiny_hooked_transformer(seed=1)
        >>> model_fingerprint(a) == model_fingerprint(tiny_hooked_transformer()), model_fingerprint(a) == model_fingerprint(b)
        (True, False)
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(n_values, flat.numel()))
            sample = flat[idx.round().long().to(flat.device)].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hash_selection(ids: Iterable[Sequence[int]], selections: Iterable[Sequence[int]]) -> str:
    """A hash of every prompt's token ids and its selected positions (order included).

    Example:
        >>> hash_selection([[1, 2]], [[1]]) == hash_selection([[1, 2]], [[0]])
        False
    """
    h = hashlib.sha256()
    for tok, sel in zip(ids, selections, strict=True):
        h.update(json.dumps([list(tok), list(sel)]).encode())
    return h.hexdigest()[:16]


def fingerprint_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, label: str = "checkpoint"
) -> list[str]:
    """One line per entry in which two run fingerprints differ (empty when they match); ``label``
    names the saved side.

    Example:
        >>> fingerprint_differences({"a": 1, "b": 2}, {"a": 1, "b": 3})
        ['b (checkpoint: 2, this run: 3)']
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key} ({label}: {a!r}, this run: {b!r})")
    return out


def save_checkpoint(
    path: str | Path,
    fingerprint: Mapping[str, Any],
    stats: Mapping[str, Any],
    counters: Mapping[str, int],
) -> None:
    """Write ``stats`` (named statistics with ``state_dict()``), integer ``counters`` and the run
    ``fingerprint`` (JSON-ready) to ``path`` atomically, as safetensors.

    Example:
        >>> import tempfile
        >>> from modeldiff.stats import SiteStats
        >>> path = Path(tempfile.mkdtemp()) / "run.ckpt"
        >>> stats = {"base": SiteStats(3, 2), "finetuned": SiteStats(3, 2)}
        >>> save_checkpoint(path, {"n_batches": 4}, stats, {"next_batch": 2, "outliers": 0})
        >>> path.exists()
        True
    """
    tensors: dict[str, Tensor] = {}
    for name, st in stats.items():
        if "." in name:
            raise ArgumentError(f"statistic names may not contain '.', got {name!r}")
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in st.state_dict().items()})
    for name, value in counters.items():
        tensors[f"{_COUNTER}{name}"] = torch.tensor(int(value), dtype=torch.int64)
    meta = {
        "format": FORMAT,
        "fingerprint": dict(fingerprint),
        "stats": sorted(stats),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, allow_nan=False)})


def load_checkpoint(
    path: str | Path, fingerprint: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a checkpoint written by :func:`save_checkpoint` for the run ``fingerprint``.

    Returns ``(statistics by name, counters)``.

    Example:
        >>> import tempfile
        >>> from modeldiff.stats import SiteStats
        >>> path = Path(tempfile.mkdtemp()) / "run.ckpt"
        >>> save_checkpoint(path, {"n_batches": 4}, {"base": SiteStats(3, 2)}, {"next_batch": 2})
        >>> stats, counters = load_checkpoint(path, {"n_batches": 4})
        >>> sorted(stats), counters
        (['base'], {'next_batch': 2})
        >>> try:
        ...     load_checkpoint(path, {"n_batches": 5})
        ... except ArgumentError as err:
        ...     print(str(err).split(": ", 1)[1].split(". ")[0])
        n_batches (checkpoint: 4, this run: 5)

    Raises:
        ArgumentError: the checkpoint belongs to another run (the message lists what differs).
        FileFormatError: the file is not a modeldiff checkpoint, or is damaged.
    """
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged_file(path, "a modeldiff checkpoint", err) from err
    if raw is None:
        raise FileFormatError(
            f"{str(path)!r} is a safetensors file but not a modeldiff checkpoint (no "
            f"{_META_KEY!r} metadata); pass a checkpoint path diff_latents wrote, or a new path"
        )
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise FileFormatError(
            f"{str(path)!r} is a checkpoint of format {meta.get('format')!r}; this version reads "
            f"{FORMAT!r}. Delete it (the run starts over) or use the version that wrote it."
        )
    diffs = fingerprint_differences(meta["fingerprint"], fingerprint)
    if diffs:
        raise ArgumentError(
            f"the checkpoint {str(path)!r} belongs to another run: "
            + "; ".join(diffs)
            + ". Resume with the same models, SAE, prompts and options, or pass a new checkpoint "
            "path (or delete this file) to start over."
        )
    stats = {}
    for name in meta["stats"]:
        prefix = name + "."
        stats[name] = stat_from_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    counters = {k[len(_COUNTER) :]: int(v) for k, v in tensors.items() if k.startswith(_COUNTER)}
    return stats, counters
