// Native tests of one component (ctest group "generate"); fixtures in common.h.
#include "tests/common.h"

namespace {

void test_model_info() {
    auto model = shared_model();
    const ModelInfo& i = model->info();
    CHECK(i.architecture == "llama");
    CHECK(i.act_name == "ffn_swiglu");
    CHECK(i.n_layers == 30);
    CHECK(i.n_ff == 1536);
    CHECK(i.n_embd == 576);
    CHECK(i.n_vocab > 1000);
    CHECK(i.has_chat_template);
    std::vector<llama_token> toks = model->tokenize("Hello world", false, false);
    CHECK(!toks.empty());
    CHECK(model->detokenize(toks) == "Hello world");
}

void test_generation() {
    auto model = shared_model();
    TappedContext tc(model, small_context());
    CHECK(tc.n_ctx() >= 512);
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int64_t E = model->info().n_embd;
    const std::vector<llama_token> prompt =
        model->tokenize("Once upon a time, in a small village by the sea, there lived", true, false);
    CHECK(prompt.size() > 5);
    const int n_gen = 24;

    GenerateParams p32 = greedy(n_gen);
    p32.capture = RowFormat::Float32;
    GenerateResult a = generate(tc, prompt, p32, nullptr);
    GenerateResult b = generate(tc, prompt, p32, nullptr);
    CHECK(a.tokens.size() == static_cast<size_t>(n_gen));
    CHECK(a.finish_reason == "length");
    CHECK(!a.text.empty());
    CHECK(a.prompt_tokens == prompt);
    CHECK(a.tokens == b.tokens);
    CHECK(a.text == b.text);
    CHECK(a.active_counts == b.active_counts);
    CHECK(a.acts_f32 == b.acts_f32);

    const size_t n = a.tokens.size();
    CHECK(a.n_layers == L && a.n_ff == F && a.n_embd == E);
    CHECK(a.active_counts.size() == n * L);
    CHECK(a.acts_f32.size() == n * L * F);
    CHECK(a.acts_f16.empty() && a.norm_inputs.empty());
    CHECK(all_finite(a.acts_f32));
    CHECK(any_nonzero(a.acts_f32));
    if (a.active_counts.size() == n * L && a.acts_f32.size() == n * L * F) {
        int mismatches = 0;
        int64_t total_active = 0;
        for (size_t t = 0; t < n; ++t) {
            for (int l = 0; l < L; ++l) {
                const float* row = a.acts_f32.data() + (t * L + l) * F;
                int32_t count = 0;
                for (int64_t i = 0; i < F; ++i) count += row[i] > 0.0f;
                mismatches += count != a.active_counts[t * L + l];
                total_active += a.active_counts[t * L + l];
            }
        }
        CHECK_MSG(mismatches == 0, std::to_string(mismatches) + " rows whose active count disagrees");
        CHECK(total_active > 0 && total_active < static_cast<int64_t>(n * L * F));
        // Rows of different tokens differ: each token's row is really its own.
        CHECK(!std::equal(a.acts_f32.begin(), a.acts_f32.begin() + L * F, a.acts_f32.begin() + L * F));
    }

    // The same rows through TappedContext::decode_seq and a plain sink: checks the generator's
    // token/layer bookkeeping against an independent path, and the decode API itself. Token 0's
    // row is the prompt's last, tapped in the batch of the whole prompt; then one row per token.
    if (a.acts_f32.size() == n * L * F) {
        tc.clear();
        const int np = static_cast<int>(prompt.size());
        std::vector<llama_token> fed = {prompt.back(), a.tokens[0], a.tokens[1], a.tokens[2]};
        int mismatched_rows = 0;
        for (int j = 0; j < static_cast<int>(fed.size()); ++j) {
            RecordingSink rs;
            const int row = j == 0 ? tc.decode_seq(prompt.data(), np, 0, 0, &rs) : tc.decode_seq(&fed[j], 1, np - 1 + j, 0, &rs);
            CHECK(row == (j == 0 ? np - 1 : 0));  // the last row's index in its batch: its logits
            CHECK(rs.calls.size() == static_cast<size_t>(L));
            std::vector<int> layers_seen(L, 0);
            for (const RecordedRows& c : rs.calls) {
                CHECK(c.kind == TapKind::MlpPost && c.n_rows == 1 && c.row0 == 0 && c.width == F);
                if (c.layer < 0 || c.layer >= L || c.data.size() != static_cast<size_t>(F)) continue;
                ++layers_seen[c.layer];
                const float* want = a.acts_f32.data() + (static_cast<size_t>(j) * L + c.layer) * F;
                mismatched_rows += !std::equal(c.data.begin(), c.data.end(), want);
            }
            CHECK(std::all_of(layers_seen.begin(), layers_seen.end(), [](int k) { return k == 1; }));
        }
        CHECK_MSG(mismatched_rows == 0, std::to_string(mismatched_rows) + " rows differ from the generator's");

        // A tapped multi-row decode: every row requests logits, so even the last layer
        // delivers all of them (llama.cpp drops rows without logits before its FFN).
        tc.clear();
        RecordingSink rs;
        std::vector<int> pos(static_cast<size_t>(np));
        std::iota(pos.begin(), pos.end(), 0);
        const std::vector<llama_seq_id> seqs(static_cast<size_t>(np), 0);
        EXPECT_NO_THROW(tc.decode_rows(prompt.data(), pos.data(), seqs.data(), np, &rs), "tapped prompt decode");
        std::vector<int> rows_per_layer(L, 0);
        bool finite = true;
        for (const RecordedRows& c : rs.calls) {
            if (c.layer >= 0 && c.layer < L) rows_per_layer[c.layer] += c.n_rows;
            for (float x : c.data) finite = finite && std::isfinite(x);
        }
        CHECK(finite);
        CHECK(std::all_of(rows_per_layer.begin(), rows_per_layer.end(), [&](int k) { return k == np; }));
        tc.clear();
    }

    // The tap must not change what the model computes.
    GenerateParams off = greedy(n_gen);
    off.tap = false;
    GenerateResult c = generate(tc, prompt, off, nullptr);
    CHECK(c.tokens == a.tokens);
    CHECK(c.active_counts.empty() && c.acts_f32.empty());

    // Half-precision capture, with the normed FFN input as well.
    GenerateParams p16 = greedy(n_gen);
    p16.capture = RowFormat::Float16;
    p16.capture_norm = true;
    GenerateResult d = generate(tc, prompt, p16, nullptr);
    CHECK(d.tokens == a.tokens);
    CHECK(d.active_counts == a.active_counts);
    CHECK(d.acts_f32.empty());
    CHECK(d.acts_f16.size() == a.acts_f32.size());
    if (d.tokens == a.tokens && d.acts_f16.size() == a.acts_f32.size()) {
        size_t bad = 0;
        double max_rel = 0;
        for (size_t i = 0; i < a.acts_f32.size(); ++i) {
            const float x = a.acts_f32[i];
            const float h = ggml_fp16_to_fp32(static_cast<ggml_fp16_t>(d.acts_f16[i]));
            const double err = std::fabs(static_cast<double>(h) - x);
            if (err > 1e-2 * std::fabs(x) + 1e-6) ++bad;  // absolute slack for half's subnormals
            if (std::fabs(x) > 1e-3) max_rel = std::max(max_rel, err / std::fabs(x));
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " f16 values off by more than 1% (max rel " +
                                std::to_string(max_rel) + ")");
    }
    CHECK(d.norm_inputs.size() == d.tokens.size() * L * E);
    CHECK(all_finite(d.norm_inputs));
    CHECK(any_nonzero(d.norm_inputs));

    // Progress counts tokens; cancellation stops early.
    Progress progress;
    GenerateResult e = generate(tc, prompt, greedy(n_gen), &progress);
    CHECK(progress.tokens.load() == static_cast<int64_t>(e.tokens.size()));
    Progress cancel;
    cancel.cancel = true;
    GenerateResult f = generate(tc, prompt, greedy(n_gen), &cancel);
    CHECK(f.finish_reason == "cancelled");
    CHECK(f.tokens.size() == 1 && f.active_counts.size() == static_cast<size_t>(L));
    CHECK(!f.tokens.empty() && f.tokens[0] == a.tokens[0]);

    // A stop string cuts the text where it starts.
    if (a.text.size() > 8) {
        GenerateParams ps = greedy(n_gen);
        const std::string stop = a.text.substr(a.text.size() / 2, 3);
        ps.stop = {stop};
        GenerateResult s = generate(tc, prompt, ps, nullptr);
        CHECK(s.finish_reason == "stop");
        CHECK(s.text == a.text.substr(0, a.text.find(stop)));
        CHECK(s.active_counts.size() == s.tokens.size() * L);
    }
}

void test_generation_errors() {
    auto model = shared_model();
    TappedContext tc(model, small_context());
    const std::vector<llama_token> prompt = model->tokenize("The capital of France is", true, false);
    const int n_vocab = model->info().n_vocab;

    EXPECT_THROW(ParamError, generate(tc, prompt, greedy(0), nullptr), "max_tokens 0");
    EXPECT_THROW(ParamError, generate(tc, prompt, greedy(-3), nullptr), "max_tokens -3");
    EXPECT_THROW(ParamError, generate(tc, {}, greedy(4), nullptr), "empty prompt");
    const std::vector<llama_token> long_prompt(600, prompt.back());
    EXPECT_THROW_MSG(ContextError, generate(tc, long_prompt, greedy(4), nullptr), "exceeds the context",
                     "600-token prompt, n_ctx 512");
    const std::vector<llama_token> fits(500, prompt.back());
    EXPECT_THROW(ContextError, generate(tc, fits, greedy(100), nullptr), "prompt fits but max_tokens does not");

    std::vector<llama_token> bad = prompt;
    bad.push_back(n_vocab);
    EXPECT_THROW(ParamError, generate(tc, bad, greedy(4), nullptr), "token id == n_vocab");
    bad.back() = -1;
    EXPECT_THROW(ParamError, generate(tc, bad, greedy(4), nullptr), "token id -1");

    auto sampled = [&](float temperature, float top_p, int top_k, float min_p) {
        GenerateParams gp = greedy(4);
        gp.sampling.temperature = temperature;
        gp.sampling.top_p = top_p;
        gp.sampling.top_k = top_k;
        gp.sampling.min_p = min_p;
        return gp;
    };
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(-1.0f, 0.9f, 40, 0.0f), nullptr), "temperature -1");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(NAN, 0.9f, 40, 0.0f), nullptr), "temperature NaN");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.0f, 40, 0.0f), nullptr), "top_p 0");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 1.5f, 40, 0.0f), nullptr), "top_p 1.5");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, NAN, 40, 0.0f), nullptr), "top_p NaN");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.9f, -1, 0.0f), nullptr), "top_k -1");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.9f, 40, 1.0f), nullptr), "min_p 1");

    // After all those errors the context still works, and seeded sampling is reproducible.
    GenerateParams gp = sampled(0.8f, 0.9f, 40, 0.05f);
    gp.sampling.seed = 42;
    gp.max_tokens = 8;
    GenerateResult r1, r2;
    EXPECT_NO_THROW(r1 = generate(tc, prompt, gp, nullptr), "sampling after errors");
    EXPECT_NO_THROW(r2 = generate(tc, prompt, gp, nullptr), "sampling again");
    CHECK(!r1.tokens.empty());
    CHECK(r1.tokens == r2.tokens);

    ContextParams tiny = small_context();
    tiny.n_ctx = 4;
    EXPECT_THROW(ParamError, TappedContext t(model, tiny), "n_ctx 4");
    ContextParams seqs = small_context();
    seqs.n_seq_max = 0;
    EXPECT_THROW(ParamError, TappedContext t(model, seqs), "n_seq_max 0");
}

