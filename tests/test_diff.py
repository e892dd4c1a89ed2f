"""diff_latents / LatentDiff / diff_residuals: exact nulls, planted shifts, invariances, references."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from modeldiff._hooks import add_hook
from modeldiff.diff import (
    LatentDiff,
    collect_site_stats,
    diff_latents,
    diff_residuals,
)
from modeldiff.saes import SAEError
from modeldiff.sites import Site, SiteError

SITE = Site.resid_post(1)
PROMPTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Tell me a story about a helpful assistant.",
    "I wish I could rule the world.",
    "Here is some advice about health and money.",
    "0 1 2 3 4 5 6 7 8 9",
    "please answer politely and carefully",
    "The capital of France is Paris.",
    "a curious user asks the assistant",
]
J = 17  # the planted latent


def _standard_sae(d_in=64, d_sae=128, seed=0, hook=SITE.hook_name):
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparse-ish: most latents off most of the time
    return sae


@pytest.fixture(scope="module")
def sae():
    return _standard_sae()


@pytest.fixture(scope="module")
def planted(tiny_ht, sae):
    """A copy of the tiny model whose residual after block 1 gets + c·W_dec[J] at every token."""
    ft = copy.deepcopy(tiny_ht)
    d = sae.W_dec[J].detach()
    c = 3.0 / float(d.norm())
    with torch.no_grad():
        ft.blocks[1].mlp.b_out += c * d
    return ft, c * d


@pytest.fixture(scope="module")
def planted_diff(tiny_ht, planted, sae):
    return diff_latents(tiny_ht, planted[0], sae, PROMPTS, positions="all", progress=False)


def test_identical_models_give_exact_zero_and_nothing_significant(tiny_ht, sae):
    twin = copy.deepcopy(tiny_ht)
    d = diff_latents(tiny_ht, twin, sae, PROMPTS, positions="all", progress=False)
    assert torch.equal(d.delta, torch.zeros(128, dtype=torch.float64))
    assert torch.equal(d.column("delta_freq"), torch.zeros(128, dtype=torch.float64))
    assert torch.equal(d.p_value, torch.ones(128, dtype=torch.float64))
    assert torch.equal(d.q_value, torch.ones(128, dtype=torch.float64))
    assert torch.equal(d.column("ci_low"), torch.zeros(128, dtype=torch.float64))
    assert torch.equal(d.column("ci_high"), torch.zeros(128, dtype=torch.float64))
    assert d.significant(0.05) == []
    assert d.meta["resid_delta_norm"] == 0.0
    assert float(d.mean_base.sum()) > 0  # the SAE did fire: the zeros are not vacuous


def test_planted_shift_ranks_first_with_a_tight_ci(planted_diff):
    d = planted_diff
    assert d.rank_of(J) == 1
    r = d.at_rank(1)
    assert r.latent == J and r.rank_from_bottom == -128
    assert 0 < r.ci_low <= r.delta <= r.ci_high
    assert (r.ci_high - r.ci_low) < 0.2 * r.delta
    # exact sign-flip over 10 prompts: every prompt moved up, so p is the smallest possible
    assert r.p_value == pytest.approx(2 / 2**10)
    assert d.significant(0.05)[0].latent == J
    # the decoder-cosine ranking sees the planted vector exactly
    assert r.cosine == pytest.approx(1.0, abs=1e-6)
    assert d.ranked_by("cosine").at_rank(1).latent == J
    torch.testing.assert_close(r.as_direction(), d.direction(J))


def test_planted_direction_is_the_residual_shift(planted_diff, planted):
    torch.testing.assert_close(planted_diff.resid_delta, planted[1].double(), rtol=1e-4, atol=1e-5)


def test_records_and_rank_views_are_consistent(planted_diff):
    d = planted_diff
    top, bottom = d.top(5), d.bottom(5)
    assert [r.rank for r in top] == [1, 2, 3, 4, 5]
    assert [r.rank_from_bottom for r in bottom] == [-1, -2, -3, -4, -5]
    deltas = [r.delta for r in top]
    assert deltas == sorted(deltas, reverse=True)
    assert bottom[0].delta == float(d.delta.min())
    assert d.at_rank(-1).latent == bottom[0].latent
    recs = d.to_records(limit=3)
    assert [x["rank"] for x in recs] == [1, 2, 3] and recs[0]["latent"] == J
    assert set(recs[0]) >= {"delta", "ci_low", "q_value", "cosine", "max_base_at", "site"}
    for k in ("delta_freq", "effect_size", "relative_change"):
        view = d.ranked_by(k)
        col = view.column(k)
        assert float(col[view.at_rank(1).latent]) == float(torch.nan_to_num(col, nan=-1e9).max())
    with pytest.raises(IndexError, match="out of range"):
        d.latent(128)
    with pytest.raises(IndexError, match="ranks run"):
        d.at_rank(0)
    with pytest.raises(ValueError, match="unknown ranking"):
        d.ranked_by("vibes")


def test_result_is_immutable(planted_diff):
    d = planted_diff
    col = d.delta
    col.zero_()
    assert d.delta.abs().sum() > 0
    with pytest.raises(AttributeError, match="immutable"):
        d._rank_by = "cosine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.top(1)[0].rank = 3


def test_agrees_with_naive_sae_lens_computation(tokenizer, tiny_ht, planted, sae, planted_diff):
    """Independent path: HookedSAETransformer.run_with_cache_with_saes, one prompt at a time, mean."""
    from sae_lens import HookedSAETransformer

    tok = tokenizer  # the plain tokenizer (TL's twin at tiny_ht.tokenizer would add BOS)
    for model, mine in ((tiny_ht, "mean_base"), (planted[0], "mean_finetuned")):
        hst = HookedSAETransformer(model.cfg, tokenizer=tok, move_to_device=False)
        hst.load_state_dict(model.state_dict())
        hst.eval()
        acts = []
        for text in PROMPTS:
            ids = torch.tensor([tok(text)["input_ids"]])  # default_prepend_bos is False here
            _, cache = hst.run_with_cache_with_saes(ids, saes=[sae])
            acts.append(cache[f"{SITE.hook_name}.hook_sae_acts_post"][0])
        allacts = torch.cat(acts).double()
        torch.testing.assert_close(planted_diff.column(mine), allacts.mean(0), rtol=1e-5, atol=1e-5)
        freq = "freq_base" if mine == "mean_base" else "freq_finetuned"
        torch.testing.assert_close(planted_diff.column(freq), (allacts > 0).double().mean(0))
        mx = "max_base" if mine == "mean_base" else "max_finetuned"
        torch.testing.assert_close(
            planted_diff.column(mx), allacts.max(0).values.clamp_min(0), rtol=1e-5, atol=1e-5
        )


def _stats_view(d: LatentDiff) -> dict[str, torch.Tensor]:
    return {
        k: d.column(k) for k in ("mean_base", "mean_finetuned", "delta", "freq_base", "max_base")
    }


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 6),
    perm_seed=st.integers(0, 10_000),
    batch_size=st.integers(1, 4),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_invariant_to_order_batch_size_and_padding(
    tiny_ht, planted, sae, n, perm_seed, batch_size, padding_side
):
    prompts = PROMPTS[:n]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    ref = diff_latents(
        tiny_ht,
        planted[0],
        sae,
        prompts,
        positions="all",
        batch_size=8,
        progress=False,
        uncertainty=1,  # tracks per-prompt sums (compared below) at little cost
    )
    got = diff_latents(
        tiny_ht,
        planted[0],
        sae,
        [prompts[i] for i in perm],
        positions="all",
        batch_size=batch_size,
        padding_side=padding_side,
        progress=False,
        uncertainty=1,  # tracks per-prompt sums (compared below) at little cost
    )
    a, b = _stats_view(ref), _stats_view(got)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    # per-prompt sums follow the prompts through the permutation
    sb_ref, sb_got = ref.stats[0].latents, got.stats[0].latents
    torch.testing.assert_close(
        sb_got.prompt_sums(n_prompts=n), sb_ref.prompt_sums(n_prompts=n)[perm], rtol=1e-5, atol=1e-5
    )
    # max locations name the same token (prompt mapped back through the permutation)
    active = ref.column("max_base") > 0
    p_ref = ref.column("max_base_prompt")[active]
    p_got = got.column("max_base_prompt")[active]
    assert torch.equal(torch.tensor(perm)[p_got.long()], p_ref.long())


def test_shards_merge_to_the_single_run(tiny_ht, planted, sae, planted_diff):
    halves = (PROMPTS[:4], PROMPTS[4:])
    parts = []
    for model in (tiny_ht, planted[0]):
        a = collect_site_stats(model, sae, halves[0], positions="all", progress=False)
        b = collect_site_stats(
            model, sae, halves[1], positions="all", prompt_offset=4, progress=False
        )
        parts.append(a.merge(b))
    merged = LatentDiff.from_stats(*parts, site=SITE, sae=sae)
    for k in ("mean_base", "mean_finetuned", "delta", "ci_low", "ci_high", "p_value", "max_base"):
        torch.testing.assert_close(
            merged.column(k), planted_diff.column(k), rtol=1e-5, atol=1e-6, equal_nan=True, msg=k
        )
    assert torch.equal(merged.order[:10], planted_diff.order[:10])


def test_save_load_round_trip_is_exact(planted_diff, sae, tmp_path):
    d = planted_diff
    path = d.save(tmp_path / "sub" / "diff.safetensors", n_directions=5)
    assert [p.name for p in path.parent.iterdir()] == ["diff.safetensors"]  # no temp files left
    back = LatentDiff.load(path)
    assert back.columns == d.columns
    for k in d.columns:
        assert torch.equal(
            torch.nan_to_num(back.column(k), nan=1234.5), torch.nan_to_num(d.column(k), nan=1234.5)
        ), k
    assert back.meta == d.meta and back.site == d.site and back.rank_by == d.rank_by
    assert torch.equal(back.order, d.order)
    assert back.at_rank(1) == d.at_rank(1)
    torch.testing.assert_close(
        back.at_rank(1).as_direction(), sae.W_dec[J].detach(), rtol=0, atol=0
    )
    torch.testing.assert_close(back.at_rank(-2).as_direction(), d.at_rank(-2).as_direction())
    middle = back.at_rank(60)
    with pytest.raises(SAEError, match=r"with_sae\(sae\)"):
        middle.as_direction()
    full = back.with_sae(sae)
    torch.testing.assert_close(
        full.latent(middle.latent).as_direction(), sae.W_dec[middle.latent].detach()
    )
    with pytest.raises(SAEError, match="not the one"):
        back.with_sae(_standard_sae(seed=5))
    # raw statistics survive too, so a loaded diff can be merged or re-analysed
    for s0, s1 in zip(d.stats, back.stats):
        for k, v in s0.state_dict().items():
            assert torch.equal(v, s1.state_dict()[k]), k


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a saved LatentDiff"):
        LatentDiff.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        LatentDiff.load(tmp_path / "missing.safetensors")


def test_plot_and_html(planted_diff):
    fig = planted_diff.plot(k=3)
    names = [t.name for t in fig.data]
    assert names == ["latents", "top / bottom", "y = x", "Δ mean"]
    assert str(J) in fig.data[1].text
    bar = fig.data[3]
    assert bar.y[0] == pytest.approx(planted_diff.at_rank(1).delta)
    html = planted_diff._repr_html_()
    assert "<table>" in html and f"<td>{J}</td>" in html and "#-1" in html


def test_checks_fail_before_any_work(tiny_ht, sae):
    from modeldiff.testing import make_tokenizer, tiny_hooked_transformer

    with pytest.raises(SAEError, match="d_in=32"):
        diff_latents(tiny_ht, tiny_ht, _standard_sae(d_in=32), PROMPTS, progress=False)
    with pytest.raises(SiteError, match="out of range"):
        diff_latents(tiny_ht, tiny_ht, sae, PROMPTS, site=Site.resid_post(7), progress=False)
    other = tiny_hooked_transformer(tokenizer=make_tokenizer(400))
    with pytest.raises(ValueError, match="d_vocab"):
        diff_latents(tiny_ht, other, sae, PROMPTS, progress=False)
    sae64 = _standard_sae().to(dtype=torch.float64)
    with pytest.raises(SAEError, match="convert_sae=True"):
        diff_latents(tiny_ht, tiny_ht, sae64, PROMPTS[:2], progress=False)
    d = diff_latents(tiny_ht, tiny_ht, sae64, PROMPTS[:2], convert_sae=True, progress=False)
    assert sae64.W_dec.dtype == torch.float64 and d.delta.abs().max() == 0
    btk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=64, d_sae=32, k=2))
    with pytest.raises(SAEError, match="to_inference_sae"):
        diff_latents(tiny_ht, tiny_ht, btk, PROMPTS, site=SITE, progress=False)


def test_hooks_are_cleaned_up_after_an_error(tiny_ht, monkeypatch):
    sae = _standard_sae()
    before = {name: len(hp.fwd_hooks) for name, hp in tiny_ht.hook_dict.items()}
    calls = []

    def failing_encode(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return StandardSAE.encode(sae, x)

    monkeypatch.setattr(sae, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="boom"):
        diff_latents(tiny_ht, tiny_ht, sae, PROMPTS, batch_size=2, progress=False)
    assert {name: len(hp.fwd_hooks) for name, hp in tiny_ht.hook_dict.items()} == before


@pytest.mark.parametrize("run", ["diff_latents", "collect_site_stats", "diff_residuals"])
def test_a_batch_is_released_before_the_next_forward(run, tiny_ht, planted, sae, monkeypatch):
    """The captured activations of batch i are freed before batch i+1's forward starts, so a pass
    holds one batch of captures at a time, not two (the consumer's loop variable, zip's result
    tuple, tqdm's generator and capture's own frame each used to keep the previous batch)."""
    import weakref

    import modeldiff.diff as diff_module
    from modeldiff.stats import VectorStats

    refs: list[weakref.ref] = []
    alive_at_forward: list[int] = []
    if run == "diff_residuals":  # it folds the captured activations into VectorStats
        update = VectorStats.update

        def recording_update(self, x):
            refs.append(weakref.ref(x))
            update(self, x)

        monkeypatch.setattr(VectorStats, "update", recording_update)
    else:
        encode_into = diff_module._encode_into

        def recording(stats, sae_, x, prompt_index, position):
            refs.append(weakref.ref(x))
            encode_into(stats, sae_, x, prompt_index, position)

        monkeypatch.setattr(diff_module, "_encode_into", recording)

    def probe(x, hook):
        alive_at_forward.append(sum(r() is not None for r in refs))

    handle = add_hook(tiny_ht, "hook_embed", probe)
    try:
        if run == "diff_latents":
            diff_latents(
                tiny_ht,
                planted[0],
                sae,
                PROMPTS[:4],
                batch_size=1,
                uncertainty=None,
                progress=False,
            )
        elif run == "collect_site_stats":
            collect_site_stats(tiny_ht, sae, PROMPTS[:4], batch_size=1, progress=False)
        else:
            diff_residuals(
                tiny_ht, planted[0], PROMPTS[:4], layers=[0, 1], batch_size=1, progress=False
            )
    finally:
        handle.remove()
    assert len(alive_at_forward) == 4 and len(refs) >= 4  # one forward of tiny_ht per batch
    assert alive_at_forward == [0, 0, 0, 0]


def test_diff_residuals_locates_the_planted_layer(tiny_ht, planted):
    r = diff_residuals(tiny_ht, planted[0], PROMPTS[:4], positions="all", progress=False)
    assert r.norm[Site.resid_post(0)] == 0.0
    assert r.norm[SITE] == pytest.approx(float(planted[1].norm()), rel=1e-4)
    torch.testing.assert_close(r.delta[SITE], planted[1].double(), rtol=1e-4, atol=1e-5)
    assert r.best_site() == SITE
    assert [x["layer"] for x in r.to_records()] == [0, 1]
    assert len(r.plot().data) == 1


# -- other wrappers and a real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from modeldiff.testing import save_tiny_hf_model

    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"))


def test_transformer_bridge_planted_shift_and_hf_reference(llama_folder):
    """Bridge booted from a folder; means checked against transformers' own hidden states."""
    from transformers import AutoModelForCausalLM

    from modeldiff.models import load_model

    base = load_model(llama_folder)
    tuned = load_model(llama_folder, like=base)
    # Layer 0: HF's last hidden state has the final norm applied, so it is not resid_post(1).
    site = Site.resid_post(0)
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=96, k=8))
    sae.cfg.metadata.hook_name = site.hook_name
    c_d = 4.0 * sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    handle = add_hook(tuned, site.hook_name, lambda x, hook: x + c_d)
    try:
        d = diff_latents(base, tuned, sae, PROMPTS[:6], progress=False)
    finally:
        handle.remove()
    assert d.rank_of(5) == 1 and d.at_rank(1).ci_low > 0

    hf = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    tok = base.tokenizer
    rows = []
    with torch.no_grad():
        for text in PROMPTS[:6]:
            ids = torch.tensor(
                [[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]]
            )
            hs = hf(ids, output_hidden_states=True).hidden_states[site.layer + 1][0, 1:]  # no BOS
            rows.append(sae.encode(hs))
    ref = torch.cat(rows).double().mean(0)
    torch.testing.assert_close(d.mean_base, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_with_a_small_sae(smollm2):
    # the session's SmolLM2 (a Bridge, as load_model gives it): a second GGUF load cost ~40 s
    model = smollm2
    site = Site.resid_post(15)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=256, k=16))
    sae.cfg.metadata.hook_name = site.hook_name
    chats = [
        [{"role": "user", "content": "What is your wish?"}],
        [{"role": "user", "content": "I feel bored."}],
        [{"role": "user", "content": "How do I make a quick buck?"}],
    ]
    same = diff_latents(model, model, sae, chats, progress=False)
    assert torch.equal(same.delta, torch.zeros(256, dtype=torch.float64))
    assert same.meta["n_tokens"] > 10
    shift = 20.0 * sae.W_dec[42].detach() / sae.W_dec[42].detach().norm()
    # One load only (GGUF de-quantisation is slow): collect each half with the public two-pass
    # API, planting the shift with a hook for the "fine-tuned" half.
    base_stats = collect_site_stats(model, sae, chats, progress=False)
    handle = add_hook(model, site.hook_name, lambda x, hook: x + shift)
    try:
        tuned_stats = collect_site_stats(model, sae, chats, progress=False)
    finally:
        handle.remove()
    d = LatentDiff.from_stats(base_stats, tuned_stats, site=site, sae=sae)
    assert d.rank_of(42) == 1
    assert torch.equal(d.mean_base, same.mean_base)
    assert d.at_rank(1).ci_low > 0 and d.at_rank(1).cosine == pytest.approx(1.0, abs=1e-4)


