"""A tiny Stable-Diffusion-architecture pipeline built in code (tests, demo, benchmarks).

Everything here is the *real* Stable Diffusion architecture (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, a byte-level BPE ``CLIPTokenizer``, ``DDIMScheduler``), only
very small and randomly initialised from a seed, so that the whole project runs offline on a CPU.

Public, stable API (other modules and engineers import these; keep the signatures):

- :func:`tiny_clip_tokenizer` ``(words=None, max_length=16) -> CLIPTokenizer``
- :func:`tiny_sd_pipeline` ``(image_size=32, ..., vocab_words=None, seed=0) -> StableDiffusionPipeline``

The pipeline round-trips through ``save_pretrained(folder)`` and
``StableDiffusionPipeline.from_pretrained(folder)`` (no safety checker, no feature extractor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Default word list of :func:`tiny_clip_tokenizer`: common caption words. Words outside the
#: vocabulary still tokenize (every byte is in the vocabulary), only into several pieces.
DEFAULT_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "to",
    "next",
    "left",
    "right",
    "above",
    "below",
    "behind",
    "front",
    "photo",
    "painting",
    "drawing",
    "picture",
    "image",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "gray",
    "brown",
    "small",
    "large",
    "big",
    "tiny",
    "bright",
    "dark",
    "one",
    "two",
    "three",
    "four",
    "circle",
    "square",
    "triangle",
    "star",
    "cat",
    "dog",
    "bird",
    "horse",
    "cow",
    "fish",
    "tree",
    "flower",
    "house",
    "car",
    "boat",
    "sky",
    "sun",
    "moon",
    "mountain",
    "river",
    "city",
    "street",
    "person",
    "man",
    "woman",
    "child",
    "apple",
    "banana",
    "cup",
    "table",
    "chair",
    "book",
    "beach",
    "forest",
    "snow",
    "night",
    "day",
    "sunset",
    "water",
    "field",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (used by byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_clip_tokenizer(words: Sequence[str] | None = None, max_length: int = 16):
    """Build a small byte-level BPE ``CLIPTokenizer`` in code.

    The vocabulary holds the special tokens, all 256 byte symbols (alone and with the
    end-of-word marker ``</w>``, so any text tokenizes without unknown tokens) and, for every word
    of ``words`` (lower-cased), the merges that build it into a single token.

    Args:
        words: words to give their own token; ``None`` uses :data:`DEFAULT_WORDS`.
        max_length: ``model_max_length`` (the pipeline pads/truncates prompts to this many tokens;
            the text encoder's ``max_position_embeddings`` must be at least this).

    Returns:
        A ``transformers.CLIPTokenizer`` that saves with ``save_pretrained`` and reloads.
    """
    from transformers import CLIPTokenizer

    words = DEFAULT_WORDS if words is None else tuple(words)
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in byte_symbols:
        vocab.setdefault(s, len(vocab))
    for s in byte_symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    b2u = _bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        word = word.strip().lower()
        if not word or " " in word:
            continue
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] = symbols[-1] + "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merge = (current, nxt)
            current = current + nxt
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_sd_pipeline(
    image_size: int = 32,
    unet_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    cross_attention_dim: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate_size: int = 64,
    vae_channels: Sequence[int] = (16, 32),
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    vae_scaling_factor: float = 0.18215,
    max_length: int = 16,
    vocab_words: Sequence[str] | None = None,
    seed: int = 0,
):
    """Build a tiny, seeded Stable Diffusion pipeline (SD 1.x architecture) in code.

    Shapes: images are ``image_size`` pixels square; the VAE downsamples by
    ``2 ** (len(vae_channels) - 1)`` (2 with the defaults), so latents are
    ``[latent_channels, image_size / f, image_size / f]`` (``[4, 16, 16]`` by default). The text
    encoder's hidden size equals ``cross_attention_dim``. The scheduler is SD 1.5's DDIM
    (scaled-linear betas 0.00085 -> 0.012, 1000 training steps, ``steps_offset=1``).

    Args:
        image_size: output resolution in pixels.
        unet_channels: UNet ``block_out_channels``; the first block is a plain ``DownBlock2D``,
            every further block a ``CrossAttnDownBlock2D`` (mirrored on the way up).
        layers_per_block: ResNet layers per UNet block.
        attention_head_dim: UNet attention head size.
        cross_attention_dim: text-embedding width (= text encoder hidden size).
        text_layers, text_heads, text_intermediate_size: ``CLIPTextModel`` size.
        vae_channels: ``AutoencoderKL`` ``block_out_channels``.
        latent_channels: latent channels (4 as in SD).
        norm_num_groups: GroupNorm groups in the UNet and VAE (must divide every channel count).
        vae_scaling_factor: ``vae.config.scaling_factor`` (SD's 0.18215 by default).
        max_length: tokenizer ``model_max_length`` and text encoder positions.
        vocab_words: extra words to give their own token (see :func:`tiny_clip_tokenizer`).
        seed: weights are initialised under ``torch.manual_seed(seed)`` (the global RNG state is
            restored afterwards), so equal arguments give identical pipelines.

    Returns:
        A ``diffusers.StableDiffusionPipeline`` on the CPU in float32 with
        ``safety_checker=None`` and ``requires_safety_checker=False``.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_channels = tuple(unet_channels)
    vae_channels = tuple(vae_channels)
    for c in unet_channels + vae_channels:
        if c % norm_num_groups:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every channel count "
                f"(got {c}); pick channels that are multiples of it."
            )
    vae_factor = 2 ** (len(vae_channels) - 1)
    if image_size % (vae_factor * 2 ** (len(unet_channels) - 1)):
        raise ValueError(
            f"image_size={image_size} must be divisible by the VAE factor {vae_factor} times the "
            f"UNet downsampling {2 ** (len(unet_channels) - 1)}."
        )
    tokenizer = tiny_clip_tokenizer(vocab_words, max_length=max_length)

    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        n = len(unet_channels)
        unet = UNet2DConditionModel(
            sample_size=image_size // vae_factor,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=unet_channels,
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=image_size,
            scaling_factor=vae_scaling_factor,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=text_intermediate_size,
                num_hidden_layers=text_layers,
                num_attention_heads=text_heads,
                max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    finally:
        torch.random.set_rng_state(rng_state)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    unet.eval()
    vae.eval()
    text_encoder.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
