"""Capture of Stable Diffusion's self-attention probabilities through a diffusers processor.

DiffSeg (docs/diffseg.md section 3) needs, for every self-attention layer (``attn1`` of each
transformer block of the UNet), the probabilities ``softmax(Q K^T * scale)`` of shape
``(heads, N, N)``, averaged over the layers of one token resolution and then over heads.

The capture is a diffusers attention processor, installed with ``unet.set_attn_processor`` on the
self-attention layers only (cross-attention keeps its processor), never a patched ``forward``.
It computes the layer's output exactly as diffusers' default processors do (projections, heads,
group/spatial norm, residual, rescale, ``to_out``) and, on the side, adds the head-mean of the
probabilities to a float32 running sum per resolution. Queries are processed in chunks, so the
largest temporary is ``(B, heads, chunk, N)`` and never a whole layer's ``(B, heads, N, N)``.

The same module serves generation (SeeDiff): :class:`TrajectoryStore` and
:class:`TrajectoryProcessor` record chosen layers over every UNet call of a denoising trajectory
(conditional half of the guidance batch, float32 running sums), leaving each layer's output to the
processor they replace, so a recorded generation makes the image an unrecorded one makes, bit for
bit. Both kinds of capture are installed by :func:`installed_processors`, and
:func:`queries_keys` / :func:`attention_probabilities` form the probabilities for both.

Typical use::

    store = AttentionStore()
    with capture_self_attention(unet, store):
        unet(latent, t, encoder_hidden_states=emb)
    maps = store.maps()   # {64: (B, 4096, 4096), 32: ..., 16: ..., 8: ...} float32
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AttentionStore",
    "CrossAttentionCaptureProcessor",
    "SelfAttentionCaptureProcessor",
    "TrajectoryProcessor",
    "TrajectoryStore",
    "attention_probabilities",
    "capture_self_attention",
    "cross_attention_layers",
    "default_chunk_elements",
    "installed_processors",
    "queries_keys",
    "self_attention_layers",
]

# Largest (B * heads * chunk * N) block of attention scores held at once. On CPU a small block that
# stays in cache is fastest (2**20 float32 = 4 MiB: 32 queries at 4096 tokens x 8 heads; see
# benchmarks/README.md); on GPUs fewer, larger blocks are (2**26 = 256 MiB). The full layer would
# be 2**27 (512 MiB per image at 4096 tokens x 8 heads).
CPU_CHUNK_ELEMENTS = 2**20
GPU_CHUNK_ELEMENTS = 2**26


def default_chunk_elements(device: torch.device | str) -> int:
    """Default bound on the scores held at once for ``device`` (elements, not bytes)."""
    return CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS


class AttentionStore:
    """Float32 running sums of head-averaged self-attention probabilities, per token resolution.

    Keys are the side ``r`` of the square token grid (a layer with ``N`` tokens has ``r = sqrt(N)``).
    For every layer the processor adds ``mean_heads(softmax(Q K^T * scale))`` of shape
    ``(B, N, N)`` to ``sums[r]`` and records the layer's name; :meth:`maps` divides by the number
    of layers. With equal head counts per layer (SD v1: 8) this equals the mean over the
    resolution's layers, then over heads (docs/diffseg.md section 3).
    """

    def __init__(self) -> None:
        self._sums: dict[int, Tensor] = {}
        self._layers: dict[int, list[str]] = {}
        self._cross_sums: dict[int, Tensor] = {}
        self._cross_layers: dict[int, list[str]] = {}

    def reset(self) -> None:
        """Forget everything accumulated (call before every UNet pass)."""
        self._sums = {}
        self._layers = {}
        self._cross_sums = {}
        self._cross_layers = {}

    def add_cross(self, res: int, name: str, columns: Tensor) -> None:
        """Add one cross-attention layer's head-mean token columns ``(B, N, T)`` at grid ``res``."""
        acc = self._cross_sums.get(res)
        self._cross_sums[res] = columns.float() if acc is None else acc.add_(columns)
        self._cross_layers.setdefault(res, []).append(name)

    def cross_maps(self) -> dict[int, Tensor]:
        """Mean over layers of the captured cross-attention columns: ``{r: (B, r*r, T)}`` float32,
        highest resolution first; column ``t`` is the attention of every query to token ``t``."""
        layers = self._cross_layers
        return {r: self._cross_sums[r] / len(layers[r]) for r in sorted(layers, reverse=True)}

    def accumulator(self, res: int, batch: int, device: torch.device) -> Tensor:
        """The running sum for resolution ``res``: float32 ``(batch, res*res, res*res)``, created
        as zeros on first use. Raises ``RuntimeError`` if a layer arrives with another batch size."""
        n = res * res
        acc = self._sums.get(res)
        if acc is None:
            acc = torch.zeros(batch, n, n, dtype=torch.float32, device=device)
            self._sums[res] = acc
        elif acc.shape[0] != batch:
            raise RuntimeError(
                f"AttentionStore got batch {batch} at resolution {res} after batch {acc.shape[0]}; "
                "call store.reset() between UNet passes."
            )
        return acc

    def add_layer(self, res: int, name: str) -> None:
        """Record that layer ``name`` contributed to resolution ``res``."""
        self._layers.setdefault(res, []).append(name)

    @property
    def layer_inventory(self) -> dict[int, list[str]]:
        """Names of the layers captured per resolution, highest resolution first."""
        return {r: list(self._layers[r]) for r in sorted(self._layers, reverse=True)}

    def maps(self) -> dict[int, Tensor]:
        """Mean over layers of the head-averaged maps: ``{r: (B, r*r, r*r)}`` float32, highest
        resolution first; every row (query) is a distribution over keys that sums to 1."""
        return {r: self._sums[r] / len(self._layers[r]) for r in sorted(self._layers, reverse=True)}