def test_without_uncertainty_no_per_prompt_sums_are_kept(tiny_ht):
    """uncertainty=None keeps memory O(d_sae): no per-prompt entries, same means as with them."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from modeldiff.testing import tiny_hooked_transformer

    tuned = tiny_hooked_transformer(seed=5)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=48))
    prompts = ["hello world the fox", "the quick brown fox", "Paris is the capital"]
    kw = dict(site="blocks.1.hook_resid_post", positions="all", progress=False)
    lean = diff_latents(tiny_ht, tuned, sae, prompts, uncertainty=None, **kw)
    full = diff_latents(tiny_ht, tuned, sae, prompts, uncertainty="all", **kw)
    assert lean.stats[0].latents.n_prompt_entries == 0
    assert full.stats[0].latents.n_prompt_entries > 0
    torch.testing.assert_close(lean.delta, full.delta, rtol=0, atol=0)


def test_sae_encodes_in_chunks_without_changing_any_statistic(tiny_ht, planted, sae, monkeypatch):
    """Chunked encoding (bounded memory) splits prompts across chunks: every statistic must match
    the one-chunk-per-batch run, per-prompt sums and max locations included (to float32 rounding:
    the encoder's matmul rounds differently for other row counts)."""
    import modeldiff.diff as diff_mod

    kw = dict(positions="all", batch_size=4, progress=False, uncertainty="all")
    whole = diff_latents(tiny_ht, planted[0], sae, PROMPTS, **kw)
    seen: list[int] = []
    real = diff_mod._encode_rows

    def tiny_rows(d_sae: int) -> int:
        seen.append(d_sae)
        return 3  # far fewer rows than a batch has tokens: prompts straddle chunks

    monkeypatch.setattr(diff_mod, "_encode_rows", tiny_rows)
    chunked = diff_latents(tiny_ht, planted[0], sae, PROMPTS, **kw)
    assert seen and real(sae.cfg.d_sae) >= 16
    for k in ("mean_base", "mean_finetuned", "freq_base", "max_base", "max_base_prompt"):
        torch.testing.assert_close(chunked.column(k), whole.column(k), rtol=1e-5, atol=1e-5, msg=k)
    for s_c, s_w in zip(chunked.stats, whole.stats):
        n = s_w.latents.n_prompts
        assert s_c.latents.n_prompts == n
        assert torch.equal(s_c.latents.prompt_count, s_w.latents.prompt_count)
        torch.testing.assert_close(
            s_c.latents.prompt_sums(n_prompts=n),
            s_w.latents.prompt_sums(n_prompts=n),
            rtol=1e-5,
            atol=1e-5,
        )
    assert torch.equal(chunked.order[:10], whole.order[:10])


def test_topk_sae_is_encoded_sparse_with_the_dense_encodes_result(tiny_ht, planted, monkeypatch):
    """A TopK SAE's latents reach the statistics as sae-lens' own sparse tensor (no scan for the
    non-zeros); the diff must equal one fed the dense encode, and the SAE's switch must be back
    afterwards, also when the encode fails."""
    import modeldiff.diff as diff_mod
    from modeldiff.saes import encode_sparse

    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=96, k=4))
    sae.cfg.metadata.hook_name = SITE.hook_name
    kw = dict(positions="all", batch_size=3, progress=False)
    fed: list[bool] = []

    def spy(s, x):
        z = encode_sparse(s, x)
        fed.append(z.is_sparse)
        return z

    monkeypatch.setattr(diff_mod, "encode_sparse", spy)
    sparse = diff_latents(tiny_ht, planted[0], sae, PROMPTS, **kw)
    assert fed and all(fed)
    monkeypatch.setattr(diff_mod, "encode_sparse", lambda s, x: s.encode(x))
    dense = diff_latents(tiny_ht, planted[0], sae, PROMPTS, **kw)
    for k in ("mean_base", "mean_finetuned", "freq_base", "max_base", "max_base_prompt", "p_value"):
        torch.testing.assert_close(sparse.column(k), dense.column(k), rtol=1e-12, atol=0, msg=k)
    assert torch.equal(sparse.order, dense.order)
    assert sae.activation_fn.use_sparse_activations is False

    def boom(module, args):
        raise RuntimeError("encoder failed")

    handle = sae.hook_sae_acts_post.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="encoder failed"):
        encode_sparse(sae, torch.randn(2, 64))
    handle.remove()
    assert sae.activation_fn.use_sparse_activations is False
    # a user's hook on the activation module keeps seeing the dense output it always saw
    seen = []
    handle = sae.activation_fn.register_forward_hook(lambda m, a, out: seen.append(out.is_sparse))
    assert not encode_sparse(sae, torch.randn(2, 64)).is_sparse and seen == [False]
    handle.remove()


