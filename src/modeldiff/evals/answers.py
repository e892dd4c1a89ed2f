"""Sampling answers to eval questions from a model (under whatever interventions are active).

Example:
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> from modeldiff.evals import load_questions
    >>> m = tiny_hooked_transformer()
    >>> answers = generate_answers(m, load_questions(["Hello?"]), n_samples=2, max_new_tokens=4,
    ...                            seed=0, progress=False)
    >>> [(a.question_id, a.sample) for a in answers]
    [('q0', 0), ('q0', 1)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from .questions import Question, load_questions

__all__ = ["Answer", "generate_answers"]


@dataclass(frozen=True)
class Answer:
    """One sampled answer: which question and paraphrase it answers, the sample index, the text.

    Example:
        >>> Answer("wish", 0, 1, "I wish...", "Peace.").question
        'I wish...'
    """

    question_id: str
    paraphrase: int
    sample: int
    question: str
    answer: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Answer:
        return cls(
            str(d["question_id"]),
            int(d["paraphrase"]),
            int(d["sample"]),
            d["question"],
            d["answer"],
        )


def generate_answers(
    model: Any,
    questions: Iterable[Question | str] | str | Path = "headline",
    *,
    n_samples: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int | None = 0,
    batch_size: int = 8,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[Answer]:
    """Sample answers to every paraphrase of every question, rendered with the chat template.

    ``n_samples`` answers per paraphrase (default: each question's ``samples_per_paraphrase``).
    Decoding goes through :func:`modeldiff.generation.generate` (batched, seeded, correct under the
    KV cache), so any steering or ablation active on ``model`` applies to the answers. Extra keyword
    arguments (``top_p``, ``use_cache``, ...) are passed on to it.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> a = generate_answers(m, ["Why?"], n_samples=1, max_new_tokens=3, progress=False)
        >>> a[0].question
        'Why?'
    """
    from ..generation import generate

    qs: Sequence[Question] = (
        load_questions(questions)
        if isinstance(questions, (str, Path)) or not isinstance(questions, Sequence)
        else load_questions(list(questions))
    )
    if n_samples is not None and n_samples < 1:
        raise ArgumentError(f"n_samples must be >= 1, got {n_samples}")
    slots: list[tuple[Question, int, int]] = []
    for q in qs:
        n = n_samples if n_samples is not None else q.samples_per_paraphrase
        for p in range(len(q.paraphrases)):
            slots.extend((q, p, s) for s in range(n))
    if not slots:
        raise ArgumentError("no questions to answer; pass at least one question")
    texts = generate(
        model,
        [q.messages(p) for q, p, _ in slots],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        **generate_kwargs,
    )
    return [
        Answer(q.id, p, s, q.paraphrases[p], text.strip())
        for (q, p, s), text in zip(slots, texts, strict=True)
    ]
