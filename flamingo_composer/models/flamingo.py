"""Flamingo: frozen vision tower -> trainable perceiver -> frozen causal LM with gated cross-attention (SPEC 1)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from flamingo_composer.models.cross_attention import media_text_time
from flamingo_composer.models.embeddings import SplicedEmbedding
from flamingo_composer.models.lm_adapter import (
    MediaConditioning,
    MediaContext,
    insert_cross_attention,
    lm_decoder,
    no_cache,
)
from flamingo_composer.models.logits import LogitProbe, check_training_logits, eval_mode, logit_transform_of
from flamingo_composer.models.perceiver import PerceiverResampler
from flamingo_composer.models.vision import measure_tower, patch_tokens, prepare_vision, vision_block_classes
from flamingo_composer.special_tokens import SPECIAL_TOKEN_KEYS


class Flamingo(nn.Module):
    """The assembled model. `lang_encoder` must already have its `SplicedEmbedding` (see embeddings.py).

    Children mirror the reference names: `vision_encoder` (open_clip `.visual`, or another tower: vision.py),
    `perceiver`, `lang_encoder`. Trainable: perceiver, gated cross-attention blocks, the spliced new-token rows;
    everything else frozen. `decoder_layers`: the LM's layer-list path when it cannot be found by itself;
    `loss_from_logits`: train on the LM's own logits instead of the fused head loss (see models/logits.py);
    `qk_norm`: LayerNorms on the queries and keys of the perceiver and the cross-attention (not in the released
    format).
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_encoder: nn.Module,
        *,
        special_token_ids: dict[str, int],
        cross_attn_every_n_layers: int = 1,
        perceiver_depth: int = 6,
        perceiver_heads: int = 8,
        perceiver_dim_head: int = 64,
        perceiver_num_latents: int = 64,
        gradient_checkpointing: bool = False,
        vision_ln_post_on_tokens: bool = False,
        per_image_cross_attention: bool = False,
        decoder_layers: str | None = None,
        loss_from_logits: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__()
        missing = [key for key in SPECIAL_TOKEN_KEYS if special_token_ids.get(key) is None]
        if missing:
            raise ValueError(f"special_token_ids lacks {missing}; expected keys {SPECIAL_TOKEN_KEYS}")
        if not isinstance(lang_encoder.get_input_embeddings(), SplicedEmbedding):
            raise ValueError("lang_encoder's input embedding must be a SplicedEmbedding (call resize_and_splice first)")
        self.special_token_ids = {key: int(special_token_ids[key]) for key in SPECIAL_TOKEN_KEYS}
        self.media_token_id = self.special_token_ids["media"]

        self.vision_encoder = prepare_vision(vision_encoder, vision_ln_post_on_tokens)
        self.vision_shape = measure_tower(vision_encoder)  # tokens, width and FLOPs of one image
        self.vis_dim = self.vision_shape.width
        self.vision_block_classes = vision_block_classes(vision_encoder)
        self.perceiver = PerceiverResampler(
            dim=self.vis_dim,
            depth=perceiver_depth,
            dim_head=perceiver_dim_head,
            heads=perceiver_heads,
            num_latents=perceiver_num_latents,
            qk_norm=qk_norm,
        )

        lang_encoder.requires_grad_(False)
        self.loss_from_logits = loss_from_logits
        self.logit_transform = logit_transform_of(lang_encoder)
        # The bare LM's own logits, to check the loss path and the wrapped layers against (real weights only).
        probe = None if lang_encoder.get_input_embeddings().weight.is_meta else LogitProbe.of(lang_encoder)
        if probe is not None and not (loss_from_logits or _head_in_forward(lang_encoder)):
            check_training_logits(lang_encoder, lang_encoder.get_output_embeddings(), self.logit_transform, probe)
        self.media_context = MediaContext()
        self.decoder_layer_classes = insert_cross_attention(
            lang_encoder,
            vis_dim=self.vis_dim,
            media_context=self.media_context,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            gradient_checkpointing=gradient_checkpointing,
            per_image_cross_attention=per_image_cross_attention,
            decoder_layers=decoder_layers,
            qk_norm=qk_norm,
        )
        lang_encoder.get_input_embeddings().new_token_rows.requires_grad_(True)
        self.lang_encoder = lang_encoder
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.gradient_checkpointing = gradient_checkpointing
        if probe is not None:
            self._check_closed_gates_give_the_bare_lm(probe)

    @torch.no_grad()
    def _check_closed_gates_give_the_bare_lm(self, probe: LogitProbe) -> None:
        """With the gates at 0 (as built) the LM must give its own logits: refuse an LM whose forward treats its
        layers differently once they are wrapped (Jamba picks each layer's mask by the layer's class)."""
        lm = self.lang_encoder
        text_time = torch.zeros_like(probe.ids)  # (1, T): no image before any token
        media = torch.zeros(1, 1, self.perceiver.latents.shape[0], self.vis_dim, device=probe.ids.device)
        try:
            with eval_mode(lm), self.media_context.activate(MediaConditioning(media=media, text_time=text_time)):
                logits = lm(input_ids=probe.ids, **no_cache(lm)).logits  # (1, T, V)
        except Exception as exc:
            raise ValueError(
                f"{type(lm).__name__}: its forward fails once Flamingo wraps its decoder layers ({type(exc).__name__}: "
                f"{exc}): it treats them unlike its own (Jamba picks each layer's inputs by its class) or passes them "
                "hidden states that are not (B, L, D) (Gemma-3n's AltUp): not supported"
            ) from exc
        if not probe.matches(logits):
            raise ValueError(
                f"{type(lm).__name__}: with closed gates its logits differ from the bare LM's (max difference "
                f"{probe.max_difference(logits)}) once Flamingo wraps its decoder layers: not supported"
            )

    def train(self, mode: bool = True) -> Flamingo:
        """The frozen vision tower stays in eval mode whatever the rest does."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def encode_media(
        self, images: torch.Tensor, image_mask: torch.Tensor, image_slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A batch's images -> media latents (B, T_img, n, D); empty slots stay zero, never encoded.

        `images` (N, 3, H, W): the batch's real images in slot order (row by row); `image_mask` (B, T_img): which
        slots hold one; `image_slots` (N,): the flat slot b * T_img + t of each image. Training batches bring the
        slots from the host (data/host_indices.py), so nothing here depends on the data's values; without them
        (evaluation, generation) they are read from the mask, one host read per call.
        """
        if image_mask is None or image_mask.dim() != 2 or images.dim() != 4:
            raise ValueError(
                "images must be (N, 3, H, W) with image_mask (B, T_img), got "
                f"{tuple(images.shape)} and {None if image_mask is None else tuple(image_mask.shape)}"
            )
        b, t_img = image_mask.shape
        if image_slots is None:
            image_slots = image_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
        if image_slots.shape[0] != images.shape[0]:  # shapes only: nothing read from the device
            raise ValueError(f"{images.shape[0]} images for {image_slots.shape[0]} filled image slots (image_mask)")
        latents = self.perceiver(patch_tokens(self.vision_encoder, images))  # (N, n, D)
        media = latents.new_zeros(b * t_img, *latents.shape[1:])  # (B * T_img, n, D)
        return media.index_copy(0, image_slots.to(latents.device), latents).view(b, t_img, *latents.shape[1:])

    def forward(
        self,
        images: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        final_hidden_states: bool = False,
        image_slots: torch.Tensor | None = None,
        text_time: torch.Tensor | None = None,
        text_segments: tuple[torch.Tensor, torch.Tensor] | None = None,
        **lm_kwargs,
    ):
        """Returns the LM's CausalLMOutputWithPast: logits (B, L, len(tokenizer)), HF shifted loss if labels.

        Images as `encode_media` takes them. Training batches also bring what the host computed from the tokens,
        so the step reads nothing back from the device: `image_slots`, `text_time` (B, L) (`media_text_time`) and
        `text_segments` (`cross_attention.image_segments`).

        `final_hidden_states=True`: the LM's last hidden states (B, L, D) instead (final norm applied, before
        `output_head`, so `logit_transform.apply(output_head(h))` equals the logits), for a loss that projects only
        the positions it needs (never a (B, L, V) tensor). Called through this module (not a separate method) so
        FSDP's hooks run.
        """
        media = self.encode_media(images, image_mask, image_slots)  # (B, T_img, n, D)
        if input_ids.dim() != 2 or media.shape[0] != input_ids.shape[0]:
            raise ValueError(f"input_ids must be (B, L) with B = the images' batch {media.shape[0]}, got "
                             f"{tuple(input_ids.shape)}")  # fmt: skip
        if text_time is None:
            text_time = media_text_time(input_ids, self.media_token_id)  # (B, L)
        conditioning = MediaConditioning(media=media, text_time=text_time, segments=text_segments)
        with self.media_context.activate(conditioning):
            if final_hidden_states:
                if self.output_head is None:
                    raise ValueError(
                        f"{type(self.lang_encoder).__name__} trains on its own logits: no hidden-state path"
                    )
                decoder = lm_decoder(self.lang_encoder)
                kwargs = {**no_cache(decoder), **lm_kwargs}
                return decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            lm_kwargs = {**no_cache(self.lang_encoder), **lm_kwargs}
            return self.lang_encoder(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @property
    def output_head(self) -> nn.Module | None:
        """The LM's output projection as a module of its own (hidden (..., D) -> logits (..., V), before
        `logit_transform`), or None when the training loss takes the LM's own logits: the LM computes them inside
        its forward (the remote MosaicGPT / MPT code), or `loss_from_logits` asks for them."""
        if self.loss_from_logits or _head_in_forward(self.lang_encoder):
            return None
        return self.lang_encoder.get_output_embeddings()

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """Encode the images once, then `lang_encoder.generate` with them held for the whole call.

        Each step's tokens get text_time from the full sequence so far (prompt + generated), so incremental
        tokens with a KV cache keep attending to the most recent image. Stops at `<|endofchunk|>` by default.
        """
        media = self.encode_media(images, image_mask)  # (B, T_img, n, D)
        generate_kwargs.setdefault("eos_token_id", self.special_token_ids["endofchunk"])
        generate_kwargs.setdefault("pad_token_id", self.special_token_ids["pad"])
        conditioning = MediaConditioning(media=media)
        lm = self.lang_encoder
        prepare_inputs = lm.prepare_inputs_for_generation

        @functools.wraps(prepare_inputs)
        def prepare_inputs_with_media(full_ids: torch.Tensor, *args, **kwargs):
            model_inputs = prepare_inputs(full_ids, *args, **kwargs)
            step_ids = model_inputs.get("input_ids")
            if step_ids is None:
                raise ValueError("Flamingo.generate needs input_ids (inputs_embeds are not supported)")
            # The step's tokens are the last ones of the full sequence (HF slices by cache_position).
            full_time = media_text_time(full_ids, self.media_token_id)  # (B', L_full)
            conditioning.text_time = full_time[:, full_time.shape[1] - step_ids.shape[1] :]  # (B', L_step)
            if conditioning.media.shape[0] != full_ids.shape[0]:  # beams / num_return_sequences
                conditioning.media = media.repeat_interleave(full_ids.shape[0] // media.shape[0], dim=0)
            return model_inputs

        lm.prepare_inputs_for_generation = prepare_inputs_with_media
        try:
            with self.media_context.activate(conditioning):
                return lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            del lm.prepare_inputs_for_generation  # back to the class method


def _head_in_forward(lm: nn.Module) -> bool:
    """The LM computes its tied logits inside its forward, with no head module (set by TiedLogitsInForward)."""
    return getattr(lm, "_tied_logits_in_forward", False)