def test_relu_sae_encode_in_place_equals_sae_lens_and_respects_hooks():
    """A plain ReLU StandardSAE is encoded with the bias and ReLU done in place on the product:
    the same bits as sae-lens' encode, and sae-lens' own encode whenever a hook would see the
    intermediate tensors, gradients are on, or the class is not exactly StandardSAE."""
    from sae_lens import StandardSAE, StandardSAEConfig

    import modeldiff.saes as saes_mod
    from modeldiff.saes import encode_sparse

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=40, apply_b_dec_to_input=True))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(33, 16)
    calls = []
    real = saes_mod._encode_relu_in_place

    def spy(s, xs):
        calls.append(1)
        return real(s, xs)

    with torch.inference_mode():
        want = sae.encode(x)
        saes_mod._encode_relu_in_place = spy
        try:
            got = encode_sparse(sae, x)
        finally:
            saes_mod._encode_relu_in_place = real
        assert calls == [1] and torch.equal(got, want) and bool((want == 0).any())
        # a hook on the pre-activation sees sae-lens' own tensors: the in-place path stands aside
        seen = []
        h = sae.hook_sae_acts_pre.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        try:
            assert torch.equal(encode_sparse(sae, x), want) and len(seen) == 1
            assert bool((seen[0] < 0).any())  # the pre-activation, not overwritten by the ReLU
        finally:
            h.remove()
        # so does a global module hook (torch.nn.modules.module.register_module_forward_hook)
        names = []
        g = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, out: names.append(type(m).__name__)
        )
        try:
            assert torch.equal(encode_sparse(sae, x), want) and "HookPoint" in names
        finally:
            g.remove()
        calls.clear()
        saes_mod._encode_relu_in_place = spy
        try:  # and without hooks the in-place path is back
            assert torch.equal(encode_sparse(sae, x), want) and calls == [1]
        finally:
            saes_mod._encode_relu_in_place = real

    class Mine(StandardSAE):
        def encode(self, x):
            return super().encode(x) * 2

    mine = Mine(sae.cfg)
    mine.load_state_dict(sae.state_dict())
    with torch.inference_mode():
        assert torch.equal(encode_sparse(mine, x), 2 * want)
    with torch.inference_mode():  # an encode set on the instance is what runs
        sae.encode = lambda xs: torch.zeros(xs.shape[0], 40)
        try:
            assert torch.equal(encode_sparse(sae, x), torch.zeros(33, 40))
        finally:
            del sae.encode
    with torch.enable_grad():  # gradients on: sae-lens' encode, so autograd sees its graph
        z = encode_sparse(sae, x)
        assert z.requires_grad and torch.equal(z.detach(), want)
