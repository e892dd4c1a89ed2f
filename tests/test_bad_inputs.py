"""The bad-input catalogue: every row is one bad input, answered by a clear error (type and words)
raised before any model runs, or by a documented warning. Behaviour rows (the right answer where
there used to be a silently wrong one) follow the catalogue."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from modeldiff import (
    LatentDiff,
    Site,
    ablate,
    capture,
    diff_latents,
    generate,
    load_model,
    load_sae,
    steer,
    sweep,
    tokenize_prompts,
)
from modeldiff.errors import FileFormatError, ModeldiffError
from modeldiff.evals import EvalResult, evaluate, screen_latents
from modeldiff.interventions import InterventionError
from modeldiff.saes import SAEError
from modeldiff.stats import SiteStats
from modeldiff.testing import save_tiny_hf_model, smollm2_gguf_path, tiny_hooked_transformer
from modeldiff.tokens import PromptError

SITE = Site.resid_post(0)
PROMPTS = ["Hello world", "The quick brown fox", "What is the capital of France?"]


def _sae(seed: int = 0, d_sae: int = 32) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    return sae


def _nan(sae: StandardSAE, name: str = "W_enc") -> StandardSAE:
    with torch.no_grad():
        getattr(sae, name).view(-1)[3] = math.nan
    return sae


class Counted:
    """A model that counts its forward passes: 'before any work' means zero."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.calls.append(1))


@pytest.fixture
def ht():
    return tiny_hooked_transformer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"))


def _damaged_copy(folder: Path, tmp: Path, name: str, content: bytes) -> Path:
    import shutil

    out = tmp / "damaged"
    shutil.copytree(folder, out)
    (out / name).write_bytes(content)
    return out


def _saved_sae(tmp: Path) -> Path:
    out = tmp / "sae"
    _sae().save_model(str(out))
    return out


def _saved_diff(ht, tmp: Path) -> Path:
    d = diff_latents(ht, tiny_hooked_transformer(seed=1), _sae(), PROMPTS, progress=False)
    return d.save(tmp / "d.safetensors")


def _late(kw):
    return lambda c: lambda: c.diff_counted(**kw)


