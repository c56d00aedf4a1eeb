"""NF4 from scratch (tutor.quant) against bitsandbytes on CPU: same codes, same values."""

from __future__ import annotations

import logging

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from tutor.errors import TutorError  # noqa: E402
from tutor.quant import (  # noqa: E402
    DoubleQuant,
    bits_per_param,
    dequantize_absmax,
    dequantize_nf4,
    double_quantize,
    dynamic_codebook,
    nf4_codebook,
    nf4_storage_bytes,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_codebook_equals_bitsandbytes_bit_for_bit():
    ours = nf4_codebook()
    assert torch.equal(ours, bnbf.get_4bit_type("nf4", device="cpu"))
    assert ours[7].item() == 0.0 and ours[0].item() == -1.0 and ours[15].item() == 1.0
    assert (ours.diff() > 0).all()


def test_dynamic_codebook_is_what_double_quant_uses():
    _, state = bnbf.quantize_4bit(weight((64, 64)), quant_type="nf4", compress_statistics=True)
    assert torch.equal(dynamic_codebook(), state.state2.code)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 320), (3, 50), (7, 9)])  # last two: partial block, odd
def test_codes_packing_and_absmax_equal_bitsandbytes(dtype, shape):
    w = weight(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w, blocksize=64)
    assert torch.equal(ours.packed, packed.reshape(-1))  # same nibbles in the same order
    assert torch.equal(ours.absmax, state.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantised_values_equal_bitsandbytes(dtype):
    w = weight((256, 320), dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    ours = dequantize_nf4(quantize_nf4(w))
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    # Both compute code * absmax in fp32 and round once to `dtype`: identical.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_other_blocksize():
    w = weight((128, 96))
    packed, state = bnbf.quantize_4bit(w, blocksize=128, quant_type="nf4")
    assert torch.equal(quantize_nf4(w, blocksize=128).packed, packed.reshape(-1))


def test_quantisation_error_is_bounded_by_half_the_widest_gap():
    w = weight((64, 64))
    q = quantize_nf4(w)
    err = (dequantize_nf4(q) - w).abs().reshape(-1, 64)
    widest_gap = nf4_codebook().diff().max()
    assert (err <= q.absmax.unsqueeze(1) * widest_gap / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_bitsandbytes(dtype):
    w = weight((512, 640), dtype, seed=1)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    dq = ours.absmax
    assert torch.equal(ours.packed, packed.reshape(-1))  # the 4-bit codes do not change
    assert torch.equal(dq.offset, state.offset)
    assert torch.equal(dq.absmax2, state.state2.absmax)
    # 8-bit codes: equal, except where bitsandbytes' CPU kernel snaps the scaled value to a
    # 65536-point grid before its lookup (a near-tie): then it is the neighbouring code, and
    # the value lies within two grid steps of the midpoint between the two codes.
    theirs = state.absmax.long()
    differ = dq.codes.long() != theirs
    assert differ.float().mean() < 0.005
    assert ((dq.codes.long() - theirs)[differ].abs() == 1).all()
    code = dynamic_codebook()
    scaled = ((ours_absmax := quantize_nf4(w).absmax) - dq.offset) / dq.absmax2.repeat_interleave(
        256)[: ours_absmax.numel()]
    lo = torch.minimum(dq.codes.long(), theirs)[differ]
    midpoint = (code[lo] + code[lo + 1]) / 2
    assert ((scaled[differ] - midpoint).abs() < 2 * 2 / 65535).all()


def test_double_quant_dequantisation_matches_bitsandbytes_where_codes_agree():
    w = weight((512, 640), seed=1)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    q = quantize_nf4(w, double_quant=True)
    ours = dequantize_nf4(q)
    same_block = (q.absmax.codes == state.absmax).repeat_interleave(64).reshape(w.shape)
    torch.testing.assert_close(ours[same_block], theirs[same_block], rtol=1e-6, atol=1e-9)
    # Where a code differs, that block's scale is one 8-bit step away (< 2 % of it).
    torch.testing.assert_close(ours, theirs, rtol=0.02, atol=1e-6)
    # And given bitsandbytes' own 8-bit codes, our dequantisation reproduces theirs everywhere.
    q.absmax = DoubleQuant(state.absmax, state.state2.absmax, state.offset)
    torch.testing.assert_close(dequantize_nf4(q), theirs, rtol=1e-6, atol=1e-9)


def test_double_quant_roundtrip_error_is_small():
    absmax = quantize_nf4(weight((1024, 1024))).absmax  # 16384 real block constants
    restored = dequantize_absmax(double_quantize(absmax))
    # Half an 8-bit step of the centred constants: well under 1 % of a typical absmax.
    assert ((restored - absmax).abs() / absmax).max() < 0.01


def test_bits_per_param_is_the_qlora_arithmetic():
    assert bits_per_param(double_quant=False) == 4.5
    assert bits_per_param() == pytest.approx(4.127, abs=5e-4)
    assert bits_per_param() == 4 + 8 / 64 + 32 / (64 * 256)


def test_storage_bytes_match_a_bitsandbytes_quant_state():
    w = weight((576, 1536))
    for dq in (False, True):
        packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        tensors = [packed, st.absmax, st.code]
        if dq:
            tensors += [st.offset, st.state2.absmax, st.state2.code]
        measured = sum(t.numel() * t.element_size() for t in tensors)
        assert nf4_storage_bytes(w.numel(), double_quant=dq) == measured


def test_bad_input_is_a_tutor_error():
    with pytest.raises(TutorError, match="blocksize"):
        quantize_nf4(weight((4, 4)), blocksize=48)
    with pytest.raises(TutorError, match="int64"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))
