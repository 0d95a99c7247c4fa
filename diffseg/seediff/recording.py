"""Record only the attention SeeDiff needs, on the conditional half of the guidance batch.

Two kinds of diffusers attention processors, installed on eight layers of an SD v1 UNet for the
duration of one generation (every other layer keeps its processor):

- cross-attention at 16x16 (``up_blocks.1`` three layers, then ``down_blocks.2`` two): the
  probabilities of the class token's column(s), summed over heads -> ``(P, 256)`` per layer;
- self-attention descriptors (``attn1`` of the first transformer block of ``up_blocks.1/2/3
  .attentions.0``, grids 16/32/64): the probabilities summed over heads -> ``(N, N)``.

Each processor lets the processor it replaces compute the layer's output (so the image is the
one an unrecorded run makes, bit for bit), then recomputes ``softmax(Q K^T * scale)`` in float32
for the conditional images only, query chunk by query chunk, and adds it to a float32 running
sum. Every UNet call of the trajectory adds once; :meth:`AttentionRecorder.cross_maps` and
:meth:`AttentionRecorder.self_maps` divide by the number of calls. Memory: the sums (64 MiB for
the 64-grid descriptor, 4 MiB at 32, the rest negligible) plus one chunk of scores
(``chunk_elements`` float32, 64 MiB by default), against several GB when every layer's full
maps are kept.

Typical use::

    recorder = AttentionRecorder(token_positions=[5], guidance=True)
    with recorder.installed(pipe.unet):
        pipe(prompt, ...)
    cross = recorder.cross_maps()[0]   # (5 * P, 16, 16)
    desc = recorder.self_maps()        # {16: (1, 256, 256), 32: ..., 64: (1, 4096, 4096)}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "CROSS_LAYERS",
    "DEFAULT_CHUNK_ELEMENTS",
    "SELF_LAYERS",
    "AttentionRecorder",
    "RecordingProcessor",
    "attention_probabilities",
]

_BLOCK = "transformer_blocks.0"
#: The class token's cross-attention layers at 16x16 (SD v1, 512 px), in SeeDiff's order.
CROSS_LAYERS = (
    f"up_blocks.1.attentions.0.{_BLOCK}.attn2",
    f"up_blocks.1.attentions.1.{_BLOCK}.attn2",
    f"up_blocks.1.attentions.2.{_BLOCK}.attn2",
    f"down_blocks.2.attentions.0.{_BLOCK}.attn2",
    f"down_blocks.2.attentions.1.{_BLOCK}.attn2",
)
#: The one self-attention layer per grid whose probabilities are the descriptor (grid at 512 px).
SELF_LAYERS = {
    16: f"up_blocks.1.attentions.0.{_BLOCK}.attn1",
    32: f"up_blocks.2.attentions.0.{_BLOCK}.attn1",
    64: f"up_blocks.3.attentions.0.{_BLOCK}.attn1",
}
#: Bound on the float32 scores held at once (batch * heads * query chunk * keys): 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _queries_keys(attn, hidden_states: Tensor, context: Tensor | None, temb: Tensor | None):
    """Q and K of a diffusers ``Attention`` exactly as its default processors form them.

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
    query: Tensor, key: Tensor, scale: float, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
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


