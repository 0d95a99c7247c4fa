"""Prompts and the prompt position of the class name's token(s).

The class token is the prompt position of the **first sub-token of the class name**, counting
the tokenizer's BOS as position 0: with SD v1's CLIP tokenizer, "A photo of a dog" is
``[BOS, a, photo, of, a, dog, EOS, ...]`` and the class token is 5.

Names the tokenizer splits (``pottedplant`` -> ``pot ted plant``) have several sub-tokens. The
``multi_token`` rule says which of their positions are recorded:

- ``"all"`` (default): every sub-token; the cross-attention maps of each position are stacked
  (position-major), so each sub-token contributes its five layers to SeeDiff's seed map. The
  released code does the same for two sub-tokens of a few hand-picked names (the first and the
  one two places later); ``"all"`` applies one rule to every name.
- ``"first"``: the first sub-token only; ``"last"``: the last only (often the head noun,
  e.g. ``dining table`` -> ``table``).

For a single-token name the three rules give the same position.
"""

from __future__ import annotations

__all__ = ["MULTI_TOKEN_RULES", "class_token_positions", "format_prompt"]

MULTI_TOKEN_RULES = ("all", "first", "last")
PLACEHOLDER = "{class}"


def format_prompt(template: str, class_name: str) -> str:
    """The prompt for ``class_name``: ``template`` with ``{class}`` replaced (e.g.
    ``"A photo of a {class}"`` -> ``"A photo of a dog"``). Raises ``ValueError`` without the
    placeholder."""
    if PLACEHOLDER not in template:
        raise ValueError(f"prompt template {template!r} has no {PLACEHOLDER} placeholder")
    return template.replace(PLACEHOLDER, class_name)


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens and without padding."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def class_token_positions(
    tokenizer, template: str, class_name: str, multi_token: str = "all"
) -> list[int]:
    """Prompt positions (BOS = 0) of the class name's sub-tokens chosen by ``multi_token``.

    The name's tokens are located where the template puts ``{class}``: after the tokens of the
    text before the placeholder (CLIP's BPE never merges across a space, so the name tokenises
    the same alone and in the prompt). Raises ``ValueError`` when the name yields no token, is
    not found at that place (e.g. a template like ``"{class}s"`` that glues text onto it), or
    lies past the text encoder's window.
    """
    if multi_token not in MULTI_TOKEN_RULES:
        raise ValueError(f"multi_token must be one of {MULTI_TOKEN_RULES}, got {multi_token!r}")
    prompt_ids = [tokenizer.bos_token_id, *_ids(tokenizer, format_prompt(template, class_name))]
    name_ids = _ids(tokenizer, class_name)
    if not name_ids:
        raise ValueError(f"class name {class_name!r} gives no token")
    start = 1 + len(_ids(tokenizer, template.split(PLACEHOLDER)[0]))
    if prompt_ids[start : start + len(name_ids)] != name_ids:
        raise ValueError(
            f"class name {class_name!r} does not tokenise the same inside the prompt "
            f"{format_prompt(template, class_name)!r}; put spaces around {PLACEHOLDER} in the "
            "prompt template"
        )
    positions = list(range(start, start + len(name_ids)))
    limit = getattr(tokenizer, "model_max_length", 77) - 1  # the last slot holds EOS
    if positions[-1] >= limit:
        raise ValueError(
            f"class name {class_name!r} sits at prompt positions {positions}, past the "
            f"tokenizer's {limit + 1}-token window; shorten the prompt template"
        )
    if multi_token == "first":
        return positions[:1]
    if multi_token == "last":
        return positions[-1:]
    return positions
