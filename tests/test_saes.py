"""load_sae from objects, folders and the registry; compatibility checks fail with precise messages."""

from __future__ import annotations

import time

import pytest
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from modeldiff.saes import (
    SAEError,
    check_sae,
    is_batch_coupled,
    load_sae,
    sae_fingerprint,
    sae_identity,
    to_inference_sae,
)
from modeldiff.sites import Site, SiteError

HOOK = "blocks.1.hook_resid_post"


def _sae(kind: str, d_in: int = 64, d_sae: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    sae.cfg.metadata.hook_name = HOOK
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1 and p.shape[0] == d_sae:
                p.add_(torch.randn_like(p) * 0.01)  # non-zero biases so a bad load shows up
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_object_is_returned_as_is_and_folder_round_trips(kind, tmp_path):
    sae = _sae(kind)
    assert load_sae(sae) is sae
    sae.save_model(tmp_path)
    back = load_sae(tmp_path)
    assert type(back) is type(sae)
    x = torch.randn(10, 64)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    assert Site.from_sae(back) == Site.resid_post(1)
    assert sae_fingerprint(back) == sae_fingerprint(sae)


def test_batchtopk_training_folder_and_inference_folder_load(tmp_path):
    sae = _sae("batchtopk")
    assert load_sae(sae) is sae and is_batch_coupled(sae)
    sae.save_model(tmp_path / "train")
    assert isinstance(load_sae(tmp_path / "train"), BatchTopKTrainingSAE)
    sae.save_inference_model(tmp_path / "inf")
    inf = load_sae(tmp_path / "inf")
    assert isinstance(inf, JumpReLUSAE) and not is_batch_coupled(inf)
    conv = to_inference_sae(sae)
    assert isinstance(conv, JumpReLUSAE)
    x = torch.randn(7, 64)
    torch.testing.assert_close(conv.encode(x), inf.encode(x), rtol=0, atol=0)


def test_device_dtype_conversion_is_a_copy():
    sae = _sae("standard")
    w = sae.W_dec.detach().clone()
    conv = load_sae(sae, dtype="float64")
    assert conv is not sae and conv.W_dec.dtype == torch.float64
    assert sae.W_dec.dtype == torch.float32 and torch.equal(sae.W_dec.detach(), w)
    assert sae_fingerprint(conv) == sae_fingerprint(sae)


def test_registry_offline_fails_fast_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SAEError, match=r"save_model\(folder\).*load_sae\(folder\)"):
        load_sae("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert time.perf_counter() - t0 < 5


def test_registry_unknown_names_are_named():
    with pytest.raises(SAEError, match="no release 'no-such-release'"):
        load_sae("no-such-release/x")
    with pytest.raises(SAEError, match="has no SAE 'nope'"):
        load_sae("gpt2-small-res-jb/nope")


def test_bad_sources(tmp_path):
    with pytest.raises(SAEError, match="no SAE folder"):
        load_sae(str(tmp_path / "missing"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SAEError, match="is a file"):
        load_sae(tmp_path / "f.txt")
    with pytest.raises(SAEError, match=r"cfg\.json"):
        load_sae(tmp_path)
    with pytest.raises(SAEError, match="cannot load an SAE from a int"):
        load_sae(3)


def test_check_sae_errors(tiny_ht):
    with pytest.raises(SAEError, match="d_in=32 but the model's d_model is 64"):
        check_sae(_sae("standard", d_in=32), tiny_ht, Site.resid_post(1))
    with pytest.raises(SiteError, match="out of range"):
        check_sae(_sae("standard"), tiny_ht, Site.resid_post(5))
    with pytest.raises(SAEError, match="to_inference_sae"):
        check_sae(_sae("batchtopk"), tiny_ht, Site.resid_post(1))
    with pytest.raises(
        SAEError, match=r"float64 on cpu but the model is float32.*convert_sae=True"
    ):
        check_sae(load_sae(_sae("standard"), dtype=torch.float64), tiny_ht, Site.resid_post(1))


def test_check_sae_converts_on_request_without_touching_the_original(tiny_ht):
    sae = load_sae(_sae("standard"), dtype=torch.float64)
    out = check_sae(sae, tiny_ht, Site.resid_post(1), convert=True)
    assert out is not sae and out.W_dec.dtype == torch.float32 and sae.W_dec.dtype == torch.float64


def test_check_sae_defaults_to_the_sae_hook_and_warns_on_another(tiny_ht):
    sae = _sae("topk")
    assert check_sae(sae, tiny_ht) is sae
    with pytest.warns(UserWarning, match="trained on 'blocks.1.hook_resid_post'"):
        check_sae(sae, tiny_ht, Site.resid_post(0))


def test_identity_is_json_and_tells_saes_apart():
    import json

    a, b = _sae("standard", seed=0), _sae("standard", seed=1)
    ia = sae_identity(a)
    assert json.loads(json.dumps(ia)) == ia
    assert ia["hook_name"] == HOOK and ia["d_sae"] == 96 and ia["class"] == "StandardSAE"
    assert ia["fingerprint"] != sae_identity(b)["fingerprint"]
    assert isinstance(load_sae(a), SAE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_nonfinite_parameters_finds_every_kind_of_bad_value(dtype, bad):
    """One reduction per parameter (min and max, which NaN and inf reach) instead of an
    isfinite() mask: it must still name exactly the parameters that hold a NaN or an inf, at any
    place, and pass empty and integer parameters."""
    from modeldiff.saes import nonfinite_parameters

    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(50, 30).to(dtype))
    m.b = torch.nn.Parameter(torch.randn(7).to(dtype))
    m.empty = torch.nn.Parameter(torch.zeros(0, 3, dtype=dtype))
    m.count = torch.nn.Parameter(torch.arange(4), requires_grad=False)
    if bad is not None:
        with torch.no_grad():
            m.b[6] = bad
            m.a[17, 29] = bad
    assert nonfinite_parameters(m) == ([] if bad is None else ["a", "b"])
