"""An on-disk cache of a diff's captured activations: one pass of both models, many SAEs.

``diff_latents(..., cache="acts/")`` captures the site activations of both models once and writes
them to a folder: one safetensors shard per model and batch of the run's batch plan (activations in
the models' dtype, prompt indices, positions, token ids and the outlier filter's norm ratios) and a
JSON ``manifest.json``. A later diff with the same models, prompts, positions and site but another
SAE (or other ranking, uncertainty or outlier options) reads the shards instead of running the
models, and gives bit for bit the result of a run without the cache.

The manifest names what the activations depend on: the site, both models' fingerprints
(:func:`modeldiff.checkpoint.model_fingerprint`) and dtype, ``d_model``, the token ids and selected
positions of every prompt (tokenization, chat template, BOS and positions included), the batch
plan, and the size. A cache whose manifest differs from what the diff needs is refused, naming each
difference. Every shard is written atomically and the manifest last, so a write killed half-way
leaves a folder without a manifest: reading it is refused as incomplete, and a diff given that
folder writes the cache again.

Example:
    >>> import tempfile
    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> from modeldiff import diff_latents
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=1)
    >>> folder = tempfile.mkdtemp() + "/acts"
    >>> kw = dict(site="blocks.0.hook_resid_post", progress=False, cache=folder)
    >>> a = diff_latents(base, tuned, StandardSAE(StandardSAEConfig(d_in=64, d_sae=32)), ["Hi", "Yo there"], **kw)
    >>> b = diff_latents(base, tuned, StandardSAE(StandardSAEConfig(d_in=64, d_sae=48)), ["Hi", "Yo there"], **kw)
    >>> c = ActivationCache(folder)
    >>> c.manifest["n_batches"], len(list(c.batches("base"))), b.d_sae
    (1, 1, 48)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._io import atomic_path, write_json_atomic
from .capture import CaptureBatch
from .checkpoint import fingerprint_differences
from .errors import ArgumentError, FileFormatError, MissingFileError, damaged_file
from .sites import Site

__all__ = ["ActivationCache", "CacheWriter"]

FORMAT = "modeldiff.activation-cache/1"
MANIFEST = "manifest.json"
ROLES = ("base", "finetuned")
_SHARD = re.compile(r"(?:base|finetuned)-(\d{6,})\.safetensors")


def _shard(folder: Path, role: str, k: int) -> Path:
    return folder / f"{role}-{k:06d}.safetensors"


class ActivationCache:
    """A complete activation cache folder (read-only): its manifest and its batches.

    Example:
        >>> import tempfile
        >>> from modeldiff.sites import Site
        >>> site = Site.resid_post(0)
        >>> b = CaptureBatch(acts={site: torch.ones(2, 4)}, prompt_index=torch.tensor([0, 1]),
        ...                  position=torch.tensor([0, 0]), token=torch.tensor([5, 6]),
        ...                  norm_ratio={site: torch.ones(2)})
        >>> w = CacheWriter(tempfile.mkdtemp(), {"site": site.hook_name, "n_batches": 1, "nbytes": 64})
        >>> w.write("base", 0, b, site); w.write("finetuned", 0, b, site)
        >>> c = ActivationCache(w.finish().folder)
        >>> c.site, c.nbytes, c.batch("finetuned", 0).acts[site].shape
        (Site.resid_post(0), 64, torch.Size([2, 4]))
        >>> try:
        ...     c.check({"n_batches": 2})  # a run with another batch plan is refused
        ... except ArgumentError as err:
        ...     print(str(err).split(": ", 1)[1].split(". ")[0])
        n_batches (cache: 1, this run: 2)

    Raises:
        MissingFileError: no such folder.
        FileFormatError: the folder has no manifest (a write was interrupted, or it is not a cache)
            or a shard is missing or damaged.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MissingFileError(
                f"no activation cache at {str(self.folder)!r}; pass cache= to diff_latents to write one"
            )
        path = self.folder / MANIFEST
        if not path.exists():
            raise FileFormatError(
                f"{str(self.folder)!r} is not a complete activation cache: it has no {MANIFEST} "
                "(a write was interrupted, or the folder is something else). Run the diff with "
                "cache= this folder again to rewrite it, or delete it."
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise damaged_file(path, "an activation cache manifest", err) from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FileFormatError(
                f"{str(path)!r} is not a manifest this version reads (format "
                f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                f"{FORMAT!r}); delete the folder and let the diff write it again"
            )
        self.manifest: dict[str, Any] = manifest

    @property
    def site(self) -> Site:
        """The site the activations were read at."""
        return Site.parse(self.manifest["site"])

    @property
    def nbytes(self) -> int:
        """Bytes of activations held (both models)."""
        return int(self.manifest["nbytes"])

    def check(self, expected: Mapping[str, Any]) -> None:
        """Refuse the cache unless its manifest has ``expected``'s entries (naming each difference)."""
        found = {k: self.manifest.get(k, "<absent>") for k in expected}
        diffs = fingerprint_differences(found, expected, label="cache")
        if diffs:
            raise ArgumentError(
                f"the activation cache {str(self.folder)!r} was written for another run: "
                + "; ".join(diffs)
                + ". Use the same models, prompts, positions and site, or another cache folder "
                "(delete this one to rewrite it)."
            )

    def batch(self, role: str, k: int) -> CaptureBatch:
        """Batch ``k`` of the run's batch plan for ``role`` (``"base"`` or ``"finetuned"``)."""
        if role not in ROLES:
            raise ArgumentError(f"role must be 'base' or 'finetuned', got {role!r}")
        n = int(self.manifest["n_batches"])
        if not 0 <= k < n:
            raise ArgumentError(f"batch {k} is out of range: the cache holds {n} batches")
        path = _shard(self.folder, role, k)
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise damaged_file(path, "an activation cache shard", err) from err
        site = self.site
        return CaptureBatch(
            acts={site: t["acts"]},
            prompt_index=t["prompt_index"],
            position=t["position"],
            token=t["token"],
            norm_ratio={site: t["norm_ratio"]},
        )

    def batches(self, role: str) -> Iterator[CaptureBatch]:
        """Every batch for ``role``, in the run's batch order (the stream ``capture`` gave)."""
        for k in range(int(self.manifest["n_batches"])):
            yield self.batch(role, k)


class CacheWriter:
    """Writes a cache batch by batch: shards atomically, the manifest last (see the module).

    Example:
        >>> import os, tempfile
        >>> from modeldiff.sites import Site
        >>> site = Site.resid_post(0)
        >>> b = CaptureBatch(acts={site: torch.zeros(1, 4)}, prompt_index=torch.tensor([0]),
        ...                  position=torch.tensor([0]), token=torch.tensor([5]),
        ...                  norm_ratio={site: torch.ones(1)})
        >>> folder = tempfile.mkdtemp()
        >>> w = CacheWriter(folder, {"site": site.hook_name, "n_batches": 1, "nbytes": 32})
        >>> w.write("base", 0, b, site); w.write("finetuned", 0, b, site)
        >>> sorted(os.listdir(folder))  # no manifest yet: not a complete cache
        ['base-000000.safetensors', 'finetuned-000000.safetensors']
        >>> len(list(w.finish().batches("base")))
        1
    """

    def __init__(self, folder: str | Path, manifest: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ArgumentError(f"cache {str(self.folder)!r} is a file; pass a folder path")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
        self.manifest = {"format": FORMAT, **manifest}

    def write(self, role: str, k: int, batch: CaptureBatch, site: Site) -> None:
        """Store batch ``k`` of ``role`` (global prompt indices in ``batch.prompt_index``)."""
        tensors: dict[str, Tensor] = {
            "acts": batch.acts[site].detach().cpu().contiguous(),
            "prompt_index": batch.prompt_index.cpu().contiguous(),
            "position": batch.position.cpu().contiguous(),
            "token": batch.token.cpu().contiguous(),
            "norm_ratio": batch.norm_ratio[site].cpu().contiguous(),
        }
        with atomic_path(_shard(self.folder, role, k)) as tmp:
            save_file(tensors, str(tmp))

    def finish(self) -> ActivationCache:
        """Write the manifest (the cache is complete from here on) and open the cache.

        Every shard must be there: a resumed run wrote only the batches after its checkpoint, the
        earlier ones come from the run that was killed.
        """
        n = int(self.manifest["n_batches"])
        missing = [
            _shard(self.folder, r, k).name
            for r in ROLES
            for k in range(n)
            if not _shard(self.folder, r, k).exists()
        ]
        if missing:
            raise FileFormatError(
                f"the activation cache {str(self.folder)!r} lacks {len(missing)} shards (e.g. "
                f"{missing[0]}): the run resumed from a checkpoint but the shards of the batches "
                "before it are gone. Delete the checkpoint (or pass another cache folder) and run "
                "again."
            )
        for stale in self.folder.iterdir():  # shards of an older, longer cache in this folder
            m = _SHARD.fullmatch(stale.name)
            if m and int(m.group(1)) >= n:
                stale.unlink()
        write_json_atomic(self.folder / MANIFEST, self.manifest)
        return ActivationCache(self.folder)


def cache_size(n_tokens: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes of activations a cache of ``n_tokens`` selected tokens holds for both models.

    Example:
        >>> cache_size(1000, 64, torch.float32)
        512000
    """
    return 2 * n_tokens * d_model * torch.empty(0, dtype=dtype).element_size()
