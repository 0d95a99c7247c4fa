"""Capture of joint attention and block outputs in MM-DiT transformers (SD3, SD3.5, FLUX).

In an MM-DiT block, image and text tokens attend jointly: one softmax runs over the keys of both
streams. What is recorded, per requested block, is the probability matrix of the **image
queries** over **all** keys (image + text), averaged over heads in float32:

- ``text``: the image -> text columns of chosen text positions, ``(B, N_img, T)``;
- ``image``: the image -> image block, ``(B, N_img, N_img)`` (rows sum to less than 1: the rest
  of their mass went to text keys).

The processors wrap the block's stock processor: they rebuild q and k exactly as it does (the
optional qk norms, RoPE for FLUX), score one head at a time (an SD3 block at 1024 px holds one
``B x 4096 x 4250`` float32 matrix, not 24 of them), then call the stock processor, so the
block's output is unchanged. Forward hooks take block outputs (image tokens) and stop the
transformer after the last block a request needs; when that block's attention is all it needs,
the pass stops inside it, right after the probabilities are taken.

Token order: SD3 / SD3.5 concatenate image tokens first, then text; FLUX puts text first (and its
single blocks receive the already concatenated sequence).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "JointAttentionCapture",
    "JointAttentionStore",
    "joint_probabilities",
]


class _StopTransformer(Exception):
    """Raised by a hook once every requested block has run: later blocks are skipped."""


def joint_probabilities(
    q: Tensor, k: Tensor, image: slice, text: slice, tokens: Sequence[int], image_block: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Head-mean softmax probabilities of the image queries over all keys, one head at a time.

    Args:
        q, k: ``(B, H, S, d)`` queries and keys of the whole joint sequence (any float dtype;
            computed in float32).
        image, text: where the image and text tokens lie on the sequence axis.
        tokens: text positions (relative to ``text``) whose columns are kept.
        image_block: also keep the image -> image block.
    Returns:
        ``(text_columns (B, N_img, T) or None, image_block (B, N_img, N_img) or None)``, float32.
    """
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    cols = torch.tensor([text.start + t for t in tokens], device=q.device, dtype=torch.long)
    text_sum = image_sum = None
    for h in range(heads):
        logits = q[:, h, image].float() @ k[:, h].float().transpose(-1, -2)
        probs = (logits * scale).softmax(dim=-1)  # (B, N_img, S): over ALL keys
        del logits
        if len(tokens):
            part = probs.index_select(-1, cols)
            text_sum = part if text_sum is None else text_sum + part
        if image_block:
            part = probs[..., image]
            image_sum = part.clone() if image_sum is None else image_sum + part
        del probs
    text_mean = None if text_sum is None else text_sum / heads
    image_mean = None if image_sum is None else image_sum / heads
    return text_mean, image_mean


class JointAttentionStore:
    """What one pass captured: ``text[block]`` (B, N_img, T) and ``image[block]`` (B, N_img,
    N_img), float32 head means; ``outputs[alias]`` (B, N_img, C) block outputs (image tokens)."""

    def __init__(self) -> None:
        self.text: dict[int, Tensor] = {}
        self.image: dict[int, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}


class _SD3Processor:
    """SD3 / SD3.5 joint attention (diffusers' ``JointAttnProcessor2_0`` contract): image tokens
    first, then text; q/k ``(B, H, S, d)`` with the optional ``norm_q/k`` and
    ``norm_added_q/k``."""

    def __init__(self, stock, record) -> None:
        self.stock, self.record = stock, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):  # fmt: skip
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x: Tensor) -> Tensor:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2)
        self.record(q, k, slice(0, n_img), slice(n_img, k.shape[2]))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                          *args, **kwargs)  # fmt: skip


class _FluxProcessor:
    """FLUX attention (diffusers' ``FluxAttnProcessor`` contract): text first; double blocks get
    the two streams, single blocks the concatenated ``[text; image]`` sequence. q/k are
    ``(B, S, H, D)`` until RoPE, then moved to ``(B, H, S, D)`` for scoring."""

    def __init__(self, stock, record, text_len: int) -> None:
        self.stock, self.record, self.text_len = stock, record, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, *args, **kwargs):  # fmt: skip
        from diffusers.models.embeddings import apply_rotary_emb

        d = attn.head_dim
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            cq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
            ck = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, d)))
            q, k = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        t = self.text_len
        self.record(q.transpose(1, 2), k.transpose(1, 2), slice(t, q.shape[1]), slice(0, t))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                          image_rotary_emb, *args, **kwargs)  # fmt: skip