class SelfAttentionCaptureProcessor:
    """A diffusers attention processor for one self-attention layer that also records its maps.

    The output is the one diffusers' ``AttnProcessor``/``AttnProcessor2_0`` computes. The maps are
    ``softmax(Q K^T * attn.scale)`` computed in float32 (whatever the model's dtype), averaged over
    heads and added to ``store``. Calls with ``encoder_hidden_states`` (cross-attention) go to
    ``fallback`` untouched.

    Args:
        store: where the maps are accumulated.
        name: the layer's processor name (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0
            .attn1.processor``), recorded in the store's inventory.
        fallback: the processor this one replaces, used for anything that is not self-attention.
        chunk_elements: bound on ``B * heads * chunk * N``, the scores held at once; ``None``:
            :func:`default_chunk_elements` of the layer's device.
        output: ``"probs"`` computes the output from the same float32 probabilities as the maps
            (one QK^T and one softmax per layer, like diffusers' ``AttnProcessor``); ``"sdpa"``
            computes the output with ``F.scaled_dot_product_attention`` exactly as
            ``AttnProcessor2_0`` and the maps separately (QK^T and softmax twice). See
            benchmarks/README.md for which is faster.
        scores_dtype: dtype of the scores and probabilities (float32: the maps' precision does
            not depend on the UNet's dtype).
    """

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        fallback=None,
        chunk_elements: int | None = None,
        output: str = "probs",
        scores_dtype: torch.dtype = torch.float32,
    ) -> None:
        if output not in ("probs", "sdpa"):
            raise ValueError(f"output must be 'probs' or 'sdpa', got {output!r}")
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.store = store
        self.name = name
        self.fallback = fallback
        self.chunk_elements = chunk_elements
        self.output = output
        self.scores_dtype = scores_dtype

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if encoder_hidden_states is not None:
            # Not self-attention (e.g. only_cross_attention blocks): leave it to the default.
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_tokens, _ = hidden_states.shape

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, heads*d) -> (B, heads, N, d)
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])

        res = math.isqrt(n_tokens)
        if res * res != n_tokens:
            raise RuntimeError(
                f"self-attention layer {self.name} has {n_tokens} tokens, not a square grid; "
                "DiffSeg needs square images (H == W)."
            )
        acc = self.store.accumulator(res, batch, query.device)

        scale = attn.scale
        # Scores in float32 (by default) whatever the model dtype; the scale is folded into the
        # queries. The running sums stay float32 in any case.
        q32 = query.to(self.scores_dtype) * scale
        k32t = key.to(self.scores_dtype).transpose(-1, -2)
        if self.output == "probs":
            out = torch.empty_like(query)
        budget = self.chunk_elements or default_chunk_elements(query.device)
        step = max(1, budget // (batch * heads * n_tokens))
        for start in range(0, n_tokens, step):
            stop = min(start + step, n_tokens)
            scores = torch.matmul(q32[:, :, start:stop], k32t)  # (B, h, c, N)
            if mask is not None:
                m = mask if mask.shape[2] == 1 else mask[:, :, start:stop]
                scores = scores + m.float()
            probs = scores.softmax(dim=-1)
            del scores
            acc[:, start:stop].add_(probs.sum(dim=1), alpha=1.0 / heads)  # head mean
            if self.output == "probs":
                out[:, :, start:stop] = torch.matmul(probs.to(value.dtype), value)
            del probs
        self.store.add_layer(res, self.name)

        if self.output == "sdpa":
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale
            )

        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout (identity in eval)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CrossAttentionCaptureProcessor:
    """A processor for one cross-attention layer (``attn2``) that records chosen token columns.

    The layer's output is the ``fallback`` processor's, untouched. On the side, the probabilities
    ``softmax(Q K^T * attn.scale)`` over the text tokens are computed in ``scores_dtype``, the
    columns of ``tokens`` kept, averaged over heads and added to ``store`` as ``(B, N, T)``.
    """

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        tokens: tuple[int, ...],
        fallback,
        scores_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not tokens:
            raise ValueError("CrossAttentionCaptureProcessor needs at least one token position")
        self.store, self.name, self.fallback = store, name, fallback
        self.tokens = tuple(int(t) for t in tokens)
        self.scores_dtype = scores_dtype

    def __call__(
        self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kw
    ) -> Tensor:
        if encoder_hidden_states is not None:
            self._record(attn, hidden_states, encoder_hidden_states)
        return self.fallback(attn, hidden_states, encoder_hidden_states, *args, **kw)

    def _record(self, attn, hidden_states: Tensor, context: Tensor) -> None:
        if max(self.tokens) >= context.shape[1]:
            raise ValueError(
                f"token position {max(self.tokens)} is outside the prompt's {context.shape[1]} tokens"
            )
        query, key = queries_keys(attn, hidden_states, context, None)  # (B, heads, N | L, d)
        n_tokens = query.shape[2]
        scores = torch.matmul(
            query.to(self.scores_dtype) * attn.scale, key.to(self.scores_dtype).transpose(-1, -2)
        )  # (B, heads, N, L)
        probs = scores.softmax(dim=-1)[..., list(self.tokens)]  # (B, heads, N, T)
        res = math.isqrt(n_tokens)
        self.store.add_cross(res, self.name, probs.mean(dim=1).float())


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules (``attn2`` of each transformer block), keyed by
    processor name, in module order."""
    return {
        f"{name}.processor": module
        for name, module in unet.named_modules()
        if name.split(".")[-1] == "attn2" and getattr(module, "is_cross_attention", False)
    }


def self_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's self-attention modules, keyed by processor name.

    A layer counts as self-attention when its module name ends in ``attn1`` (the first attention
    of a diffusers ``BasicTransformerBlock``) and it attends to its own tokens
    (``is_cross_attention`` is False). Returns ``{"<module name>.processor": module}`` in module
    order (down blocks, mid block, up blocks).
    """
    layers = {}
    for name, module in unet.named_modules():
        if (
            name.split(".")[-1] == "attn1"
            and hasattr(module, "set_processor")
            and not getattr(module, "is_cross_attention", False)
        ):
            layers[f"{name}.processor"] = module
    return layers


