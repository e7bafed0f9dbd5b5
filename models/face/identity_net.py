"""dlib's face-recognition ResNet in torch, with a reader for its serialized weights.

The network is ``dlib_face_recognition_resnet_model_v1`` (shipped by the
``face-recognition-models`` package): a 29-layer ResNet trained by Davis King
on about 3 million faces with a metric loss; two faces of one person lie
closer than 0.6 in its 128-d descriptor space. Layer list as in dlib's
examples/dnn_face_recognition_ex.cpp (``anet_type``), bottom-up:

    input 150x150 RGB, x = (pixel - mean_rgb) / 256
    con 7x7/2 (32) -> affine -> relu -> max_pool 3x3/2
    level4: 3 x res(32)      level3: res_down(64) + 3 x res(64)
    level2: res_down(128) + 2 x res(128)      level1: res_down(256) + 2 x res(256)
    level0: res_down(256)    -> avg_pool_everything -> fc 128 (no bias)

    res(N)      = relu(x + B(x))
    res_down(N) = relu(avg_pool_2x2/2(x) (+) B_stride2(x))
    B           = affine(con 3x3 (N)) o relu o affine(con 3x3/s (N))

``affine`` is a frozen batch-norm (per-channel gamma * x + beta). A conv with
stride 2 has no padding, a stride-1 conv pads by half its size (dlib's
defaults). ``(+)`` is dlib's add_prev: the two tensors are added as if each
were zero-padded to the larger one's channels, rows and columns (level1's
downsampling adds a 3x3 branch to a 4x4 shortcut).

The .dat file is dlib's binary serialization (dlib/serialize.h, dlib/dnn/core.h,
layers.h, tensor.h): integers are a length byte (low nibble: byte count, bit 7:
sign) then little-endian bytes; a float is two integers (mantissa, exponent:
m * 2^e); a string is its length then its bytes; a bool is the character '1'
or '0'; a tensor is (version 2, n, k, nr, nc) then n*k*nr*nc little-endian
float32. The network is written top-down: first the loss layer, then every
layer wrapper's version (add_layer 2, tag/skip 1) as the recursion descends,
then each computational layer's details bottom-up, each followed by its
wrapper's bookkeeping (3 bools and 3 empty tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DESCRIPTOR_DIM",
    "CHIP_SIZE",
    "DlibFormatError",
    "DlibLayer",
    "DlibNet",
    "read_dlib_net",
    "FaceRecognitionNet",
]

DESCRIPTOR_DIM = 128
CHIP_SIZE = 150
# (channels, residual blocks after the first, first block downsamples) per level, bottom-up
_LEVELS = ((32, 3, False), (64, 3, True), (128, 2, True), (256, 2, True), (256, 0, True))


class DlibFormatError(ValueError):
    """The file is not the dlib network this module re-implements."""


# ----------------------------------------------------------------------------- reader


@dataclass
class DlibLayer:
    """One computational layer as serialized: its name (version suffix dropped, e.g.
    'con', 'affine', 'max_pool'), integer settings and float32 parameters."""

    name: str
    ints: dict[str, int] = field(default_factory=dict)
    params: np.ndarray | None = None  # flat float32


@dataclass
class DlibNet:
    """A parsed network: the input's per-channel means (0..255 RGB) and the layers bottom-up."""

    mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]


class _Stream:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"expected {n} more bytes at offset {self.pos}, got the end of the file")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        head = self._take(1)[0]
        size, negative = head & 0x0F, head & 0x80
        if size > 8:
            raise DlibFormatError(f"expected an integer of at most 8 bytes at offset {self.pos - 1}, got {size}")
        value = int.from_bytes(self._take(size), "little")
        return -value if negative else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # dlib's codes for inf, -inf, nan
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        return math.ldexp(mantissa, exponent)

    def string(self) -> str:
        n = self.int()
        if not 0 <= n <= 256:
            raise DlibFormatError(f"expected a layer name (a short string) at offset {self.pos}, got a length of {n}")
        return self._take(n).decode("ascii", errors="replace")

    def bool(self) -> bool:
        c = self._take(1)
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"expected a bool ('0' or '1') at offset {self.pos - 1}, got {c!r}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"expected a tensor of version 2, got version {version} at offset {self.pos}")
        shape = [self.int() for _ in range(4)]
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def alias_tensor(self) -> tuple[int, ...]:
        version = self.int()
        if version != 1:
            raise DlibFormatError(f"expected an alias_tensor of version 1, got version {version}")
        return tuple(self.int() for _ in range(4))


