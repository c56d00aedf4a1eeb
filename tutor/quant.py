"""NF4 and double quantisation from scratch, the way QLoRA stores a frozen base model.

Three ideas, each a few lines of tensor code (bitsandbytes does the same in C/CUDA):

1. **The NF4 codebook** (`nf4_codebook`): 16 values in [-1, 1] placed at quantiles of the
   standard normal distribution, so that each code is used about equally often by normally
   distributed weights. 8 negative-side levels (with -1), zero, 7 positive-side levels (with +1)::

       p = linspace(0.9677083, 0.5, 9)[:-1]     # 8 probabilities, upper tail first
       positive = Phi^-1(p)                      # 8 quantiles (Phi^-1 = inverse normal CDF)
       negative = -Phi^-1(linspace(0.9677083, 0.5, 8)[:-1])   # 7 quantiles
       codebook = sort([*positive, 0, *negative]) / max         # 16 values, exact 0 included

   0.9677083 = 1 - (1/30 + 1/32) / 2 (QLoRA appendix): the mean of the outermost
   quantile positions for 15 and 16 bins, which keeps Phi^-1 finite at the ends.
2. **Blockwise absmax quantisation** (`quantize_nf4`): every block of 64 consecutive weights
   is divided by its absolute maximum (so it lies in [-1, 1]) and each value is replaced by the
   index of its nearest codebook entry. Two 4-bit indices share a byte: the FIRST value in the
   HIGH nibble. Storage: 4 bits per weight + one fp32 absmax per 64 weights = 4.5 bits.
3. **Double quantisation** (`double_quantize`): the fp32 absmax constants themselves are
   quantised to 8 bits (minus their mean, blocks of 256, bitsandbytes' signed "dynamic" 8-bit
   code), which costs 8/64 + 32/(64*256) bits per weight: 4.127 bits in total.

The codes and dequantised values equal bitsandbytes' `quantize_4bit` / `dequantize_4bit`
(`quant_type="nf4"`); tests/test_quant.py checks that.

Not handled: FP4, blocksizes other than those bitsandbytes allows, packing into storage types
other than uint8, and matmul kernels (we dequantise to a full tensor; bitsandbytes never does).
bitsandbytes' CPU kernel rounds the 8-bit absmax codes through a 65536-entry lookup table, so in
rare near-ties (|value - midpoint| < 2/65535) its 8-bit code is the neighbour of ours; we round
exactly to the nearest code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tutor.errors import TutorError

if TYPE_CHECKING:
    import torch

NF4_OFFSET = 0.9677083  # bitsandbytes' rounded 1 - (1/30 + 1/32) / 2; the rounding matters bitwise
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels, sorted, float32, shape (16,); index 7 is exactly 0.0.

    Built in float32 probabilities and float64 quantiles, as bitsandbytes built its table, so the
    result equals `bitsandbytes.functional.get_4bit_type("nf4")` bit for bit.
    """
    import torch

    def quantiles(n: int) -> torch.Tensor:  # n quantiles of N(0, 1), from the upper tail inwards
        probs = torch.linspace(NF4_OFFSET, 0.5, n + 1)[:-1]  # drop p = 0.5 (the zero level)
        return torch.special.ndtri(probs.double())

    levels = torch.cat([quantiles(8), torch.zeros(1, dtype=torch.float64), -quantiles(7)])
    levels = levels.float().sort().values
    return levels / levels.max()


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 sorted values in [-1, 1]) for the absmax.

    Dynamic tree quantisation (Dettmers 2015): a run of zero bits encodes a decimal exponent,
    the remaining bits a linear fraction, so small magnitudes get fine steps.
    """
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=True)


def _nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted `codebook` for every element of `x` (int64).

    Nearest = which interval between consecutive midpoints `x` falls in; a value exactly on a
    midpoint goes to the lower code (bitsandbytes' convention).
    """
    import torch

    midpoints = (codebook[:-1] + codebook[1:]) / 2
    return torch.bucketize(x, midpoints)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `flat` (n,) fp32 into blocks; return (absmax (blocks,), values scaled into [-1, 1]).

    The last block may be shorter. Scaling multiplies by the reciprocal (not divides), exactly
    as bitsandbytes does, so the codes agree bit for bit.
    """
    import torch

    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # zeros never win absmax
    absmax = blocks.abs().max(dim=1).values
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    return absmax, scaled.clamp(-1, 1).reshape(-1)[:n]


@dataclass
class DoubleQuant:
    """8-bit absmax constants: `absmax ≈ dynamic[codes] * absmax2[block] + offset`."""

    codes: torch.Tensor  # (blocks,) uint8, one per 64-weight block
    absmax2: torch.Tensor  # (ceil(blocks / 256),) fp32
    offset: torch.Tensor  # () fp32, the mean of the original absmax values
    blocksize: int = 256


@dataclass
class NF4Tensor:
    """A weight stored as NF4: packed codes plus what is needed to scale them back."""

    packed: torch.Tensor  # (ceil(n / 2),) uint8, first value of each pair in the high nibble
    absmax: torch.Tensor | DoubleQuant  # (blocks,) fp32, or its 8-bit double quantisation
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64

    def codes(self) -> torch.Tensor:
        """The unpacked 4-bit indices, shape (n,) uint8, in the weight's flat order."""
        import torch

        pairs = torch.stack([self.packed >> 4, self.packed & 0x0F], dim=1).reshape(-1)
        return pairs[: _numel(self.shape)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuant:
    """Quantise fp32 absmax constants (blocks,) to 8 bits: subtract the mean, blockwise absmax.

    The constants are all positive and similar in size; centring them first lets the signed
    8-bit code spend its resolution on their spread instead of their magnitude.
    """
    import torch

    offset = absmax.mean()
    absmax2, scaled = _blockwise_absmax(absmax - offset, blocksize)
    codes = _nearest_code(scaled, dynamic_codebook()).to(torch.uint8)
    return DoubleQuant(codes=codes, absmax2=absmax2, offset=offset, blocksize=blocksize)


def dequantize_absmax(dq: DoubleQuant) -> torch.Tensor:
    """Undo `double_quantize`: (blocks,) fp32 absmax constants (approximately the originals)."""
    values = dynamic_codebook()[dq.codes.long()]
    scales = dq.absmax2.repeat_interleave(dq.blocksize)[: values.numel()]
    return values * scales + dq.offset


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64,
                 double_quant: bool = False) -> NF4Tensor:
    """Quantise a float weight of any shape to NF4 in blocks of `blocksize` flat values.

    >>> import torch
    >>> q = quantize_nf4(torch.tensor([[0.5, -1.0], [0.25, 1.0]]))
    >>> q.codes().tolist()   # one block, absmax 1: 0.5 -> 0.4407 (12), 0.25 -> 0.2461 (10)
    [12, 0, 10, 15]
    >>> [hex(b) for b in q.packed.tolist()]   # pairs share a byte, first value high
    ['0xc0', '0xaf']
    """
    import torch

    if blocksize not in VALID_BLOCKSIZES:
        raise TutorError(f"blocksize must be one of {VALID_BLOCKSIZES}, not {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TutorError(f"quantize_nf4 takes fp32/fp16/bf16 weights, not {weight.dtype}")
    flat = weight.detach().reshape(-1).float()  # (n,)
    absmax, scaled = _blockwise_absmax(flat, blocksize)
    if scaled.numel() % 2:  # an odd count: the last low nibble holds the code of 0.0 (7)
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = _nearest_code(scaled, nf4_codebook()).to(torch.uint8)  # (n,) values 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),)
    scale: torch.Tensor | DoubleQuant = double_quantize(absmax) if double_quant else absmax
    return NF4Tensor(packed, scale, tuple(weight.shape), weight.dtype, blocksize)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """Rebuild the weight: codebook[code] * its block's absmax, shape `q.shape`, dtype `q.dtype`."""
    absmax = dequantize_absmax(q.absmax) if isinstance(q.absmax, DoubleQuant) else q.absmax
    values = nf4_codebook()[q.codes().long()]  # (n,) in [-1, 1]
    scales = absmax.repeat_interleave(q.blocksize)[: values.numel()]
    return (values * scales).reshape(q.shape).to(q.dtype)


def bits_per_param(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> float:
    """Average storage bits per weight of NF4 (ignoring the few bytes of codebooks and offset).

    >>> round(bits_per_param(double_quant=False), 3), round(bits_per_param(), 3)
    (4.5, 4.127)
    """
    if not double_quant:
        return 4 + 32 / blocksize  # 4-bit code + an fp32 absmax shared by `blocksize` weights
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes bitsandbytes keeps for one NF4 weight of `numel` values.

    Packed codes, absmax (fp32, or uint8 + fp32 second-level absmax + fp32 offset + the
    256-entry fp32 dynamic code when double-quantised) and the 16-entry fp32 NF4 code that each
    layer's quant state carries.
    """
    blocks = -(-numel // blocksize)
    total = -(-numel // 2) + 16 * 4
    if not double_quant:
        return total + 4 * blocks
    blocks2 = -(-blocks // 256)
    return total + blocks + 4 * blocks2 + 4 + 256 * 4
