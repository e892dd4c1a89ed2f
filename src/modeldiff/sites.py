"""Where in a model: a layer and a kind of activation, in the user's words.

A :class:`Site` is named like TransformerLens' hook points (``blocks.{layer}.hook_{kind}``), and each
model adapter (:mod:`modeldiff.adapters`) maps it onto its family, so code written against sites runs
on HookedTransformer, TransformerBridge and native transformers models alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ModeldiffError

__all__ = ["KINDS", "Site", "SiteError"]

SiteKind = Literal["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
# In the order a block computes them; used to find the deepest of several sites.
KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(KINDS) + r")$")


class SiteError(ModeldiffError, ValueError):
    """A site that does not exist in a model, or a hook name that is not a site."""


@dataclass(frozen=True, order=False)
class Site:
    """A place in the model: ``layer`` (0-based block index) and ``kind``.

    Build one with the named constructors, from a hook name, or from an SAE's metadata.

    Example:
        >>> Site.resid_post(12).hook_name
        'blocks.12.hook_resid_post'
        >>> Site.parse("blocks.3.hook_mlp_out")
        Site.mlp_out(3)
        >>> Site.resid_pre(2) < Site.resid_post(2) < Site.resid_pre(3)
        True
    """

    layer: int
    kind: SiteKind = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise SiteError(f"site layer must be a non-negative integer, got {self.layer!r}")

    # -- constructors in the user's words -------------------------------------------------------
    @classmethod
    def resid_pre(cls, layer: int) -> Site:
        """The residual stream entering block ``layer``."""
        return cls(layer, "resid_pre")

    @classmethod
    def resid_mid(cls, layer: int) -> Site:
        """The residual stream between attention and MLP of block ``layer``."""
        return cls(layer, "resid_mid")

    @classmethod
    def resid_post(cls, layer: int) -> Site:
        """The residual stream leaving block ``layer`` (HF ``hidden_states[layer + 1]``)."""
        return cls(layer, "resid_post")

    @classmethod
    def attn_out(cls, layer: int) -> Site:
        """What block ``layer``'s attention writes into the residual stream."""
        return cls(layer, "attn_out")

    @classmethod
    def mlp_out(cls, layer: int) -> Site:
        """What block ``layer``'s MLP writes into the residual stream."""
        return cls(layer, "mlp_out")

    @classmethod
    def parse(cls, spec: str | Site) -> Site:
        """A site from a hook name (``blocks.3.hook_resid_post``) or ``kind:layer`` (``resid_post:3``).

        Example:
            >>> Site.parse("resid_pre:4")
            Site.resid_pre(4)
        """
        if isinstance(spec, Site):
            return spec
        text = str(spec).strip()
        m = _HOOK_RE.match(text)
        if m:
            return cls(int(m.group(1)), m.group(2))  # type: ignore[arg-type]
        kind, _, layer = text.partition(":")
        if kind in KINDS and layer.isdigit():
            return cls(int(layer), kind)  # type: ignore[arg-type]
        raise SiteError(
            f"{spec!r} is not a site modeldiff knows. Use a hook name like 'blocks.6.hook_resid_post' "
            f"or 'resid_post:6'; kinds: {', '.join(KINDS)}."
        )

    @classmethod
    def from_sae(cls, sae: Any) -> Site:
        """The site an sae-lens SAE was trained on (its ``cfg.metadata.hook_name``).

        Example:
            >>> from sae_lens import StandardSAE, StandardSAEConfig
            >>> cfg = StandardSAEConfig(d_in=64, d_sae=128)
            >>> cfg.metadata.hook_name = "blocks.1.hook_resid_post"
            >>> Site.from_sae(StandardSAE(cfg))
            Site.resid_post(1)
        """
        cfg = getattr(sae, "cfg", None)
        meta = getattr(cfg, "metadata", None)
        name = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
        if not name:
            raise SiteError(
                "the SAE does not say which hook it was trained on (cfg.metadata.hook_name is empty); "
                "pass site=Site.resid_post(L) explicitly."
            )
        try:
            return cls.parse(name)
        except SiteError:
            raise SiteError(
                f"the SAE was trained on hook {name!r}, which is not a residual/attn_out/mlp_out site; "
                "modeldiff supports blocks.{L}.hook_{" + ",".join(KINDS) + "}."
            ) from None

    # -- mapping and checks ---------------------------------------------------------------------
    @property
    def hook_name(self) -> str:
        """The site's name: the hook name on HookedTransformer and TransformerBridge."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def depth(self) -> tuple[int, int]:
        """Execution order key: later sites have larger depth."""
        return (self.layer, KINDS.index(self.kind))

    def __lt__(self, other: Site) -> bool:
        return self.depth < other.depth

    def validate(self, model: Any) -> Site:
        """Check that this site exists in ``model``; raise :class:`SiteError` listing valid ones.

        Example:
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> Site.resid_post(9).validate(tiny_hooked_transformer())
            Traceback (most recent call last):
            ...
            modeldiff.sites.SiteError: layer 9 is out of range: the model has 2 layers (0..1). Valid sites: resid_pre, attn_out, resid_mid, mlp_out, resid_post at layers 0..1.
        """
        from .adapters import adapter_for

        return adapter_for(model).check_site(self)

    def __repr__(self) -> str:
        return f"Site.{self.kind}({self.layer})"

    def __str__(self) -> str:
        return self.hook_name


def valid_sites(model: Any) -> list[Site]:
    """Every site the model exposes, in execution order.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> len(valid_sites(tiny_hooked_transformer()))
        10
    """
    from .adapters import adapter_for

    return adapter_for(model).sites()


def as_sites(sites: Site | str | list[Site | str] | tuple[Site | str, ...]) -> list[Site]:
    """Normalise one or several site specs into a de-duplicated list in execution order."""
    if isinstance(sites, (Site, str)):
        sites = [sites]
    out = sorted({Site.parse(s) for s in sites})
    if not out:
        raise SiteError("no sites given; pass e.g. Site.resid_post(6)")
    return out
