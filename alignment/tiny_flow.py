"""Tiny flow-matching pipelines built in code: SD 3.x and FLUX architectures (tests, benchmarks).

The real diffusers/transformers classes (``SD3Transformer2DModel`` / ``FluxTransformer2DModel``,
``AutoencoderKL`` with a shift factor, ``CLIPTextModelWithProjection`` / ``CLIPTextModel``,
``T5EncoderModel``, ``FlowMatchEulerDiscreteScheduler``), only very small and randomly initialised
from a seed, so that the flow policy and Flow-GRPO run offline on a CPU. The tokenizers are made in
code too: byte-level BPE CLIP tokenizers (:func:`alignment.tiny.tiny_clip_tokenizer`) and a
Unigram T5 tokenizer (:func:`tiny_t5_tokenizer`).

Public, stable API:

- :func:`tiny_t5_tokenizer` ``(words=None, max_length=16) -> T5Tokenizer``
- :func:`tiny_sd3_pipeline` ``(image_size=32, ..., seed=0) -> StableDiffusion3Pipeline``
- :func:`tiny_flux_pipeline` ``(image_size=32, ..., seed=0) -> FluxPipeline``

Both round-trip through ``save_pretrained(folder)`` and ``<Pipeline>.from_pretrained(folder)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from alignment.tiny import DEFAULT_WORDS, tiny_clip_tokenizer

#: Printable ASCII: every character gets a piece, so no ASCII text tokenizes to ``<unk>``.
_CHARS = tuple(chr(i) for i in range(33, 127))


def tiny_t5_tokenizer(words: Sequence[str] | None = None, max_length: int = 16):
    """Build a small Unigram ``T5Tokenizer`` in code (no sentencepiece file).

    Vocabulary: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), the word boundary ``▁``, every
    printable ASCII character, and ``▁word`` for each of ``words`` (lower-cased; default
    :data:`alignment.tiny.DEFAULT_WORDS`). Known words score higher than their spelling, so they
    tokenize to one piece; anything else falls back to characters.

    Args:
        words: words to give their own piece.
        max_length: ``model_max_length`` (the flow policy's default T5 sequence length).

    Returns:
        A ``transformers.T5Tokenizer`` (what ``T5TokenizerFast`` names in transformers 5) that
        saves with ``save_pretrained`` and reloads.
    """
    from transformers import T5Tokenizer

    words = DEFAULT_WORDS if words is None else tuple(words)
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(c, -5.0) for c in _CHARS]
    seen = {piece for piece, _ in vocab}
    for word in words:
        piece = "▁" + word.strip().lower()
        if len(piece) > 1 and " " not in piece and piece not in seen:
            seen.add(piece)
            vocab.append((piece, -1.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for weight init, restoring its state afterwards."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)


def _vae(image_size: int, channels: Sequence[int], latent_channels: int, groups: int, seed: int):
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=tuple(channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=groups,
            sample_size=image_size,
            scaling_factor=1.5305,  # SD 3.x's; FLUX uses 0.3611 / 0.1159 (any value works here)
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def _clip_config(tokenizer, hidden: int, layers: int, heads: int, max_length: int, proj: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=proj,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5(tokenizer, d_model: int, layers: int, heads: int, seed: int, dropout: float = 0.1):
    from transformers import T5Config, T5EncoderModel

    with _seeded(seed):
        return T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=d_model,
                d_kv=d_model // heads,
                d_ff=2 * d_model,
                num_layers=layers,
                num_heads=heads,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                dropout_rate=dropout,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()


def _check_sizes(image_size: int, vae_channels: Sequence[int], groups: int, multiple: int) -> int:
    for c in vae_channels:
        if c % groups:
            raise ValueError(f"norm_num_groups={groups} must divide every VAE channel count ({c}).")
    factor = 2 ** (len(vae_channels) - 1)
    if image_size % (factor * multiple):
        raise ValueError(
            f"image_size={image_size} must be divisible by the VAE factor {factor} times "
            f"{multiple} (the transformer's patching)."
        )
    return factor


def tiny_sd3_pipeline(
    image_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    text_hidden_size: int = 16,
    text_layers: int = 2,
    text_heads: int = 2,
    t5_layers: int = 2,
    vae_channels: Sequence[int] = (16, 32),
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    max_length: int = 16,
    vocab_words: Sequence[str] | None = None,
    seed: int = 0,
    t5_dropout: float = 0.1,
):
    """Build a tiny, seeded Stable Diffusion 3 pipeline (SD 3 / 3.5 architecture) in code.

    Shapes: images ``[3, image_size, image_size]``; the VAE downsamples by
    ``2 ** (len(vae_channels) - 1)`` (2 by default), so latents are ``[latent_channels, 16, 16]``
    by default and the transformer sees ``(16 / patch_size)^2 = 64`` image tokens. Two CLIP text
    encoders (hidden ``text_hidden_size``, pooled ``2 * text_hidden_size``) and a T5 encoder
    (``d_model = 2 * text_hidden_size`` = the joint attention width, as SD3 pads the CLIP
    embeddings up to T5's) make ``16 + 16`` text tokens. The scheduler is SD 3.5's
    (``FlowMatchEulerDiscreteScheduler``, shift 3). About 130K parameters with the defaults.

    Args:
        image_size: output resolution in pixels.
        num_layers, num_attention_heads, attention_head_dim, patch_size: the
            ``SD3Transformer2DModel`` (joint transformer blocks).
        text_hidden_size, text_layers, text_heads: each CLIP text encoder.
        t5_layers: T5 encoder layers.
        t5_dropout: T5's dropout rate (its own default, 0.1; active only in training mode).
        vae_channels, latent_channels, norm_num_groups: the ``AutoencoderKL``.
        max_length: all tokenizers' ``model_max_length``.
        vocab_words: words with their own token (see :func:`alignment.tiny.tiny_clip_tokenizer`).
        seed: every module is initialised under its own fixed offset of this seed (the global RNG
            state is restored), so equal arguments give identical pipelines.

    Returns:
        A ``diffusers.StableDiffusion3Pipeline`` on the CPU in float32.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    factor = _check_sizes(image_size, vae_channels, norm_num_groups, patch_size)
    joint = 2 * text_hidden_size
    latent_size = image_size // factor
    tok = tiny_clip_tokenizer(vocab_words, max_length=max_length)
    tok_2 = tiny_clip_tokenizer(vocab_words, max_length=max_length)
    tok_3 = tiny_t5_tokenizer(vocab_words, max_length=max_length)
    clip_cfg = _clip_config(
        tok, text_hidden_size, text_layers, text_heads, max_length, text_hidden_size
    )
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=patch_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=2 * text_hidden_size,
            pos_embed_max_size=latent_size // patch_size,
        ).eval()
    with _seeded(seed + 1):
        text_encoder = CLIPTextModelWithProjection(clip_cfg).eval()
    with _seeded(seed + 2):
        text_encoder_2 = CLIPTextModelWithProjection(clip_cfg).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(image_size, vae_channels, latent_channels, norm_num_groups, seed + 3),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=_t5(tok_3, joint, t5_layers, text_heads, seed + 4, t5_dropout),
        tokenizer_3=tok_3,
    )


