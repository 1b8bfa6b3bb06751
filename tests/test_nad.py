"""NAD's contributions and activated sets equal a numpy reference on the real default model.

The reference takes the run's own captured activations (capture="float32", the input of the
down projection), W_down and the unembedding dequantized by the `gguf` package (independent of
neurotap's reader), computes every c = a_i * (W_U[y] . W_down[:, i]) in float64 for the token y
that the position predicts, then the paper's rule: the 64 largest per layer, eta = the 500th
largest of those, activated when c > eta. Native sums are float32 (FMA), so values agree to about
1e-5 relative; set membership is compared away from exact ties (|c - eta| > 1e-4 |eta|).
"""
import numpy as np
import pytest

from neurotap import _native

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

gguf = pytest.importorskip("gguf")

PROMPT = [{"role": "user", "content": "Tom has 23 apples and buys 45 more. How many apples does he have?"}]


@pytest.fixture(scope="module")
def weights(model_path):
    r = gguf.GGUFReader(model_path)
    t = {x.name: x for x in r.tensors}

    def deq(name):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64)

    n_layer = sum(1 for n in t if n.endswith(".ffn_down.weight"))
    down = [deq(f"blk.{il}.ffn_down.weight") for il in range(n_layer)]  # [n_embd, n_ff]
    gate = {il: deq(f"blk.{il}.ffn_gate.weight") for il in (0, n_layer - 1)}  # [n_ff, n_embd]
    unembed = deq("output.weight" if "output.weight" in t else "token_embd.weight")  # [n_vocab, n_embd]
    return down, unembed, gate


@pytest.fixture(scope="module")
def run(model):
    r = model.start_sampling(PROMPT, n=3, max_tokens=10, seed=5, chunk=1, capture="float32",
                             reducers=("contributions",), keep_top=True)
    r.advance()
    return r.samples()


def reference(acts, token, down, unembed):
    u = unembed[token]
    return np.stack([acts[il].astype(np.float64) * (down[il].T @ u) for il in range(len(down))])  # [L, n_ff]


def nad_rule(c, k=64, rank=500):
    order = np.argsort(-c, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(c, order, axis=1)
    eta = np.sort(top.ravel())[::-1][rank - 1]
    return order, top, eta


def bits_to_set(words, n_ff):
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {(int(b) // n_ff, int(b) % n_ff) for b in np.flatnonzero(bits)}


def test_contributions_equal_numpy(run, weights, model):
    down, unembed, _ = weights
    n_ff = model.info.n_ff
    checked = 0
    for s in run:
        for j in range(0, s.n_tokens, 3):
            c = reference(s.activations[j], s.tokens[j], down, unembed)
            order, top, eta = nad_rule(c)
            np.testing.assert_allclose(s.contribution_top_values[j], top, rtol=1e-4, atol=1e-6 * np.abs(top).max())
            assert s.contribution_eta[j] == pytest.approx(eta, rel=1e-4)
            # Indices agree wherever the value is not a near-tie with its neighbour.
            gap = np.abs(np.diff(top, axis=1)) > 1e-4 * np.abs(top[:, :-1])  # between r and r + 1
            clear = np.ones_like(top, dtype=bool)
            clear[:, :-1] &= gap
            clear[:, 1:] &= gap
            clear[:, -1] = False  # the 64th may tie with the 65th, outside the top
            same = s.contribution_top_index[j] == order
            assert np.all(same | ~clear), "top-64 neuron indices differ from numpy"
            assert clear.mean() > 0.9
            ref = {(il, int(i)) for il in range(len(down)) for i in order[il] if c[il, i] > eta}
            near = {(il, int(i)) for il in range(len(down)) for i in order[il]
                    if abs(c[il, i] - eta) <= 1e-4 * abs(eta)}
            got = bits_to_set(s.contribution_sets[j], n_ff)
            assert (got ^ ref) <= near, f"activated sets differ at token {j}"
            assert s.contribution_counts[j] == len(got)
            assert 400 <= len(got) <= 499  # eta is the 500th value: at most 499 lie strictly above
            checked += 1
    assert checked >= 9


def test_position_predicts_its_own_token(run, weights):
    """Projecting onto the input token (the authors' helper code, off by one) gives other values."""
    down, unembed, _ = weights
    s = run[0]
    j = 4
    right = nad_rule(reference(s.activations[j], s.tokens[j], down, unembed))[1]
    wrong = nad_rule(reference(s.activations[j], s.tokens[j - 1], down, unembed))[1]
    assert np.allclose(s.contribution_top_values[j], right, rtol=1e-4, atol=1e-6)
    assert not np.allclose(s.contribution_top_values[j], wrong, rtol=1e-2)


def test_chunks_are_unions_of_tokens(model):
    r1 = model.start_sampling(PROMPT, n=2, max_tokens=40, seed=9, chunk=1, reducers=("contributions",))
    r1.advance()
    r32 = model.start_sampling(PROMPT, n=2, max_tokens=40, seed=9, chunk=32, reducers=("contributions",))
    r32.advance()
    for a, b in zip(r1.samples(), r32.samples()):
        assert a.tokens == b.tokens
        for c in range(b.contribution_sets.shape[0]):
            np.testing.assert_array_equal(b.contribution_sets[c], np.bitwise_or.reduce(a.contribution_sets[32 * c:32 * c + 32]))


def test_gate_variant_uses_silu_of_gate(model, weights):
    """contribution="gate": a = SiLU(W_gate x) (the paper's code). Recomputed from the normed FFN
    input of a teacher-forced trace; ggml's Q8_1 rounding of x costs about 1% (see test_tap_correctness)."""
    down, unembed, gate = weights
    r = model.start_sampling(PROMPT, n=1, max_tokens=6, seed=2, chunk=1, reducers=("contributions",),
                             contribution="gate", keep_top=True, temperature=0)
    r.advance()
    s = r.sample(0)
    tr = model.trace(PROMPT, s.tokens, hooks=["ln2.hook_normalized"])
    for il in gate:
        for j in range(s.n_tokens):
            g = gate[il] @ tr.norm_inputs[j, il].astype(np.float64)
            a = g / (1 + np.exp(-g))
            c = a * (down[il].T @ unembed[s.tokens[j]])
            top = np.sort(c)[::-1][:64]
            np.testing.assert_allclose(s.contribution_top_values[j, il], top, rtol=0.05, atol=0.05 * np.abs(top).max())


def test_jaccard_by_popcount():
    rng = np.random.default_rng(0)
    sets = rng.integers(0, 2**63, size=(5, 11), dtype=np.uint64) & rng.integers(0, 2**63, size=(5, 11), dtype=np.uint64)
    sets[4] = 0
    S = _native.jaccard(sets)
    bits = np.unpackbits(sets.view(np.uint8), axis=1).astype(bool)
    for i in range(5):
        for j in range(5):
            inter, union = (bits[i] & bits[j]).sum(), (bits[i] | bits[j]).sum()
            assert S[i, j] == pytest.approx(inter / union if union else 1.0)
    np.testing.assert_array_equal(_native.popcount(sets), bits.sum(axis=1))


def test_bad_contribution_options(model):
    with pytest.raises(ValueError, match="contribution must be one of"):
        model.start_sampling("x", n=2, max_tokens=4, reducers=("contributions",), contribution="up")
    with pytest.raises(ValueError, match="eta_rank"):
        model.start_sampling("x", n=2, max_tokens=4, reducers=("contributions",), eta_rank=0)
