// Native tests of one component (ctest group "neureasoner"); fixtures in common.h.
#include "tests/common.h"

namespace {

// NeuReasoner's spectral features against a direct double-precision DFT, on windows whose spectra
// are known: a pure tone (all its energy in one bin), an alternating sign (the Nyquist bin), a
// constant (no spectrum: zeros) and random values.
void test_nr_spectral() {
    EXPECT_THROW(ParamError, SpectralWindow(3), "a window of 3");
    EXPECT_THROW(ParamError, SpectralWindow(513), "a window of 513");
    const int W = 32, K = W / 2;
    const SpectralWindow spec(W);
    auto reference = [&](const std::vector<float>& x, double* out) {
        double mean = 0;
        for (float v : x) mean += v;
        mean /= W;
        std::vector<double> p(K + 1, 0.0);
        double total = 0, top = 0, lo = 0, hi = 0, ent = 0, var = 0, tv = 0;
        for (int k = 1; k <= K; ++k) {
            double re = 0, im = 0;
            for (int t = 0; t < W; ++t) {
                re += (x[t] - mean) * std::cos(2 * M_PI * k * t / W);
                im -= (x[t] - mean) * std::sin(2 * M_PI * k * t / W);
            }
            p[k] = re * re + im * im;
            total += p[k];
            top = std::max(top, p[k]);
        }
        for (int k = 1; k <= K; ++k) {
            if (k <= W / 8) lo += p[k];
            if (k > W / 4) hi += p[k];
            if (p[k] > 0) ent -= p[k] / total * std::log(p[k] / total);
        }
        for (int t = 0; t < W; ++t) var += (x[t] - mean) * (x[t] - mean);
        for (int t = 1; t < W; ++t) tv += (double(x[t]) - x[t - 1]) * (double(x[t]) - x[t - 1]);
        out[0] = hi / total, out[1] = lo / total, out[2] = top / total, out[3] = ent / std::log(double(K)), out[4] = tv / var;
    };
    std::mt19937 rng(3);
    std::normal_distribution<float> noise;
    for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> x(W);
        for (float& v : x) v = noise(rng) * (1 + trial);
        float f[kNumSpectral];
        double r[kNumSpectral];
        spec.features(x.data(), f);
        reference(x, r);
        for (int i = 0; i < kNumSpectral; ++i) CHECK_MSG(std::fabs(f[i] - r[i]) < 1e-4 * std::max(1.0, std::fabs(r[i])), "feature " + std::to_string(i));
    }
    std::vector<float> tone(W), alt(W), flat(W, 2.5f);
    for (int t = 0; t < W; ++t) tone[t] = std::sin(2 * M_PI * 3 * t / W), alt[t] = t % 2 ? 1.0f : -1.0f;
    float f[kNumSpectral];
    spec.features(tone.data(), f);
    CHECK(f[kDominantRatio] > 0.999f && f[kEntropy] < 1e-3f && f[kLowRatio] > 0.999f);
    spec.features(alt.data(), f);
    CHECK(f[kHighRatio] > 0.999f && f[kDominantRatio] > 0.999f);
    spec.features(flat.data(), f);
    for (float v : f) CHECK(v == 0.0f);
}

// The MLP forward pass (ReLU hidden layers, logistic output, scaler first), computed by hand.
void test_nr_mlp() {
    Mlp m;
    m.mean = {1.0f, -1.0f};
    m.scale = {2.0f, 0.5f};
    m.weights = {{1.0f, -1.0f, 0.5f, 2.0f}, {1.5f, -0.5f}};  // [2 x 2], [2 x 1]
    m.biases = {{0.1f, -0.2f}, {0.3f}};
    EXPECT_NO_THROW(m.validate(), "a consistent MLP");
    const float x[2] = {3.0f, 0.0f};  // scaled: (1, 2)
    const double h0 = std::max(0.0, 1 * 1.0 + 2 * 0.5 + 0.1), h1 = std::max(0.0, 1 * -1.0 + 2 * 2.0 - 0.2);
    const double z = 1.5 * h0 - 0.5 * h1 + 0.3;
    CHECK(std::fabs(m.probability(x) - 1.0 / (1.0 + std::exp(-z))) < 1e-6);
    Mlp bad = m;
    bad.weights[1].push_back(1.0f);
    EXPECT_THROW_MSG(ParamError, bad.validate(), "layer 1", "weights of the wrong size");
    bad = m;
    bad.scale[0] = 0.0f;
    EXPECT_THROW(ParamError, bad.validate(), "a zero scale");
    bad = m;
    bad.biases[1] = {0.0f, 0.0f};
    bad.weights[1] = {1, 1, 1, 1};
    EXPECT_THROW_MSG(ParamError, bad.validate(), "one output", "two outputs");
}