def _read_details(s: _Stream, name: str) -> DlibLayer:
    """One layer's details after its name (dlib/dnn/layers.h serialize functions)."""
    base = name.rstrip("0123456789").rstrip("_")
    layer = DlibLayer(base)
    if name in ("con_4", "con_5"):
        layer.params = s.tensor()
        for key in ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            layer.ints[key] = s.int()
        s.alias_tensor(), s.alias_tensor()  # filters [n, k, nr, nc], biases [1, n]
        for _ in range(4):  # learning-rate and weight-decay multipliers
            s.float()
        layer.ints["use_bias"] = int(s.bool()) if name == "con_5" else 1
    elif name == "affine_":
        layer.params = s.tensor()  # gamma then beta
        s.alias_tensor(), s.alias_tensor()
        layer.ints["mode"] = s.int()
    elif name in ("max_pool_2", "avg_pool_2"):
        for key in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            layer.ints[key] = s.int()
    elif name == "fc_2":
        layer.ints["num_outputs"], layer.ints["num_inputs"] = s.int(), s.int()
        layer.params = s.tensor()  # weights [num_inputs, num_outputs] row-major, then biases
        s.alias_tensor(), s.alias_tensor()
        layer.ints["bias_mode"] = s.int()
        for _ in range(4):
            s.float()
    elif name in ("relu_", "add_prev_"):
        pass
    else:
        raise DlibFormatError(f"expected a layer of the face-recognition ResNet, got '{name}'")
    return layer


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a dlib ``loss_metric`` network file (e.g. dlib_face_recognition_resnet_model_v1.dat)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a dlib network file, got no such path: {path}")
    s = _Stream(path.read_bytes())
    try:
        version = s.int()
        loss = s.string() if version == 1 else f"a file starting with version {version}"
    except DlibFormatError as exc:
        loss = str(exc)
    if loss != "loss_metric_2":
        raise DlibFormatError(f"expected a loss_metric_2 network in {path}, got '{loss}'")
    s.float(), s.float()  # margin, distance threshold (0.04, 0.6)
    versions = []  # wrapper versions, top-down; the first value > 3 is the input name's length
    while (v := s.int()) <= 3:
        versions.append(v)
    name = s._take(v).decode("ascii", errors="replace")
    if name != "input_rgb_image_sized":
        raise DlibFormatError(f"expected the input layer input_rgb_image_sized, got '{name}'")
    mean_rgb = (s.float(), s.float(), s.float())
    input_size = (s.int(), s.int())
    if versions[-1] not in (2, 3) or any(v not in (1, 2) for v in versions[:-1]):
        raise DlibFormatError(f"expected layer wrappers of versions 1 (tag, skip) and 2 (add_layer), got {versions}")
    layers: list[DlibLayer] = []
    for i in range(sum(v >= 2 for v in versions)):
        layers.append(_read_details(s, s.string()))
        s.bool(), s.bool(), s.bool()  # setup called, gradient stale, getters disabled
        # x_grad, cached output, then params_grad (grad_final for the layer on the input)
        if any(s.tensor().size for _ in range(3)):
            raise DlibFormatError("expected empty cached tensors in a saved network, got data")
        if i == 0 and versions[-1] == 3:
            s.int()  # sample expansion factor
    if s.pos != len(s.data):
        raise DlibFormatError(f"expected the file to end after {len(layers)} layers, got {len(s.data) - s.pos} more bytes")
    return DlibNet(mean_rgb, input_size, layers)


# ----------------------------------------------------------------------------- network


class _Affine(nn.Module):
    """dlib's affine layer (a frozen batch-norm): y = gamma[c] * x + beta[c]."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("gamma", torch.ones(channels))
        self.register_buffer("beta", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta[:, None, None], x, self.gamma[:, None, None])


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b as if both were zero-padded (at the end of channels,
    rows, columns) to the larger size. a, b [B, C, H, W]."""
    if a.shape == b.shape:
        return a + b
    C, H, W = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(x):
        return F.pad(x, (0, W - x.shape[3], 0, H - x.shape[2], 0, C - x.shape[1]))

    return pad(a) + pad(b)


