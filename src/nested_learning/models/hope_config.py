"""Configuration and size presets of HOPE (Eq 94-97) and HOPE-attention.

One dataclass serves both models: HOPE reads the ``titans_*`` fields, HOPE-attention ``rope_theta`` and
``max_seq_len``; the ``cms_*`` fields configure the Continuum Memory System (Eq 70-74) of every block.

Sizes. The tiny presets equal the Transformer++ 'tiny' (dim 128, 2 layers, 4 heads, GPT-2 vocabulary) so the three
models can be compared. A HOPE block holds about 27 d^2 weights (self-modifying Titans ~3 d^2: W_q, gate, output;
three CMS levels of 2 * 4 d^2 each) against 12 d^2 for a Transformer++ block, so at the paper's widths (d_model 1024
for 760M and 1536 for 1.3B, per the sources) fewer layers reach the paper's parameter counts. Counts with the GPT-2
vocabulary (50257, tied head), from ``num_parameters()`` on the meta device:

    hope-760m            dim 1024, 25 layers, 16 heads   ->  0.765 B     (paper: 760M)
    hope-1.3b            dim 1536, 19 layers, 24 heads   ->  1.294 B     (paper: 1.3B)
    hope_attention-760m  dim 1024, 25 layers, 16 heads   ->  0.786 B
    hope_attention-1.3b  dim 1536, 19 layers, 24 heads   ->  1.333 B

(the paper trains with a 32K vocabulary; with it each count would be ~19M / ~28M smaller.)
"""

from __future__ import annotations

import dataclasses

from nested_learning.ops._validation import check_int


@dataclasses.dataclass
class HOPEConfig:
    vocab_size: int = 50257
    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    # Continuum Memory System (Eq 70-74)
    chunk_sizes: tuple = (16, 64, 256)
    cms_expansion: int = 4
    cms_variant: str = "sequential"  # "sequential" (Eq 70) | "independent" (Eq 74) | "nested" (Eq 72-73)
    cms_objective: str = "lm"  # "lm" (next-token surprise, Eq 8-9) | "next_input" (local regression)
    cms_mode: str = "first_order"  # "first_order" | "meta" (backpropagate through the inner updates)
    cms_inner_lr: float = 0.1  # initial eta_l of every level (tuned: docs/equations.md, "Initial rate (tuned)")
    cms_max_inner_lr: float = 1.0
    cms_grad_clip: float | None = 1.0  # max norm of a level's mean chunk gradient (a trust region)
    cms_transfer: str | tuple = "init"  # per level: "init" | "backprop" | "direct" | "generate" (Eq 24-30)
    test_time_updates: bool = True
    # self-modifying Titans (HOPE)
    titans_chunk_size: int = 16
    titans_objective: str = "l2"
    # "mlp" (Eq 89 residual MLP memories, the sources' choice) | "linear" (matrix memories). With matrix memories the
    # five self-modifying memories collapse to one read through fixed maps (docs/equations.md, "Why MLP memories").
    titans_memory: str = "mlp"
    # L2-normalised values (and bounded targets of matrix memories); False, with titans_bounded_targets=False: Eq 83
    titans_value_norm: bool = True
    titans_retention: str = "initial"  # MLP memories decay toward their initial weights; "zero": Eq 88 as written
    conv_size: int = 4
    # torch.compile backend of the Titans chunk step ("inductor"), or None for eager (SelfModifyingTitans.compile_chunk_step)
    titans_compile: str | None = None
    # with titans_compile: also each layer call on one whole chunk (every segment when the Titans chunk is the CMS
    # segment) as one compiled graph (SelfModifyingTitans.compile_whole_chunk_calls); False: the chunk step alone
    titans_compile_layer: bool = True
    # the Titans chunk step's hand-written backward (SelfModifyingTitans.hand_backward); False: autograd's
    titans_hand_backward: bool = True
    # MLP memories' self-generated targets bounded (SelfModifyingTitans.bounded_targets; our addition, see there)
    titans_bounded_targets: bool = True
    # softmax attention (HOPE-attention)
    rope_theta: float = 10000.0
    max_seq_len: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        # 16.7 must not become 16: every size is checked as an integer where the CMS is built
        if isinstance(self.chunk_sizes, (int, float)) or not hasattr(self.chunk_sizes, "__iter__"):
            raise TypeError(f"chunk_sizes must be a sequence of integers, got {self.chunk_sizes!r}")
        self.chunk_sizes = tuple(check_int(f"chunk_sizes[{i}]", c) for i, c in enumerate(self.chunk_sizes))
        if not isinstance(self.cms_transfer, str):
            self.cms_transfer = tuple(self.cms_transfer)


_SIZES = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4),
    "small": dict(dim=256, n_layers=4, n_heads=4),
    "760M": dict(dim=1024, n_layers=25, n_heads=16),
    "1.3B": dict(dim=1536, n_layers=19, n_heads=24),
}
HOPE_PRESETS: dict[str, HOPEConfig] = {f"hope-{k.lower()}": HOPEConfig(**v) for k, v in _SIZES.items()}
HOPE_ATTENTION_PRESETS: dict[str, HOPEConfig] = {
    f"hope_attention-{k.lower()}": HOPEConfig(**v, max_seq_len=16384 if k in ("tiny", "small") else 4096)
    for k, v in _SIZES.items()
}


def preset(presets: dict[str, HOPEConfig], family: str, name: str) -> HOPEConfig:
    """Look up ``name`` as ``"tiny"``, ``"760M"`` or ``"<family>-760m"`` (case-insensitive)."""
    key = name.lower()
    key = key if key.startswith(family + "-") else f"{family}-{key}"
    if key not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; choose from {sorted(presets)}")
    return presets[key]
