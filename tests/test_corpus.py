"""build_corpus: deterministic for a seed, a manifest whose hash is the content's, sizes as asked,
the model's own chat answers, and no network."""

from __future__ import annotations

import socket

import pytest

from modeldiff import corpus as corpus_module
from modeldiff.corpus import Corpus, build_corpus, chunk_text, content_hash
from modeldiff.errors import ArgumentError
from modeldiff.testing import tiny_hooked_transformer
from modeldiff.tokens import tokenize_prompts

SMALL = dict(max_files_per_package=2)


def test_same_seed_same_corpus_other_seed_another():
    a = build_corpus("docs", n=30, seed=3, **SMALL)
    b = build_corpus("docs", n=30, seed=3, **SMALL)
    c = build_corpus("docs", n=30, seed=4, **SMALL)
    assert list(a) == list(b) and a.manifest == b.manifest
    assert list(a) != list(c) and a.manifest["hash"] != c.manifest["hash"]


def test_manifest_hash_sources_and_sizes():
    c = build_corpus("docs", n=25, seed=0, min_chars=300, max_chars=900, **SMALL)
    assert isinstance(c, list) and isinstance(c, Corpus) and len(c) == 25
    assert c.manifest["hash"] == content_hash(list(c))
    assert c.manifest["sources"] == {"packages": 13, "python": 12}
    assert c.manifest["n"] == 25 and c.manifest["seed"] == 0
    assert "torch" in c.manifest["distributions"]
    assert all(isinstance(t, str) and 300 <= len(t) <= 900 for t in c)
    assert len(set(c)) == len(c)


def test_chunks_respect_the_limits():
    text = "\n\n".join(("word " * n).strip() for n in (3, 50, 400, 7, 20))
    chunks = chunk_text(text, min_chars=40, max_chars=300)
    assert chunks and all(40 <= len(ch) <= 300 for ch in chunks)


def test_chat_answers_come_from_the_model_and_tokenize():
    model = tiny_hooked_transformer()
    kw = dict(n=4, seed=2, model=model, chat_max_new_tokens=3, progress=False)
    a, b = build_corpus("chat", **kw), build_corpus("chat", **kw)
    assert list(a) == list(b) and a.manifest["hash"] == b.manifest["hash"]
    chat, answer = a[0]
    assert chat[0]["role"] == "user" and isinstance(answer, str)
    assert a.manifest["sources"] == {"chat": 4}
    assert len(tokenize_prompts(model, a)) == 4


def test_no_network_is_touched(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("build_corpus tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    corpus_module._python_documents.cache_clear()  # read the sources again, not a cached copy
    c = build_corpus("docs", n=6, seed=1, max_files_per_package=1)
    assert len(c) == 6


def test_bad_arguments_name_the_fix():
    with pytest.raises(ArgumentError, match="model="):
        build_corpus("chat", n=3)
    with pytest.raises(ArgumentError, match="kind="):
        build_corpus("web", n=3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="fewer"):
        build_corpus("python", n=10**7)
    with pytest.raises(ArgumentError, match="positive"):
        build_corpus("python", n=0)
