"""Mixture-of-experts layers under continuous batching (runtime.batch.Batch, the server's): the
batcher hands each run its share of a layer's compact expert rows (Batcher::on_moe_rows), so two
runs decoded together in one context hold the records each holds decoded alone: the same tokens,
activations, counts, active sets, routing and contribution sets."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import neurotap
from neurotap.runtime.batch import Batch
from neurotap.runtime.sampling import sample_from

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_shapes  # noqa: E402

pytest.importorskip("gguf")

REDUCERS = ("counts", "active_sets", "rows", "contributions", "routing")


def test_two_batched_moe_runs_hold_what_each_holds_alone(tmp_path):
    path = make_shapes.write_moe(tmp_path / "shexp.gguf", arch="qwen2moe", n_ff_shexp=48, seed=3)
    m = neurotap.load(str(path), n_ctx=1024)
    prompts = [m.tokenize("The experts of this layer", add_special=False),
               m.tokenize("Another prompt, routed elsewhere", add_special=False)]
    kw = [dict(n=2, reducers=REDUCERS, chunk=4, max_tokens=12, seed=s, temperature=0.9) for s in (5, 6)]
    alone = []
    for ids, k in zip(prompts, kw):
        run = m.start_sampling(ids, **k)
        run.advance()
        alone.append(run.samples())
        run.close()
    batch = Batch(m, 4)
    runs = []
    for j, (ids, k) in enumerate(zip(prompts, kw)):
        opts = m.sampling_options(**k)
        opts.seqs = [2 * j, 2 * j + 1]
        runs.append(batch.start(ids, opts, 12))
    while any(r.n_live for r in runs):
        batch.run()
    for run, want in zip(runs, alone):
        got = [sample_from(run.sample(i), 4) for i in range(2)]
        for a, b in zip(want, got):
            assert a.tokens == b.tokens
            assert np.any(b.activations != 0) and np.any(b.activations == 0)  # idle experts are zeros
            np.testing.assert_array_equal(a.activations, b.activations)
            np.testing.assert_array_equal(a.active_counts, b.active_counts)
            np.testing.assert_array_equal(np.asarray(a.active_sets), np.asarray(b.active_sets))
            np.testing.assert_array_equal(a.routing_ids, b.routing_ids)
            np.testing.assert_array_equal(a.routing_weights, b.routing_weights)
            np.testing.assert_array_equal(np.asarray(a.contribution_sets), np.asarray(b.contribution_sets))
            np.testing.assert_array_equal(a.contribution_eta, b.contribution_eta)