class AttentionRecorder:
    """Float32 running sums of the class token's cross-attention and the self-attention
    descriptors over the UNet calls of one generation.

    Args:
        token_positions: prompt positions of the class token(s) (BOS = 0), see
            :func:`diffseg.seediff.tokens.class_token_positions`.
        guidance: True when every UNet call sees the classifier-free-guidance batch
            ``[unconditional, conditional]`` (diffusers' order); only the second half is
            recorded. False: the whole batch is conditional.
        cross_layers: the cross-attention layers (module names), in output order.
        self_layers: ``{grid side at 512 px: module name}``; the key is a label, the side of the
            descriptor is read from the layer's token count.
        chunk_elements: bound on the float32 scores held at once.
    """

    def __init__(
        self,
        token_positions: Sequence[int],
        guidance: bool = True,
        cross_layers: Sequence[str] = CROSS_LAYERS,
        self_layers: dict[int, str] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        if not token_positions:
            raise ValueError("token_positions must name at least one prompt position")
        self.token_positions = [int(p) for p in token_positions]
        self.guidance = bool(guidance)
        self.cross_layers = list(cross_layers)
        self.self_layers = dict(SELF_LAYERS if self_layers is None else self_layers)
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
        q, k = _queries_keys(
            attn,
            hidden_states[rows],
            None if context is None else context[rows],
            None if temb is None else temb[rows],
        )
        b, nq = q.shape[0], q.shape[2]
        positions = self.token_positions
        if context is None:  # descriptor (B, Nq, Nk)
            acc = self._accumulator(name, (b, nq, k.shape[2]), q.device)
        else:  # the class token's column(s), (B, P, Nq)
            acc = self._accumulator(name, (b, len(positions), nq), q.device)
        for start, stop, probs in attention_probabilities(q, k, attn.scale, self.chunk_elements):
            summed = probs.sum(dim=1)  # over heads: (B, c, Nk)
            if context is None:
                acc[:, start:stop] += summed
            else:
                acc[:, :, start:stop] += summed[..., positions].transpose(1, 2)
        self._calls[name] = self._calls.get(name, 0) + 1

    # ------------------------------------------------------------------ results

    @property
    def num_calls(self) -> int:
        """UNet calls recorded (the same for every layer; 0 before any)."""
        counts = set(self._calls.values())
        if len(counts) > 1:
            raise RuntimeError(f"layers were recorded unequally often: {self._calls}")
        return counts.pop() if counts else 0

    def _mean(self, name: str) -> Tensor:
        if name not in self._sums:
            raise RuntimeError(
                f"layer {name} was never called; is the recorder installed on this UNet "
                "and was a generation run?"
            )
        return self._sums[name] / self.num_calls

    def cross_maps(self) -> Tensor:
        """The class token's step-averaged, head-summed cross-attention.

        Returns:
            float32 (B, P * L, r, r): for each token position (in order) the L layers (in
            ``cross_layers`` order); SD v1 at 512 with one class token: (1, 5, 16, 16).
        """
        maps = [self._mean(name) for name in self.cross_layers]  # each (B, P, N)
        b, p, n = maps[0].shape
        r = math.isqrt(n)
        return torch.stack(maps, dim=2).reshape(b, p * len(maps), r, r)

    def self_maps(self) -> dict[int, Tensor]:
        """The step-averaged, head-summed self-attention descriptors ``{r: (B, r*r, r*r)}``,
        keyed by the grid side actually recorded, smallest first. Entry ``[b, i, j]`` is the
        attention of query token ``i`` to key token ``j`` (rows sum to the head count)."""
        out = {}
        for name in self.self_layers.values():
            mean = self._mean(name)
            out[math.isqrt(mean.shape[-1])] = mean
        return dict(sorted(out.items()))

    def nbytes(self) -> int:
        """Bytes held by the running sums."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())

    # ------------------------------------------------------------------ installation

    @contextlib.contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[AttentionRecorder]:
        """Install :class:`RecordingProcessor` on the recorded layers of ``unet`` (others keep
        their processors), reset the sums, and restore the previous processors on exit.

        Raises ``ValueError`` naming any layer the UNet lacks (not an SD v1-shaped UNet).
        """
        previous = dict(unet.attn_processors)
        names = [*self.cross_layers, *self.self_layers.values()]
        missing = [n for n in names if f"{n}.processor" not in previous]
        if missing:
            raise ValueError(
                f"{type(unet).__name__} lacks the attention layers SeeDiff records: {missing}; "
                "SeeDiff needs a Stable Diffusion v1-shaped UNet"
            )
        processors = dict(previous)
        for name in names:
            key = f"{name}.processor"
            processors[key] = RecordingProcessor(self, name, previous[key])
        self.reset()
        unet.set_attn_processor(processors)
        try:
            yield self
        finally:
            unet.set_attn_processor(previous)


class RecordingProcessor:
    """A diffusers attention processor that computes the output with ``fallback`` (the processor
    it replaces) and records the layer's probabilities into ``recorder`` under ``name``."""

    def __init__(self, recorder: AttentionRecorder, name: str, fallback) -> None:
        self.recorder = recorder
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
            self.recorder.record(self.name, attn, hidden_states, encoder_hidden_states, temb)
        return out
