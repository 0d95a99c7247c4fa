"""What a method asks of the diffusion model, and what one UNet pass gives back.

A method declares a :class:`FeatureRequest` (self-attention probabilities, cross-attention of some
prompt tokens, outputs of named UNet modules, at a timestep, with or without seeded noise, for a
prompt). The engine merges the requests of every setting of a run (:func:`merge_requests`): the
requests that share a timestep, noise and prompt are served by ONE UNet pass, which returns a
:class:`Features`. :class:`FeatureCapture` installs what a pass needs on the UNet (attention
processors on the requested layers only, forward hooks on the requested modules) and stops the
UNet as soon as the last of them has run (DiffCut needs only the encoder).

Generation asks for attention along a whole denoising trajectory instead: a
:class:`TrajectoryRequest` (cross-attention of given prompt tokens and self-attention of given
layers, conditional half of the guidance batch, averaged over the UNet calls) is served by the same
capture module (:mod:`diffseg.attention`) while diffusers' pipeline runs; it returns a
:class:`Trajectory`.

Names: the model's input is ``image_size`` pixels square; a token grid is ``grid`` tokens square
(``image_size / 8 / 2**level``); the evaluation size of labels and predictions is ``resolution``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .attention import (
    TRAJECTORY_CHUNK_ELEMENTS,
    AttentionStore,
    TrajectoryProcessor,
    TrajectoryStore,
    capture_self_attention,
    installed_processors,
)

__all__ = [
    "ALL",
    "LAST_ENCODER_SELF_ATTENTION",
    "FeatureCapture",
    "FeatureRequest",
    "Features",
    "Trajectory",
    "TrajectoryRequest",
    "merge_requests",
]

#: ``FeatureRequest(self_attention=ALL)``: every self-attention layer of the UNet.
ALL = "all"
#: Module alias: the last self-attention module (``attn1``) of the UNet's down path (DiffCut's
#: feature: ``down_blocks.2.attentions.1.transformer_blocks.<last>.attn1`` on SDXL models,
#: ``down_blocks.2.attentions.1.transformer_blocks.0.attn1`` on SD 1.x/2.x).
LAST_ENCODER_SELF_ATTENTION = "last_encoder_self_attention"


@dataclass(frozen=True)
class FeatureRequest:
    """What one method setting needs from a UNet pass.

    Attributes:
        self_attention: ``"all"`` (every self-attention layer), a tuple of token-grid sides
            (only the layers on those grids), or None.
        cross_attention: prompt token positions whose cross-attention columns are recorded
            (averaged over heads and the layers of each grid); empty = none.
        modules: UNet module names (``down_blocks.2.attentions.1...attn1``) or aliases
            (:data:`LAST_ENCODER_SELF_ATTENTION`) whose outputs are captured with forward hooks.
        timestep: the diffusion timestep of the pass; None = the backbone's default.
        noise_seed: None = the clean latent (DiffSeg); an int = Gaussian noise from a generator
            on the model's device seeded with it, one draw shared by the batch, added with the
            scheduler's ``add_noise`` at ``timestep`` (DiffCut: 42).
        prompt: the text conditioning (the empty prompt for zero-shot segmentation).
        joint_blocks: MM-DiT backbones only: blocks whose joint attention is recorded (global
            numbers; FLUX: double blocks, then single blocks).
        joint_tokens: text positions whose image -> text columns are kept
            (:attr:`Features.joint_text`).
        joint_image: keep the image -> image block (:attr:`Features.joint_image`).
        noise_step, num_steps: MM-DiT backbones only: the flow-matching noise level, the
            ``noise_step``-th timestep from the end of the backbone scheduler's ``num_steps``-step
            schedule (None: the backbone's defaults; SD3: 8 of 28). ``timestep`` wins when set.
        For MM-DiT backbones, ``modules`` name blocks (``"block.9"``) whose image-token outputs
        are captured.
    """

    self_attention: str | tuple[int, ...] | None = None
    cross_attention: tuple[int, ...] = ()
    modules: tuple[str, ...] = ()
    timestep: int | None = None
    noise_seed: int | None = None
    prompt: str = ""
    joint_blocks: tuple[int, ...] = ()
    joint_tokens: tuple[int, ...] = ()
    joint_image: bool = False
    noise_step: int | None = None
    num_steps: int | None = None

    def __post_init__(self) -> None:
        sa = self.self_attention
        if sa is not None and sa != ALL:
            if isinstance(sa, str) or not all(isinstance(g, int) and g > 0 for g in sa):
                raise ValueError(f"self_attention must be 'all', grid sides or None; got {sa!r}")
            object.__setattr__(self, "self_attention", tuple(sorted(set(sa), reverse=True)))
        object.__setattr__(self, "cross_attention", tuple(sorted(set(self.cross_attention))))
        object.__setattr__(self, "modules", tuple(dict.fromkeys(self.modules)))
        object.__setattr__(self, "joint_blocks", tuple(sorted(set(self.joint_blocks))))
        object.__setattr__(self, "joint_tokens", tuple(sorted(set(self.joint_tokens))))

    @property
    def pass_key(self) -> tuple:
        """Requests with the same key share one UNet pass (an MM-DiT noise step, when set, is
        part of it)."""
        key = (self.timestep, self.noise_seed, self.prompt)
        if self.noise_step is None and self.num_steps is None:
            return key
        return (*key, self.noise_step, self.num_steps)

    def is_empty(self) -> bool:
        return (
            self.self_attention is None
            and not self.cross_attention
            and not self.modules
            and not self.joint_blocks
        )


def _union_self_attention(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return a if b is None else b
    if ALL in (a, b):
        return ALL
    return tuple(sorted(set(a) | set(b), reverse=True))


def merge_requests(requests: Iterable[FeatureRequest]) -> list[FeatureRequest]:
    """The passes that serve ``requests``: one merged request per distinct ``pass_key``, in order
    of first appearance (what each pass captures is the union of its requests)."""
    merged: dict[tuple, FeatureRequest] = {}
    for req in requests:
        have = merged.get(req.pass_key)
        if have is None:
            merged[req.pass_key] = req
            continue
        merged[req.pass_key] = replace(
            have,
            self_attention=_union_self_attention(have.self_attention, req.self_attention),
            cross_attention=have.cross_attention + req.cross_attention,
            modules=have.modules + req.modules,
            joint_blocks=have.joint_blocks + req.joint_blocks,
            joint_tokens=have.joint_tokens + req.joint_tokens,
            joint_image=have.joint_image or req.joint_image,
        )
    return list(merged.values())


@dataclass
class Features:
    """The output of one UNet pass over a batch of ``B`` images.

    Attributes:
        self_attention: ``{grid: (B, grid**2, grid**2)}`` float32, the probabilities averaged over
            the grid's captured layers and their heads (rows are queries and sum to 1), largest
            grid first.
        cross_attention: ``{grid: (B, grid**2, T)}`` float32, the columns of the requested tokens
            (``tokens``) averaged over the grid's cross-attention layers and heads.
        tokens: the prompt positions of ``cross_attention``'s last axis.
        modules: ``{requested name: output}`` of the hooked modules, as the module returned it,
            cast to float32 (an ``attn1`` gives ``(B, grid**2, C)``, tokens in row-major order).
        images: the model input ``(B, 3, image_size, image_size)`` in [-1, 1] (refinements such
            as PAMR look at it).
        timestep, noise_seed, prompt: what the pass used.
        layers: ``{"self": {grid: [layer names]}, "modules": {alias: module name}}``.
        joint_text: MM-DiT: ``{block: (B, N_img, T)}`` float32, the image -> text probabilities
            (softmax over all image + text keys, mean over heads) of the tokens ``joint_tokens``;
            image token ``n`` is grid cell ``(n // side, n % side)``.
        joint_image: MM-DiT: ``{block: (B, N_img, N_img)}`` float32, the image -> image block of
            the same probabilities (rows sum to less than 1).
        sigma: MM-DiT: the flow-matching noise level of the pass (x_t = sigma e + (1 - sigma) z).
    """

    self_attention: dict[int, Tensor] = field(default_factory=dict)
    cross_attention: dict[int, Tensor] = field(default_factory=dict)
    tokens: tuple[int, ...] = ()
    modules: dict[str, Tensor] = field(default_factory=dict)
    images: Tensor | None = None
    timestep: int | None = None
    noise_seed: int | None = None
    prompt: str = ""
    layers: dict[str, Any] = field(default_factory=dict)
    joint_text: dict[int, Tensor] = field(default_factory=dict)
    joint_image: dict[int, Tensor] = field(default_factory=dict)
    joint_tokens: tuple[int, ...] = ()
    sigma: float | None = None

    @property
    def batch_size(self) -> int:
        groups = (self.self_attention, self.cross_attention, self.modules, self.joint_text,
                  self.joint_image)  # fmt: skip
        for group in groups:
            for value in group.values():
                return int(value.shape[0])
        return 0 if self.images is None else int(self.images.shape[0])

    def select(self, index: Sequence[int]) -> Features:
        """The same features for the images ``index`` of the batch (in that order)."""
        if list(index) == list(range(self.batch_size)):
            return self
        rows = list(index)

        def pick(t: Tensor) -> Tensor:
            return t.index_select(0, torch.tensor(rows, device=t.device))

        return replace(
            self,
            self_attention={g: pick(m) for g, m in self.self_attention.items()},
            cross_attention={g: pick(m) for g, m in self.cross_attention.items()},
            modules={k: pick(m) for k, m in self.modules.items()},
            joint_text={k: pick(m) for k, m in self.joint_text.items()},
            joint_image={k: pick(m) for k, m in self.joint_image.items()},
            images=None if self.images is None else pick(self.images),
        )


class _StopForward(Exception):
    """Raised by a hook once every requested output exists: the rest of the UNet is skipped."""


class FeatureCapture:
    """Install the capture of a (merged) request on a UNet for one ``with`` block.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        self_layers: processor names of the self-attention layers to capture (may be empty).
        cross_layers: processor names of the cross-attention layers to capture.
        cross_tokens: the token positions the cross-attention capture keeps.
        modules: ``{requested name: module name in the UNet}`` to hook.
        stop_early: raise inside the UNet once all of the above have run, so the modules after
            them never run; the caller runs the UNet through :meth:`run`.
        **capture_kwargs: ``chunk_elements``, ``output`` and ``scores_dtype`` of the attention
            capture (:func:`diffseg.attention.capture_self_attention`).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        self_layers: Sequence[str],
        cross_layers: Sequence[str] = (),
        cross_tokens: tuple[int, ...] = (),
        modules: dict[str, str] | None = None,
        stop_early: bool = True,
        **capture_kwargs: Any,
    ) -> None:
        self.unet = unet
        self.self_layers = list(self_layers)
        self.cross_layers = list(cross_layers)
        self.cross_tokens = cross_tokens
        self.modules = dict(modules or {})
        self.stop_early = stop_early
        self.capture_kwargs = capture_kwargs
        self.store = AttentionStore()
        self.outputs: dict[str, Tensor] = {}
        # Modules whose completion the early stop waits for: the attention layers (the module
        # itself, without the ".processor" suffix) and the hooked modules.
        self._pending: set[str] = set()

    def _watch(self) -> list[str]:
        names = [n.removesuffix(".processor") for n in self.self_layers + self.cross_layers]
        return names + list(self.modules.values())

    def _hook(self, module_name: str, alias: str | None):
        def hook(_module, _inputs, output):
            if alias is not None:
                out = output[0] if isinstance(output, tuple) else output
                self.outputs[alias] = out.float()
            self._pending.discard(module_name)
            if self.stop_early and not self._pending:
                raise _StopForward

        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[FeatureCapture]:
        """Processors and hooks in place for the block; everything restored after it."""
        self._pending = set(self._watch())
        self.outputs = {}
        by_module = {name: None for name in self._pending}
        by_module.update({name: alias for alias, name in self.modules.items()})
        handles = [
            self.unet.get_submodule(name).register_forward_hook(self._hook(name, alias))
            for name, alias in by_module.items()
        ]
        try:
            if self.self_layers or self.cross_layers:
                with capture_self_attention(
                    self.unet,
                    self.store,
                    layers=self.self_layers,
                    cross_layers=self.cross_layers,
                    cross_tokens=self.cross_tokens,
                    **self.capture_kwargs,
                ):
                    yield self
            else:
                self.store.reset()
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Call the UNet; an early stop is the expected way out."""
        try:
            self.unet(*args, **kwargs)
        except _StopForward:
            pass
        if self._pending:
            raise RuntimeError(f"the UNet pass never reached {sorted(self._pending)[:3]}")


# ---------------------------------------------------------------------- trajectories (generation)


@dataclass(frozen=True)
class TrajectoryRequest:
    """Attention recorded over every UNet call of a generation (SeeDiff's input).

    Attributes:
        cross_attention: prompt token positions whose cross-attention columns are recorded.
        cross_layers: UNet module names of the cross-attention layers (``...attn2``), in the
            order :meth:`Trajectory.cross_maps` stacks them.
        self_layers: UNet module names of the self-attention layers (``...attn1``) whose whole
            probabilities are recorded.
        guidance: every UNet call sees ``[unconditional, conditional]``; only the conditional
            half is recorded (False: the whole batch).
        chunk_elements: bound on the float32 scores held at once.
    """

    cross_attention: tuple[int, ...] = ()
    cross_layers: tuple[str, ...] = ()
    self_layers: tuple[str, ...] = ()
    guidance: bool = True
    chunk_elements: int = TRAJECTORY_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        if self.cross_layers and not self.cross_attention:
            raise ValueError("cross_attention must name at least one prompt position")
        if self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {self.chunk_elements}")

    @property
    def layers(self) -> tuple[str, ...]:
        return (*self.cross_layers, *self.self_layers)

    @contextlib.contextmanager
    def capture(self, unet: torch.nn.Module, model_kind: str = "") -> Iterator[Trajectory]:
        """Record the requested layers of ``unet`` for the ``with`` block (outputs untouched).

        Raises ``ValueError`` naming the layers the UNet lacks (``model_kind`` says which
        architecture the request was written for).
        """
        previous = unet.attn_processors
        missing = [n for n in self.layers if f"{n}.processor" not in previous]
        if missing:
            need = f"; it needs a {model_kind} UNet" if model_kind else ""
            raise ValueError(f"{type(unet).__name__} lacks the attention layers {missing}{need}")
        store = TrajectoryStore(self.cross_attention, self.guidance, self.chunk_elements)
        replacements = {
            f"{n}.processor": TrajectoryProcessor(store, n, previous[f"{n}.processor"])
            for n in self.layers
        }
        with installed_processors(unet, replacements):
            yield Trajectory(self, store)


@dataclass
class Trajectory:
    """What a :class:`TrajectoryRequest` recorded: step-averaged, head-summed attention."""

    request: TrajectoryRequest
    store: TrajectoryStore

    @property
    def num_calls(self) -> int:
        """UNet calls recorded."""
        return self.store.num_calls

    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        return self.store.nbytes()

    def cross_maps(self) -> Tensor:
        """float32 ``(B, T * L, r, r)``: for each token position (in order) the L cross layers
        (in request order); SD v1 at 512 with one token and SeeDiff's layers: (1, 5, 16, 16)."""
        maps = [self.store.mean(n) for n in self.request.cross_layers]  # each (B, T, N)
        b, t, n = maps[0].shape
        r = math.isqrt(n)
        return torch.stack(maps, dim=2).reshape(b, t * len(maps), r, r)

    def self_maps(self) -> dict[int, Tensor]:
        """``{r: (B, r*r, r*r)}`` keyed by the grid side recorded, smallest first. Entry
        ``[b, i, j]`` is the attention of query ``i`` to key ``j`` (rows sum to the head count)."""
        out = {}
        for name in self.request.self_layers:
            mean = self.store.mean(name)
            out[math.isqrt(mean.shape[-1])] = mean
        return dict(sorted(out.items()))
