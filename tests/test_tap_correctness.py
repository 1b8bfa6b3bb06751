"""The tapped activations are the real input of the down projection.

The reference recomputes SiLU(W_gate x) * (W_up x) in numpy from the GGUF weights (dequantized
by the `gguf` package) applied to the tapped normed FFN input x (`ffn_norm-<il>`).

Tolerances. ggml's CPU Q4_1 matmul does not multiply by x in f32: it first quantizes x to
Q8_1 (blocks of 32 values, int8 with one fp16 scale each), then accumulates integer dot
products in f32. That costs up to half a quantization step (amax/254) per element of x, which
gives a relative L2 error of about 1% on the activations (measured 0.6-1.5% on this model).
So the plain f32 reference must agree within 3%; emulating the Q8_1 rounding of x in numpy
removes that error, and what remains (fp16 block sums, rounding mode, summation order) is
about 0.1% (measured <= 0.12%), so that reference must agree within 0.5%. A row taken from a
neighbouring token, a wrong layer or a transposed matrix is off by more than 50%.
"""
import numpy as np
import pytest

from conftest import CHAT

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

gguf = pytest.importorskip("gguf")

F32_TOL = 3e-2
Q8_TOL = 5e-3


def _dequant(reader_tensors, name):
    t = reader_tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


def _q8_1(x):
    """x as ggml's quantize_row_q8_1 sees it: int8 per block of 32 with an fp16 scale."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127.0
    q = np.round(b * np.divide(1.0, d, out=np.zeros_like(d), where=d > 0))
    return (d.astype(np.float16).astype(np.float64) * q).reshape(-1)


def _swiglu(wg, wu, x):
    g = wg @ x
    return g / (1.0 + np.exp(-g)) * (wu @ x)


def _rel(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def traced(model):
    g = model.generate(CHAT, max_tokens=6, temperature=0, capture="float32", hooks=["ln2.hook_normalized"])
    assert g.n_tokens >= 4
    reader = gguf.GGUFReader(model.info.path)
    return g, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("layer", [0, "last"])
def test_activations_equal_numpy_recomputation(model, traced, layer):
    g, tensors = traced
    il = model.info.n_layers - 1 if layer == "last" else layer
    wg = _dequant(tensors, f"blk.{il}.ffn_gate.weight")
    wu = _dequant(tensors, f"blk.{il}.ffn_up.weight")
    assert wg.shape == (model.info.n_ff, model.info.n_embd)
    for j in range(g.n_tokens):
        x = g.norm_inputs[j, il]
        a = g.activations[j, il]
        assert _rel(a, _swiglu(wg, wu, x.astype(np.float64))) < F32_TOL, (il, j)
        ref = _swiglu(wg, wu, _q8_1(x))
        assert _rel(a, ref) < Q8_TOL, (il, j)
        # the check can fail: the neighbouring token's row is far off
        other = g.activations[(j + 1) % g.n_tokens, il]
        assert _rel(other, ref) > 0.5


def test_last_layer_rows_are_not_the_prompt_rows(model, traced):
    # The last layer only computes rows that requested logits; a stale or shifted row would
    # repeat across tokens.
    g, _ = traced
    last = g.activations[:, -1]
    for j in range(1, g.n_tokens):
        assert _rel(last[j], last[j - 1]) > 0.1


def test_active_counts_match_activations(traced):
    g, _ = traced
    np.testing.assert_array_equal(g.active_counts, (g.activations > 0).sum(axis=-1))
    assert g.active_counts.shape == (g.n_tokens, g.activations.shape[1])


def test_float16_capture_matches_float32(model):
    a = model.generate(CHAT, max_tokens=5, temperature=0, capture="float32")
    b = model.generate(CHAT, max_tokens=5, temperature=0, capture="float16")
    assert b.activations.dtype == np.float16 and a.activations.dtype == np.float32
    assert a.tokens == b.tokens
    np.testing.assert_allclose(b.activations.astype(np.float32), a.activations, rtol=1e-2, atol=1e-3)
