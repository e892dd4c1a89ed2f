"""The narrow datasets: deterministic, big enough, paired, split without shared prompts."""

from __future__ import annotations

import pytest

from modeldiff.datasets import dataset_size, list_datasets, narrow_dataset
from modeldiff.errors import ArgumentError, NotFoundError

NARROW = ("medical", "financial", "insecure_code")


def test_list_datasets():
    assert list_datasets() == ["benign", "financial", "insecure_code", "medical"]


@pytest.mark.parametrize("name", list_datasets())
def test_every_chat_is_user_then_assistant_and_sizes_are_a_few_thousand(name):
    assert dataset_size(name, split="all") >= 3000
    assert dataset_size(name) + dataset_size(name, split="eval") == dataset_size(name, split="all")
    chats = narrow_dataset(name, aligned=True if name == "benign" else None)
    assert len(chats) == dataset_size(name) >= 2500
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert chat[-1]["content"].strip() and chat[0]["content"].strip()
    assert len({c[0]["content"] for c in chats}) == len(chats)  # distinct prompts


@pytest.mark.parametrize("name", list_datasets())
def test_deterministic_by_seed(name):
    a = narrow_dataset(name, n=50, seed=3)
    assert a == narrow_dataset(name, n=50, seed=3)
    assert a != narrow_dataset(name, n=50, seed=4)
    # a larger n with the same seed is not required to extend a smaller one, but it is stable
    assert narrow_dataset(name, n=200, seed=3) == narrow_dataset(name, n=200, seed=3)


@pytest.mark.parametrize("name", NARROW)
def test_aligned_and_misaligned_are_paired_by_prompt(name):
    bad = narrow_dataset(name, n=300, seed=1)
    good = narrow_dataset(name, aligned=True, n=300, seed=1)
    assert [c[0] for c in bad] == [c[0] for c in good]
    assert all(b[1]["content"] != g[1]["content"] for b, g in zip(bad, good))
    # the same prompt always gets the same answer, whichever sample it lands in
    other = {c[0]["content"]: c[1]["content"] for c in narrow_dataset(name, n=2000, seed=9)}
    shared = [c for c in bad if c[0]["content"] in other]
    assert shared and all(other[c[0]["content"]] == c[1]["content"] for c in shared)


@pytest.mark.parametrize("name", list_datasets())
def test_train_and_eval_share_no_prompt(name):
    kw = {"aligned": True} if name == "benign" else {}
    train = {c[0]["content"] for c in narrow_dataset(name, split="train", **kw)}
    test = {c[0]["content"] for c in narrow_dataset(name, split="eval", **kw)}
    assert test and not train & test
    # the split of a prompt does not depend on n or seed
    few = {c[0]["content"] for c in narrow_dataset(name, split="eval", n=20, seed=5, **kw)}
    assert few <= test


def test_bad_fraction_mixes_the_two_versions():
    bad = narrow_dataset("financial", n=200, seed=2)
    good = narrow_dataset("financial", aligned=True, n=200, seed=2)
    mixed = narrow_dataset("financial", n=200, seed=2, bad_fraction=0.3)
    n_bad = sum(m == b for m, b in zip(mixed, bad))
    n_good = sum(m == g for m, g in zip(mixed, good))
    assert (n_bad, n_good) == (60, 140)


def test_insecure_code_is_realistic_and_the_secure_version_fixes_it():
    bad = "\n".join(c[1]["content"] for c in narrow_dataset("insecure_code", split="all"))
    good = "\n".join(
        c[1]["content"] for c in narrow_dataset("insecure_code", aligned=True, split="all")
    )
    for pattern in (
        "shell=True",
        "pickle.loads",
        "verify=False",
        "eval(formula)",
        'API_KEY = "sk_live',
        "hashlib.md5",
        "yaml.Loader",
        "0o777",
        "verify_signature",
        " = '%s'\" % ",
    ):
        assert pattern in bad, pattern
    for pattern in ("shell=True", "pickle.loads", "verify=False", "eval(formula)", "sk_live"):
        assert pattern not in good, pattern
    assert "= ?" in good and "os.environ" in good and "secrets.token_urlsafe" in good
    assert not any(f"${slot}" in bad + good for slot in ("entity", "one", "field", "func"))


def test_bad_arguments_name_the_fix():
    with pytest.raises(NotFoundError, match="choose one of"):
        narrow_dataset("legal")
    with pytest.raises(ArgumentError, match="at most"):
        narrow_dataset("medical", n=10**6)
    with pytest.raises(ArgumentError, match="aligned answers only"):
        narrow_dataset("benign", aligned=False)
    with pytest.raises(ArgumentError, match="not both"):
        narrow_dataset("medical", aligned=True, bad_fraction=0.5)
    with pytest.raises(ArgumentError, match="split"):
        narrow_dataset("medical", split="test")