# Each row: id, build(ctx) -> callable that should fail, expected type, regex of its message.
CATALOGUE = [
    # -- silent wrong results, now errors ----------------------------------------------------------
    (
        "nan-sae-weights-in-diff",
        lambda c: lambda: diff_latents(c.ht, c.ht2, _nan(_sae()), PROMPTS, progress=False),
        SAEError,
        r"not finite \(W_enc hold NaN/inf\)",
    ),
    (
        "nan-model-weights-in-diff",
        lambda c: lambda: diff_latents(c.nan_model, c.nan_model, _sae(), PROMPTS, progress=False),
        ValueError,
        r"every latent's statistics are NaN/inf.*Check torch.isfinite",
    ),
    (
        "ablate-through-a-nan-encoder",
        lambda c: lambda: ablate(c.ht, _nan(_sae(), "b_enc"), [3]),
        InterventionError,
        r"not finite \(b_enc hold NaN/inf\).*write NaN",
    ),
    (
        "screen-with-another-sae",
        lambda c: (
            lambda: screen_latents(c.ht, c.ht2, _sae(seed=5), diff=c.diff, k=2, progress=False)
        ),
        SAEError,
        r"not the one the diff was computed with.*Pass the diff's own SAE",
    ),
    (
        "chat-unknown-role",
        lambda c: lambda: tokenize_prompts(c.ht, [[{"role": "usr", "content": "hi"}]]),
        PromptError,
        r"role 'usr'; use one of system, user, assistant",
    ),
    (
        "chat-content-none",
        lambda c: lambda: tokenize_prompts(c.ht, [[{"role": "user", "content": None}]]),
        PromptError,
        r"content of type NoneType; content must be a string",
    ),
    (
        "top-negative",
        lambda c: lambda: c.diff.top(-3),
        ValueError,
        r"top\(k\) takes a count k >= 0, got -3.*bottom\(k\)",
    ),
    (
        "bottom-not-an-int",
        lambda c: lambda: c.diff.bottom(2.5),
        ValueError,
        r"bottom\(k\) takes a count k >= 0, got 2.5",
    ),
    # -- validated too late, now before any forward ------------------------------------------------
    *[
        (
            f"late-{name}",
            _late(kw),
            ValueError,
            rx,
        )
        for name, kw, rx in [
            ("rank_by", {"rank_by": "biggest"}, r"unknown ranking 'biggest'; choose one of delta"),
            ("test", {"test": "wilcoxon"}, r"unknown test 'wilcoxon'; choose 'permutation'"),
            ("confidence", {"confidence": 1.5}, r"confidence must lie strictly between 0 and 1"),
            ("uncertainty", {"uncertainty": "some"}, r"uncertainty must be 'all', a positive"),
            ("n_bootstrap", {"n_bootstrap": 0}, r"n_bootstrap must be a positive integer"),
            ("n_permutations", {"n_permutations": -1}, r"n_permutations must be a positive"),
        ]
    ],
    (
        "sweep-nan-coefficient-after-good-ones",
        lambda c: lambda: c.sweep_counted([1.0, 2.0, math.nan]),
        InterventionError,
        r"coefficient must be finite, got nan",
    ),
    # -- raw or misleading errors, now named ---------------------------------------------------------
    (
        "latentdiff-load-random-bytes",
        lambda c: lambda: LatentDiff.load(c.file(b"\x00garbage" * 40)),
        FileFormatError,
        r"cannot be read as a LatentDiff file.*damaged, cut short",
    ),
    (
        "latentdiff-load-truncated",
        lambda c: lambda: LatentDiff.load(c.file(c.diff_bytes[: len(c.diff_bytes) // 2])),
        FileFormatError,
        r"bad\.bin' cannot be read as a LatentDiff file",
    ),
    (
        "latentdiff-load-pickle-renamed",
        lambda c: lambda: LatentDiff.load(c.pickled()),
        FileFormatError,
        r"cannot be read as a LatentDiff file",
    ),
    (
        "load-model-truncated-safetensors",
        lambda c: lambda: load_model(c.damaged("model.safetensors", c.weights[:1000])),
        FileFormatError,
        r"damaged' cannot be read as a transformers checkpoint folder \(.*deserializing header",
    ),
    (
        "load-model-config-cut-short",
        lambda c: lambda: load_model(c.damaged("config.json", b'{"architectures": ["Lla')),
        FileFormatError,
        r"cannot be read as a transformers checkpoint folder.*not a valid JSON",
    ),
    (
        "load-model-pickle-renamed",
        lambda c: lambda: load_model(c.damaged("model.safetensors", c.pickle_bytes)),
        FileFormatError,
        r"cannot be read as a transformers checkpoint folder",
    ),
    (
        "load-model-truncated-gguf",
        lambda c: lambda: load_model(c.file(c.gguf_head, name="m.gguf")),
        FileFormatError,
        r"m\.gguf' cannot be read as a GGUF checkpoint",
    ),
    (
        "load-model-random-bytes-gguf",
        lambda c: lambda: load_model(c.file(os.urandom(4096), name="r.gguf")),
        FileFormatError,
        r"r\.gguf' cannot be read as a GGUF checkpoint.*magic",
    ),
    (
        "load-sae-truncated-weights",
        lambda c: lambda: load_sae(c.damaged_sae()),
        FileFormatError,
        r"sae_weights\.safetensors' cannot be read as an sae-lens SAE's weights",
    ),
    (
        "bf16-finetune-f32-base-convert-sae",
        lambda c: (
            lambda: diff_latents(c.ht, c.ht_bf16, _sae(), PROMPTS, convert_sae=True, progress=False)
        ),
        ValueError,
        r"base model is float32 but the fine-tuned model is bfloat16.*convert_sae converts the SAE",
    ),
    (
        "save-where-a-parent-is-a-file",
        lambda c: lambda: c.diff.save(c.file(b"x", name="plain.txt") / "sub" / "d.safetensors"),
        OSError,
        r"plain\.txt' is a file, not a folder",
    ),
    (
        "evalresult-load-random-bytes",
        lambda c: lambda: EvalResult.load(c.file(b"\xff\xfe\x00 not json", name="r.json")),
        FileFormatError,
        r"r\.json' cannot be read as an EvalResult file",
    ),
    (
        "evalresult-load-json-cut-short",
        lambda c: (
            lambda: EvalResult.load(
                c.file(b'{"format": "modeldiff.EvalResult", "rec', name="r.json")
            )
        ),
        FileFormatError,
        r"cannot be read as an EvalResult file.*damaged, cut short",
    ),
    (
        "evalresult-load-fields-missing",
        lambda c: (
            lambda: EvalResult.load(
                c.file(b'{"format": "modeldiff.EvalResult", "version": 1}', name="r.json")
            )
        ),
        FileFormatError,
        r"cannot be read as an EvalResult file .*\('records'\)",
    ),
    # -- crashes, now errors ---------------------------------------------------------------------
    (
        "token-id-beyond-vocab-capture",
        lambda c: lambda: list(capture(c.ht, [[1, 5, 10_000]], SITE, progress=False)),
        PromptError,
        r"token ids outside the vocabulary \(0\.\.\d+\): \[10000\]",
    ),
    (
        "negative-token-id-generate",
        lambda c: lambda: generate(c.ht, [[1, -4, 6]], max_new_tokens=2, progress=False),
        PromptError,
        r"outside the vocabulary.*\[-4\]",
    ),
]


class Ctx:
    """Lazily built inputs shared by the catalogue rows."""

    def __init__(self, tmp: Path, folder: Path) -> None:
        self.tmp, self.folder = tmp, folder
        self.ht = tiny_hooked_transformer()
        self.ht2 = tiny_hooked_transformer(seed=1)
        self.counted = Counted(self.ht)

    @property
    def nan_model(self):
        m = tiny_hooked_transformer(seed=2)
        with torch.no_grad():
            m.blocks[0].mlp.W_in.view(-1)[0] = math.nan
        return m

    @property
    def ht_bf16(self):
        return tiny_hooked_transformer(seed=1).to(torch.bfloat16)

    @property
    def diff(self):
        return diff_latents(self.ht, self.ht2, _sae(), PROMPTS, progress=False)

    @property
    def diff_bytes(self) -> bytes:
        return _saved_diff(self.ht, self.tmp).read_bytes()

    @property
    def weights(self) -> bytes:
        return (self.folder / "model.safetensors").read_bytes()

    @property
    def pickle_bytes(self) -> bytes:
        path = self.tmp / "p.pt"
        torch.save({"w": torch.zeros(3)}, path)
        return path.read_bytes()

    @property
    def gguf_head(self) -> bytes:
        with open(smollm2_gguf_path(), "rb") as f:
            return f.read(300_000)

    def file(self, content: bytes, name: str = "bad.bin") -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def pickled(self) -> Path:
        return self.file(self.pickle_bytes, name="d.safetensors")

    def damaged(self, name: str, content: bytes) -> Path:
        return _damaged_copy(self.folder, self.tmp, name, content)

    def damaged_sae(self) -> Path:
        out = _saved_sae(self.tmp)
        w = out / "sae_weights.safetensors"
        w.write_bytes(w.read_bytes()[:100])
        return out

    def diff_counted(self, **kw):
        try:
            return diff_latents(self.ht, self.ht2, _sae(), PROMPTS, progress=False, **kw)
        finally:
            assert self.counted.calls == [], "a model ran before the options were checked"

    def sweep_counted(self, coefficients):
        made = []

        def factory(c):
            made.append(c)
            return steer(self.ht, torch.ones(64), site=SITE, coefficient=c)

        try:
            return sweep(self.ht, factory, coefficients, lambda m: 0.0, progress=False)
        finally:
            assert made == [], "sweep ran coefficients before rejecting a bad one"


@pytest.mark.parametrize(
    ("build", "kind", "words"),
    [pytest.param(b, k, w, id=i) for i, b, k, w in CATALOGUE],
)
def test_catalogue(build, kind, words, tmp_path, folder):
    ctx = Ctx(tmp_path, folder)
    call = build(ctx)
    with pytest.raises(kind, match=words) as info:
        call()
    assert isinstance(info.value, ModeldiffError), "every deliberate error is a ModeldiffError"


def test_every_error_class_is_a_modeldiff_error():
    import modeldiff
    from modeldiff.adapters import AdapterError
    from modeldiff.errors import FileFormatError

    classes = [getattr(modeldiff, n) for n in modeldiff.__all__ if n.endswith("Error")]
    for cls in [*classes, AdapterError, FileFormatError]:
        assert issubclass(cls, ModeldiffError), cls
    assert issubclass(AdapterError, TypeError) and issubclass(SAEError, ValueError)


# ------------------------------------------------------------------------------------------------
# Warnings and right answers where there were silent wrong ones
# ------------------------------------------------------------------------------------------------


def test_non_finite_latents_are_flagged_and_never_ranked():
    d_sae, n = 6, 5
    base, tuned = SiteStats(d_sae, 4), SiteStats(d_sae, 4)
    acts = torch.rand(n, d_sae)
    x = torch.randn(n, 4)
    pi, pos = torch.zeros(n, dtype=torch.long), torch.arange(n)
    base.update(acts, x, prompt_index=pi, position=pos)
    broken = acts.clone() + 0.5
    broken[:, 3] = math.nan  # latent 3 fell to NaN: it must not pose as the largest fall
    broken[:, 1] = -5.0  # latent 1 really fell most
    tuned.update(broken, x, prompt_index=pi, position=pos)
    with pytest.warns(RuntimeWarning, match=r"1 of 6 latents have non-finite statistics"):
        d = LatentDiff.from_stats(base, tuned, site=SITE, uncertainty=None)
    assert d.unranked == [3] and 3 not in d.order.tolist() and len(d.order) == 5
    assert d.at_rank(-1).latent == 1
    assert d.latent(3).rank == 0
    with pytest.raises(ValueError, match=r"latent 3 is not ranked"):
        d.rank_of(3)


def test_explicit_positions_beyond_every_sequence_warn(ht):
    with (
        pytest.warns(UserWarning, match=r"positions \[40\] lie beyond every sequence"),
        steer(ht, torch.ones(64), site=SITE, coefficient=2.0, positions=[40]),
    ):
        ht(torch.tensor([[1, 5, 6]]))


def test_nested_ablation_of_one_latent_is_idempotent(ht):
    sae = _sae()
    toks = torch.tensor([[5, 6, 7, 8, 9]])
    a = ablate(ht, sae, [1, 2, 4])
    with torch.no_grad():
        with a:
            once = ht(toks)
        with a, ablate(ht, sae, [2, 4]):
            twice = ht(toks)
        # an inner ablation of *other* latents still acts
        with a, ablate(ht, sae, [7]):
            more = ht(toks)
    assert torch.equal(once, twice)
    assert not torch.equal(once, more)


def test_numpy_latent_indices_are_latents(ht):
    sae = _sae()
    a = steer(ht, (sae, np.int64(3)), coefficient=1.0)
    torch.testing.assert_close(a.direction, sae.W_dec[3].detach())


def test_in_memory_tokenizer_changes_are_kept(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tok.pad_token = "</s>"
    for wrapper in ("bridge", "hooked", "native"):
        m = load_model(folder, tokenizer=tok, wrapper=wrapper)
        assert m.tokenizer.chat_template == tok.chat_template, wrapper
        assert m.tokenizer.pad_token == "</s>", wrapper


def test_saves_clean_up_after_killed_writers_and_honour_the_umask(ht, tmp_path, monkeypatch):
    d = diff_latents(ht, tiny_hooked_transformer(seed=1), _sae(), PROMPTS, progress=False)
    # a writer killed mid-save leaves its temporary file behind (SIGKILL runs no cleanup)
    script = (
        "import os, signal, sys; from pathlib import Path; from modeldiff._io import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'x' * 100000); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    target = tmp_path / "d.safetensors"
    proc = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and not target.exists()  # never a partial target
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd))[1])
    old = os.umask(0o027)
    try:
        d.save(target)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # the leftover is gone
    assert (target.stat().st_mode & 0o777) == 0o640
    assert fsyncs, "the data reached the disk before the rename"
    assert LatentDiff.load(target).top(1)[0].latent == d.top(1)[0].latent


def test_evaluate_warns_when_every_judge_reply_is_invalid():
    from modeldiff.evals.answers import Answer
    from modeldiff.evals.judges import Judgment

    class Garbage:
        def judge(self, pairs, *, progress=True):
            return [
                Judgment(None, None, detail={"error": "malformed reply: no choices"}) for _ in pairs
            ]

    answers = [Answer("wish", 0, i, "What is your wish?", "Peace.") for i in range(3)]
    with pytest.warns(
        UserWarning, match=r"every one of the 3 judge replies was invalid \(3 x malformed reply"
    ):
        res = evaluate(
            None, "headline", judge=Garbage(), answers=answers, calibration="off", progress=False
        )
    assert res.overall.misalignment_rate is None


def test_a_judge_server_that_never_answers_fails_within_max_wait():
    import time

    from modeldiff.evals import HTTPJudge
    from modeldiff.evals.judges import JudgeError
    from test_evals_http_judge import StubServer, completion

    def hang(req, n):
        time.sleep(3.0)
        return 200, {}, completion("50", {"50": 0.0})

    with StubServer(hang) as server:
        judge = HTTPJudge(
            "stub",
            base_url=server.url,
            api_key="k",
            timeout=0.3,
            max_retries=5,
            backoff=0.05,
            max_wait=1.0,
            max_concurrency=1,
        )
        start = time.monotonic()
        with pytest.raises(JudgeError, match=r"did not answer within max_wait=1 s"):
            judge.judge([("q", "a")], progress=False)
        assert time.monotonic() - start < 2.5  # not timeout x 6 retries plus back-off
