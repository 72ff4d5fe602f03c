"""The text encoder shared by every prompt learner (fast, exact paths) and its reference."""

from .dense import encode_dense
from .encoder import reference_encode
from .fast import encode_shared_prefix, encode_truncated

__all__ = ["encode_dense", "encode_shared_prefix", "encode_truncated", "reference_encode"]
