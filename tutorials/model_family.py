# %% [markdown]
# # Adding a model family: a custom adapter
#
# Everything in modeldiff that runs a model (capture, diffing, interventions, generation, the
# judges) goes through one **model adapter**, the only code that knows how to run a family.
# transformers models, TransformerLens models and plain torch decoders whose layer list you name
# are covered already (see the adapters page). For anything else, subclass `ModelAdapter`,
# implement five things and register it. This notebook does that for a toy decoder, then checks
# the adapter the way the built-in ones are checked.

# %%
import copy

import torch
from torch import nn

from modeldiff import Site, collect, diff_latents, generate_ids, model_kind, steer
from modeldiff.adapters import HookHandle, ModelAdapter, register_adapter
from modeldiff.testing import make_tokenizer

torch.manual_seed(0)


class ToyLM(nn.Module):
    """Stands in for your family: embeddings, residual blocks, unembedding."""

    def __init__(self, vocab: int, d: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(n_layers)
        )
        self.unembed = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.unembed(x)


# %% [markdown]
# ## The adapter
#
# `matches` says which models it runs; `n_layers` and `d_model` describe them; `site_kinds` says
# which sites exist at a layer; `add_hook` puts a function on a site and returns a handle that
# removes exactly that hook; `logits` runs the model. The rest (the forward that stops after the
# deepest site, KV-cache-free decoding, devices, dtype) has working defaults in `ModelAdapter`.


# %%
@register_adapter
class ToyAdapter(ModelAdapter):
    name = "toy"

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, ToyLM)

    @property
    def n_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def d_model(self) -> int:
        return self.model.embed.embedding_dim

    def site_kinds(self, layer: int) -> tuple[str, ...]:
        return ("resid_post",)  # the residual stream after each block

    def add_hook(self, site, fn, *, prepend=False) -> HookHandle:
        point = type("Point", (), {"name": site.hook_name})()
        block = self.model.blocks[site.layer]

        def after(module, args, out):  # resid_post = input + block(input)
            x = args[0] + out
            new = fn(x, point)
            return None if new is None else new - args[0]

        return HookHandle(block.register_forward_hook(after, prepend=prepend).remove)

    def logits(self, tokens, attention_mask):
        return self.model(tokens)  # each token is computed on its own: padding cannot leak


tok = make_tokenizer()  # a small word-level tokenizer with a chat template
toy = ToyLM(len(tok))
toy.tokenizer = tok
print(model_kind(toy))
assert model_kind(toy) == "toy"

# %% [markdown]
# ## Every feature now works on it
#
# Capture activations, steer (here with the strength in units of the residual norm), generate.

# %%
prompts = ["hello world", "the cat sat on the mat", "a b c d e f", "one two three"]
acts = collect(toy, prompts, Site.resid_post(1), progress=False)
print({site: [a.shape for a in per_prompt] for site, per_prompt in acts.items()})

with steer(
    toy,
    torch.ones(16),
    site=Site.resid_post(0),
    coefficient=2.0,
    scale="residual_norm",
    calibration_prompts=prompts,
):
    steered = generate_ids(toy, [[5, 6, 7]], max_new_tokens=4, stop_at_eos=False, progress=False)
plain = generate_ids(toy, [[5, 6, 7]], max_new_tokens=4, stop_at_eos=False, progress=False)
print("plain:", plain, "steered:", steered)

# %% [markdown]
# ## Check it like the built-in adapters
#
# Before trusting an adapter: (1) the activations it reports are the model's own, (2) a shift we
# plant is what a diff ranks first, (3) the model is bit-identical after an intervention, also
# one left by an exception.

# %%
# (1) resid_post(0) by hand
ids = torch.tensor([tok("hello world")["input_ids"]])
with torch.no_grad():
    x = toy.embed(ids)
    by_hand = x + toy.blocks[0](x)
captured = collect(toy, ["hello world"], Site.resid_post(0), include_bos=True, progress=False)
got = captured[Site.resid_post(0)][0]
print(got.shape, by_hand[0].shape)
torch.testing.assert_close(got, by_hand[0, -got.shape[0] :])

# %% [markdown]
# (2) A "fine-tune" that pushes the residual after block 0 along one SAE decoder row: the diff
# must rank that latent first. The SAE is an sae-lens `StandardSAE` with orthonormal decoder
# rows, its encoder their transpose.

# %%
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

cfg = StandardSAEConfig(d_in=16, d_sae=16)
cfg.metadata.hook_name = "blocks.0.hook_resid_post"
sae = StandardSAE(cfg)
q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
with torch.no_grad():
    sae.W_dec.copy_(q.T)
    sae.W_enc.copy_(q)
    sae.b_enc.zero_()
    sae.b_dec.zero_()

planted = 7
tuned = copy.deepcopy(toy)
with torch.no_grad():
    tuned.blocks[0][1].bias += 3.0 * sae.W_dec[planted]

diff = diff_latents(toy, tuned, sae, prompts * 4, positions="all", progress=False)
print([(r.name, r.latent, round(r.delta, 3)) for r in diff.top(3)])
assert diff.rank_of(planted) == 1

# %%
# (3) bit-identical after steering, also when the block raises
before = toy(ids)
try:
    with steer(toy, torch.randn(16), site=Site.resid_post(1), coefficient=5.0):
        raise RuntimeError("an experiment that fails half-way")
except RuntimeError:
    pass
assert torch.equal(toy(ids), before)
print("the adapter passes the checks")

# %% [markdown]
# The built-in adapters are checked the same way in `tests/test_adapters.py`, and in addition
# for KV-cached greedy decoding against a full-recompute reference (`prefill` / `step`, which a
# family with its own cache implements for speed).
