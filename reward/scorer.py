"""`RewardScorer`: the user-facing API of a trained LLaVA-Reward folder.

    scorer = RewardScorer.from_pretrained("runs/reward")          # bf16 on a GPU, fp32 on the CPU
    scorer.score(["a red circle"] * 2, ["a.png", "b.png"])          # Tensor[2]
    scorer.compare("a red circle", "a.png", "b.png")                 # P(a preferred)
    scorer.rank("a red circle", ["a.png", "b.png", "c.png"])         # best first
    fn = scorer.as_reward_fn({"alignment": 1.0, "fidelity": 0.5})    # fn(images[N,3,H,W], prompts) -> [N]

Scores are the raw head outputs (logits): ``sigmoid(r)`` is a probability for unpaired heads (e.g.
P(safe)); for paired heads only differences are meaningful, and ``P(a > b) = sigmoid((r_a - r_b) / tau)``.

Without a perspective every method (and the ``llava_reward`` registry entry and the
``llava-reward`` command line) uses :func:`default_perspective`: the folder's only perspective,
else ``overall`` when it has one, else an error that lists the perspectives to choose from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .guards import process_device
from .images import ImageInputError, ImageLike, check_image_batch, load_images
from .losses import pairwise_probability
from .modeling import LlavaRewardModel

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


class PerspectiveNotChosenError(ValueError):
    """No perspective was named and the model holds several, none of them ``overall``."""


def default_perspective(perspectives: Sequence[str]) -> str:
    """The perspective used when none is named: the only one, else ``"overall"`` when present.

    Raises :class:`PerspectiveNotChosenError` (listing the perspectives) otherwise.
    """
    names = list(perspectives)
    if len(names) == 1:
        return names[0]
    if "overall" in names:
        return "overall"
    if not names:
        raise PerspectiveNotChosenError(
            "the model holds no perspective; train one with recipes/train_reward.py."
        )
    raise PerspectiveNotChosenError(
        f"the model holds the perspectives {', '.join(names)} and none is 'overall', so none is "
        f"the default: name one, e.g. perspective={names[0]!r} (--perspective {names[0]} on the "
        "command line)."
    )


def default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """``device`` defaults to this process's device (:func:`reward.guards.process_device`:
    ``cuda:{LOCAL_RANK}`` or the current CUDA device, else the CPU); ``dtype`` to bf16 on CUDA,
    fp32 elsewhere."""
    dev = torch.device(device) if device is not None else process_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


class RewardScorer:
    """Batched, frozen scoring with a :class:`LlavaRewardModel` loaded once."""

    def __init__(
        self,
        model: LlavaRewardModel,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        mixed_adapters: bool = False,
    ):
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for head in self.model.heads.values():  # heads stay float32 (tiny, and numerically safer)
            head.float()
        self.model.requires_grad_(False)
        if model.processor is None:
            raise ValueError(
                "the model has no processor; load it with from_pretrained / from_backbone."
            )
        self.processor = model.processor
        self.tau = float(model.config.tau)
        #: score several perspectives of a batch in one peft mixed-adapter forward (where the
        #: perspectives allow it) instead of switching adapters; see bench/score.py.
        self.mixed_adapters = mixed_adapters

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs,
    ) -> RewardScorer:
        """Load a reward folder written by ``LlavaRewardModel.save_pretrained`` / the recipes.

        ``kwargs`` go to :meth:`LlavaRewardModel.from_pretrained`: e.g. ``max_length`` (the token
        budget; default the saved one, else the backbone's context), ``min_pixels`` /
        ``max_pixels`` (Qwen's image area range; default the saved one)."""
        dev, dt = default_device_dtype(device, dtype)
        model = LlavaRewardModel.from_pretrained(path, torch_dtype=dt, **kwargs)
        return cls(model, dev, dt)

    @property
    def perspectives(self) -> list[str]:
        return self.model.perspectives

    @property
    def default_perspective(self) -> str:
        """What ``perspective=None`` means here (:func:`default_perspective`)."""
        return default_perspective(self.perspectives)

    # ------------------------------------------------------------------ scoring
    def _prompts_for(self, prompts: str | Sequence[str], n: int) -> list[str]:
        if isinstance(prompts, str):
            return [prompts] * n
        prompts = list(prompts)
        if len(prompts) == 1 and n > 1:
            return prompts * n
        if len(prompts) != n:
            raise ValueError(
                f"got {len(prompts)} prompts for {n} images: pass one prompt per image, "
                "or a single prompt for all."
            )
        return prompts

    def _inputs_to_device(self, inputs: dict) -> dict:
        out = {}
        for k, v in inputs.items():
            v = v.to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    def score(
        self,
        prompts: str | Sequence[str],
        images: Sequence[ImageLike] | torch.Tensor,
        perspective: str | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards ``Tensor[N]`` (``[N, 2]`` for GPM heads) of ``images`` under ``perspective``
        (default: :attr:`default_perspective`).

        ``images``: PIL images, paths, bytes or tensors (``[3, H, W]`` in ``[0, 1]``), or a
        ``Tensor[N, 3, H, W]``. ``prompts``: one per image, or one for all. Batches are sorted by
        caption length to cut padding; results come back in input order.
        """
        name = self.default_perspective if perspective is None else perspective
        return self.score_perspectives(prompts, images, [name], batch_size)[name]

    @torch.inference_mode()
    def score_perspectives(
        self,
        prompts: str | Sequence[str],
        images: Sequence[ImageLike] | torch.Tensor,
        perspectives: Sequence[str],
        batch_size: int = 16,
    ) -> dict[str, torch.Tensor]:
        """Rewards for several perspectives; each image is decoded and preprocessed once."""
        n = len(images)
        if n == 0:
            raise ImageInputError("no images to score.")
        prompts = self._prompts_for(prompts, n)
        for p in perspectives:
            self.model._check_perspective(p)
        pil = load_images(images)
        lengths = [len(self.processor._encode(p)) for p in prompts]
        order = sorted(range(n), key=lambda i: lengths[i])
        results: dict[str, list[torch.Tensor | None]] = {p: [None] * n for p in perspectives}
        with self.processor.collect_truncations():  # one warning per call, naming the count
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                inputs = self._inputs_to_device(
                    self.processor([prompts[i] for i in idx], [pil[i] for i in idx])
                )
                batch = self.model.forward_perspectives(
                    **inputs, perspectives=perspectives, mixed=self.mixed_adapters
                )
                for p in perspectives:
                    rewards = batch[p].float().cpu()
                    for j, i in enumerate(idx):
                        results[p][i] = rewards[j]
        return {p: torch.stack(v) for p, v in results.items()}

    def compare(
        self,
        prompt: str,
        image_a: ImageLike,
        image_b: ImageLike,
        perspective: str | None = None,
    ) -> float:
        """P(a preferred over b) = ``sigmoid((r_a - r_b) / tau)`` (the GPM form for 2-d heads)."""
        r = self.score([prompt, prompt], [image_a, image_b], perspective)
        return float(pairwise_probability(r[:1], r[1:], self.tau)[0])

    def rank(
        self, prompt: str, images: Sequence[ImageLike], perspective: str | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Indices of ``images`` best first, and their rewards (in input order)."""
        r = self.score(prompt, images, perspective)
        return torch.argsort(r, descending=True).tolist(), r

    # ------------------------------------------------------------------ reward functions
    def _weights(
        self, perspective_or_weights: str | Mapping[str, float] | None
    ) -> dict[str, float]:
        if perspective_or_weights is None:
            perspective_or_weights = self.default_perspective
        if isinstance(perspective_or_weights, str):
            weights = {perspective_or_weights: 1.0}
        else:
            weights = {str(k): float(v) for k, v in perspective_or_weights.items()}
        if not weights:
            raise ValueError("pass a perspective name or a non-empty {perspective: weight} dict.")
        for p in weights:
            self.model._check_perspective(p)
        return weights

    def differentiable_rewards(
        self, images: torch.Tensor, prompts: Sequence[str], weights: Mapping[str, float]
    ) -> torch.Tensor:
        """``sum_p w_p r_p(images)``, ``images [N, 3, H, W]`` in ``[0, 1]`` -> ``[N]``, with a graph
        to the pixels (the backbone's preprocessing runs in torch)."""
        check_image_batch(images)  # before the float32 cast: names a wrong dtype as such
        prompts = self._prompts_for(prompts, images.shape[0])
        inputs = self.processor.from_tensors(prompts, images.to(self.device, torch.float32))
        inputs = self._inputs_to_device(inputs)
        total = None
        for p, w in weights.items():
            r = self.model(**inputs, perspective=p).rewards.float() * w
            total = r if total is None else total + r
        return total

    def as_reward_fn(
        self,
        perspective_or_weights: str | Mapping[str, float] | None = None,
        differentiable: bool = False,
        batch_size: int = 16,
    ) -> RewardFn:
        """``fn(images: Tensor[N, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[N]``.

        ``perspective_or_weights``: a perspective name or ``{"alignment": 1.0, "fidelity": 0.5}``
        (a weighted sum of rewards); None: :attr:`default_perspective`. ``differentiable=True``: gradients reach the pixels (the
        image preprocessing is written in torch). Otherwise the images are scored frozen, in batches.
        """
        weights = self._weights(perspective_or_weights)
        # frozen scores through the torch preprocessing when it reproduces the processor exactly
        torch_path = self.processor.family.supports_torch_preprocessing()

        def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            with self.processor.collect_truncations():  # one warning per call
                return _reward(images, prompts)

        def _reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            if differentiable:
                return self.differentiable_rewards(images, prompts, weights)
            out = []
            all_prompts = self._prompts_for(prompts, images.shape[0])
            with torch.inference_mode():
                for s in range(0, images.shape[0], batch_size):
                    chunk = images[s : s + batch_size].detach()
                    chunk_prompts = all_prompts[s : s + batch_size]
                    if torch_path:
                        out.append(self.differentiable_rewards(chunk, chunk_prompts, weights).cpu())
                    else:
                        scores = self.score_perspectives(
                            chunk_prompts, chunk, list(weights), batch_size
                        )
                        out.append(sum(w * scores[p] for p, w in weights.items()))
            return torch.cat(out).to(images.device)

        reward_fn.perspective_weights = weights  # type: ignore[attr-defined]
        return reward_fn