def tiny_flux_pipeline(
    image_size: int = 32,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    guidance_embeds: bool = True,
    text_hidden_size: int = 16,
    text_layers: int = 2,
    text_heads: int = 2,
    t5_layers: int = 2,
    vae_channels: Sequence[int] = (16, 32),
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    max_length: int = 16,
    vocab_words: Sequence[str] | None = None,
    seed: int = 0,
):
    """Build a tiny, seeded FLUX.1 pipeline (FLUX.1-dev architecture) in code.

    Shapes: images ``[3, image_size, image_size]``, latents ``[latent_channels, 16, 16]`` by
    default, packed in 2x2 patches to ``64`` tokens of ``4 * latent_channels`` for the transformer
    (``in_channels = 4 * latent_channels``). The CLIP text encoder gives the pooled embedding
    (``text_hidden_size``), the T5 encoder the token embeddings (``d_model = 2 *
    text_hidden_size``). With ``guidance_embeds`` the transformer takes FLUX.1-dev's embedded
    guidance (CFG-free sampling). The scheduler is FLUX.1-dev's (dynamic shifting). Note that
    ``FluxPipeline`` defaults to 1024-pixel images: pass ``height=width=image_size`` to it (the
    flow policy takes ``resolution``). About 120K parameters with the defaults.

    Args: as :func:`tiny_sd3_pipeline`; ``num_layers`` / ``num_single_layers`` are FLUX's double
        and single stream blocks and ``sum(axes_dims_rope)`` must equal ``attention_head_dim``.

    Returns:
        A ``diffusers.FluxPipeline`` on the CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(
            f"sum(axes_dims_rope)={sum(axes_dims_rope)} must equal attention_head_dim="
            f"{attention_head_dim} (FLUX's rotary embedding covers each head)."
        )
    _check_sizes(image_size, vae_channels, norm_num_groups, 2)
    tok = tiny_clip_tokenizer(vocab_words, max_length=max_length)
    tok_2 = tiny_t5_tokenizer(vocab_words, max_length=max_length)
    clip_cfg = _clip_config(
        tok, text_hidden_size, text_layers, text_heads, max_length, text_hidden_size
    )
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=2 * text_hidden_size,
            pooled_projection_dim=text_hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=tuple(axes_dims_rope),
        ).eval()
    with _seeded(seed + 1):
        text_encoder = CLIPTextModel(clip_cfg).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(image_size, vae_channels, latent_channels, norm_num_groups, seed + 3),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=_t5(tok_2, 2 * text_hidden_size, t5_layers, text_heads, seed + 4),
        tokenizer_2=tok_2,
        transformer=transformer,
    )


__all__ = ["tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_t5_tokenizer"]
