"""The IP-Adapter image-projection layouts an Expression Adapter checkpoint may come in.

Arc2Face loads ``exp_adapter.bin`` with diffusers' ``load_ip_adapter``, whose UNet loader
(``_convert_ip_adapter_image_proj_to_diffusers``, diffusers 0.42) recognises the
``image_proj`` dict by its keys, in this order:

=================  ==============================  =========================================
layout             recognised by                   diffusers module, tokens per FLAME vector
=================  ==============================  =========================================
image_projection   ``proj.weight``                 ImageProjection: linear + LayerNorm, 4
mlp                ``proj.3.weight``               IPAdapterFullImageProjection: 2-layer MLP
                                                   + LayerNorm, 1 (one per input row)
faceid_plus        ``perceiver_resampler.*``       IPAdapterFaceIDPlusImageProjection
mlp_tokens         ``norm.weight``                 IPAdapterFaceIDImageProjection: 2-layer
                                                   MLP to T tokens + LayerNorm, T
resampler          anything else (``latents``)     IPAdapterPlusImageProjection: perceiver
                                                   resampler with Q learned queries, Q
=================  ==============================  =========================================

Every layout but ``faceid_plus`` runs on a 55-value FLAME vector. ``faceid_plus`` also
needs CLIP image features (its ``clip_embeds``), which an expression does not have, so it
is refused with a message that says so. The resampler attends over a sequence of input
tokens, so its FLAME vector is given as a sequence of one token.
"""

from __future__ import annotations

from collections.abc import Mapping

IMAGE_PROJECTION = "image_projection"
MLP = "mlp"
FACEID_PLUS = "faceid_plus"
MLP_TOKENS = "mlp_tokens"
RESAMPLER = "resampler"
LAYOUTS = (IMAGE_PROJECTION, MLP, FACEID_PLUS, MLP_TOKENS, RESAMPLER)
USABLE_LAYOUTS = (IMAGE_PROJECTION, MLP, MLP_TOKENS, RESAMPLER)


def layout_of(image_proj: Mapping[str, object]) -> str:
    """The layout diffusers will build for this ``image_proj`` dict (its checks, its order)."""
    if "proj.weight" in image_proj:
        return IMAGE_PROJECTION
    if "proj.3.weight" in image_proj:
        return MLP
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return FACEID_PLUS
    if "norm.weight" in image_proj:
        return MLP_TOKENS
    return RESAMPLER


def unusable_reason(layout: str) -> str | None:
    """Why a layout cannot condition on FLAME expressions alone (None when it can)."""
    if layout == FACEID_PLUS:
        return (
            "its projection is IP-Adapter FaceID-Plus, which also needs CLIP image features "
            "that FLAME expressions do not have"
        )
    return None


def wants_token_axis(layout: str) -> bool:
    """Whether the FLAME vector goes in as a sequence of one token, (batch, 1, 1, 55), rather
    than one embedding per image, (batch, 1, 55): the resampler attends over input tokens."""
    return layout == RESAMPLER
