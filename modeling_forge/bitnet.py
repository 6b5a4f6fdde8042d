"""BitNet b1.58 for Forge models: ternary `BitLinear` layers, 2-bit packed storage, k-bit embeddings.

A `BitLinear` quantizes its weight to {-1, 0, +1} times one absmean scale per tensor and its input to 8-bit
integers per token (absmax), and computes `y = (x_int @ w_int^T) * (w_scale / x_scale) + bias`. The integer product
is exact in fp32 (|sum| <= in_features * 128 < 2^24), so the training form (full-precision shadow weight, STE
backward), the packed inference form and the int8-kernel form give bit-identical outputs.

Storage (`config.bitnet["format"] == "packed"`): 4 ternary values per byte in transformers' BitNet layout (values +1
stored as {0, 1, 2}; output row `r` of block `i` = rows `i*R .. (i+1)*R` lives in bits `2i` of packed row `r`,
`R = ceil(out_features / 4)`), plus an fp32 scale. `save_pretrained` writes that form and `from_pretrained` rebuilds
the layers from `config.bitnet` (the hook `apply_bitnet_layout`, called by the model constructors) and unpacks each
layer once, in `_init_weights`, into a non-persistent buffer: the same place transformers derives rotary
frequencies after loading. The embedding (tied to the LM head) may be stored in 16, 8 or 4 bits.

Kernels (`set_bitnet_kernel`; the packed layers' cache is made once per load for the one chosen): "float" (fp32
ternary matrix, F.linear), "int8" (int8 matrix, bitsandbytes' int8 GEMM), "packed" (kernels/bitnet_packed.cpp, a C++
CPU kernel built on first use with torch.utils.cpp_extension: per-token int8 activations times the 2-bit weights,
repacked once into a VNNI-friendly 2-bit layout, with integer dot products; AVX-512 VNNI, AVX2 or scalar). All three
give the same bits. "auto" (the default of `from_pretrained` and `pack_bitnet`) takes "packed" where it builds and
"float" otherwise (no compiler, or a trust_remote_code folder, which has no C++ source). With a 4/8-bit embedding
and the extension built, the tied LM head reads the codes when decoding (`TiedLMHead`).

References:
    - Ma et al. "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", 2024 (BitNet b1.58).
    - Wang et al. "BitNet: Scaling 1-bit Transformers for Large Language Models", 2023 (per-token absmax, STE).

Written here, and why: the packing and unpacking helpers are transformers' own (`integrations.bitnet.pack_weights` /
`unpack_weights`, imported lazily). transformers' `BitLinear`/`AutoBitLinear` are not reused: their packed layer
assumes `out_features % 4 == 0`, unpacks to the full weight dtype on every call, and has no shadow-weight training
form, and their STE path (`WeightQuant`/`ActQuant`) rounds in floating point, so it would not match the packed
forward bit for bit. The integer-exact STE autograd function and the symmetric int8/int4 group-wise embedding codec
below are hand-written (~60 lines): bitsandbytes' 4-/8-bit codecs would make loading a checkpoint depend on
bitsandbytes, which the remote-code route should not need.
"""

import contextlib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import is_bitsandbytes_available, logging

logger = logging.get_logger(__name__)

PACKING_LAYOUT = "transformers-bitnet-2bit"  # transformers.integrations.bitnet pack_weights / unpack_weights
VALUES_PER_BYTE = 4
BITNET_FORMATS = ("shadow", "packed")
KERNELS = ("float", "int8", "packed")
KERNEL_CHOICES = (*KERNELS, "auto")  # "auto": the fastest one available ("packed" where it builds, else "float")
EMBEDDING_BITS = (32, 16, 8, 4)
SPEC_KEYS = ("format", "packing", "modules", "activation_bits", "embedding_bits", "embedding_group_size")
# Linear layers that can become BitLinear, by group; names relative to the backbone (`ForgeModel`).
QUANTIZABLE_GROUPS: dict[str, str] = {
    "attention": r"^layers\.\d+\.self_attn\.(q|k|v|o)_proj$",
    # EMA: down/up; neural: q/k/v, output gate and output (its rate projections a/b stay full precision).
    "memory": r"^layers\.\d+\.memory\.(down|up|q|k|v|g|o)_proj$",
    "gate": r"^layers\.\d+\.gate\.fc[12]$",
    "mlp": r"^layers\.\d+\.mlp\.(gate|up|down)_proj$",
    "trm": r"^recursion\.refiner\.(z_init|attn\.(q|k|v|o)_proj|block\.(gate|up|down)_proj)$",
}
DEFAULT_GROUPS = ("attention", "memory", "gate", "mlp", "trm")
WEIGHT_SCALE_EPS = 1e-5
ACTIVATION_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Quantizers and packing
# ----------------------------------------------------------------------------------------------------------------


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 weights: `w_int = RoundClip(w / mean|w|, -1, 1)` (fp32 values in {-1, 0, 1}) and the (1,) scale."""
    w = weight.detach().float()
    scale = w.abs().mean().clamp(min=WEIGHT_SCALE_EPS).reshape(1)
    return (w / scale).round().clamp(-1, 1), scale


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization: integer-valued fp32 `x_int` in [-(2^(b-1) - 1), 2^(b-1) - 1] and `x_scale`
    (..., 1), so that `x ~ x_int / x_scale`. No clamp is needed: |x * x_scale| <= qmax by construction (measured ~2x
    faster than abs/amax/mul/round/clamp on this CPU)."""
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    x_scale = qmax / x.abs().amax(dim=-1, keepdim=True).clamp_(min=ACTIVATION_EPS)
    return torch.mul(x, x_scale).round_(), x_scale


