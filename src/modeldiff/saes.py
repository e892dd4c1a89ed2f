"""Loading sae-lens SAEs and checking that one fits a model before any work is done.

``load_sae`` accepts what a user is likely to have: an SAE object, a folder written by sae-lens
(``save_model`` or ``save_inference_model``), or a registry name ``"release/sae_id"``.
``check_sae`` runs every compatibility check in one place and fails with a message that names the
problem and the fix; ``sae_identity`` describes an SAE (without its weights) so a saved result can say
which SAE produced it.

Example:
    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> sae = load_sae(StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)))
    >>> sae.cfg.d_sae
    16
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import ModeldiffError, reading
from .sites import Site

__all__ = [
    "SAEError",
    "check_sae",
    "encode_sparse",
    "is_batch_coupled",
    "load_sae",
    "model_dtype_device",
    "nonfinite_parameters",
    "sae_fingerprint",
    "sae_d_in",
    "sae_d_sae",
    "sae_identity",
    "to_inference_sae",
]


class SAEError(ModeldiffError, ValueError):
    """An SAE that cannot be loaded, or does not fit the model it is used with."""


def _is_sae(obj: Any) -> bool:
    try:
        from sae_lens import SAE
    except ImportError:  # pragma: no cover - sae-lens is a hard dependency
        return False
    return isinstance(obj, SAE)


def _str_to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    got = getattr(torch, name, None)
    if not isinstance(got, torch.dtype):
        raise SAEError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or torch.float16")
    return got


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _load_folder(path: Path, device: str, dtype: torch.dtype | None) -> Any:
    from sae_lens import SAE, TrainingSAE

    cfg_file = path / "cfg.json"
    if not cfg_file.exists() or not (path / "sae_weights.safetensors").exists():
        raise SAEError(
            f"{str(path)!r} is not an sae-lens SAE folder: it needs cfg.json and "
            "sae_weights.safetensors (written by sae.save_model(folder) or "
            "training_sae.save_inference_model(folder))"
        )
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
    try:
        architecture = json.loads(cfg_file.read_text()).get("architecture", "standard")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"{str(cfg_file)!r} is not valid JSON ({e}); re-save the SAE") from None
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    with reading(path / "sae_weights.safetensors", "an sae-lens SAE's weights"):
        if architecture in SAE_CLASS_REGISTRY:
            return SAE.load_from_disk(path, device=device, dtype=dtype_name)
        if architecture in SAE_TRAINING_CLASS_REGISTRY:
            # A training checkpoint (e.g. BatchTopK) saved with save_model: the training class.
            return TrainingSAE.load_from_disk(path, device=device, dtype=dtype_name)
    raise SAEError(
        f"{str(path)!r} holds an SAE of architecture {architecture!r}, which this sae-lens version "
        f"does not know (known: {', '.join(sorted(SAE_CLASS_REGISTRY))}); upgrade sae-lens"
    )


def _load_registry(spec: str, device: str, dtype: torch.dtype | None) -> Any:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, _, sae_id = spec.partition("/")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAEError(
            f"{spec!r} is neither an existing folder nor a known sae-lens release/id "
            f"(no release {release!r} in sae-lens' registry). Pass an SAE object, a folder written "
            "by sae.save_model(folder), or 'release/sae_id' from the sae-lens pretrained list"
        )
    if sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise SAEError(f"release {release!r} has no SAE {sae_id!r}; its ids include: {shown}")
    if _hub_offline():
        raise SAEError(
            f"{spec!r} would be downloaded from the Hugging Face hub, but hub access is off "
            "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). On a machine with network run "
            f"SAE.from_pretrained({release!r}, {sae_id!r}).save_model(folder), copy the folder "
            "here and call load_sae(folder)"
        )
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype_name)
    sae.cfg.metadata.modeldiff_release = release
    sae.cfg.metadata.modeldiff_sae_id = sae_id
    return sae


def load_sae(
    source: Any,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """An sae-lens SAE from an object, a saved folder, or a registry ``"release/sae_id"``.

    Args:
        source: an sae-lens ``SAE`` (any architecture: Standard, TopK, JumpReLU, BatchTopK, ...),
            returned as is unless ``device``/``dtype`` ask for a converted copy; a folder written by
            ``save_model`` / ``save_inference_model``; or ``"release/sae_id"`` from sae-lens'
            pretrained list (downloads, so it needs network; with the hub switched off it fails at
            once and says how to load a local copy instead).
        device: where to put the SAE (default: as saved, CPU for folders and registry SAEs).
        dtype: the SAE's dtype (default: as saved).

    Example:
        >>> import tempfile
        >>> from sae_lens import TopKSAE, TopKSAEConfig
        >>> folder = tempfile.mkdtemp()
        >>> _ = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2)).save_model(folder)
        >>> type(load_sae(folder)).__name__
        'TopKSAE'
    """
    want_dtype = _str_to_dtype(dtype)
    if _is_sae(source):
        if device is None and want_dtype is None:
            return source
        out = copy.deepcopy(source)
        return out.to(
            **({"device": torch.device(device)} if device is not None else {}),
            **({"dtype": want_dtype} if want_dtype is not None else {}),
        )
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        dev = str(device) if device is not None else "cpu"
        if path.is_dir():
            return _load_folder(path, dev, want_dtype)
        if path.exists():
            raise SAEError(
                f"{str(path)!r} is a file; pass the folder that holds cfg.json and "
                "sae_weights.safetensors"
            )
        text = str(source)
        if "/" in text and not text.startswith((".", "/", "~")):
            return _load_registry(text, dev, want_dtype)
        raise SAEError(
            f"no SAE folder at {text!r}; pass an SAE object, an existing folder written by "
            "sae.save_model(folder), or 'release/sae_id' from sae-lens' pretrained list"
        )
    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(s, str) for s in source):
        dev = str(device) if device is not None else "cpu"
        return _load_registry(f"{source[0]}/{source[1]}", dev, want_dtype)
    raise SAEError(
        f"cannot load an SAE from a {type(source).__name__}; pass an sae-lens SAE, a folder "
        "written by sae.save_model(folder), or 'release/sae_id'"
    )


def is_batch_coupled(sae: Any) -> bool:
    """Whether the SAE's encoder mixes tokens of a batch (BatchTopK picks top-k over the batch).

    Such an encoder makes a token's latents depend on which other tokens share its batch, so
    statistics would change with the batch size. Convert it with :func:`to_inference_sae`.

    Example:
        >>> from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        >>> is_batch_coupled(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2)))
        True
    """
    try:
        from sae_lens.saes.batchtopk_sae import BatchTopK
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(sae, "activation_fn", None), BatchTopK)


def encode_sparse(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """The SAE's latent activations of ``x``, as cheaply as they can be had exactly: a sparse COO
    tensor for an sae-lens TopK SAE, the dense encode for every other SAE (done in place for a
    plain ReLU ``StandardSAE``: the same values without two of its intermediate tensors).

    A TopK encoder keeps ``k`` latents per token, so its dense output is almost all zeros, and
    finding the non-zeros again costs more than the statistics built on them. sae-lens' TopK
    activation can return its top-k entries as a sparse tensor (``use_sparse_activations``); this
    switches that on for the one call and restores it on every exit path. The values are exactly the
    dense encode's (the same top-k, the same ReLU); an entry may be an explicit zero.

    Example:
        >>> import torch
        >>> from sae_lens import TopKSAE, TopKSAEConfig
        >>> sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2))
        >>> x = torch.randn(3, 8)
        >>> z = encode_sparse(sae, x)
        >>> z.is_sparse, torch.equal(z.to_dense(), sae.encode(x))
        (True, True)
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> relu = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
        >>> with torch.inference_mode():
        ...     torch.equal(encode_sparse(relu, x), relu.encode(x))
        True
    """
    try:
        from sae_lens.saes.topk_sae import TopK
    except ImportError:  # pragma: no cover
        return sae.encode(x)
    act = getattr(sae, "activation_fn", None)
    if type(act) is torch.nn.ReLU and x.ndim == 2:
        return _encode_relu_in_place(sae, x)
    if type(act) is not TopK or x.ndim != 2 or _hooked(act):
        return sae.encode(x)  # a user's hook on the activation sees what it always saw
    before = act.use_sparse_activations
    act.use_sparse_activations = True
    try:
        # sae-lens builds the tensor from valid indices; opting out of the checks explicitly keeps
        # torch from warning that they are off
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            return sae.encode(x)
    finally:
        act.use_sparse_activations = before


def _hooked(*modules: Any) -> bool:
    """Whether a forward hook would see these modules run (their own, or torch's global ones)."""
    glob = torch.nn.modules.module
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        getattr(glob, "_global_forward_hooks", None)
        or getattr(glob, "_global_forward_pre_hooks", None)
    )


