"""Training pairs: the sample format, an in-memory dataset, collation, synthetic pairs.

A sample is a dict of CPU tensors, S x S pixels, V target views:

    "ref"     [3, S, S]     float in [0, 1]  clean reference view (the refiner's extra view)
    "views"   [V, 3, S, S]  float in [0, 1]  the avatar's renders (refiner input)
    "seen"    [V, 1, S, S]  float in [0, 1]  where the render's texture was seen by the source
    "target"  [V, 3, S, S]  float in [0, 1]  ground truth
    "weight"  [V, 1, S, S]  float in [0, 1]  per-pixel loss weight (head 1, rest small)
    "meta"    optional dict of str/int (clip, frames, stage): collated as a list

Any ``torch.utils.data.Dataset`` yielding such dicts can be trained on. The
trainer draws samples through :class:`KeyedDataset` with keys (index, draw
seed): a dataset that has ``sample(index, generator)`` (like
:class:`TensorPairDataset`) gets a generator seeded by the draw, so its
augmentation is reproducible whatever the number of workers or ranks, and a
resumed run sees exactly the samples the uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from models.pictures import to_uint8

logger = logging.getLogger(__name__)

TENSOR_KEYS = ("ref", "views", "seen", "target", "weight")
IMAGE_KEYS = ("ref", "views", "target")  # colour-jittered together
PAIRS_SUFFIX = ".safetensors"
PAIRS_FORMAT = "telepresence-pairs"
PAIRS_VERSION = 1


class PairFormatError(ValueError):
    """A sample or a pair file does not follow the sample format."""


def check_sample(sample: dict, size: int | None = None) -> tuple[int, int]:
    """Validate one sample (see module docstring); returns (V, S)."""
    if not isinstance(sample, dict):
        raise PairFormatError(f"expected a sample dict with {TENSOR_KEYS}, got {type(sample).__name__}")
    missing = [k for k in TENSOR_KEYS if k not in sample]
    if missing:
        raise PairFormatError(f"expected sample keys {TENSOR_KEYS}, got {sorted(sample)} (missing {missing})")
    ref = sample["ref"]
    if ref.ndim != 3 or ref.shape[0] != 3 or ref.shape[1] != ref.shape[2]:
        raise PairFormatError(f"expected ref [3, S, S], got {tuple(ref.shape)}")
    s = ref.shape[-1]
    if size is not None and s != size:
        raise PairFormatError(f"expected samples of {size}x{size} pixels, got {s}x{s}")
    v = sample["views"].shape[0] if sample["views"].ndim == 4 else -1
    for key, c in (("views", 3), ("seen", 1), ("target", 3), ("weight", 1)):
        t = sample[key]
        if tuple(t.shape) != (v, c, s, s) or v < 1:
            raise PairFormatError(f"expected {key} [V, {c}, S, S] = {(max(v, 1), c, s, s)}, got {tuple(t.shape)}")
    for key in TENSOR_KEYS:
        if not sample[key].is_floating_point():
            raise PairFormatError(f"expected {key} as floats in [0, 1], got {sample[key].dtype}")
    return v, s


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch: ref [B, 3, S, S], views/seen/target/weight [B, V, C, S, S];
    "meta" (if any) becomes a list; other tensor keys are stacked."""
    if not samples:
        raise ValueError("expected at least one sample to collate, got none")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "meta":
            out[key] = values
        elif isinstance(values[0], Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise PairFormatError(f"expected every sample's {key} of one shape, got {sorted(shapes)}")
            out[key] = _stack(values)
        else:
            out[key] = values
    return out


def _stack(values: list[Tensor]) -> Tensor:
    """torch.stack; in a DataLoader worker straight into shared memory (as torch's default_collate does),
    instead of stacking and then copying the batch there to send it (a 512 px batch of 64 is ~0.7 GB)."""
    out = None
    if get_worker_info() is not None:
        first = values[0]
        storage = first._typed_storage()._new_shared(sum(v.numel() for v in values), device=first.device)
        out = first.new(storage).resize_(len(values), *first.shape)
    return torch.stack(values, out=out)


# ---- keyed access -------------------------------------------------------------------------------
def draw_generator(seed: int) -> torch.Generator:
    """A CPU generator for one draw (augmentation, noise level)."""
    return torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


class KeyedDataset(Dataset):
    """Wraps a sample dataset for keys (index, draw_seed); adds "draw" (int64 seed) to each sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        sample_fn = getattr(self.dataset, "sample", None)
        sample = sample_fn(index, draw_generator(seed)) if callable(sample_fn) else self.dataset[index]
        sample = dict(sample)
        sample["draw"] = torch.tensor(seed, dtype=torch.int64)
        return sample


# ---- in-memory dataset ----------------------------------------------------------------------------
def _to_float(x: Tensor) -> Tensor:
    return x.float() / 255.0


class TensorPairDataset(Dataset):
    """Samples held in memory as uint8 tensors (N samples, V views, S x S pixels), with cheap augmentation.

    Storage: ref [N, 3, S, S], views/target [N, V, 3, S, S], seen/weight [N, V, 1, S, S],
    all uint8 (value * 255), plus an optional list of N meta dicts.
    Augmentation (``augment=True``, one draw per sample): horizontal flip of every
    tensor together (p = 0.5), then one colour jitter applied identically to
    ref/views/target: brightness * U[1-b, 1+b], contrast * U[1-c, 1+c] about the
    mean grey, saturation * U[1-s, 1+s]; seen and weight are only flipped.
    """

    def __init__(
        self,
        ref: Tensor,
        views: Tensor,
        seen: Tensor,
        target: Tensor,
        weight: Tensor,
        meta: list[dict] | None = None,
        augment: bool = True,
        jitter: tuple[float, float, float] = (0.1, 0.1, 0.1),
    ):
        n = ref.shape[0]
        for name, t in (("ref", ref), ("views", views), ("seen", seen), ("target", target), ("weight", weight)):
            if t.dtype != torch.uint8:
                raise PairFormatError(f"expected {name} as uint8, got {t.dtype} (use TensorPairDataset.from_samples for floats)")
            if t.shape[0] != n:
                raise PairFormatError(f"expected {n} samples in {name}, got {t.shape[0]}")
        if meta is not None and len(meta) != n:
            raise PairFormatError(f"expected {n} meta entries, got {len(meta)}")
        self.ref, self.views, self.seen, self.target, self.weight = ref, views, seen, target, weight
        self.meta = meta
        self.augment = augment
        self.jitter = tuple(float(j) for j in jitter)
        if n:
            check_sample(self._raw(0))

    def __len__(self) -> int:
        return self.ref.shape[0]

    @property
    def size(self) -> int:
        return int(self.ref.shape[-1])

    @property
    def num_views(self) -> int:
        return int(self.views.shape[1])

    @classmethod
    def from_samples(cls, samples: Iterable[dict], **kwargs) -> "TensorPairDataset":
        """Quantise float samples (the sample format) to uint8 storage."""
        samples = list(samples)
        if not samples:
            raise PairFormatError("expected at least one sample, got none")
        shapes = {check_sample(s) for s in samples}
        if len(shapes) != 1:
            raise PairFormatError(f"expected samples of one (V, S), got {sorted(shapes)}")
        stacked = {k: to_uint8(torch.stack([s[k] for s in samples])) for k in TENSOR_KEYS}
        meta = [dict(s["meta"]) for s in samples] if all("meta" in s for s in samples) else None
        return cls(**stacked, meta=meta, **kwargs)

    @classmethod
    def concat(cls, parts: Sequence["TensorPairDataset"], **kwargs) -> "TensorPairDataset":
        if not parts:
            raise PairFormatError("expected at least one pair set, got none")
        shapes = {(p.num_views, p.size) for p in parts}
        if len(shapes) != 1:
            raise PairFormatError(f"expected pair sets of one (V, S), got {sorted(shapes)}")
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in TENSOR_KEYS}
        metas = [p.meta for p in parts]
        meta = [m for ms in metas for m in ms] if all(m is not None for m in metas) else None
        return cls(**tensors, meta=meta, **kwargs)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One .safetensors file (uint8 tensors; meta as JSON in the header metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != PAIRS_SUFFIX:
            raise PairFormatError(f"expected a {PAIRS_SUFFIX} path for pairs, got {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": PAIRS_FORMAT, "version": str(PAIRS_VERSION)}
        if self.meta is not None:
            metadata["meta"] = json.dumps(self.meta)
        save_file({k: getattr(self, k).contiguous() for k in TENSOR_KEYS}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "TensorPairDataset":
        """A file written by save(), or a folder of them (concatenated, sorted by name)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"expected a pair file or folder, got no such path: {path}")
        if path.is_dir():
            files = sorted(path.glob(f"*{PAIRS_SUFFIX}"))
            if not files:
                raise PairFormatError(f"expected {PAIRS_SUFFIX} pair files in {path}, got none")
            return cls.concat([cls.load(f, augment=False) for f in files], **kwargs)
        if path.suffix != PAIRS_SUFFIX:
            raise PairFormatError(f"expected a pair file ({PAIRS_SUFFIX}, written by TensorPairDataset.save), got {path.name}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != PAIRS_FORMAT:
                    raise PairFormatError(f"expected a {PAIRS_FORMAT} file, got format {metadata.get('format')!r} in {path.name}")
                if metadata.get("version") != str(PAIRS_VERSION):
                    raise PairFormatError(f"expected pair format version {PAIRS_VERSION}, got {metadata.get('version')!r} in {path.name}")
                tensors = {k: f.get_tensor(k) for k in TENSOR_KEYS}
        except PairFormatError:
            raise
        except Exception as exc:  # not a safetensors file at all
            raise PairFormatError(f"expected a pair file written by TensorPairDataset.save, got an unreadable {path.name} ({exc})") from exc
        meta = json.loads(metadata["meta"]) if "meta" in metadata else None
        return cls(**tensors, meta=meta, **kwargs)

    # ---- access ---------------------------------------------------------------------------------
    def _raw(self, index: int) -> dict:
        out = {k: _to_float(getattr(self, k)[index]) for k in TENSOR_KEYS}
        if self.meta is not None:
            out["meta"] = dict(self.meta[index])
        return out

    def __getitem__(self, index: int) -> dict:
        return self.sample(index, None)

    def sample(self, index: int, generator: torch.Generator | None = None) -> dict:
        """Sample ``index`` (float tensors), augmented with ``generator``'s draws when augment is on."""
        sample = self._raw(index)
        if not self.augment:
            return sample
        g = generator
        u = torch.rand(4, generator=g)  # flip, brightness, contrast, saturation
        if u[0] < 0.5:
            for k in TENSOR_KEYS:
                sample[k] = sample[k].flip(-1)
        b, c, s = self.jitter
        factors = (1 + b * (2 * u[1] - 1), 1 + c * (2 * u[2] - 1), 1 + s * (2 * u[3] - 1))
        for k in IMAGE_KEYS:
            sample[k] = color_jitter(sample[k], *factors)
        return sample


def color_jitter(x: Tensor, brightness: Tensor | float, contrast: Tensor | float, saturation: Tensor | float) -> Tensor:
    """x [..., 3, H, W] in [0, 1] -> same, with x' = clamp(grey + s (x - grey)) after brightness and contrast.

    brightness: x * b; contrast: m + c (x - m) with m the image's mean luma;
    saturation: l + s (x - l) with l the per-pixel luma (Rec. 601 weights).
    """
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    x = x * brightness
    luma = (x * w).sum(-3, keepdim=True)  # [..., 1, H, W]
    m = luma.mean(dim=(-2, -1), keepdim=True)
    x = m + contrast * (x - m)
    luma = (x * w).sum(-3, keepdim=True)
    x = luma + saturation * (x - luma)
    return x.clamp(0, 1)


# ---- synthetic pairs (tests, --smoke) -----------------------------------------------------------------
def _smooth_field(g: torch.Generator, channels: int, size: int, cells: int) -> Tensor:
    """Random low-frequency field [C, S, S] in about [0, 1] (bicubic upsampling of a coarse grid)."""
    coarse = torch.rand(1, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of x [N, C, H, W] (reflect padding)."""
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def synthetic_pairs(
    n: int, size: int = 32, views: int = 1, seed: int = 0, stage: str = "synthetic", background_weight: float = 0.1
) -> list[dict]:
    """Pairs for tests and smoke runs: a smooth random "scene" with a bright disc
    (the "head"); views are blurred, shifted, noisy copies of each target; the
    weight is 1 on the disc and ``background_weight`` elsewhere."""
    if n < 1 or size < 8 or views < 1:
        raise ValueError(f"expected n >= 1, size >= 8, views >= 1, got {n}, {size}, {views}")
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    samples = []
    for i in range(n):
        scene = _smooth_field(g, 3, size, 4)
        cx, cy = (torch.rand(2, generator=g) * 0.6 - 0.3).tolist()
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.35**2).float()[None]  # [1, S, S]
        colour = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
        targets, inputs, seens = [], [], []
        for v in range(views):
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            t = (scene * (1 - disc) + colour * disc * (0.7 + 0.3 * _smooth_field(g, 1, size, 3))).roll(shift, dims=(1, 2))
            x = _blur(t[None], 1.2)[0].roll((1, -1), dims=(1, 2))
            x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
            targets.append(t)
            inputs.append(x)
            seens.append((_smooth_field(g, 1, size, 3) > 0.4).float())
        ref = (scene * (1 - disc) + colour * disc).clamp(0, 1)
        weight = (background_weight + (1 - background_weight) * disc).expand(views, 1, size, size)
        samples.append(
            {
                "ref": ref,
                "views": torch.stack(inputs),
                "seen": torch.stack(seens),
                "target": torch.stack(targets),
                "weight": weight.clone(),
                "meta": {"clip": f"synthetic{seed}", "index": i, "stage": stage},
            }
        )
    return samples