def _transformers_packing():
    # Lazy: the integration module pulls in transformers' quantizer machinery (~1 s), needed only for BitNet models.
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    return pack_weights, unpack_weights


def pack_ternary(w_int: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D ternary tensor (out, in) into uint8 (ceil(out / 4), in); any number of rows (the last block pads)."""
    if w_int.ndim != 2:
        raise ValueError(f"pack_ternary needs a 2-D (out, in) tensor, got shape {tuple(w_int.shape)}.")
    if not bool(((w_int == -1) | (w_int == 0) | (w_int == 1)).all()):
        raise ValueError("pack_ternary got values outside {-1, 0, 1}. Fix: ternarize the weight first.")
    pack_weights, _ = _transformers_packing()
    return pack_weights(w_int.detach().to(torch.int8).clone())  # clone: pack_weights adds 1 in place


def unpack_ternary(packed: torch.Tensor, out_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of `pack_ternary`: (ceil(out / 4), in) uint8 -> (out, in) ternary values in `dtype`."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack_ternary needs a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
    if packed.shape[0] != -(-out_features // VALUES_PER_BYTE):
        raise ValueError(
            f"A packed weight with {packed.shape[0]} rows holds {VALUES_PER_BYTE * (packed.shape[0] - 1) + 1}.."
            f"{VALUES_PER_BYTE * packed.shape[0]} output rows, not {out_features}. Fix: pass the layer's out_features."
        )
    _, unpack_weights = _transformers_packing()
    with torch.compiler.set_stance("force_eager"):  # transformers wraps it in torch.compile (~20 s on a CPU)
        return unpack_weights(packed, dtype=dtype)[:out_features]


LANE_ROWS = 16  # the "packed" kernel's lane layout: tiles of 16 rows x groups of 4 columns, 16 bytes each
LANE_COLS = 4


def lane_pack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Repack transformers' 2-bit layout into the lane layout the "packed" kernel reads (still 2 bits per weight).

    Codes `w + 1` in {0, 1, 2}; rows padded to a multiple of 16 and columns to a multiple of 4 (code 1, weight 0);
    per tile of 16 rows and group of 4 columns, byte `b` holds row `4L + b // 4`, column `b % 4` in bits `2L`
    (L = 0..3), so that one 16-byte load shifted by 0/2/4/6 per 128-bit lane gives the 16 rows x 4 columns operand
    of one VPDPBUSD (see kernels/bitnet_packed.cpp). Shape (ceil(out / 16), ceil(in / 4) * 16) uint8; once per load.
    """
    w_int = unpack_ternary(packed, out_features, torch.int8)
    rows, cols = w_int.shape
    tiles, groups = -(-rows // LANE_ROWS), -(-cols // LANE_COLS)
    codes = torch.ones(tiles * LANE_ROWS, groups * LANE_COLS, dtype=torch.uint8, device=packed.device)
    codes[:rows, :cols] = (w_int + 1).to(torch.uint8)
    # (tile, L, row in lane, group, column in group) -> (tile, group, L, 16 bytes)
    codes = codes.view(tiles, 4, 4, groups, LANE_COLS).permute(0, 3, 1, 2, 4).reshape(tiles, groups, 4, 16)
    lanes = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return lanes.reshape(tiles, groups * 16).contiguous()


_PACKED_KERNEL_SOURCE = Path(__file__).with_name("kernels") / "bitnet_packed.cpp"
# "ops" (torch.ops.forge_bitnet), "bitlinear" (its op) and "isa" (the CPU path it takes), or "error" (why not)
_packed_kernel_state: dict[str, object] = {}


def load_packed_kernel() -> object | None:
    """Build (first use; cached in torch's extension folder) and load the "packed" kernel; `torch.ops.forge_bitnet`,
    or None with one warning saying why (no C++ compiler, no kernel source in a remote-code folder, a build error).

    Written here, and why: `torch.utils.cpp_extension.load` does the building and caching; only the kernel itself
    (kernels/bitnet_packed.cpp) is hand-written, because no kept library multiplies this 2-bit layout directly.
    """
    if "ops" in _packed_kernel_state or "error" in _packed_kernel_state:
        return _packed_kernel_state.get("ops")
    error = None
    if not _PACKED_KERNEL_SOURCE.exists():
        # A folder loaded with trust_remote_code holds the model code but not the C++ source.
        error = f"its source {_PACKED_KERNEL_SOURCE.name} is not next to {Path(__file__).name}; install agent-forge"
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        error = "no C++ compiler was found (CXX or c++ on PATH); install g++ (Debian: apt-get install g++)"
    elif hasattr(torch.ops, "forge_bitnet") and hasattr(torch.ops.forge_bitnet, "bitlinear"):
        _packed_kernel_state["ops"] = torch.ops.forge_bitnet  # already loaded in this process
    else:
        path = os.environ.get("PATH", "")
        try:
            from torch.utils import cpp_extension

            if shutil.which("ninja") is None:  # pip's ninja lives in the venv's bin, which may not be on PATH
                import ninja

                os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path}"
            logger.info("Building the BitNet 'packed' kernel (once; cached by torch.utils.cpp_extension).")
            # The cache folder is named by the source's hash: checkouts with other versions never share (and rebuild)
            # one folder, and a process never loads a library built from another version of the source.
            digest = hashlib.sha256(_PACKED_KERNEL_SOURCE.read_bytes()).hexdigest()[:16]
            name = f"forge_bitnet_packed_{digest}"
            # torch's folder layout (TORCH_EXTENSIONS_DIR, else its cache; per Python and torch build), made explicit
            # so the build lock below can name it.
            root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
            flavour = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
            build_dir = Path(root) / flavour / name
            build_dir.mkdir(parents=True, exist_ok=True)
            with _build_lock(build_dir):
                cpp_extension.load(name=name, sources=[str(_PACKED_KERNEL_SOURCE)], build_directory=str(build_dir),
                                   extra_cflags=["-O3", "-ffp-contract=off"], is_python_module=False)  # fmt: skip
            _register_fake_kernels()
            _packed_kernel_state["ops"] = torch.ops.forge_bitnet
        except Exception as exc:  # a failed build must not stop a model from loading: it falls back to "float"
            error = f"building it failed ({type(exc).__name__}: {str(exc).strip()[-500:]})"
        finally:
            os.environ["PATH"] = path
    if error is None:
        _packed_kernel_state["bitlinear"] = torch.ops.forge_bitnet.bitlinear.default
        _packed_kernel_state["isa"] = torch.ops.forge_bitnet.isa()
    else:
        _packed_kernel_state["error"] = error
        log = logger.info if not _PACKED_KERNEL_SOURCE.exists() else logger.warning  # expected in remote-code folders
        log(f"The BitNet 'packed' CPU kernel is unavailable: {error}. Using kernel 'float' (same outputs, slower).")
    return _packed_kernel_state.get("ops")


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds of one kernel folder with an OS lock that dies with its holder, and clear a stale torch lock.

    torch's own build lock is a plain `lock` file: a build killed mid-way leaves it behind and every later process
    waits on it forever. Every builder of this folder takes the `flock` below first, so while we hold it a `lock`
    file can only be a dead builder's, and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    with open(build_dir / "forge-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning(f"Removing a stale build lock left by a killed build: {stale}")
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register_fake_kernels() -> None:
    """Output shapes of the C++ ops, so torch.compile and meta-device tracing can see through them."""

    @torch.library.register_fake("forge_bitnet::bitlinear")
    def _(x, lanes, w_scale, bias, out_features, qmax, eps, isa=-1):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("forge_bitnet::lowbit_linear")
    def _(x, codes, scales, bits, group_size):
        return x.new_empty(x.shape[0], codes.shape[0])


def resolve_kernel(kernel: str) -> str:
    """A kernel name from `KERNEL_CHOICES` -> one of `KERNELS` ("auto": "packed" if it builds here, else "float")."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"BitLinear kernel {kernel!r} is unknown. Fix: use one of {KERNEL_CHOICES}.")
    if kernel == "auto":
        return "packed" if load_packed_kernel() is not None else "float"
    if kernel == "packed" and load_packed_kernel() is None:
        raise ValueError(f"kernel='packed' is unavailable here: {_packed_kernel_state['error']}. Fix: do that, or use "
                         "kernel='float'.")  # fmt: skip
    return kernel


def quantize_embedding(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric absmax quantization per group of `group_size` columns: (codes, fp16 scales (rows, cols / group)).

    8 bits: int8 codes in [-127, 127]. 4 bits: codes in [-7, 7] stored +8 as two nibbles per byte (even column in
    the low nibble), shape (rows, cols / 2). 16 bits: the fp16 weight and no scales.
    """
    w = weight.detach().float()
    if bits == 16:
        return w.to(torch.float16), None
    rows, cols = w.shape
    qmax = 2 ** (bits - 1) - 1
    groups = w.view(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / qmax).to(torch.float16)  # (rows, cols / group)
    codes = (groups / scales.float().clamp(min=1e-12)[..., None]).round().clamp(-qmax, qmax).view(rows, cols)
    if bits == 8:
        return codes.to(torch.int8), scales
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_embedding(codes: torch.Tensor, scales: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_embedding` (fp32)."""
    if bits == 16:
        return codes.float()
    if bits == 4:
        low, high = (codes & 0x0F).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8
        codes = torch.stack([low, high], dim=-1).flatten(-2)
    rows, cols = codes.shape
    values = codes.float().view(rows, cols // group_size, group_size) * scales.float()[..., None]
    return values.view(rows, cols)


# ----------------------------------------------------------------------------------------------------------------
# BitLinear
# ----------------------------------------------------------------------------------------------------------------


def _int8_matmul(x_int: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """(..., in) integer-valued activations @ (out, in) int8 weights -> fp32, with bitsandbytes' int8 GEMM."""
    import bitsandbytes.functional as bnbf

    flat = x_int.reshape(-1, x_int.shape[-1]).to(torch.int8)
    return bnbf.int8_linear_matmul(flat, w_int8).float().reshape(*x_int.shape[:-1], w_int8.shape[0])


def bitlinear_product(
    x: torch.Tensor,
    w_int: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation_bits: int,
    kernel: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BitLinear forward: `(x_int @ w_int^T) * (w_scale / x_scale) + bias` in fp32; also returns x_int, x_scale.

    `w_int` holds ternary values as fp32 (kernel "float", exact: integer sums below 2^24) or int8 (kernel "int8",
    bitsandbytes' integer GEMM); both give the same bits.
    """
    x_int, x_scale = quantize_activations(x, activation_bits)
    acc = _int8_matmul(x_int, w_int) if kernel == "int8" else F.linear(x_int, w_int)  # (..., out), exact integers
    out = acc.mul_(w_scale / x_scale)
    if bias is not None:
        out = out.add_(bias.float())
    return out, x_int, x_scale


class BitLinearSTE(torch.autograd.Function):
    """BitLinear on a full-precision shadow weight: the integer-exact forward, and straight-through gradients
    `dL/dx = dL/dy @ (w_int * w_scale)`, `dL/dW = dL/dy^T @ (x_int / x_scale)` (quantizers treated as identity)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation_bits):
        w_int, w_scale = ternarize(weight)
        out, x_int, x_scale = bitlinear_product(x, w_int, w_scale, bias, activation_bits)
        ctx.save_for_backward(x_int, x_scale, w_int, w_scale)
        ctx.has_bias = bias is not None
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_int, x_scale, w_int, w_scale = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ w_int * w_scale).to(ctx.input_dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            x_deq = (x_int / x_scale).reshape(-1, x_int.shape[-1])  # (N, in)
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ x_deq).to(ctx.weight_dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class BitLinear(nn.Module):
    """Ternary linear layer (BitNet b1.58) with 8-bit per-token activations.

    Two forms with identical outputs:
      - shadow (`packed=False`, training): `weight` is a full-precision Parameter; every forward ternarizes it and
        gradients pass straight through to it (`BitLinearSTE`), which is what MuGrokfast's STE mode updates.
      - packed (`packed=True`, inference/storage): persistent `weight_packed` (uint8, 4 values per byte) and
        `weight_scale` (fp32), and a non-persistent cache made once per load for the matmul `kernel`:
        `weight_ternary` (fp32 for "float", int8 for "int8") or `weight_lanes` (2-bit lane layout for "packed",
        which computes from the 2-bit weights with a CPU kernel; the other cache is None).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        packed: bool = False,
        activation_bits: int = 8,
        kernel: str = "float",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_bits = activation_bits
        self.kernel = resolve_kernel(kernel)
        if packed:
            self.register_parameter("weight", None)
            rows = -(-out_features // VALUES_PER_BYTE)
            self.weight_packed = nn.Buffer(torch.zeros(rows, in_features, dtype=torch.uint8, device=device))
            self.weight_scale = nn.Buffer(torch.ones(1, dtype=torch.float32, device=device))
            self._set_cache(self._empty_cache(device))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def packed(self) -> bool:
        """Whether this layer holds packed ternary weights (no shadow weight)."""
        return self.weight is None

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int = 8) -> "BitLinear":
        """A shadow-form BitLinear whose shadow weight (and bias) is a copy of `linear`'s."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            activation_bits=activation_bits,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        return layer

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ternary values (fp32 {-1, 0, 1}, (out, in)) and the (1,) scale this layer computes with."""
        if self.packed:
            if self.weight_ternary is None:
                return unpack_ternary(self.weight_packed, self.out_features, torch.float32), self.weight_scale.float()
            return self.weight_ternary.float(), self.weight_scale.float()
        return ternarize(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """`w_int * w_scale`: the effective weight (fp32), for analysis."""
        w_int, scale = self.quantized()
        return w_int * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return BitLinearSTE.apply(x, self.weight, self.bias, self.activation_bits)
        if self.kernel == "packed" and not (x.requires_grad and torch.is_grad_enabled()):  # the C++ op has no backward
            if not x.is_cpu:
                raise ValueError(f"BitLinear kernel 'packed' runs on CPU only, got an input on {x.device}. Fix: "
                                 "set_bitnet_kernel(model, 'float') after moving the model.")  # fmt: skip
            # Decoding calls this ~100 times per token: only the conversions that are needed, the op looked up once.
            flat = x.reshape(-1, self.in_features)
            if flat.dtype != torch.float32 or not flat.is_contiguous():
                flat = flat.float().contiguous()
            qmax = 2 ** (self.activation_bits - 1) - 1
            out = _packed_kernel_state["bitlinear"](flat, self.weight_lanes, self.weight_scale, self.bias,
                                                    self.out_features, qmax, ACTIVATION_EPS)  # fmt: skip
            out = out.view(*x.shape[:-1], self.out_features)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        weight = self.weight_ternary
        if weight is None:  # kernel "packed" under autograd: the reference product on the unpacked weight
            weight = unpack_ternary(self.weight_packed, self.out_features, torch.float32)
        kernel = "float" if weight.dtype == torch.float32 else "int8"
        out, _, _ = bitlinear_product(x, weight, self.weight_scale, self.bias, self.activation_bits, kernel)
        return out.to(x.dtype)

    @torch.no_grad()
    def to_packed(self, kernel: str | None = None) -> None:
        """Shadow -> packed, in place: keep only the 2-bit packed ternary weight and its scale."""
        if self.packed:
            return
        w_int, scale = ternarize(self.weight)
        device = self.weight.device
        self.register_parameter("weight", None)
        self.kernel = resolve_kernel(kernel) if kernel else self.kernel
        self.weight_packed = nn.Buffer(pack_ternary(w_int).to(device))
        self.weight_scale = nn.Buffer(scale.to(device))
        self._set_cache(self._cache_from_packed())

    @torch.no_grad()
    def to_shadow(self) -> None:
        """Packed -> shadow, in place (to fine-tune a packed checkpoint with STE): shadow `w_int * s / p`, with `p`
        the share of non-zero weights, ternarizes back to the same values and (up to rounding) the same scale."""
        if not self.packed:
            return
        w_int, scale = self.quantized()
        nonzero = w_int.abs().mean().clamp(min=1.0 / w_int.numel())
        weight = w_int * (scale / nonzero)
        del self.weight_packed, self.weight_scale, self.weight_ternary, self.weight_lanes
        self.weight = nn.Parameter(weight)

    @torch.no_grad()
    def set_kernel(self, kernel: str) -> None:
        """Switch the matmul of the packed form ("float": fp32 ternary cache; "int8": int8 cache, integer GEMM;
        "packed": the CPU kernel on the 2-bit lane layout; "auto": the fastest available)."""
        self.kernel = resolve_kernel(kernel)
        if self.packed:
            self._set_cache(self._cache_from_packed())

    def _empty_cache(self, device: torch.device | str | None) -> torch.Tensor:
        if self.kernel == "packed":
            shape = (-(-self.out_features // LANE_ROWS), -(-self.in_features // LANE_COLS) * 16)
            return torch.zeros(shape, dtype=torch.uint8, device=device)
        dtype = torch.int8 if self.kernel == "int8" else torch.float32
        return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device)

    def _cache_from_packed(self) -> torch.Tensor:
        if self.kernel == "packed":
            return lane_pack(self.weight_packed, self.out_features)
        dtype = torch.int8 if self.kernel == "int8" else torch.float32
        return unpack_ternary(self.weight_packed, self.out_features, dtype)

    def _set_cache(self, cache: torch.Tensor) -> None:
        """Keep the kernel's cache (`weight_lanes` for "packed", else `weight_ternary`), the other one None."""
        lanes = self.kernel == "packed"
        self.register_buffer("weight_lanes", cache if lanes else None, persistent=False)
        self.register_buffer("weight_ternary", None if lanes else cache, persistent=False)

    @torch.no_grad()
    def init_from_checkpoint(self, std: float) -> None:
        """Called by `_init_weights`: a packed layer derives its kernel's cache from the (loaded) packed bytes; a
        shadow layer's missing weight gets the model's normal init."""
        if self.packed:
            if self.kernel == "packed" and self.weight_packed.device.type != "cpu":
                self.kernel = "float"  # the C++ kernel is CPU-only; on an accelerator the layer computes in fp32
                self._set_cache(self._empty_cache(self.weight_packed.device))
            cache = self.weight_lanes if self.kernel == "packed" else self.weight_ternary
            init.copy_(cache, self._cache_from_packed())
        else:
            init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            init.zeros_(self.bias)

    def extra_repr(self) -> str:
        form = f"packed, kernel={self.kernel}" if self.packed else "shadow"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, {form}"


class QuantizedEmbedding(nn.Embedding):
    """An embedding stored in `bits` (16, 8 or 4) with fp16 group scales. `weight` is a non-persistent fp32 buffer of
    the dequantized values, derived once per load from the persistent `weight_codes` / `weight_scales`, so the
    checkpoint holds only the codes. Used by the packed format only (the shadow format keeps an `nn.Embedding` whose
    values sit on the same grid)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        bits: int = 8,
        group_size: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device)
        self.bits, self.group_size = bits, group_size
        del self.weight
        self.weight = nn.Buffer(torch.zeros(num_embeddings, embedding_dim, device=device), persistent=False)
        if bits == 16:
            codes = torch.zeros(num_embeddings, embedding_dim, dtype=torch.float16, device=device)
        elif bits == 8:
            codes = torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        else:
            codes = torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device)
        self.weight_codes = nn.Buffer(codes)
        scales = None
        if bits != 16:
            scales = torch.ones(num_embeddings, embedding_dim // group_size, dtype=torch.float16, device=device)
        self.register_buffer("weight_scales", scales)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group_size: int) -> "QuantizedEmbedding":
        """Quantize `embedding`; the new layer computes with the dequantized values."""
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            bits=bits,
            group_size=group_size,
            device=embedding.weight.device,
        )
        codes, scales = quantize_embedding(embedding.weight, bits, group_size)
        layer.weight_codes = nn.Buffer(codes)
        layer.register_buffer("weight_scales", scales)
        layer.weight.copy_(dequantize_embedding(codes, scales, bits, group_size))
        return layer

    @torch.no_grad()
    def init_from_checkpoint(self, std: float) -> None:
        """Called by `_init_weights` after loading: the fp32 weight is the dequantized stored codes."""
        values = dequantize_embedding(self.weight_codes, self.weight_scales, self.bits, self.group_size)
        init.copy_(self.weight, values)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


LOWBIT_HEAD_MAX_POSITIONS = 16  # decoding; longer inputs (prefill, scoring) use F.linear, faster there


class TiedLMHead(nn.Module):
    """The LM head of a model with a quantized, tied embedding: `logits = h @ E^T` with the embedding's dequantized
    weight. It owns no tensors (the checkpoint stores the embedding once, as codes), so there is nothing for
    transformers to tie or to find missing when loading.

    With an 8- or 4-bit embedding, the "packed" kernel's extension built and AVX-512, calls of at most
    `LOWBIT_HEAD_MAX_POSITIONS` positions (decoding) read the codes directly (`read_codes`; 4-8x fewer bytes than the
    fp32 weight): the same products, summed in a different fp32 order than F.linear (logits differ by ~1e-6
    relative). This is independent of the BitLinear kernel, so switching kernels never changes logits.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._source = (embedding,)  # a tuple: referenced, not registered a second time as a submodule
        self.read_codes = True

    @property
    def weight(self) -> torch.Tensor:
        """The embedding matrix (V, D) this head multiplies with."""
        return self._source[0].weight

    def _reads_codes(self, hidden_states: torch.Tensor) -> bool:
        embedding = self._source[0]
        ops = _packed_kernel_state.get("ops")  # built by the packed layers; never built here, mid-forward
        return (
            self.read_codes
            and ops is not None
            and isinstance(embedding, QuantizedEmbedding)
            and embedding.bits in (8, 4)
            and embedding.group_size % 32 == 0
            and hidden_states.device.type == "cpu"
            and hidden_states[..., 0].numel() <= LOWBIT_HEAD_MAX_POSITIONS
            and not (torch.is_grad_enabled() and hidden_states.requires_grad)
            and _packed_kernel_state["isa"] == "avx512-vnni"
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._reads_codes(hidden_states):
            embedding = self._source[0]
            flat = hidden_states.reshape(-1, hidden_states.shape[-1]).float().contiguous()
            logits = torch.ops.forge_bitnet.lowbit_linear(flat, embedding.weight_codes, embedding.weight_scales,
                                                          embedding.bits, embedding.group_size)  # fmt: skip
            return logits.view(*hidden_states.shape[:-1], -1).to(hidden_states.dtype)
        return F.linear(hidden_states, self.weight.to(hidden_states.dtype))


# ----------------------------------------------------------------------------------------------------------------
# The layout recorded in `config.bitnet`, and converting models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BitNetLayout:
    """Which parts of a Forge model become low-bit, for `convert_to_bitnet`."""

    groups: Sequence[str] = field(
        default=DEFAULT_GROUPS,
        metadata={"help": f"Linear groups made ternary: any of {tuple(QUANTIZABLE_GROUPS)}."},
    )
    modules: Sequence[str] | None = field(
        default=None,
        metadata={"help": "Exact backbone-relative module names to make ternary; overrides `groups` when given."},
    )
    exclude: Sequence[str] = field(
        default=(), metadata={"help": "Module names kept in full precision (e.g. sensitive layers)."}
    )
    activation_bits: int = field(default=8, metadata={"help": "Bits of the per-token absmax activations (2-8)."})
    embedding_bits: int = field(
        default=32,
        metadata={"help": "Storage bits of the (tied) embedding / LM head: 32 (unchanged), 16, 8 or 4."},
    )
    embedding_group_size: int = field(
        default=64, metadata={"help": "Columns per fp16 scale of an 8- or 4-bit embedding; must divide hidden_size."}
    )


def validate_bitnet_spec(spec: dict, hidden_size: int) -> None:
    """Raise a `ValueError` naming the first invalid entry of a `config.bitnet` dict and the fix."""

    def fail(key: str, problem: str, fix: str) -> None:
        raise ValueError(f"ForgeConfig.bitnet[{key!r}] {problem}. Fix: {fix}.")

    if not isinstance(spec, dict):
        raise ValueError(f"ForgeConfig.bitnet must be a dict or None, got {type(spec).__name__}. Fix: see bitnet.py.")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"ForgeConfig.bitnet has unknown keys {unknown}. Fix: use only {SPEC_KEYS}.")
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(f"ForgeConfig.bitnet lacks {missing}. Fix: build it with modeling_forge.bitnet helpers.")
    if spec["format"] not in BITNET_FORMATS:
        fail("format", f"is {spec['format']!r}", f"use one of {BITNET_FORMATS}")
    if spec["packing"] != PACKING_LAYOUT:
        fail("packing", f"is {spec['packing']!r}, a layout this code cannot read", f"use {PACKING_LAYOUT!r}")
    if not isinstance(spec["modules"], list) or not all(isinstance(m, str) for m in spec["modules"]):
        fail("modules", "must be a list of module names", "list backbone-relative names like 'layers.0.mlp.up_proj'")
    if not (isinstance(spec["activation_bits"], int) and 2 <= spec["activation_bits"] <= 8):
        fail("activation_bits", f"is {spec['activation_bits']!r}", "use an integer in [2, 8] (BitNet uses 8)")
    if spec["embedding_bits"] not in EMBEDDING_BITS:
        fail("embedding_bits", f"is {spec['embedding_bits']!r}", f"use one of {EMBEDDING_BITS}")
    group = spec["embedding_group_size"]
    if spec["embedding_bits"] in (8, 4) and not (isinstance(group, int) and group > 0 and hidden_size % group == 0):
        fail("embedding_group_size", f"is {group!r}, not a positive divisor of hidden_size {hidden_size}",
             "use a divisor of hidden_size, e.g. 64 or hidden_size itself")  # fmt: skip
    if spec["embedding_bits"] == 4 and group % 2:
        fail("embedding_group_size", "must be even for 4-bit embeddings (two codes per byte)", "use e.g. 64")


def _backbone(model: nn.Module) -> nn.Module:
    """The `ForgeModel` of a `ForgeForCausalLM` (or the model itself), via transformers' public `base_model`."""
    return model.base_model


def bitnet_candidates(model: nn.Module, groups: Iterable[str] = DEFAULT_GROUPS) -> list[str]:
    """Backbone-relative names of the linear (or BitLinear) layers in `groups`, in forward order."""
    unknown = sorted(set(groups) - set(QUANTIZABLE_GROUPS))
    if unknown:
        raise ValueError(f"Unknown BitNet groups {unknown}. Fix: use any of {tuple(QUANTIZABLE_GROUPS)}.")
    patterns = [re.compile(QUANTIZABLE_GROUPS[g]) for g in groups]
    return [
        name
        for name, module in _backbone(model).named_modules()
        if isinstance(module, (nn.Linear, BitLinear)) and any(p.search(name) for p in patterns)
    ]


def _spec(model: nn.Module) -> dict | None:
    return getattr(model.config, "bitnet", None)


def quantize_module(model: nn.Module, name: str, activation_bits: int = 8) -> BitLinear:
    """Swap the backbone's linear `name` for a shadow BitLinear with a copy of its weights; returns the new layer."""
    backbone = _backbone(model)
    module = backbone.get_submodule(name)
    if isinstance(module, BitLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear. Fix: pick a linear layer.")
    layer = BitLinear.from_linear(module, activation_bits)
    backbone.set_submodule(name, layer)
    return layer


def restore_module(model: nn.Module, name: str, original: nn.Module) -> None:
    """Put a full-precision layer back at `name` (the fallback of a sensitive layer)."""
    _backbone(model).set_submodule(name, original)


def _use_tied_head(model: nn.Module) -> None:
    """Point a tied LM head at the quantized embedding (a `TiedLMHead`) and tell transformers nothing is tied."""
    if model is _backbone(model) or not model.config.tie_word_embeddings:
        return
    model.lm_head = TiedLMHead(model.base_model.embed_tokens)
    model._tied_weights_keys = None  # read by post_init and tie_weights; the head shares the weight by reference
    model.all_tied_weights_keys = {}


@torch.no_grad()
def snap_embedding(model: nn.Module, bits: int, group_size: int) -> None:
    """Round the (tied) embedding to its `bits` storage grid in place and freeze it, so what is trained and
    evaluated is exactly what the packed checkpoint stores (a no-op for 32 bits; idempotent)."""
    if bits == 32:
        return
    embedding = _backbone(model).embed_tokens
    codes, scales = quantize_embedding(embedding.weight, bits, group_size)
    embedding.weight.copy_(dequantize_embedding(codes, scales, bits, group_size))
    embedding.weight.requires_grad_(False)


def convert_to_bitnet(model: nn.Module, layout: BitNetLayout | dict | None = None) -> list[str]:
    """Make the chosen linears of a Forge model ternary (shadow form, ready for STE fine-tuning) and snap the
    embedding to its storage grid; records the layout in `config.bitnet`. Returns the converted names."""
    if isinstance(layout, dict):
        layout = BitNetLayout(**layout)
    layout = layout or BitNetLayout()
    if model.config.bitnet is not None and model.config.bitnet["format"] == "packed":
        raise ValueError("This model is already packed. Fix: call bitnet_to_shadow(model) to fine-tune it again.")
    names = list(layout.modules) if layout.modules is not None else bitnet_candidates(model, layout.groups)
    names = [name for name in names if name not in set(layout.exclude)]
    for name in names:
        quantize_module(model, name, layout.activation_bits)
    snap_embedding(model, layout.embedding_bits, layout.embedding_group_size)
    spec = {
        "format": "shadow",
        "packing": PACKING_LAYOUT,
        "modules": names,
        "activation_bits": layout.activation_bits,
        "embedding_bits": layout.embedding_bits,
        "embedding_group_size": layout.embedding_group_size,
    }
    validate_bitnet_spec(spec, model.config.hidden_size)
    model.config.bitnet = spec
    return names


@torch.no_grad()
def pack_bitnet(model: nn.Module, kernel: str = "auto") -> nn.Module:
    """Shadow -> packed, in place: BitLinear layers keep 2-bit weights only (computing with `kernel`, by default the
    fastest available), the embedding its low-bit codes; `save_pretrained` then writes the packed checkpoint.
    Outputs stay bit-identical."""
    spec = _spec(model)
    if spec is None:
        raise ValueError("The model has no config.bitnet. Fix: call convert_to_bitnet(model, layout) first.")
    backbone = _backbone(model)
    for name in spec["modules"]:
        backbone.get_submodule(name).to_packed(kernel)
    if spec["embedding_bits"] != 32 and not isinstance(backbone.embed_tokens, QuantizedEmbedding):
        backbone.embed_tokens = QuantizedEmbedding.from_embedding(
            backbone.embed_tokens, spec["embedding_bits"], spec["embedding_group_size"]
        )
        _use_tied_head(model)
    model.config.bitnet = {**spec, "format": "packed"}
    return model


@torch.no_grad()
def bitnet_to_shadow(model: nn.Module) -> nn.Module:
    """Packed -> shadow, in place, so a later phase can fine-tune a packed checkpoint with STE."""
    spec = _spec(model)
    if spec is None:
        raise ValueError("The model has no config.bitnet; it is not a BitNet model.")
    backbone = _backbone(model)
    for name in spec["modules"]:
        backbone.get_submodule(name).to_shadow()
    if isinstance(backbone.embed_tokens, QuantizedEmbedding):
        embedding = backbone.embed_tokens
        plain = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                             device=embedding.weight.device)  # fmt: skip
        plain.weight.copy_(embedding.weight)
        plain.weight.requires_grad_(False)  # on its storage grid, as after convert_to_bitnet
        backbone.embed_tokens = plain
        if isinstance(model.lm_head, TiedLMHead):
            model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
            del model._tied_weights_keys  # back to the class's mapping
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
            model.tie_weights()
    model.config.bitnet = {**spec, "format": "shadow"}
    return model


def set_bitnet_kernel(model: nn.Module, kernel: str) -> str:
    """Choose the packed layers' matmul: "float" (fp32 ternary cache, any device), "int8" (int8 cache and
    bitsandbytes' int8 GEMM; needs bitsandbytes and, on CPU, AVX-512), "packed" (a C++ CPU kernel reading the 2-bit
    weights, built on first use; needs a C++ compiler) or "auto" (the fastest available). Same outputs bit for bit,
    different speed and memory. Returns the kernel chosen."""
    if kernel == "int8" and not is_bitsandbytes_available():
        raise ValueError("kernel='int8' needs bitsandbytes. Fix: pip install bitsandbytes, or use kernel='float'.")
    kernel = resolve_kernel(kernel)
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.set_kernel(kernel)
    return kernel


def apply_bitnet_layout(model: nn.Module) -> None:
    """The constructor hook: rebuild the BitNet layers `config.bitnet` records (empty, in their stored form) so that
    `from_pretrained` loads a BitNet checkpoint into them. A no-op without `config.bitnet`."""
    spec = _spec(model)
    if spec is None:
        return
    backbone = _backbone(model)
    packed = spec["format"] == "packed"
    if model is backbone:
        kernel = resolve_kernel("auto") if packed else "float"
        if packed:
            isa = f" ({torch.ops.forge_bitnet.isa()})" if kernel == "packed" else ""
            logger.info(f"BitNet packed layers compute with kernel {kernel!r}{isa}; set_bitnet_kernel() changes it.")
        for name in spec["modules"]:
            linear = backbone.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"config.bitnet lists {name}, a {type(linear).__name__}, not a linear layer.")
            layer = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, packed=packed,
                              activation_bits=spec["activation_bits"], kernel=kernel, device=linear.weight.device,
                              dtype=linear.weight.dtype)  # fmt: skip
            backbone.set_submodule(name, layer)
        if packed and spec["embedding_bits"] != 32:
            old = backbone.embed_tokens
            backbone.embed_tokens = QuantizedEmbedding(
                old.num_embeddings,
                old.embedding_dim,
                old.padding_idx,
                bits=spec["embedding_bits"],
                group_size=spec["embedding_group_size"],
                device=old.weight.device,
            )
    elif packed and spec["embedding_bits"] != 32:
        _use_tied_head(model)


__all__ = [
    "BITNET_FORMATS",
    "DEFAULT_GROUPS",
    "PACKING_LAYOUT",
    "QUANTIZABLE_GROUPS",
    "BitLinear",
    "BitLinearSTE",
    "BitNetLayout",
    "QuantizedEmbedding",
    "TiedLMHead",
    "apply_bitnet_layout",
    "lane_pack",
    "load_packed_kernel",
    "resolve_kernel",
    "bitlinear_product",
    "bitnet_candidates",
    "bitnet_to_shadow",
    "convert_to_bitnet",
    "dequantize_embedding",
    "pack_bitnet",
    "pack_ternary",
    "quantize_activations",
    "quantize_embedding",
    "quantize_module",
    "restore_module",
    "set_bitnet_kernel",
    "snap_embedding",
    "ternarize",
    "unpack_ternary",
    "validate_bitnet_spec",
]