def _encode_relu_in_place(sae: Any, x: torch.Tensor) -> torch.Tensor:
    # sae-lens' StandardSAE.encode is relu(process_sae_in(x) @ W_enc + b_enc) between two hook points,
    # each step a fresh [tokens, d_sae] tensor; doing the bias and the ReLU in place on the product
    # gives the same bits (the same three operations) without two of those tensors. Only for that
    # exact class with its own encode, without gradients, and when no hook would see the
    # intermediate tensors.
    from sae_lens import StandardSAE

    if (
        type(sae) is not StandardSAE
        or "encode" in vars(sae)  # an encode set on the instance (a wrapper, a patch) is honoured
        or torch.is_grad_enabled()
        or _hooked(sae.hook_sae_acts_pre, sae.hook_sae_acts_post, sae.activation_fn)
    ):
        return sae.encode(x)
    out = torch.mm(sae.process_sae_in(x), sae.W_enc)
    out += sae.b_enc
    return out.relu_()


def to_inference_sae(sae: Any) -> Any:
    """The inference twin of an sae-lens training SAE (a BatchTopK one becomes JumpReLU).

    Goes through sae-lens' own ``save_inference_model`` in a temporary folder, so the conversion is
    exactly what sae-lens does when a training run ends. Inference SAEs are returned unchanged.

    Example:
        >>> from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        >>> sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
        >>> type(to_inference_sae(sae)).__name__
        'JumpReLUSAE'
    """
    from sae_lens import SAE, TrainingSAE

    if not isinstance(sae, TrainingSAE):
        return sae
    device = next(sae.parameters()).device
    with tempfile.TemporaryDirectory(prefix="modeldiff-sae-") as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=str(device))


