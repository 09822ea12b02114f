"""PixArt-alpha / sigma (`PixArtTransformer2DModel`): self-attention over image tokens, text
through cross-attention (left alone by CLEAR), a PatchEmbed that interpolates its positions."""

from __future__ import annotations

from .base import PatchEmbedAdapter, register_adapter


class PixArtAdapter(PatchEmbedAdapter):
    class_name, label, layout = "PixArtTransformer2DModel", "PixArt", "image_only"
    needed_encoders = ("text_encoder",)
    pooled_prompts = False  # its embeddings come with attention masks instead
    text_width_key, pooled_width_key = "caption_channels", None
    img2img = False

    def pipeline_arguments(self) -> dict:
        return {"use_resolution_binning": False}  # binning would snap 4096 px to a ~1024 px bin


register_adapter(PixArtAdapter())
