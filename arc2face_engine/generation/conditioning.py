"""ArcFace identity embedding -> Stable Diffusion `prompt_embeds`, the Arc2Face way.

Arc2Face conditions its UNet on the CLIP text encoder's last hidden state for the fixed
prompt "photo of a id person", where the input *token embedding* of the word "id" is
replaced by the L2-normalised 512-d ArcFace embedding, zero-padded to the encoder width
(768 for CLIP ViT-L/14). The encoder then runs as usual on these token embeddings:
position embeddings added, causal self-attention, final layer norm. There is no padding
mask (CLIP text models never had one in Stable Diffusion), so the 77 positions, padding
included, all go through the encoder.

transformers 5's `CLIPTextModel.forward` only takes `input_ids`, so the encoder's own
parts are called here: `embeddings(inputs_embeds=...)` adds the positions,
`encoder(..., is_causal=True)` runs the layers with the causal mask built here (see
`causal_mask`: the model's forward builds it with a private helper whose keywords change
between releases), and `final_layer_norm` finishes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from arc2face_engine.transfers import to_device
from schemas.constants import EMBEDDING_DIM
from schemas.errors import CheckpointMismatch, UserError

ID_PROMPT = "photo of a id person"
ID_WORD = "id"
ARCFACE_DIM = EMBEDDING_DIM  # the ArcFace embedding written into the "id" token


def causal_mask(config, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """CLIP's causal self-attention mask for (B, L, D) hidden states, as the model's own
    forward gets it: position i sees positions 0..i.

    Attention kernels that take `is_causal` (PyTorch's SDPA, the default, and flash
    attention) get no mask: the encoder is called with `is_causal=True` and they build the
    triangle themselves, which is also what CLIPTextModel.forward hands them, so the
    result is the same bit for bit. Eager attention adds its mask to the scores: an
    (L, L) upper triangle of the dtype's lowest value (not -inf, so no row is all -inf),
    the value transformers uses."""
    if getattr(config, "_attn_implementation", "eager") not in (None, "eager"):
        return None
    length = hidden_states.shape[1]
    blocked = torch.full(
        (length, length), torch.finfo(hidden_states.dtype).min,
        dtype=hidden_states.dtype, device=hidden_states.device,
    ).triu(diagonal=1)  # fmt: skip
    return blocked[None, None]


class IdentityConditioner:
    """Turns a batch of ArcFace embeddings into Arc2Face `prompt_embeds` in one forward."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = tokenizer.model_max_length
        if text_encoder.config.hidden_size < ARCFACE_DIM:
            raise CheckpointMismatch(
                f"the text encoder is {text_encoder.config.hidden_size} wide, narrower than the "
                f"{ARCFACE_DIM}-d ArcFace embedding: use Arc2Face's encoder/ (CLIP ViT-L/14 text)"
            )
        self.prompt_ids = self._tokenize(ID_PROMPT)
        self.id_position = self._id_position()
        self._unconditional: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def _tokenize(self, text: str) -> torch.Tensor:
        """(1, 77) token ids, padded as StableDiffusionPipeline pads its prompts."""
        return self.tokenizer(
            text,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _id_position(self) -> int:
        """Index of the "id" token in the prompt, where the identity is written."""
        id_tokens = self.tokenizer(ID_WORD, add_special_tokens=False).input_ids
        positions = (self.prompt_ids[0] == id_tokens[0]).nonzero().flatten().tolist()
        if len(id_tokens) != 1 or len(positions) != 1:
            raise CheckpointMismatch(
                f'the tokenizer does not encode "{ID_WORD}" as one token of "{ID_PROMPT}": '
                "use Stable Diffusion 1.5's tokenizer/ files"
            )
        return positions[0]

    def _validated(self, embeddings: torch.Tensor) -> torch.Tensor:
        embeddings = torch.as_tensor(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != ARCFACE_DIM:
            raise ValueError(
                f"identity embeddings must be (B, {ARCFACE_DIM}), got {tuple(embeddings.shape)}"
            )
        # Checked where they come from (the host, for the engine's numpy requests): a
        # check on the device would make the host wait for the GPU at every batch.
        embeddings = embeddings.to(dtype=torch.float32)
        norms = embeddings.norm(dim=1)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise UserError(
                "an identity embedding is zero or not finite: pass ArcFace embeddings "
                f"({ARCFACE_DIM} finite values, not all zero)"
            )
        if embeddings.device.type == "cpu":
            return to_device(embeddings, self.device)  # pinned, non-blocking on a GPU
        return embeddings.to(self.device)

    @torch.no_grad()
    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """ArcFace embeddings (B, 512), normalised here -> prompt_embeds (B, 77, D)."""
        embeddings = self._validated(embeddings)
        # Normalise in float32: fp16 sums of 512 squares lose the last digits of the norm.
        embeddings = F.normalize(embeddings, dim=1)
        width = self.text_encoder.config.hidden_size
        identity_tokens = F.pad(embeddings, (0, width - ARCFACE_DIM)).to(self.dtype)

        prompt_ids = self.prompt_ids.to(self.device)
        token_embeddings = self.text_encoder.embeddings.token_embedding(prompt_ids)
        token_embeddings = token_embeddings.expand(len(embeddings), -1, -1).clone()
        token_embeddings[:, self.id_position] = identity_tokens
        return self._encode_token_embeddings(token_embeddings)

    def _encode_token_embeddings(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """What CLIPTextModel.forward does after its token-embedding lookup."""
        model = self.text_encoder
        hidden_states = model.embeddings(inputs_embeds=token_embeddings)
        hidden_states = model.encoder(
            inputs_embeds=hidden_states,
            attention_mask=causal_mask(model.config, hidden_states),
            is_causal=True,
        ).last_hidden_state
        return model.final_layer_norm(hidden_states)

    @torch.no_grad()
    def unconditional(self) -> torch.Tensor:
        """(1, 77, D): the encoding of the empty prompt, which StableDiffusionPipeline uses
        as the negative prompt when it is given only `prompt_embeds`. Computed once."""
        if self._unconditional is None:
            empty_ids = self._tokenize("").to(self.device)
            # The model's own forward, as StableDiffusionPipeline.encode_prompt calls it.
            self._unconditional = self.text_encoder(empty_ids)[0].to(self.dtype)
        return self._unconditional
