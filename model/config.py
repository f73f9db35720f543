"""Architecture hyper-parameters of a Mistral/Llama decoder, independent of checkpoint format."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "mixtral")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of the decoder.

    Llama checkpoints are the same architecture with ``sliding_window=None``.
    ``head_dim`` is explicit because some Mistral models (Nemo) use
    ``head_dim * num_heads != hidden_size``.

    Windows: ``layer_windows`` gives each layer's window (None: full attention) where they
    differ (Ministral: sliding layers and full ones); empty means every layer has
    ``sliding_window``. ``sliding_window`` is then the window the KV cache may release blocks
    behind: the largest layer window, or None when any layer attends to everything.

    Mixture of experts (Mixtral): ``num_experts`` SwiGLU experts of ``intermediate_size`` per
    layer, ``num_experts_per_tok`` chosen per token by a softmax router (0, 0: dense).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_windows:
            if len(self.layer_windows) != self.num_layers:
                raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
            if any(w is not None and (not isinstance(w, int) or w < 1) for w in self.layer_windows):
                raise ValueError(f"layer windows must be >= 1 or None, got {list(self.layer_windows)}")
            if self.sliding_window != release_window(self.layer_windows):
                raise ValueError(
                    f"sliding_window={self.sliding_window} does not match the layer windows "
                    f"(expected {release_window(self.layer_windows)})"
                )
        if (self.num_experts or self.num_experts_per_tok) and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it sees every earlier key)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(self.window_of(i) for i in range(self.num_layers))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def release_window(windows: tuple[int | None, ...] | list[int | None]) -> int | None:
    """The window behind which no layer looks: the largest, or None if any layer has none."""
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)
