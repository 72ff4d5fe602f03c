"""Image-tower shortcuts (see `fast`)."""

from .fast import FAST_IMAGE_ID, encode_vit_cls, fast_image_unsupported

__all__ = ["FAST_IMAGE_ID", "encode_vit_cls", "fast_image_unsupported"]