class JointAttentionCapture:
    """Install, for one ``with`` block, the capture of a request on an MM-DiT transformer.

    Args:
        blocks: the transformer's blocks in execution order (SD3: ``transformer_blocks``;
            FLUX: ``transformer_blocks`` then ``single_transformer_blocks``), indexed by the
            global block numbers used below.
        attention_blocks: blocks whose joint attention is recorded.
        tokens: text positions (0 = the first text token) whose image -> text columns are kept.
        image_attention: also keep the image -> image block.
        outputs: ``{alias: block number}`` whose image-token outputs are kept.
        text_first, text_len: the token layout (FLUX: True and the text length).
        stop_early: stop the transformer after the last block needed.
    """

    def __init__(
        self,
        blocks: Sequence[torch.nn.Module],
        attention_blocks: Sequence[int] = (),
        tokens: Sequence[int] = (),
        image_attention: bool = False,
        outputs: dict[str, int] | None = None,
        text_first: bool = False,
        text_len: int = 0,
        stop_early: bool = True,
    ) -> None:
        self.blocks = list(blocks)
        self.attention_blocks = sorted(set(int(b) for b in attention_blocks))
        self.tokens = tuple(int(t) for t in tokens)
        self.image_attention = bool(image_attention)
        self.outputs = dict(outputs or {})
        self.text_first, self.text_len = text_first, int(text_len)
        self.stop_early = stop_early
        self.store = JointAttentionStore()
        for b in [*self.attention_blocks, *self.outputs.values()]:
            if not 0 <= b < len(self.blocks):
                raise ValueError(f"block {b} does not exist; the transformer has {len(blocks)}")
        self.last = max([*self.attention_blocks, *self.outputs.values()], default=-1)

    def _recorder(self, block: int):
        # The last block needed, when only its attention is: nothing of its output is used, so
        # the pass stops as soon as the probabilities are taken (its attention output and MLP
        # are never computed; the recorded values are the same).
        stop_here = self.stop_early and block == self.last and block not in self.outputs.values()

        def record(q: Tensor, k: Tensor, image: slice, text: slice) -> None:
            text_cols, image_block = joint_probabilities(
                q, k, image, text, self.tokens, self.image_attention
            )
            if text_cols is not None:
                self.store.text[block] = text_cols
            if image_block is not None:
                self.store.image[block] = image_block
            if stop_here:
                raise _StopTransformer

        return record

    def _output_hook(self, block: int):
        aliases = [a for a, b in self.outputs.items() if b == block]

        def hook(_module, _inputs, output):
            for alias in aliases:
                # both block kinds return (text stream, image stream)
                self.store.outputs[alias] = output[1].float()
            if self.stop_early and block == self.last:
                raise _StopTransformer

        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[JointAttentionCapture]:
        """Processors and hooks in place; the stock processors restored afterwards."""
        self.store = JointAttentionStore()
        restore: list[tuple[Any, Any]] = []
        handles = []
        try:
            for b in self.attention_blocks:
                attn = self.blocks[b].attn
                stock = attn.processor
                if self.text_first:
                    proc = _FluxProcessor(stock, self._recorder(b), self.text_len)
                else:
                    proc = _SD3Processor(stock, self._recorder(b))
                attn.processor = proc  # set directly: set_processor would log and re-check
                restore.append((attn, stock))
            hooked = set(self.outputs.values()) | ({self.last} if self.last >= 0 else set())
            for b in sorted(hooked):
                handles.append(self.blocks[b].register_forward_hook(self._output_hook(b)))
            yield self
        finally:
            for attn, stock in restore:
                attn.processor = stock
            for handle in handles:
                handle.remove()

    def run(self, transformer: torch.nn.Module, **kwargs: Any) -> None:
        """Call the transformer; an early stop is the expected way out."""
        try:
            transformer(**kwargs)
        except _StopTransformer:
            pass
        missing = [b for b in self.attention_blocks if b not in self.store.text and
                   b not in self.store.image and (self.tokens or self.image_attention)]  # fmt: skip
        missing += [a for a in self.outputs if a not in self.store.outputs]
        if missing:
            raise RuntimeError(f"the transformer pass never reached {missing[:3]}")
