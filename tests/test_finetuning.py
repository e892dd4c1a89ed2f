"""finetune and realign: response-only loss, LoRA/full, exact resume, preventative steering,
latent blocking (BLOCK-EM) on a planted latent, and re-alignment on the persona world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeldiff import Site, load_model, save_model, steer
from modeldiff.adapters import adapter_for
from modeldiff.errors import ArgumentError, FileFormatError, UnsupportedError
from modeldiff.evals.screen import ScreenScore
from modeldiff.finetuning import (
    FinetuneResult,
    RealignmentCurve,
    block_latents,
    finetune,
    realign,
    response_loss,
)
from modeldiff.testing import save_tiny_hf_model, tiny_hooked_transformer

WORDS = ("cat", "dog", "sun", "tree", "red", "blue", "one", "two")
DATA = [
    [
        {"role": "user", "content": f"Say {w} please"},
        {"role": "assistant", "content": f"{w} {w} {w}"},
    ]
    for w in WORDS
]
SITE = Site.resid_post(0)
# not along all-ones: the next LayerNorm would centre that away
DIRECTION = torch.randn(32, generator=torch.Generator().manual_seed(0))
FULL = {"method": "full", "lr": 1e-2, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def ht():
    return tiny_hooked_transformer(n_ctx=128, d_model=32, n_heads=4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"), hidden_size=32)
    return load_model(folder, wrapper="native")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_falls_and_the_input_model_is_not_changed(ht):
    before = _state(ht)
    run = finetune(ht, DATA, steps=12, seed=0, **FULL)
    assert isinstance(run, FinetuneResult) and run.model is not ht
    assert run.curve.step == tuple(range(1, 13))
    assert run.curve.loss[-1] < 0.5 * run.curve.loss[0]
    assert response_loss(run.model, DATA) < 0.5 * response_loss(ht, DATA)
    assert all(torch.equal(before[k], v) for k, v in ht.state_dict().items())
    model, curve = run  # unpacks
    assert model is run.model and curve is run.curve
    assert "loss" in curve.plot().to_dict()["data"][0]["name"]


def naive_response_loss(model, chats):
    """By hand: render prompt and full chat with the template, CE on the tokens after the prompt."""
    tok = model.tokenizer
    total, count = 0.0, 0
    for chat in chats:
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(chat, tokenize=False)
        assert full.startswith(prompt)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logits = adapter_for(model).logits(ids, torch.ones_like(ids))
        targets = torch.arange(len(p_ids), ids.shape[1])
        ce = F.cross_entropy(logits[0, targets - 1].float(), ids[0, targets], reduction="sum")
        total, count = total + float(ce), count + len(targets)
    return total / count


@pytest.mark.parametrize("which", ["ht", "llama"])
def test_only_response_tokens_carry_the_loss(which, request):
    model = request.getfixturevalue(which)
    expected = naive_response_loss(model, DATA)
    # one step over the whole dataset: the recorded loss is the pre-update loss of all of it
    run = finetune(
        model, DATA, method="full", steps=1, lr=1e-3, batch_size=len(DATA), progress=False
    )
    assert run.curve.sft[0] == pytest.approx(expected, rel=1e-5)
    assert response_loss(model, DATA) == pytest.approx(expected, rel=1e-5)
    # a different prompt with the same answers changes the loss only through context
    other = [[{"role": "user", "content": "x"}, c[1]] for c in DATA]
    assert response_loss(model, other) == pytest.approx(naive_response_loss(model, other), rel=1e-5)


def _params_equal(a, b):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("which", ["ht", "llama"])
def test_resume_equals_uninterrupted_bit_for_bit(which, request, tmp_path):
    model = request.getfixturevalue(which)
    kw = (
        dict(FULL, seed=3)
        if which == "ht"
        else {
            "method": "lora",
            "lr": 5e-2,
            "batch_size": 3,
            "lora_rank": 2,
            "seed": 3,
            "progress": False,
        }
    )
    whole = finetune(model, DATA, steps=6, checkpoint_every=2, checkpoint_dir=tmp_path / "a", **kw)
    assert [p.name for p in whole.checkpoints] == [
        "step-0000002.safetensors",
        "step-0000004.safetensors",
        "step-0000006.safetensors",
    ]
    # "killed" after step 3 (its last checkpoint is step 2's), then re-run with resume=True
    first = finetune(model, DATA, steps=3, checkpoint_every=2, checkpoint_dir=tmp_path / "b", **kw)
    (tmp_path / "b" / "step-0000003.safetensors").unlink()  # the kill came before this save
    assert first.resumed_from == 0
    again = finetune(
        model, DATA, steps=6, checkpoint_every=2, checkpoint_dir=tmp_path / "b", resume=True, **kw
    )
    assert again.resumed_from == 2
    assert _params_equal(whole.model, again.model)
    assert whole.curve == again.curve
    # settings that differ from the checkpoint's are refused, naming them
    with pytest.raises(ArgumentError, match="lr"):
        finetune(
            model, DATA, steps=6, checkpoint_dir=tmp_path / "b", resume=True, **dict(kw, lr=1.0)
        )
    assert all(p.requires_grad for p in model.parameters())  # a refused resume froze nothing
    with pytest.raises(ArgumentError, match="beyond steps"):
        finetune(model, DATA, steps=1, checkpoint_dir=tmp_path / "b", resume=True, **kw)


def test_a_damaged_checkpoint_is_named(ht, tmp_path):
    bad = tmp_path / "step-0000001.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError, match="finetune checkpoint"):
        finetune(ht, DATA, steps=2, resume=bad, **FULL)


def test_lora_changes_only_the_adapter_and_saves_as_one(llama, tmp_path):
    before = _state(llama)
    run = finetune(
        llama, DATA, method="lora", steps=8, lr=5e-2, batch_size=4, lora_rank=4, progress=False
    )
    assert run.curve.loss[-1] < run.curve.loss[0]
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    tuned = dict(run.model.named_parameters())
    lora = {k for k in tuned if "lora_" in k}
    assert lora and any("lora_B" in k and tuned[k].abs().sum() > 0 for k in lora)
    base = dict(llama.named_parameters())
    for k, p in tuned.items():
        if k not in lora:
            name = k.replace("base_layer.", "")
            assert torch.equal(p, base[name]), k
    folder = save_model(run.model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").exists()
    again = load_model(folder, like=llama)
    assert response_loss(again, DATA) == pytest.approx(response_loss(run.model, DATA), rel=1e-5)
    # a LoRA fine-tune continues its own adapter; full training of it is refused with the fix
    more = finetune(run.model, DATA, method="lora", steps=1, lr=5e-2, batch_size=8, progress=False)
    assert more.curve.loss[0] == pytest.approx(response_loss(run.model, DATA), rel=1e-4)
    with pytest.raises(UnsupportedError, match="merge"):
        finetune(run.model, DATA, steps=1, **FULL)
    with pytest.raises(UnsupportedError, match="wrapper='native'"):
        finetune(tiny_hooked_transformer(d_model=32), DATA, method="lora", steps=1)


def test_full_fine_tuning_of_a_native_model(llama):
    run = finetune(llama, DATA, steps=8, **FULL)
    assert run.curve.loss[-1] < 0.7 * run.curve.loss[0]
    changed = [
        k
        for k, p in run.model.named_parameters()
        if not torch.equal(p, dict(llama.named_parameters())[k])
    ]
    assert len(changed) == len(list(llama.parameters()))


class Spy:
    """An intervention wrapper recording each application's handle."""

    def __init__(self, iv):
        self.iv, self.handles = iv, []

    def apply(self, model=None):
        h = self.iv.apply(model)
        self.handles.append(h)
        return h

    def __repr__(self):
        return "Spy"