def nonfinite_parameters(module: Any) -> list[str]:
    """Names of ``module``'s parameters that hold NaN or inf (empty when all are finite).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     lin.bias[0] = float("nan")
        >>> nonfinite_parameters(lin)
        ['bias']
    """
    return [n for n, p in module.named_parameters() if not _all_finite(p)]


def _all_finite(p: torch.Tensor) -> bool:
    # min and max propagate NaN, and are +-inf if any entry is: one reduction pass, no [p.shape]
    # bool temporary (10x cheaper than isfinite(p).all(), which diff_latents paid on every call)
    if p.numel() == 0 or not (p.is_floating_point() or p.is_complex()):
        return True
    if p.is_complex():
        return bool(torch.isfinite(p).all())
    lo, hi = torch.aminmax(p.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def model_dtype_device(model: Any, site: Site | None = None) -> tuple[torch.dtype, torch.device]:
    """The model's dtype and the device of its activations at ``site`` (its input device if None).

    On a model spread over several devices the SAE belongs where its site's activations are.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_dtype_device(tiny_hooked_transformer(), Site.resid_post(1))
        (torch.float32, device(type='cpu'))
    """
    from .adapters import adapter_for

    adapter = adapter_for(model)
    return adapter.dtype, adapter.input_device if site is None else adapter.site_device(site)


def check_sae(sae: Any, model: Any, site: Site | None = None, *, convert: bool = False) -> Any:
    """Check that ``sae`` can read ``model``'s activations at ``site``; return the SAE to use.

    Raises :class:`SAEError` (or :class:`~modeldiff.sites.SiteError`) naming the problem and the fix
    when: the site is missing from the model; the SAE's ``d_in`` differs from the model's
    ``d_model``; the SAE reads reshaped ``hook_z`` activations; its encoder mixes the tokens of a
    batch (BatchTopK); or its dtype/device differ from the model's (``convert=True`` returns a
    converted *copy* instead; the caller's SAE is never modified). Warns when the SAE's metadata
    names another hook or another model.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer(d_model=32)
        >>> check_sae(StandardSAE(StandardSAEConfig(d_in=64, d_sae=8)), m, Site.resid_post(0))
        Traceback (most recent call last):
        ...
        modeldiff.saes.SAEError: the SAE reads vectors of size d_in=64 but the model's d_model is 32 at blocks.0.hook_resid_post: this SAE was trained on a different model; use an SAE trained on this model
    """
    if site is None:
        site = Site.from_sae(sae)
    site.validate(model)
    from .adapters import adapter_for

    d_in, d_model = sae_d_in(sae), adapter_for(model).d_model
    if d_in != d_model:
        raise SAEError(
            f"the SAE reads vectors of size d_in={d_in} but the model's d_model is {d_model} at "
            f"{site.hook_name}: this SAE was trained on a different model; use an SAE trained on "
            "this model"
        )
    cfg = getattr(sae, "cfg", None)
    if getattr(cfg, "reshape_activations", "none") == "hook_z":
        raise SAEError(
            "this SAE reads per-head hook_z activations; modeldiff diffs residual-stream sites "
            "(resid_pre/mid/post, attn_out, mlp_out). Use an SAE trained on one of those"
        )
    broken = nonfinite_parameters(sae)
    if broken:
        raise SAEError(
            f"the SAE's weights are not finite ({', '.join(broken)} hold NaN/inf): every latent it "
            "encodes would be NaN. Re-train or re-load the SAE."
        )
    if is_batch_coupled(sae):
        raise SAEError(
            f"{type(sae).__name__} picks its top-k over the whole batch, so a token's latents would "
            "depend on the other prompts in its batch. Convert it first: "
            "sae = modeldiff.saes.to_inference_sae(sae) (what sae-lens saves after training)"
        )
    meta = getattr(cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) if meta is not None else None
    if hook and hook != site.hook_name:
        warnings.warn(
            f"the SAE was trained on {hook!r} but is applied at {site.hook_name!r}; its latents may "
            "mean nothing there. Leave site=None to use the SAE's own hook",
            UserWarning,
            stacklevel=3,
        )
    m_dtype, m_device = model_dtype_device(model, site)
    s_param = next(iter(sae.parameters()))
    s_dtype, s_device = s_param.dtype, s_param.device
    if s_dtype != m_dtype or s_device != m_device:
        if not convert:
            raise SAEError(
                f"the SAE is {str(s_dtype).removeprefix('torch.')} on {s_device} but the model is "
                f"{str(m_dtype).removeprefix('torch.')} on {m_device}. Pass convert_sae=True to "
                "use a converted copy, or load it to match: "
                f"load_sae(sae, device={str(m_device)!r}, dtype={str(m_dtype).removeprefix('torch.')!r})"
            )
        sae = copy.deepcopy(sae).to(device=m_device, dtype=m_dtype)
    return sae


def sae_identity(sae: Any) -> dict[str, Any]:
    """A JSON-ready description of an SAE (no weights): architecture, sizes, hook, source, fingerprint.

    The fingerprint hashes the decoder bias and a fixed sample of decoder rows, so a result saved with
    one SAE can check that a later SAE is the same one, without hashing gigabytes.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
        >>> ident = sae_identity(sae)
        >>> ident["d_sae"], ident["architecture"], len(ident["fingerprint"])
        (16, 'standard', 16)
    """
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)

    def _meta(name: str) -> Any:
        v = getattr(meta, name, None) if meta is not None else None
        return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)

    arch = getattr(cfg, "architecture", None)
    return {
        "class": type(sae).__name__,
        "architecture": arch() if callable(arch) else arch,
        "d_in": sae_d_in(sae),
        "d_sae": sae_d_sae(sae),
        "hook_name": _meta("hook_name"),
        "model_name": _meta("model_name"),
        "release": _meta("modeldiff_release"),
        "sae_id": _meta("modeldiff_sae_id"),
        "neuronpedia_id": _meta("neuronpedia_id"),
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "fingerprint": sae_fingerprint(sae),
    }