@contextlib.contextmanager
def capture_self_attention(
    unet: torch.nn.Module,
    store: AttentionStore,
    chunk_elements: int | None = None,
    output: str = "probs",
    layers: Collection[str] | None = None,
    cross_layers: Collection[str] = (),
    cross_tokens: tuple[int, ...] = (),
    scores_dtype: torch.dtype = torch.float32,
) -> Iterator[AttentionStore]:
    """Install :class:`SelfAttentionCaptureProcessor` on the self-attention layers of ``unet``
    (all of them, or the processor names in ``layers``) and
    :class:`CrossAttentionCaptureProcessor` on ``cross_layers`` (recording ``cross_tokens``) for
    the duration of the ``with`` block, then restore the previous processors.

    ``store`` is reset on entry. Every other attention layer keeps its processor (diffusers'
    fused attention). Raises ``ValueError`` if the UNet has no self-attention layer to capture.
    """
    previous = dict(unet.attn_processors)
    wanted = layers
    layers = {
        name: m
        for name, m in self_attention_layers(unet).items()
        if wanted is None or name in wanted
    }
    if wanted is not None and len(layers) != len(set(wanted)):
        raise ValueError(
            f"not self-attention layers of the UNet: {sorted(set(wanted) - set(layers))}"
        )
    if wanted is None and not layers:
        raise ValueError(
            f"{type(unet).__name__} has no self-attention ('attn1') layers to capture; "
            "expected a diffusers UNet2DConditionModel."
        )
    missing = [name for name in [*layers, *cross_layers] if name not in previous]
    if missing:
        raise RuntimeError(f"attention layers without a processor entry: {missing[:3]}")
    replacements = {
        name: SelfAttentionCaptureProcessor(
            store,
            name,
            fallback=previous[name],
            chunk_elements=chunk_elements,
            output=output,
            scores_dtype=scores_dtype,
        )
        for name in layers
    }
    for name in cross_layers:
        replacements[name] = CrossAttentionCaptureProcessor(
            store, name, cross_tokens, previous[name], scores_dtype=scores_dtype
        )
    store.reset()
    with installed_processors(unet, replacements):
        yield store


