"""train_sae on tiny models: it learns, its report equals a by-hand computation, outliers are left
out, the saved folder loads in modeldiff and sae-lens, the fine-tune is measured, seeds reproduce."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from modeldiff import Site, load_model, load_sae
from modeldiff._io import SaveError
from modeldiff.corpus import Corpus
from modeldiff.errors import ArgumentError
from modeldiff.sae_training import SAEQualityReport, evaluate_sae, train_sae
from modeldiff.testing import save_tiny_hf_model, tiny_hooked_transformer

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "runs",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "big",
    "small",
    "house",
    "tree",
    "river",
    "stone",
    "old",
    "new",
    "sun",
    "moon",
    "bird",
    "fish",
    "sings",
    "jumps",
    "under",
    "over",
    "near",
    "far",
    "quick",
    "slow",
    "green",
    "grey",
]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(n)]


TRAIN, HELD_OUT = _texts(60, 0), _texts(12, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices on a shared two-core machine: a second thread only adds contention (~50x)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hooked():
    return tiny_hooked_transformer()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    path = save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"))
    return load_model(path, wrapper="native")


@pytest.fixture(scope="module")
def other():
    return tiny_hooked_transformer(seed=1)  # a planted different "fine-tune", same tokenizer


@pytest.fixture(scope="module")
def trained(hooked, other):
    return train_sae(
        hooked,
        Site.resid_post(0),
        TRAIN,
        eval_corpus=HELD_OUT,
        finetuned=other,
        d_sae=128,
        k=8,
        steps=300,
        batch_tokens=64,
        lr=1e-3,
        progress=False,
    )


# -- the naive computation: one prompt at a time, plain forwards, splicing by hand -----------------


def _hooked_forward(model, hook_name):
    def acts(ids):
        _, cache = model.run_with_cache(ids[None], names_filter=hook_name)
        return cache[hook_name][0]

    def logits(ids, edit=None):
        if edit is None:
            return model(ids[None])[0]
        return model.run_with_hooks(ids[None], fwd_hooks=[(hook_name, lambda x, hook: edit(x))])[0]

    return acts, logits


def _hf_forward(hf, layer):
    block = hf.model.layers[layer]

    def run(ids, edit=None):
        got = {}

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            got["x"] = x.detach().clone()
            if edit is not None:
                y = edit(x)
                return (y, *output[1:]) if isinstance(output, tuple) else y
            return None

        handle = block.register_forward_hook(hook)
        try:
            out = hf(input_ids=ids[None]).logits[0]
        finally:
            handle.remove()
        return got["x"][0], out

    return (lambda ids: run(ids)[0]), (lambda ids, edit=None: run(ids, edit)[1])


@torch.no_grad()
def _naive_quality(sae, model, texts, acts_of, logits_of, outlier_factor=10.0):
    from modeldiff.adapters import adapter_for

    tokenizer = model.tokenizer
    prepend = adapter_for(model).default_prepend_bos
    xs = []
    ce = {"clean": [], "sae": [], "zero": []}
    kls = {"sae": [], "zero": []}
    bos = tokenizer.bos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(([bos] if prepend else []) + ids)
        x = acts_of(ids)
        norms = x.norm(dim=-1)
        keep = norms / norms.median() <= outlier_factor
        if ids[0] == bos:
            keep[0] = False
        idx = keep.nonzero()[:, 0]
        if not len(idx):
            continue
        xs.append(x[idx])

        def splice(fn, idx=idx):
            def edit(a):
                a = a.clone()
                a[0, idx] = fn(a[0, idx])
                return a

            return edit

        recon = lambda v: sae.decode(sae.encode(v))  # noqa: E731
        first = int(idx[0])
        targets = ids[first + 1 :]
        lp = {
            "clean": logits_of(ids).log_softmax(-1)[first:-1],
            "sae": logits_of(ids, splice(recon)).log_softmax(-1)[first:-1],
            "zero": logits_of(ids, splice(torch.zeros_like)).log_softmax(-1)[first:-1],
        }
        for name in ce:
            ce[name].append(-lp[name][torch.arange(len(targets)), targets])
        for name in kls:
            kls[name].append((lp["clean"].exp() * (lp["clean"] - lp[name])).sum(-1))
    x = torch.cat(xs)
    z = sae.encode(x)
    xh = sae.decode(z)
    c = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    return {
        "explained_variance": float(1 - (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "l0": float((z != 0).sum(-1).float().mean()),
        "dead_fraction": float(((z != 0).sum(0) == 0).float().mean()),
        "ce_clean": c["clean"],
        "ce_sae": c["sae"],
        "ce_zero": c["zero"],
        "ce_loss_recovered": (c["zero"] - c["sae"]) / (c["zero"] - c["clean"]),
        "kl_sae": float(torch.cat(kls["sae"]).mean()),
        "kl_zero": float(torch.cat(kls["zero"]).mean()),
        "n_tokens": len(x),
    }


def _assert_matches(quality, naive):
    for key, want in naive.items():
        got = getattr(quality, key)
        assert got == pytest.approx(want, rel=2e-4, abs=2e-5), key


# -- tests ---------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_explains_the_variance(trained):
    curve = trained.report.mse_curve
    assert len(curve) == 300
    assert sum(curve[-20:]) < 0.3 * sum(curve[:20])
    assert trained.report.base.explained_variance > 0.5
    assert trained.report.base.l0 <= 8
    assert trained.report.base.ce_loss_recovered > 0.5
    assert Site.from_sae(trained.sae) == Site.resid_post(0)
    assert trained.report.n_train_tokens == 300 * 64 and trained.report.epochs > 1


def test_report_equals_a_naive_computation_on_a_hooked_transformer(trained, hooked):
    acts, logits = _hooked_forward(hooked, "blocks.0.hook_resid_post")
    naive = _naive_quality(trained.sae, hooked, HELD_OUT, acts, logits)
    _assert_matches(trained.report.base, naive)


def test_native_model_trains_and_its_report_equals_a_naive_computation(native):
    site = Site.resid_post(1)
    result = train_sae(
        native,
        site,
        TRAIN,
        eval_corpus=HELD_OUT,
        d_sae=128,
        k=8,
        steps=200,
        batch_tokens=64,
        lr=1e-3,
        progress=False,
    )
    assert result.report.base.explained_variance > 0.6
    acts, logits = _hf_forward(native, 1)
    naive = _naive_quality(result.sae, native, HELD_OUT, acts, logits)
    _assert_matches(result.report.base, naive)


def test_outlier_tokens_are_left_out(hooked):
    planted = copy.deepcopy(hooked)
    tok = planted.tokenizer
    [tid] = tok(" zebra", add_special_tokens=False)["input_ids"][:1]
    with torch.no_grad():
        planted.W_E[tid] *= 1000.0  # an attention-sink-like token: norm ~1000x the others
    texts = [t + " zebra" if i % 2 else t for i, t in enumerate(TRAIN[:20])]
    n_planted = sum(tok(t, add_special_tokens=False)["input_ids"].count(tid) for t in texts)
    assert n_planted >= 10
    kw = dict(eval_corpus=texts[:6], d_sae=64, k=4, steps=5, batch_tokens=32, progress=False)
    filtered = train_sae(planted, Site.resid_post(0), texts, **kw)
    assert filtered.report.n_train_outliers == n_planted
    n_eval = sum(tok(t, add_special_tokens=False)["input_ids"].count(tid) for t in texts[:6])
    assert filtered.report.base.n_outliers == n_eval
    kept_all = train_sae(planted, Site.resid_post(0), texts, outlier_factor=math.inf, **kw)
    assert kept_all.report.n_train_outliers == 0
    assert kept_all.report.base.n_tokens == filtered.report.base.n_tokens + n_eval


def test_saved_folder_loads_in_modeldiff_and_sae_lens(trained, hooked, tmp_path):
    from sae_lens import SAE

    folder = tmp_path / "sae"
    corpus = Corpus(TRAIN[:20], manifest={"kind": "hand-written"})
    result = train_sae(
        hooked,
        "blocks.0.hook_resid_post",
        corpus,
        d_sae=64,
        k=4,
        steps=5,
        batch_tokens=32,
        out=folder,
        progress=False,
    )
    assert result.path == folder
    assert {p.name for p in tmp_path.iterdir()} == {"sae"}  # no temporary left beside it
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    for loaded in (load_sae(folder), SAE.load_from_disk(folder)):
        assert Site.from_sae(loaded) == Site.resid_post(0)
        torch.testing.assert_close(loaded.encode(x), result.sae.encode(x), rtol=0, atol=0)
    assert SAEQualityReport.load(folder) == result.report
    assert result.report.corpus == corpus.manifest  # the corpus it was trained on, by hash
    with pytest.raises(SaveError, match="overwrite=True"):
        train_sae(hooked, "blocks.0.hook_resid_post", TRAIN[:4], d_sae=8, k=2, steps=1,
                  batch_tokens=8, out=folder, progress=False)  # fmt: skip


def test_the_finetuned_report_measures_the_other_model(trained, hooked, other):
    same = evaluate_sae(trained.sae, copy.deepcopy(hooked), HELD_OUT, site=Site.resid_post(0))
    base, ft = trained.report.base, trained.report.finetuned
    assert same.explained_variance == pytest.approx(base.explained_variance, rel=1e-5)
    assert same.ce_loss_recovered == pytest.approx(base.ce_loss_recovered, rel=1e-5)
    assert ft is not None and ft.model == "finetuned"
    assert ft == evaluate_sae(trained.sae, other, HELD_OUT, label="finetuned")
    assert ft.explained_variance < base.explained_variance - 0.2
    assert trained.report.transfer["explained_variance"] < -0.2
    assert "finetuned" in trained._repr_html_()
    assert SAEQualityReport.from_dict(trained.report.to_dict()) == trained.report


def test_same_seed_same_weights(hooked):
    kw = dict(d_sae=64, k=4, steps=15, batch_tokens=32, lr=1e-3, progress=False)
    a = train_sae(hooked, Site.resid_post(1), TRAIN[:24], seed=3, **kw).sae.state_dict()
    b = train_sae(hooked, Site.resid_post(1), TRAIN[:24], seed=3, **kw).sae.state_dict()
    c = train_sae(hooked, Site.resid_post(1), TRAIN[:24], seed=4, **kw).sae.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_other_architectures_and_bad_arguments(hooked):
    kw = dict(d_sae=32, steps=3, batch_tokens=16, progress=False)
    std = train_sae(hooked, Site.resid_post(0), TRAIN[:8], architecture="standard",
                    sae_options={"l1_coefficient": 2.0}, **kw)  # fmt: skip
    assert type(std.sae).__name__ == "StandardSAE" and std.report.k is None
    with pytest.raises(ArgumentError, match="topk"):
        train_sae(hooked, Site.resid_post(0), TRAIN[:8], architecture="relu", **kw)
    with pytest.raises(ArgumentError, match="l1_coefficient"):
        train_sae(hooked, Site.resid_post(0), TRAIN[:8], architecture="standard", k=4, **kw)
    with pytest.raises(ArgumentError, match="not fields"):
        train_sae(hooked, Site.resid_post(0), TRAIN[:8], sae_options={"kk": 1}, **kw)
    with pytest.raises(ArgumentError, match="at least 2"):
        train_sae(hooked, Site.resid_post(0), TRAIN[:1], **kw)
    with pytest.raises(ArgumentError, match="outlier_factor"):
        train_sae(hooked, Site.resid_post(0), TRAIN[:8], outlier_factor=0.5, **kw)