// Lifetimes: a model closed under its contexts (what llama_cpp.Llama.close does to a tapped model)
// frees them first; every later use raises instead of touching freed memory (ASan watches). A tiny
// context decodes a long prompt in the batches llama.cpp accepts.
void test_model_lifetime() {
    auto model = Model::load(g_model_path, 0);
    const std::vector<llama_token> prompt = model->tokenize("The capital of France is", true, false);
    auto tc = std::make_unique<TappedContext>(model, small_context());
    GenerateResult before = generate(*tc, prompt, greedy(4), nullptr);
    CHECK(before.tokens.size() == 4u);
    SampleParams sp = sample_params(1, 16, 3);
    DecodeLoop loop(*tc, prompt, sp, {});
    loop.advance(2, nullptr);
    model->close();
    CHECK(model->closed() && tc->closed());
    EXPECT_THROW_MSG(RuntimeError, generate(*tc, prompt, greedy(4), nullptr), "was closed", "generate after close");
    EXPECT_THROW_MSG(RuntimeError, loop.advance(8, nullptr), "was closed", "advance after close");
    EXPECT_THROW_MSG(RuntimeError, model->tokenize("Hi", true, false), "was closed", "tokenize after close");
    EXPECT_THROW(RuntimeError, TappedContext(model, small_context()), "a new context after close");
    EXPECT_NO_THROW(loop.stop({0}), "stopping after close frees nothing twice");
    CHECK(loop.sample(0).tokens.size() == 2u);
    model->close();  // twice: nothing
    tc.reset();      // the context object outlives its llama context, and goes cleanly

    auto m2 = Model::load(g_model_path, 0);
    ContextParams tiny = small_context();
    tiny.n_ctx = 32;  // padded to 256 by llama.cpp; its batch stays 32
    TappedContext small(m2, tiny);
    std::vector<llama_token> longer;
    while (longer.size() < 120) longer.insert(longer.end(), prompt.begin(), prompt.end());
    GenerateResult r;
    EXPECT_NO_THROW(r = generate(small, longer, greedy(3), nullptr), "a prompt longer than the batch");
    CHECK(r.tokens.size() == 3u);
    while (longer.size() < 400) longer.insert(longer.end(), prompt.begin(), prompt.end());
    EXPECT_THROW_MSG(ContextError, generate(small, longer, greedy(3), nullptr), "exceeds the context",
                     "a prompt beyond the context");
}

}  // namespace

std::vector<TestCase> generate_tests() {
    return {
        {"generate", "model_info", test_model_info, true},
        {"generate", "generation", test_generation, true},
        {"generate", "generation_errors", test_generation_errors, true},
        {"generate", "model_lifetime", test_model_lifetime, true},
    };
}