@contextlib.contextmanager
def installed_processors(unet: torch.nn.Module, replacements: dict[str, object]) -> Iterator[None]:
    """Set ``replacements`` (``{processor name: processor}``) on ``unet`` for the ``with`` block;
    every other layer keeps its processor, and all previous processors come back after it."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({**previous, **replacements})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


# ---------------------------------------------------------------------- trajectories (generation)

#: Bound on the float32 scores a trajectory recording holds at once (batch * heads * query chunk
#: * keys): 64 MiB.
TRAJECTORY_CHUNK_ELEMENTS = 2**24


def queries_keys(attn, hidden_states: Tensor, context: Tensor | None, temb: Tensor | None):
    """Q and K of a diffusers ``Attention`` exactly as its default processors form them
    (spatial norm, group norm, projections, heads, q/k norms).

    Returns ``(q, k)`` of shapes ``(B, heads, Nq, d)`` and ``(B, heads, Nk, d)``.
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key


def attention_probabilities(
    query: Tensor, key: Tensor, scale: float, chunk_elements: int = TRAJECTORY_CHUNK_ELEMENTS
) -> Iterator[tuple[int, int, Tensor]]:
    """``softmax(Q K^T * scale)`` in float32, by chunks of queries.

    Args:
        query: (B, heads, Nq, d), key: (B, heads, Nk, d), any float dtype.
    Yields:
        ``(start, stop, probs)`` with probs float32 (B, heads, stop - start, Nk).
    """
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    q32, kt32 = query.float() * scale, key.float().transpose(-1, -2)
    step = max(1, chunk_elements // (b * h * nk))
    for start in range(0, nq, step):
        stop = min(start + step, nq)
        yield start, stop, torch.matmul(q32[:, :, start:stop], kt32).softmax(dim=-1)


class TrajectoryStore:
    """Float32 running sums, per layer, of head-summed attention over the UNet calls of one
    denoising trajectory, for the conditional images only.

    A self-attention layer adds its probabilities ``(B, Nq, Nk)``; a cross-attention layer adds
    the columns of ``tokens``, as ``(B, T, Nq)``. :meth:`mean` divides by the number of calls.

    Args:
        tokens: prompt positions of the cross-attention columns kept (BOS = 0).
        guidance: True when every UNet call sees the classifier-free-guidance batch
            ``[unconditional, conditional]`` (diffusers' order); only the second half is
            recorded. False: the whole batch is conditional.
        chunk_elements: bound on the float32 scores held at once.
    """

    def __init__(
        self,
        tokens: tuple[int, ...] = (),
        guidance: bool = True,
        chunk_elements: int = TRAJECTORY_CHUNK_ELEMENTS,
    ) -> None:
        self.tokens = [int(p) for p in tokens]
        self.guidance = bool(guidance)
        self.chunk_elements = int(chunk_elements)
        self.reset()

    def reset(self) -> None:
        """Forget all sums and counts."""
        self._sums: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}

    def conditional(self, batch: int) -> slice:
        """The rows of a UNet batch that belong to the conditional branch."""
        if self.guidance:
            if batch % 2:
                raise RuntimeError(f"guidance batch of odd size {batch}")
            return slice(batch // 2, batch)
        return slice(0, batch)

    def _accumulator(self, name: str, shape: tuple[int, ...], device) -> Tensor:
        acc = self._sums.get(name)
        if acc is None:
            acc = self._sums[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        return acc

    def record(self, name: str, attn, hidden_states: Tensor, context: Tensor | None, temb):
        """Add one call of layer ``name`` (self-attention when ``context`` is None)."""
        rows = self.conditional(hidden_states.shape[0])
        q, k = queries_keys(
            attn,
            hidden_states[rows],
            None if context is None else context[rows],
            None if temb is None else temb[rows],
        )
        b, nq = q.shape[0], q.shape[2]
        if context is None:  # (B, Nq, Nk)
            acc = self._accumulator(name, (b, nq, k.shape[2]), q.device)
        else:  # the tokens' columns, (B, T, Nq)
            if not self.tokens:
                raise RuntimeError(f"{name}: a cross-attention layer needs token positions")
            acc = self._accumulator(name, (b, len(self.tokens), nq), q.device)
        for start, stop, probs in attention_probabilities(q, k, attn.scale, self.chunk_elements):
            summed = probs.sum(dim=1)  # over heads: (B, c, Nk)
            if context is None:
                acc[:, start:stop] += summed
            else:
                acc[:, :, start:stop] += summed[..., self.tokens].transpose(1, 2)
        self._calls[name] = self._calls.get(name, 0) + 1

    @property
    def num_calls(self) -> int:
        """UNet calls recorded (the same for every layer; 0 before any)."""
        counts = set(self._calls.values())
        if len(counts) > 1:
            raise RuntimeError(f"layers were recorded unequally often: {self._calls}")
        return counts.pop() if counts else 0

    def mean(self, name: str) -> Tensor:
        """Layer ``name``'s sum divided by the number of calls (float32)."""
        if name not in self._sums:
            raise RuntimeError(
                f"layer {name} was never called; is the capture installed on this UNet "
                "and was a generation run?"
            )
        return self._sums[name] / self.num_calls

    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())


class TrajectoryProcessor:
    """A diffusers attention processor that computes the output with ``fallback`` (the processor
    it replaces) and records the layer's probabilities into ``store`` under ``name``."""

    def __init__(self, store: TrajectoryStore, name: str, fallback) -> None:
        self.store = store
        self.name = name
        self.fallback = fallback

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        out = self.fallback(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )
        if attention_mask is not None:
            raise NotImplementedError(
                f"{self.name}: attention masks are not supported (SD v1 passes none)"
            )
        with torch.no_grad():
            self.store.record(self.name, attn, hidden_states, encoder_hidden_states, temb)
        return out