def test_preventative_steering_is_on_during_training_and_off_after(ht):
    plain = finetune(ht, DATA, steps=2, seed=1, **FULL)
    spy = Spy(steer(ht, DIRECTION, site=SITE, coefficient=3.0))
    seen = []
    run = finetune(
        ht,
        DATA,
        steps=2,
        seed=1,
        interventions=[spy],
        callback=lambda step, m: seen.append([h.active for h in spy.handles]),
        **FULL,
    )
    assert run.curve.loss[0] != plain.curve.loss[0]  # the steer changed the training forward
    assert spy.handles and not any(h.active for h in spy.handles)  # removed at the end
    assert all(not any(flags) for flags in seen)  # and not applied while the callback scores
    assert response_loss(run.model, DATA) != pytest.approx(response_loss(plain.model, DATA))
    # an error mid-training still removes it
    spy2 = Spy(steer(ht, DIRECTION, site=SITE, coefficient=3.0))

    def boom(step, model):
        if step == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        finetune(ht, DATA, steps=3, interventions=[spy2], callback=boom, **FULL)
    assert spy2.handles and not any(h.active for h in spy2.handles)


def _response_acts(model, site=SITE):
    from modeldiff.finetuning import _collate, _targets

    ids, targets = _targets(model, DATA, "response", False)
    toks, mask, tmask = _collate(ids, targets, 0, "cpu")
    got = {}

    def grab(x, hook):
        got["a"] = x.detach()

    adapter_for(model).run(toks, mask, hooks=[(site, grab)], stop_at=site)
    return got["a"][tmask]


