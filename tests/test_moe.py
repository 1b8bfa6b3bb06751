"""Mixture-of-experts layers (issue 23): the tap, the routing and every reducer on small MoE GGUFs
written by benchmarks/make_shapes.write_moe, against a numpy forward pass of the MoE layer from
the normed FFN input that llama.cpp computed (ln2.hook_normalized).

Tolerances: with f32 experts llama.cpp multiplies in f32 (differences ~1e-6 relative); with
quantized experts it quantizes the layer input to Q8_0 / Q8_K for the dot products, so the
activations differ by up to ~1-2% of the row's scale (we allow 4%). Routing decisions are compared
where the router's margin between the k-th and the next expert exceeds the same error. The
reducers are checked from the tapped rows themselves, so their check is exact up to float32
summation order (contributions: 1e-4 relative)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import neurotap
from neurotap.methods.nad import best_of_n

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_shapes  # noqa: E402

gguf = pytest.importorskip("gguf")

PROMPT = "The experts of this layer"
CONFIGS = {
    "qwen3moe-f32": dict(arch="qwen3moe"),
    "qwen3moe-q8_0": dict(arch="qwen3moe", weight_type="q8_0", seed=1),
    "qwen3moe-q4_k": dict(arch="qwen3moe", n_embd=256, n_ff_exp=256, n_expert=4, weight_type="q4_k", seed=2),
    "qwen2moe-shexp": dict(arch="qwen2moe", n_ff_shexp=48, seed=3),
    "olmoe": dict(arch="olmoe", seed=4),
    "mixtral": dict(arch="llama", seed=5),
    "gpt-oss-mxfp4": dict(arch="gpt-oss", weight_type="mxfp4", seed=6),
}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


_files: dict = {}


def moe_file(moe_dir, name: str) -> Path:
    if name not in _files:
        _files[name] = make_shapes.write_moe(moe_dir / f"{name}.gguf", **CONFIGS[name])
    return _files[name]


def _tensors(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = a.reshape([int(x) for x in reversed(t.shape)] if a.size == int(np.prod(t.shape)) else a.shape)
    return out


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_layer(W: dict, arch: str, l: int, x: np.ndarray, n_used: int):
    """The MoE layer as llama-graph.cpp build_moe_ffn computes it: router probabilities, ids
    (descending), gate weights, per-selected-expert activation, shared expert activation and gate."""
    p = f"blk.{l}."
    logits = W[p + "ffn_gate_inp.weight"] @ x
    if arch == "gpt-oss":
        logits = logits + W[p + "ffn_gate_inp.bias"]
        probs = logits  # SOFTMAX_WEIGHT: the probs node holds the biased logits
    else:
        probs = _softmax(logits)
    order = np.argsort(-probs, kind="stable")
    ids = order[:n_used]
    margin = probs[order[n_used - 1]] - probs[order[n_used]] if len(order) > n_used else np.inf
    w = probs[ids]
    if arch == "gpt-oss":
        w = _softmax(w)
    elif arch in ("qwen3moe", "llama"):
        w = w / w.sum()
    g = np.einsum("efd,d->ef", W[p + "ffn_gate_exps.weight"][ids], x)
    u = np.einsum("efd,d->ef", W[p + "ffn_up_exps.weight"][ids], x)
    if arch == "gpt-oss":
        g = g + W[p + "ffn_gate_exps.bias"][ids]
        u = u + W[p + "ffn_up_exps.bias"][ids]
        gc = np.minimum(g, 7.0)
        act = gc / (1 + np.exp(-1.702 * gc)) * (np.clip(u, -7.0, 7.0) + 1)
    else:
        act = g / (1 + np.exp(-g)) * u
    sh = gate = None
    if p + "ffn_down_shexp.weight" in W:
        gs, us = W[p + "ffn_gate_shexp.weight"] @ x, W[p + "ffn_up_shexp.weight"] @ x
        sh = gs / (1 + np.exp(-gs)) * us
        gate = 1 / (1 + np.exp(-(W[p + "ffn_gate_inp_shexp.weight"] @ x)))
    return probs, ids, margin, w, act, sh, gate


def run_all(model, n=4, max_tokens=8, **kw):
    info = model.info
    watch = [(0, 0), (1, info.n_ff - 1), (1, info.n_ff_exp + 3), (0, info.n_ff // 2)]
    return model.sample(PROMPT, n=n, max_tokens=max_tokens, seed=7, temperature=0.9,
                        reducers=("counts", "active_sets", "watch", "rows", "contributions", "routing"),
                        watch=watch, hooks=["ln2.hook_normalized", "mlp.hook_router_probs"], keep_top=True,
                        chunk=4, **kw), watch


def check_sample(s, W: dict, info, arch: str, quant: bool, watch, chunk: int = 4) -> int:
    """Checks one sample's tap and reducers against numpy; returns the routing decisions compared."""
    E, F, U, Fs, L = info.n_expert, info.n_ff_exp, info.n_expert_used, info.n_ff_shexp, info.n_layers
    W_U = W["output.weight"]
    checked_ids = 0
    n = s.n_tokens
    assert s.activations.shape == (n, L, info.n_ff)
    assert s.routing_ids.shape == (n, L, U)
    contrib = np.full((n, L, info.n_ff), -np.inf)
    for t in range(n):
        for l in range(L):
            x = s.norm_inputs[t, l].astype(np.float64)
            probs, ids, margin, w, act, sh, gate = reference_layer(W, arch, l, x, U)
            row = s.activations[t, l]
            got_ids = s.routing_ids[t, l]
            # The tapped route is self-consistent: rows are zero outside the experts that ran.
            ran = np.zeros(E, bool)
            ran[got_ids] = True
            assert len(set(got_ids.tolist())) == U
            assert np.all(row[: E * F].reshape(E, F)[~ran] == 0)
            if s.router_probs is not None:
                np.testing.assert_allclose(s.router_probs[t, l], probs, rtol=1e-3 if not quant else 0.05,
                                           atol=1e-5 if not quant else 0.05 * np.abs(probs).max())
            scale = np.abs(act).max()
            tol = 0.04 * scale if quant else 1e-4 * scale + 1e-6
            if margin > (0.05 * abs(probs).max() if quant else 1e-4):
                assert list(got_ids) == list(ids), (t, l, got_ids, ids)
                np.testing.assert_allclose(s.routing_weights[t, l], w, rtol=0.05 if quant else 1e-4, atol=1e-6)
                for j, e in enumerate(ids):
                    np.testing.assert_allclose(row[e * F:(e + 1) * F], act[j], atol=tol)
                checked_ids += 1
            if Fs:
                np.testing.assert_allclose(row[E * F:], sh, atol=1e-4 * np.abs(sh).max() + 1e-6)
                np.testing.assert_allclose(s.shexp_gate[t, l], gate, rtol=1e-4)
            else:
                assert s.shexp_gate is None
            # Exact contributions from the tapped route and rows: c = a * w * (W_down[e][:, i] . W_U[y]).
            u = W_U[s.tokens[t]]
            for j, e in enumerate(got_ids):
                d = W[f"blk.{l}.ffn_down_exps.weight"][e].T @ u  # [F]
                contrib[t, l, e * F:(e + 1) * F] = row[e * F:(e + 1) * F] * s.routing_weights[t, l, j] * d
            if Fs:
                d = W[f"blk.{l}.ffn_down_shexp.weight"].T @ u
                contrib[t, l, E * F:] = row[E * F:] * s.shexp_gate[t, l] * d
    # counts, active sets, watch: from the rows.
    np.testing.assert_array_equal(s.active_counts, (s.activations > 0).sum(axis=2))
    sets = np.asarray(s.active_sets)
    for c in range(sets.shape[0]):
        bits = (s.activations[c * chunk:(c + 1) * chunk] > 0).any(axis=0).reshape(-1)
        want = np.packbits(np.pad(bits, (0, sets.shape[1] * 64 - bits.size)).astype(np.uint8), bitorder="little")
        np.testing.assert_array_equal(sets[c].view(np.uint8), want)
    np.testing.assert_array_equal(s.watched, np.stack([s.activations[:, l, i] for l, i in watch], axis=1))
    # Contributions: each layer's top k (idle experts are no candidates), eta, activated sets.
    K = s.contribution_top_values.shape[2]
    top = -np.sort(-contrib, axis=2)[:, :, :K]
    fin = np.isfinite(top)
    np.testing.assert_array_equal(np.isfinite(s.contribution_top_values), fin)
    np.testing.assert_allclose(s.contribution_top_values[fin], top[fin], rtol=1e-4,
                               atol=1e-6 * np.abs(top[fin]).max())
    idx = s.contribution_top_index
    csets = np.asarray(s.contribution_sets)
    for t in range(n):
        vals = top[t].reshape(-1)
        eta = -np.sort(-vals)[min(500, vals.size) - 1]
        np.testing.assert_allclose(s.contribution_eta[t], eta, rtol=1e-4, atol=1e-7)
        for l in range(L):
            for r in range(K):
                i = int(idx[t, l, r])
                if not np.isfinite(s.contribution_top_values[t, l, r]):
                    continue
                # The reducer's neuron has the numpy contribution it reports (an expert that ran).
                np.testing.assert_allclose(contrib[t, l, i], s.contribution_top_values[t, l, r], rtol=1e-4,
                                           atol=1e-6 * np.abs(top[fin]).max())
                bit = l * info.n_ff + i
                active = bool(csets[t // chunk].view(np.uint8)[bit // 8] >> (bit % 8) & 1)
                if s.contribution_top_values[t, l, r] > s.contribution_eta[t]:
                    assert active, (t, l, i)
    return checked_ids


def run_all(model, n=4, max_tokens=8, hooks=("ln2.hook_normalized", "mlp.hook_router_probs"), **kw):
    info = model.info
    watch = [(0, 0), (1, info.n_ff - 1), (1, info.n_ff_exp + 3), (0, info.n_ff // 2)]
    return model.sample(PROMPT, n=n, max_tokens=max_tokens, seed=7, temperature=0.9,
                        reducers=("counts", "active_sets", "watch", "rows", "contributions", "routing"),
                        watch=watch, hooks=list(hooks), keep_top=True, chunk=4, **kw), watch


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_layer_and_reducers_match_numpy(moe_dir, name):
    path = moe_file(moe_dir, name)
    arch = CONFIGS[name]["arch"]
    quant = CONFIGS[name].get("weight_type", "f32") != "f32"
    model = neurotap.load(str(path), n_ctx=512)
    info = model.info
    assert info.is_moe and info.n_ff == info.n_expert * info.n_ff_exp + info.n_ff_shexp
    assert info.tapped_tensors[0] == ("ffn_moe_swiglu_oai-0" if arch == "gpt-oss" else "ffn_moe_swiglu-0")
    W = _tensors(path)
    samples, watch = run_all(model)
    assert all(s.router_probs.shape == (s.n_tokens, info.n_layers, info.n_expert) for s in samples)
    assert sum(check_sample(s, W, info, arch, quant, watch) for s in samples) > 0


def test_contribution_cache_computes_experts_lazily(moe_dir):
    """Recurring token ids in new contexts: after the queue's first pass their projections are
    cached for the experts they ran then, and later tokens that route elsewhere need more of them
    (a pass of cache hits that computes only the experts still missing); still exact."""
    path = moe_file(moe_dir, "qwen2moe-shexp")
    model = neurotap.load(str(path), n_ctx=1024)
    W = _tensors(path)
    ids = model.tokenize(" the cat sat on a mat", add_special=False)[:6]
    streams = [[ids[(3 * k + i) % len(ids)] for k in range(100)] for i in range(4)]
    info = model.info
    watch = [(0, 0), (1, info.n_ff - 1), (1, info.n_ff_exp + 3), (0, info.n_ff // 2)]
    with model.start_sampling(PROMPT, n=4, max_tokens=100, seed=7, forced=streams, watch=watch, keep_top=True,
                              chunk=4, hooks=["ln2.hook_normalized"],
                              reducers=("counts", "active_sets", "watch", "rows", "contributions", "routing")) as run:
        run.advance()
        stats = run._native.contribution_stats
        samples = run.samples()
    for s in samples:
        assert s.n_tokens == 100
        check_sample(s, W, info, "qwen2moe", False, watch)
    # Lazy: far fewer projections than every expert of every (id, layer), some added to cached ids.
    segments = info.n_expert + 1
    assert 0 < stats["expert_projections"] < stats["cache_misses"] * info.n_layers * segments
    assert stats["cache_hits"] > 0 and stats["expert_projections_cached"] > 0, stats


def test_neuron_layout_helpers(moe_dir):
    model = neurotap.load(str(moe_file(moe_dir, "qwen2moe-shexp")), n_ctx=256)
    i = model.info
    assert i.expert_of(0) == (0, 0)
    assert i.expert_of(i.n_ff_exp * 3 + 5) == (3, 5)
    assert i.expert_of(i.n_expert * i.n_ff_exp + 2) == (i.n_expert, 2)  # the shared expert
    e, u = i.expert_of(np.arange(i.n_ff))
    assert all(i.expert_neuron(int(a), int(b)) == k for k, (a, b) in enumerate(zip(e, u)))
    with pytest.raises(ValueError):
        i.expert_neuron(i.n_expert, i.n_ff_shexp)
    with pytest.raises(ValueError):
        i.expert_of(i.n_ff)


def test_best_of_n_nad_and_early_stop_on_moe(moe_dir):
    model = neurotap.load(str(moe_file(moe_dir, "qwen3moe-f32")), n_ctx=1024)
    res = best_of_n(model, PROMPT, n=4, max_tokens=24, early_stop=8, seed=3)
    assert 0 <= res.index < 4 and res.early_stop == 8
    assert res.sample.n_tokens > 8 or res.sample.finish_reason == "eos"
    # The NAD sets it chose by are over the MoE layer's flat neurons, all of them computed ones.
    for c in res.candidates:
        keys = np.concatenate(c.contribution_sets.keys(0, len(c.contribution_sets)) or [np.zeros(0, np.uint32)])
        assert keys.size and keys.max() < model.info.total_neurons
    full = best_of_n(model, PROMPT, n=4, max_tokens=12, early_stop=None, seed=3)
    assert 0 <= full.index < 4 and len(full.candidates) == 4
    # A stop string ends samples early; the routing record is cut with them.
    samples = model.sample(PROMPT, n=3, max_tokens=16, seed=5, reducers=("routing", "counts"), stop=["e"])
    assert any(s.finish_reason == "stop" for s in samples)
    for s in samples:
        assert s.routing_ids.shape[0] == s.n_tokens == s.active_counts.shape[0]


def test_routing_needs_moe_and_gate_variant_refused(moe_dir):
    dense = neurotap.load(n_ctx=256)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        dense.sample("Hi", n=1, max_tokens=2, reducers=("routing",))
    model = neurotap.load(str(moe_file(moe_dir, "olmoe")), n_ctx=256)
    with pytest.raises(ValueError, match="gate contribution variant"):
        model.sample("Hi", n=1, max_tokens=2, reducers=("contributions",), contribution="gate")


@pytest.mark.parametrize("tamper,match", [
    ({"expert_count": 6}, r"layer 0: tensor 'blk\.0\.ffn_gate_inp\.weight' has shape 64 x 8 but the metadata"),
    ({"down_exps_width": 40}, r"layer 0: tensor 'blk\.0\.ffn_down_exps\.weight' has shape 40 x 64 x 8"),
    ({"arch": "llama4"}, r"llama4.*before the experts"),
])
def test_bad_moe_files_are_refused(tmp_path, tamper, match):
    path = make_shapes.write_moe(tmp_path / "bad.gguf", arch="qwen3moe", tamper=tamper)
    with pytest.raises(neurotap.ModelError, match=match):
        neurotap.load(str(path), n_ctx=256)


def test_nan_gate_weights_name_the_layer(tmp_path):
    path = make_shapes.write_moe(tmp_path / "nan.gguf", arch="qwen3moe", tamper={"nan_router_layer": 1})
    model = neurotap.load(str(path), n_ctx=256)
    with pytest.raises(RuntimeError, match=r"layer 1: gate weight nan"):
        model.sample("Hello", n=2, max_tokens=3)


@pytest.mark.parametrize("name", ["qwen3moe-q8_0", "qwen2moe-shexp"])
def test_neat_down_projection_reads_experts_in_the_flat_order(moe_dir, name):
    """NEAT's calibration scores a neuron by a_i W_down[:, i]: on an MoE layer W_down is the experts'
    down projections side by side (then the shared expert's), read per expert from the file."""
    from neurotap.methods.neat import DownProjection, neuron_name

    path = moe_file(moe_dir, name)
    model = neurotap.load(str(path), n_ctx=256)
    i = model.info
    W = _tensors(path)
    full = np.concatenate([W["blk.1.ffn_down_exps.weight"][e] for e in range(i.n_expert)], axis=1)
    if i.n_ff_shexp:
        full = np.concatenate([full, W["blk.1.ffn_down_shexp.weight"]], axis=1)
    assert full.shape == (i.n_embd, i.n_ff)
    down = DownProjection(model, 1)
    v = np.random.default_rng(0).standard_normal(i.n_embd)
    active = np.zeros(i.n_ff, bool)
    active[[3, i.n_ff_exp * 2 + 1, i.n_ff - 1]] = True  # experts 0 and 2, and the last part
    got = down.project(v, active)
    want = full.T.astype(np.float64) @ v
    for a in (0, 2 * i.n_ff_exp, i.n_ff - (i.n_ff_shexp or i.n_ff_exp)):
        w = i.n_ff_shexp if a == i.n_expert * i.n_ff_exp else i.n_ff_exp
        np.testing.assert_allclose(got[a:a + w], want[a:a + w], rtol=1e-5, atol=1e-6)
    assert got[i.n_ff_exp:2 * i.n_ff_exp].sum() == 0  # expert 1 held no active neuron: not read
    np.testing.assert_allclose(down.column(i.n_ff - 1), full[:, -1], rtol=1e-6)
    e, u = i.expert_of(i.n_ff - 1)
    assert neuron_name(model, i.n_ff - 1) == {"expert": int(e), "unit": int(u)}
