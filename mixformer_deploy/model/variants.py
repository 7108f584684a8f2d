"""The MixFormer variant table (B0-B6) and the config record every other module speaks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import UsageError


@dataclass(frozen=True)
class MixFormerConfig:
    """Constructor arguments of a MixFormer, the same as the official code's."""

    embed_dim: int = 32
    depths: tuple[int, ...] = (1, 2, 6, 6)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    num_classes: int = 1000
    window_size: int = 7
    dwconv_kernel_size: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_size: int = 4
    in_chans: int = 3
    head_dim: int = 1280  # width of the last projection before the classifier
    name: str = field(default="custom", compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["num_heads"] = list(self.depths), list(self.num_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MixFormerConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("depths", "num_heads"):
            if k in known:
                known[k] = tuple(int(v) for v in known[k])
        return cls(**known)

    @property
    def stride(self) -> int:
        """Total down-sampling factor: the input side must be a multiple of it."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


_TABLE = {
    "B0": (24, (1, 2, 6, 6), (3, 6, 12, 24)),
    "B1": (32, (1, 2, 6, 6), (2, 4, 8, 16)),
    "B2": (32, (2, 2, 8, 8), (2, 4, 8, 16)),
    "B3": (48, (2, 2, 8, 6), (3, 6, 12, 24)),
    "B4": (64, (2, 2, 8, 8), (4, 8, 16, 32)),
    "B5": (96, (1, 2, 8, 6), (6, 12, 24, 48)),
    "B6": (96, (2, 4, 16, 12), (6, 12, 24, 48)),
}
VARIANTS = tuple(_TABLE)


def variant_config(variant: str, **overrides) -> MixFormerConfig:
    """Config of a named variant (case-insensitive), or 'custom' built from overrides alone."""
    key = variant.upper()
    if key == "CUSTOM":
        base = MixFormerConfig(name="custom")
    elif key in _TABLE:
        dim, depths, heads = _TABLE[key]
        base = MixFormerConfig(embed_dim=dim, depths=depths, num_heads=heads, name=key)
    else:
        raise UsageError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)} or 'custom'")
    for k in ("depths", "num_heads"):
        if k in overrides:
            overrides[k] = tuple(int(v) for v in overrides[k])
    unknown = set(overrides) - set(MixFormerConfig.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    cfg = replace(base, **overrides)
    if overrides and key != "CUSTOM" and name_of(cfg) != key:
        cfg = replace(cfg, name="custom")
    return cfg


def name_of(cfg: MixFormerConfig) -> str:
    """The variant name whose architecture equals cfg (class count aside), else 'custom'."""
    for key, (dim, depths, heads) in _TABLE.items():
        ref = MixFormerConfig(embed_dim=dim, depths=depths, num_heads=heads, num_classes=cfg.num_classes,
                              in_chans=cfg.in_chans)
        if replace(cfg, name="x") == replace(ref, name="x"):
            return key
    return "custom"