// A level that always detects: a one-input MLP whose bias saturates the logistic.
NrLevelConfig always_level(int action, std::vector<int> components) {
    NrLevelConfig lv;
    lv.enabled = true;
    lv.components = std::move(components);
    lv.features = {kEntropy};
    lv.mlp.mean = {0.0f};
    lv.mlp.scale = {1.0f};
    lv.mlp.weights = {{0.0f}};
    lv.mlp.biases = {{30.0f}};
    lv.threshold = 0.5f;
    lv.action = action;
    return lv;
}

// Rollbacks leave the run as if the rolled-back tokens had never been generated: a greedy run
// resampled at every detection draws the plain greedy run's tokens; an exit ends the sample with
// the exit tokens; runs that cannot follow a rollback are refused.
void test_nr_rollback() {
    auto model = shared_model();
    const ModelInfo& mi = model->info();
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    const int max_tokens = 60;
    SampleParams sp = sample_params(1, max_tokens, 5);
    sp.temperature = 0.0f;
    sp.ignore_eos = true;
    TappedContext tc(model, parallel_context(1));
    DecodeLoop plain(tc, prompt, sp, {});
    plain.advance(max_tokens, nullptr);
    const std::vector<llama_token> ref = plain.sample(0).tokens;

    NeuReasonerConfig cfg;
    cfg.layer = mi.n_layers / 2;
    cfg.window = 8;
    cfg.levels.assign(kNrLevels, NrLevelConfig{});
    // An FFN neuron and an attention head: both taps are read.
    cfg.levels[kNrIntra] = always_level(kNrResample, {3, static_cast<int>(mi.n_ff) + 1});
    cfg.max_actions = 4;
    cfg.max_retries = 2;
    cfg.cooldown = 2;
    // Bounded by the retries of a step (the story's first line is longer than the run), then by
    // the actions of a sample.
    for (int retries : {2, 10}) {
        cfg.max_retries = retries;
        NeuReasonerMonitor mon(cfg, *model);
        CHECK(mon.tap_request().kinds & tap_bit(TapKind::AttnZ) && mon.tap_request().attention_layer == cfg.layer);
        DecodeLoop loop(tc, prompt, sp, {}, {&mon});
        loop.advance(max_tokens, nullptr);
        const SampleState& st = loop.sample(0);
        int rollbacks = 0, let_pass = 0;
        for (const NrEvent& e : mon.events(0)) rollbacks += e.rollback_to >= 0, let_pass += e.action == kNrNone;
        CHECK_MSG(rollbacks == std::min(retries, cfg.max_actions), "rollbacks: " + std::to_string(rollbacks));
        CHECK(let_pass > 0);
        CHECK(st.tokens == ref);
        CHECK(loop.tokens_sampled() > max_tokens);
        CHECK(mon.signals(0).size() == static_cast<size_t>(max_tokens) * kNrLevels);
        CHECK(std::isfinite(mon.signals(0)[kNrIntra]));
    }
    {
        NeuReasonerConfig ex = cfg;
        ex.levels[kNrIntra] = NrLevelConfig{};
        ex.levels[kNrInstance] = always_level(kNrExit, {7});
        ex.exit_tokens = model->tokenize(" The end.", false, false);
        ex.exit_tokens.push_back(llama_vocab_eos(model->vocab()));
        NeuReasonerMonitor mon(ex, *model);
        CHECK(!(mon.tap_request().kinds & tap_bit(TapKind::AttnZ)));
        SampleParams p = sp;
        p.ignore_eos = false;
        DecodeLoop loop(tc, prompt, p, {}, {&mon});
        loop.advance(max_tokens, nullptr);
        const SampleState& st = loop.sample(0);
        CHECK(st.finish == Finish::Exit && st.exit_by == &mon && st.finish_reason() == "neureasoner_exit");
        CHECK(mon.exit_at(0) == ex.window);
        CHECK(st.text.size() >= 9 && st.text.compare(st.text.size() - 9, 9, " The end.") == 0);
        CHECK(std::equal(st.tokens.begin(), st.tokens.begin() + ex.window, ref.begin()));
    }
    NeuReasonerMonitor mon(cfg, *model);
    SampleParams p = sp;
    ActiveSetReducer sets(4, 0.0f);
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, p, {&sets}, {&mon}), "chunked set records", "rollbacks and chunk sets");
    p.forced = {ref[0], ref[1]};
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, p, {}, {&mon}), "teacher-forced", "rollbacks and forcing");
    NeuReasonerConfig out = cfg;
    out.levels[kNrIntra].components = {static_cast<int>(mi.n_ff) + mi.n_head};
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "outside this model", "a component beyond the heads");
    out = cfg;
    out.layer = mi.n_layers;
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "layer", "a layer beyond the model");
    out = cfg;
    out.levels[kNrIntra].features = {kEntropy, kTvEnergy};
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "inputs", "features the MLP does not read");
}

}  // namespace

std::vector<TestCase> neureasoner_tests() {
    return {
        {"neureasoner", "nr_spectral", test_nr_spectral, true},
        {"neureasoner", "nr_mlp", test_nr_mlp, true},
        {"neureasoner", "nr_rollback", test_nr_rollback, true},
    };
}
