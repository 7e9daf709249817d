"""Model access: the family table, loading, the hook primitive and subject token positions."""

from .adapter import SITES, ModelAdapter
from .families import FAMILY_TABLE, FamilySpec, family_of
from .hooks import StopForward, Trace
from .loading import load_model
from .positions import PromptBatch, TargetBatch, encode_prompt_target, encode_prompts, subject_token_span

__all__ = [
    "FAMILY_TABLE", "FamilySpec", "family_of", "ModelAdapter", "SITES", "load_model",
    "Trace", "StopForward", "subject_token_span", "encode_prompts", "PromptBatch", "TargetBatch",
    "encode_prompt_target",
]
