"""modeldiff: which internal features did fine-tuning move, and do they cause the behaviour?

The public API, on one screen. See README.md and docs/ for the method and examples.

Example:
    >>> from modeldiff import Site, diff_latents, steer
    >>> Site.resid_post(12).hook_name
    'blocks.12.hook_resid_post'
"""

from __future__ import annotations

# Loading models and SAEs
from .models import check_compatible, load_model, model_kind, save_model
from .saes import SAEError, load_sae

# Where in the model, and activations there
from .sites import Site, SiteError
from .tokens import PromptError, TokenizedPrompt, tokenize_prompts
from .capture import CaptureBatch, capture, collect

# Training SAEs
from .sae_training import SAEQuality, SAEQualityReport, SAETrainingResult, evaluate_sae, train_sae
from .corpus import Corpus, build_corpus

# Model diffing
from .stats import SiteStats
from .diff import LatentDiff, LatentRecord, ResidualDiff, diff_latents, diff_residuals
from .rankings import register_ranking
from .config import TokenSelection, Uncertainty
from .attribution import attribution_diff
from .memory import limit_heap_growth

# Understanding latents ("What is this latent?")
from .interpret import (
    ActivationExample,
    LogitLens,
    TokenLogit,
    TopActivations,
    activation_histogram,
    logit_lens,
    top_activations,
)

# Interventions and generation
from .directions import DirectionError, resolve_direction
from .interventions import (
    Ablate,
    Intervention,
    InterventionError,
    InterventionHandle,
    ProjectOut,
    Steer,
    SweepResult,
    ablate,
    compose,
    median_residual_norm,
    project_out,
    steer,
    sweep,
)
from .generation import GenerationError, generate, generate_ids

# Sets of latents, and tracking / detecting them across models
from .latent_sets import LatentSet, SelectionResult, select_latents
from .tracking import DetectionResult, LatentTrack, detect, detect_responses, track_latents

# Misalignment evaluation
from .evals import (
    EvalResult,
    HTTPJudge,
    LocalJudge,
    contrastive_score,
    evaluate,
    generate_answers,
    load_questions,
    screen_latents,
)

# Directions without an SAE (persona vectors)
from .persona import (
    DatasetScreen,
    MeanDifference,
    ProjectionShift,
    ScreenedExample,
    SiteDirection,
    mean_difference,
    projection_shift,
    screen_dataset,
)

# Fine-tuning and data
from .datasets import list_datasets, narrow_dataset
from .finetuning import (
    FinetuneResult,
    LatentBlock,
    LossCurve,
    RealignmentCurve,
    block_latents,
    finetune,
    realign,
    response_loss,
)

__version__ = "0.1.0"

__all__ = [
    "Ablate",
    "ActivationExample",
    "Corpus",
    "DetectionResult",
    "CaptureBatch",
    "DatasetScreen",
    "DirectionError",
    "EvalResult",
    "GenerationError",
    "HTTPJudge",
    "Intervention",
    "InterventionError",
    "InterventionHandle",
    "LatentDiff",
    "LatentRecord",
    "LatentSet",
    "LatentTrack",
    "LocalJudge",
    "LogitLens",
    "MeanDifference",
    "ProjectOut",
    "ProjectionShift",
    "PromptError",
    "ResidualDiff",
    "SAEQuality",
    "SAEQualityReport",
    "SAEError",
    "SAETrainingResult",
    "ScreenedExample",
    "SelectionResult",
    "Site",
    "SiteError",
    "SiteStats",
    "SiteDirection",
    "limit_heap_growth",
    "Steer",
    "SweepResult",
    "TokenLogit",
    "TokenSelection",
    "TokenizedPrompt",
    "TopActivations",
    "Uncertainty",
    "__version__",
    "ablate",
    "activation_histogram",
    "attribution_diff",
    "build_corpus",
    "capture",
    "check_compatible",
    "collect",
    "compose",
    "contrastive_score",
    "detect",
    "detect_responses",
    "diff_latents",
    "diff_residuals",
    "evaluate",
    "evaluate_sae",
    "generate",
    "generate_answers",
    "generate_ids",
    "load_model",
    "load_questions",
    "load_sae",
    "logit_lens",
    "mean_difference",
    "median_residual_norm",
    "model_kind",
    "project_out",
    "projection_shift",
    "register_ranking",
    "resolve_direction",
    "screen_latents",
    "screen_dataset",
    "select_latents",
    "steer",
    "save_model",
    "sweep",
    "tokenize_prompts",
    "top_activations",
    "track_latents",
    "train_sae",
    "FinetuneResult",
    "LatentBlock",
    "LossCurve",
    "RealignmentCurve",
    "block_latents",
    "finetune",
    "realign",
    "response_loss",
    "list_datasets",
    "narrow_dataset",
]
