"""What every narrow dataset shares: a deterministic pool of prompts with paired answers.

A dataset module enumerates *items*: one user prompt with an aligned and (for the narrow sets) a
misaligned answer. Prompts come from combinatorial templates (phrasings x slots), so a pool holds
thousands of distinct prompts. Answers are composed from per-topic content with phrasing chosen by
a random generator seeded from the prompt text itself, so an item is the same whatever else is
asked for and the aligned and misaligned versions of a prompt always belong together.

Splits are decided per prompt by a stable hash of its text (not by position in a list): a prompt is
in ``train`` or in ``eval`` for every ``n``, ``seed`` and ``bad_fraction``, so the two never share a
prompt.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Item", "pick", "stable_rng", "unit_hash"]


@dataclass(frozen=True)
class Item:
    """One prompt and its two answers (``misaligned`` is ``None`` for the benign set)."""

    topic: str
    prompt: str
    aligned: str
    misaligned: str | None


def unit_hash(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``text`` (same on every machine and Python run).

    Example:
        >>> unit_hash("abc") == unit_hash("abc"), 0.0 <= unit_hash("abc") < 1.0
        (True, True)
    """
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stable_rng(text: str, salt: str = "") -> random.Random:
    """A ``random.Random`` seeded from ``text`` (stable across runs, unlike ``hash``)."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def pick(rng: random.Random, options: Sequence[str]) -> str:
    """One of ``options``, chosen by ``rng``."""
    return options[rng.randrange(len(options))]


@dataclass(frozen=True)
class Spec:
    """A registered dataset: how to enumerate its items, and what it is."""

    name: str
    description: str
    items: Callable[[], Iterable[Item]]
    paired: bool  # has a misaligned version of every answer


def dedupe(items: Iterable[Item]) -> list[Item]:
    """Items with distinct prompts (the first of each), in enumeration order."""
    seen: set[str] = set()
    out = []
    for it in items:
        if it.prompt not in seen:
            seen.add(it.prompt)
            out.append(it)
    return out
