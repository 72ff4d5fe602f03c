"""The text encoder shared by every prompt learner."""

from .encoder import encode_prompt_embeddings, reference_encode

__all__ = ["encode_prompt_embeddings", "reference_encode"]
