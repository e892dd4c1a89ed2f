"""Misalignment evaluation: question sets, answer generation, judges, scores and the causal screen.

Example:
    >>> from modeldiff.evals import load_questions
    >>> len(load_questions("headline"))
    8
"""

from .answers import Answer, generate_answers
from .calibration import Calibration
from .contrastive import ContrastiveResult, ContrastiveRow, contrastive_score, response_logprobs
from .http_judge import HTTPJudge
from .judges import (
    CATEGORIES,
    CONDENSED_RUBRIC,
    DEFAULT_PROMPTS,
    FULL_RUBRIC,
    Judge,
    JudgeCache,
    JudgeError,
    Judgment,
    SequenceScore,
    label_score,
    parse_rubric,
    rubric_to_aligned,
    sequence_score,
    weighted_score,
)
from .local_judge import LocalJudge
from .questions import (
    BUNDLED_SETS,
    FORMATS,
    Question,
    QuestionFormatError,
    load_questions,
    questions_from_csv,
    questions_from_jsonl,
    questions_from_yaml,
)
from .scores import EvalResult, QuestionStats, SampleRecord, evaluate, wilson_interval
from .screen import (
    ContrastiveScorer,
    JudgeScorer,
    Scorer,
    ScreenResult,
    ScreenRow,
    ScreenScore,
    screen_latents,
)

__all__ = [
    "ContrastiveScorer",
    "JudgeScorer",
    "ScreenResult",
    "ScreenRow",
    "ScreenScore",
    "Scorer",
    "screen_latents",
    "EvalResult",
    "LocalJudge",
    "QuestionStats",
    "SampleRecord",
    "evaluate",
    "wilson_interval",
    "Answer",
    "ContrastiveResult",
    "ContrastiveRow",
    "contrastive_score",
    "generate_answers",
    "response_logprobs",
    "BUNDLED_SETS",
    "FORMATS",
    "CATEGORIES",
    "CONDENSED_RUBRIC",
    "DEFAULT_PROMPTS",
    "FULL_RUBRIC",
    "Calibration",
    "HTTPJudge",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "Judgment",
    "Question",
    "QuestionFormatError",
    "label_score",
    "load_questions",
    "parse_rubric",
    "questions_from_csv",
    "questions_from_jsonl",
    "questions_from_yaml",
    "rubric_to_aligned",
    "SequenceScore",
    "sequence_score",
    "weighted_score",
]