class _Residual(nn.Module):
    """res(N) or, with stride 2, res_down(N) (see the module docstring)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1 if stride == 1 else 0)
        self.affine1 = _Affine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1)
        self.affine2 = _Affine(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, 2)
        return F.relu(_add_padded(y, shortcut))


class FaceRecognitionNet(nn.Module):
    """dlib's face-recognition ResNet: aligned chips [B, 3, 150, 150] RGB in [0, 1] ->
    descriptors [B, 128] (not normalised; same person: distance < 0.6).

    Eval-only float32 network with frozen weights (load with :meth:`from_dlib`);
    :meth:`features` also returns the activations after the stem and after each
    level, for a feature-matching loss. Runs on any device; the input may carry
    gradients.
    """

    def __init__(self, mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 32, 7, 2, padding=0)
        self.affine = _Affine(32)
        levels, c_in = [], 32
        for c, repeats, down in _LEVELS:
            blocks = [_Residual(c_in, c, 2 if down else 1)] if down else []
            blocks += [_Residual(c, c, 1) for _ in range(repeats)]
            levels.append(nn.Sequential(*blocks))
            c_in = c
        self.levels = nn.ModuleList(levels)
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FaceRecognitionNet:
        return super().train(False)  # frozen batch-norms: there is no training mode

    def features(self, chips: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """chips [B, 3, 150, 150] in [0, 1] -> (activations: stem [B, 32, 35, 35] then
        one per level [B, 32, 35, 35], [B, 64, 17, 17], [B, 128, 8, 8], [B, 256, 4, 4],
        [B, 256, 2, 2]; descriptors [B, 128])."""
        if chips.ndim != 4 or chips.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected chips (B, 3, {CHIP_SIZE}, {CHIP_SIZE}), got {tuple(chips.shape)}")
        x = (chips * 255.0 - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)
        acts = [x]
        for level in self.levels:
            x = level(x)
            acts.append(x)
        return acts, self.fc(x.mean(dim=(2, 3)))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return self.features(chips)[1]

    # ---- weights ----------------------------------------------------------------------------------------
    def _expected_layers(self) -> list[tuple[str, nn.Module | None]]:
        """The dlib layer sequence (bottom-up) this module computes, with the module holding each one's weights."""
        seq: list[tuple[str, nn.Module | None]] = [("con", self.conv), ("affine", self.affine), ("relu", None), ("max_pool", None)]
        for level in self.levels:
            for block in level:
                seq += [("con", block.conv1), ("affine", block.affine1), ("relu", None),
                        ("con", block.conv2), ("affine", block.affine2)]
                seq += [("avg_pool", None)] if block.stride == 2 else []
                seq += [("add_prev", None), ("relu", None)]
        return seq + [("avg_pool", None), ("fc", self.fc)]

    @torch.no_grad()
    def load_dlib(self, net: DlibNet) -> FaceRecognitionNet:
        """Copy a parsed dlib network's weights in, checking every layer's kind, size and stride."""
        expected = self._expected_layers()
        got = [layer.name for layer in net.layers]
        if got != [name for name, _ in expected]:
            raise DlibFormatError(f"expected the layers {[n for n, _ in expected]}, got {got}")
        self.mean.copy_(torch.tensor(net.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        for layer, (name, module) in zip(net.layers, expected):
            p = None if layer.params is None else torch.from_numpy(layer.params.copy())
            if name == "con":
                w = module.weight
                o, i, kh, kw = w.shape
                want = dict(num_filters=o, nr=kh, nc=kw, stride_y=module.stride[0], stride_x=module.stride[1],
                            padding_y=module.padding[0], padding_x=module.padding[1], use_bias=1)
                if {k: layer.ints[k] for k in want} != want or p.numel() != w.numel() + o:
                    raise DlibFormatError(f"expected a conv {want} with {w.numel() + o} parameters, got {layer.ints} with {p.numel()}")
                w.copy_(p[:w.numel()].view_as(w))  # dlib filters are [n, k, nr, nc], cross-correlation like torch
                module.bias.copy_(p[w.numel():])
            elif name == "affine":
                c = module.gamma.numel()
                if p.numel() != 2 * c or layer.ints["mode"] != 0:  # 0: per-channel (CONV_MODE)
                    raise DlibFormatError(f"expected a per-channel affine of {c} channels, got {layer.ints} with {p.numel()} parameters")
                module.gamma.copy_(p[:c])
                module.beta.copy_(p[c:])
            elif name == "fc":
                n_in, n_out = module.in_features, module.out_features
                if (layer.ints["num_inputs"], layer.ints["num_outputs"]) != (n_in, n_out) or p.numel() != n_in * n_out:
                    raise DlibFormatError(f"expected fc {n_in} -> {n_out} without bias, got {layer.ints} with {p.numel()} parameters")
                module.weight.copy_(p.view(n_in, n_out).T)  # dlib: y = x @ W, W [inputs, outputs]
            elif name in ("max_pool", "avg_pool"):
                window = (3, 3, 2, 2) if name == "max_pool" else (2, 2, 2, 2)
                if layer is net.layers[-2]:
                    window = (0, 0, 1, 1)  # avg_pool_everything
                got_w = tuple(layer.ints[k] for k in ("nr", "nc", "stride_y", "stride_x"))
                if got_w != window or (layer.ints["padding_y"], layer.ints["padding_x"]) != (0, 0):
                    raise DlibFormatError(f"expected {name} {window} without padding, got {layer.ints}")
        return self

    @classmethod
    def from_dlib(cls, path: str | Path) -> FaceRecognitionNet:
        """The network with the weights of a dlib .dat file (float32, CPU; ``.to(device)`` after)."""
        net = read_dlib_net(path)
        if net.input_size != (CHIP_SIZE, CHIP_SIZE):
            raise DlibFormatError(f"expected an input of {CHIP_SIZE}x{CHIP_SIZE}, got {net.input_size}")
        return cls(net.mean_rgb).load_dlib(net)