@torch.no_grad()
def sae_fingerprint(sae: Any, n_rows: int = 256) -> str:
    """A short hash of the SAE's decoder (bias plus ``n_rows`` evenly spaced rows).

    Values are hashed as float32, so a float32 SAE and its float64 copy share a fingerprint.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
        >>> sae_fingerprint(sae) == sae_fingerprint(load_sae(sae, dtype="float64"))
        True
    """
    w = sae.W_dec.detach()
    idx = torch.linspace(0, w.shape[0] - 1, min(n_rows, w.shape[0])).round().long().to(w.device)
    parts = [w[idx]]
    b = getattr(sae, "b_dec", None)
    if isinstance(b, torch.Tensor):
        parts.append(b.detach().reshape(1, -1))
    h = hashlib.sha256()
    for p in parts:
        h.update(p.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sae_d_in(sae: Any) -> int:
    """The width of the activations an sae-lens SAE reads (``cfg.d_in``, else ``W_dec``'s columns).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae_d_in(StandardSAE(StandardSAEConfig(d_in=64, d_sae=32)))
        64
    """
    cfg = getattr(sae, "cfg", None)
    d_in = getattr(cfg, "d_in", None)
    if d_in is None:
        w = getattr(sae, "W_dec", None)
        if w is None:
            raise SAEError(
                f"{type(sae).__name__} does not look like an SAE: it has neither cfg.d_in nor W_dec. "
                "Pass an sae-lens SAE (modeldiff.load_sae) or a plain vector."
            )
        d_in = w.shape[1]
    return int(d_in)


def sae_d_sae(sae: Any) -> int:
    """The number of latents of an sae-lens SAE (``cfg.d_sae``, else ``W_dec``'s rows).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> sae_d_sae(StandardSAE(StandardSAEConfig(d_in=64, d_sae=32)))
        32
    """
    cfg = getattr(sae, "cfg", None)
    d_sae = getattr(cfg, "d_sae", None)
    if d_sae is None:
        d_sae = sae.W_dec.shape[0]
    return int(d_sae)
