"""The multimodal embedding stack: text tokens followed by N identities' tokens.

``K = Concat(K_t, K_f1, …, K_fN)`` along the token axis (paper Eq. 4–5). :class:`SlotLayout` says which key
positions belong to which identity; the attention code consumes it and never derives positions from numbers of
its own. Identity tokens always sit at the *end* of the context, so a layout is fully determined by the number of
identities, the tokens per identity and the total key length — whatever text length ComfyUI batched in front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import IdentityCountError


@dataclass(frozen=True)
class SlotLayout:
    """Positions of the text and of each identity in a stacked context of ``key_length`` tokens."""

    text_length: int
    tokens_per_identity: int
    num_identities: int

    def __post_init__(self) -> None:
        if self.text_length < 1:
            raise IdentityCountError(f"text tokens: need at least one text token before the identity tokens, "
                                     f"got a text length of {self.text_length}")
        if self.num_identities < 0 or (self.num_identities and self.tokens_per_identity < 1):
            raise IdentityCountError(f"identities: got {self.num_identities} identities of "
                                     f"{self.tokens_per_identity} tokens each")

    @property
    def key_length(self) -> int:
        return self.text_length + self.num_identities * self.tokens_per_identity

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_length)

    def identity_slice(self, n: int) -> slice:
        if not 0 <= n < self.num_identities:
            raise IdentityCountError(f"identity index {n} is out of range for {self.num_identities} identities")
        start = self.text_length + n * self.tokens_per_identity
        return slice(start, start + self.tokens_per_identity)

    def key_owner(self) -> torch.Tensor:
        """Long tensor of length ``key_length``: -1 for text keys, n for identity n's keys."""
        owner = torch.full((self.key_length,), -1, dtype=torch.long)
        for n in range(self.num_identities):
            owner[self.identity_slice(n)] = n
        return owner

    @classmethod
    def for_key_length(cls, key_length: int, tokens_per_identity: int, num_identities: int) -> "SlotLayout":
        """The layout of a context of ``key_length`` tokens whose last ``N·T`` tokens are identities."""
        return cls(key_length - num_identities * tokens_per_identity, tokens_per_identity, num_identities)


def stack_context(text: torch.Tensor, identity_tokens: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, SlotLayout]:
    """Stack ``text`` ``(B, L_t, D)`` with identity tokens after it.

    ``identity_tokens``: ``(N, T, D)`` shared by every row, ``(B, N, T, D)`` per row, or a sequence of N ``(T, D)``
    tensors. Returns the context ``(B, L_t + N·T, D)`` and its :class:`SlotLayout`.
    """
    if text.ndim != 3:
        raise IdentityCountError(f"text tokens: expected (batch, tokens, width), got {tuple(text.shape)}")
    if not isinstance(identity_tokens, torch.Tensor):
        identity_tokens = (torch.stack(list(identity_tokens)) if len(identity_tokens)
                           else text.new_zeros((0, 1, text.shape[-1])))
    if identity_tokens.ndim == 3:
        identity_tokens = identity_tokens.unsqueeze(0).expand(text.shape[0], -1, -1, -1)
    if identity_tokens.ndim != 4 or identity_tokens.shape[0] != text.shape[0] \
            or identity_tokens.shape[-1] != text.shape[-1]:
        raise IdentityCountError(f"identity tokens: expected (N, T, {text.shape[-1]}) or "
                                 f"({text.shape[0]}, N, T, {text.shape[-1]}), got {tuple(identity_tokens.shape)}")
    b, n, t, d = identity_tokens.shape
    layout = SlotLayout(text.shape[1], t, n)
    if n == 0:
        return text, layout
    flat = identity_tokens.to(device=text.device, dtype=text.dtype).reshape(b, n * t, d)
    return torch.cat([text, flat], dim=1), layout