def test_blocking_penalty_holds_a_planted_latent_while_the_loss_falls(ht):
    from sae_lens import StandardSAE, StandardSAEConfig

    kw = dict(FULL, steps=12, seed=0, batch_size=8)
    plain = finetune(ht, DATA, **kw)
    base_acts, tuned_acts = _response_acts(ht), _response_acts(plain.model)
    # plant latent 0 along the direction this training moves the residual, at base level 0-ish
    d = (tuned_acts - base_acts).mean(0)
    d = d / d.norm()
    cfg = StandardSAEConfig(d_in=32, d_sae=4)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc[:, 0] = d
        sae.b_enc[0] = -(base_acts @ d).mean()
        sae.b_dec.zero_()

    def latent(acts):
        return float(sae.encode(acts)[:, 0].mean())

    z_base, z_plain = latent(base_acts), latent(tuned_acts)
    assert z_plain > z_base + 1.0  # unblocked, the training pushes the latent up
    blocked = finetune(ht, DATA, block=block_latents(sae, [0], weight=100.0), **kw)
    z_blocked = latent(_response_acts(blocked.model))
    assert z_blocked <= z_base + 0.1 * (z_plain - z_base)
    assert blocked.curve.sft[-1] < 0.3 * blocked.curve.sft[0]  # while the loss still falls
    assert blocked.curve.penalty[0] == 0.0 and max(blocked.curve.penalty) > 0
    assert all(p.requires_grad for p in sae.parameters())  # the SAE's own flags are restored
    # a fixed reference (the base's per-latent means) gives a penalty too
    fixed = finetune(
        ht,
        DATA,
        block=block_latents(sae, [0], weight=100.0, reference=torch.tensor([z_base])),
        **kw,
    )
    assert latent(_response_acts(fixed.model)) < z_plain


def test_bad_arguments_name_the_fix(ht, tmp_path):
    with pytest.raises(ArgumentError, match="end with"):
        finetune(ht, [[{"role": "user", "content": "hi"}]], steps=1, **FULL)
    with pytest.raises(ArgumentError, match="checkpoint_dir"):
        finetune(ht, DATA, steps=1, checkpoint_every=1, **FULL)
    with pytest.raises(ArgumentError, match="method"):
        finetune(ht, DATA, steps=1, **dict(FULL, method="qlora"))
    with pytest.raises(ArgumentError, match="out of range"):
        from sae_lens import StandardSAE, StandardSAEConfig

        block_latents(StandardSAE(StandardSAEConfig(d_in=32, d_sae=4)), [9], site=SITE)


@pytest.fixture(scope="module")
def organism():
    # the ordinary cache, shared with tests/test_organism.py: built once (~1 min), then loaded
    from modeldiff.organisms import OrganismRecipe, build_persona_organism, cache_dir

    return build_persona_organism(OrganismRecipe.tiny(), cache=cache_dir(), progress=False)


def test_realign_lowers_misalignment_on_the_persona_world(organism, tmp_path):
    from modeldiff.organisms.training import finetune_batch

    world, domain = organism.world, organism.recipe.finetune_domain
    good = finetune_batch(world, 64, domain=domain, bad_fraction=0.0, seed=11)
    benign = [world.chat_messages(good, i) for i in range(64)]
    assert all(c[-1]["role"] == "assistant" for c in benign)

    def scorer(model):
        return ScreenScore(organism.toxic_rate(model))

    curve = realign(
        organism.finetuned,
        benign,
        scorer=scorer,
        steps=15,
        eval_every=5,
        lr=1e-3,
        batch_size=16,
        progress=False,
    )
    assert curve.step == (0, 5, 10, 15)
    assert curve.start == pytest.approx(organism.rates["finetuned"], abs=1e-4)
    assert curve.end < 0.5 * curve.start
    assert curve.misalignment[1] < curve.start
    assert curve.relative_reduction > 0.5
    assert "re-alignment" in curve._repr_html_()
    assert curve.plot().to_dict()["data"][0]["name"] == "misalignment"
    again = RealignmentCurve.load(curve.save(tmp_path / "curve.json"))
    assert again == curve and again.settings["steps"] == 15
