// Native tests of one component (ctest group "decode_loop"); fixtures in common.h.
#include "tests/common.h"

namespace {

const char* kQuestion = "What is the capital of France? Answer briefly.";

std::vector<std::vector<llama_token>> all_tokens(const DecodeLoop& ps) {
    std::vector<std::vector<llama_token>> out;
    for (int i = 0; i < ps.n(); ++i) out.push_back(ps.sample(i).tokens);
    return out;
}

// The largest relative L2 distance between a row of `got` and the same row of `want`, both
// [tokens, layers, n_ff]. Infinity when the sizes differ.
double max_row_rel_l2(const std::vector<float>& got, const std::vector<float>& want, int64_t n_ff) {
    if (got.size() != want.size() || n_ff <= 0) return INFINITY;
    double worst = 0;
    for (size_t r = 0; r * n_ff < got.size(); ++r) {
        double d2 = 0, w2 = 0;
        for (int64_t i = 0; i < n_ff; ++i) {
            const double g = got[r * n_ff + i], w = want[r * n_ff + i];
            d2 += (g - w) * (g - w);
            w2 += w * w;
        }
        const double rel = std::sqrt(d2) / std::max(std::sqrt(w2), 1e-12);
        if (!(rel <= worst)) worst = rel;  // NaN sticks
    }
    return worst;
}

// The rows of `tokens` fed one by one to a single-sequence context: the reference.
std::vector<float> teacher_forced_rows(TappedContext& single, const std::vector<llama_token>& prompt,
                                       const std::vector<llama_token>& tokens) {
    GenerateParams gp;
    gp.max_tokens = static_cast<int>(tokens.size());
    gp.forced = tokens;
    gp.capture = RowFormat::Float32;
    gp.sampling.temperature = 0.0f;
    GenerateResult r = generate(single, prompt, gp, nullptr);
    if (r.tokens != tokens) return {};
    return r.acts_f32;
}

void test_parallel_sampling() {
    auto model = shared_model();
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int n = 6, max_tokens = 24;
    const uint32_t seed = 1234;
    TappedContext tc(model, parallel_context(n));
    TappedContext single(model, small_context());
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    CHECK(prompt.size() > 10);

    ActiveCountReducer counts(0.0f);
    ActiveSetReducer bitsets(4, 0.0f);
    const std::vector<std::pair<int, int>> watched = {{29, 1535}, {0, 0}, {14, 700}};
    WatchReducer watch(watched);
    MlpPostReducer rows(false), half(true);
    DecodeLoop ps(tc, prompt, sample_params(n, max_tokens, seed), {&counts, &bitsets, &watch, &rows, &half});
    CHECK(ps.n() == n && ps.n_live() == n && ps.n_prompt() == static_cast<int>(prompt.size()));
    Progress progress;
    CHECK(ps.advance(max_tokens, &progress) == 0);
    CHECK(ps.n_live() == 0);

    int64_t total = 0;
    std::vector<size_t> lengths;
    for (int s = 0; s < n; ++s) {
        const SampleState& st = ps.sample(s);
        lengths.push_back(st.tokens.size());
        total += static_cast<int64_t>(st.tokens.size()) + (st.finish_reason() == "eos");
        CHECK(!st.live);
        CHECK(st.tokens.size() <= static_cast<size_t>(max_tokens));
        CHECK_MSG(st.finish_reason() == (st.tokens.size() == static_cast<size_t>(max_tokens) ? "length" : "eos"),
                  "sample " + std::to_string(s) + ": " + st.finish_reason());
        CHECK(st.text == model->detokenize(st.tokens));
        CHECK(st.token_logprob.empty() && st.top_ids.empty());
    }
    std::printf("  sample lengths:");
    for (size_t k : lengths) std::printf(" %zu", k);
    std::printf("\n");
    CHECK(ps.tokens_sampled() == total);  // end-of-generation tokens are sampled too
    CHECK(progress.tokens.load() == total);
    CHECK_MSG(*std::min_element(lengths.begin(), lengths.end()) < *std::max_element(lengths.begin(), lengths.end()),
              "all samples ended at the same step: nothing checks the routing after one ends");
    CHECK(ps.decode_steps() == static_cast<int>(*std::max_element(lengths.begin(), lengths.end())) - 1 ||
          ps.decode_steps() == static_cast<int>(*std::max_element(lengths.begin(), lengths.end())));
    const auto first = all_tokens(ps);
    CHECK_MSG(std::count(first.begin(), first.end(), first[0]) < n, "every sample drew the same tokens");

    // Every sample's rows are the rows of its own tokens: a single-sequence teacher-forced run
    // of the same tokens computes them again, and the other reducers agree with the rows.
    double worst_rel = 0;
    for (int s = 0; s < n; ++s) {
        const std::string tag = "sample " + std::to_string(s);
        const auto& toks = ps.sample(s).tokens;
        const size_t nt = toks.size();
        const auto& got = rows.rows_f32(s);
        CHECK_MSG(got.size() == nt * L * F, tag);
        if (nt == 0 || got.size() != nt * L * F) continue;
        const std::vector<float> want = teacher_forced_rows(single, prompt, toks);
        CHECK_MSG(want.size() == got.size(), tag + ": teacher-forced run");
        const double rel = max_row_rel_l2(got, want, F);
        worst_rel = std::max(worst_rel, rel);
        CHECK_MSG(rel < 5e-3, tag + ": max relative L2 " + std::to_string(rel));
        // A wrong row (the next token's, or another sample's) is far from it.
        if (nt > 1) {
            std::vector<float> shifted(want.begin() + L * F, want.end());
            shifted.insert(shifted.end(), want.end() - L * F, want.end());
            CHECK_MSG(max_row_rel_l2(got, shifted, F) > 0.1, tag + ": rows are not token-specific");
        }

        const auto& cnt = counts.counts(s);
        CHECK_MSG(cnt.size() == nt * L, tag);
        int bad_counts = 0;
        if (cnt.size() == nt * L)
            for (size_t r = 0; r < nt * L; ++r)
                bad_counts += cnt[r] != std::count_if(got.begin() + r * F, got.begin() + (r + 1) * F,
                                                      [](float x) { return x > 0.0f; });
        CHECK_MSG(bad_counts == 0, tag + ": active counts disagree with the rows");

        const size_t W = static_cast<size_t>(bitsets.n_words());
        CHECK(W == static_cast<size_t>((L * F + 63) / 64));
        const size_t n_chunks = (nt + 3) / 4;
        CHECK_MSG(bitsets.sets(s).size() == n_chunks * W, tag);
        if (bitsets.sets(s).size() == n_chunks * W) {
            std::vector<uint64_t> want_bits(n_chunks * W, 0);
            for (size_t t = 0; t < nt; ++t)
                for (int64_t k = 0; k < L * F; ++k)
                    if (got[t * L * F + k] > 0.0f) want_bits[(t / 4) * W + k / 64] |= uint64_t(1) << (k % 64);
            CHECK_MSG(bitsets.sets(s) == want_bits, tag + ": chunk bitsets disagree with the rows");
        }

        const auto& wv = watch.values(s);
        CHECK_MSG(wv.size() == nt * watched.size(), tag);
        if (wv.size() == nt * watched.size()) {
            int bad = 0;
            for (size_t t = 0; t < nt; ++t)
                for (size_t k = 0; k < watched.size(); ++k)
                    bad += wv[t * watched.size() + k] !=
                           got[(t * L + watched[k].first) * F + watched[k].second];
            CHECK_MSG(bad == 0, tag + ": watched values disagree with the rows");
        }

        const auto& h = half.rows_f16(s);
        CHECK_MSG(h.size() == got.size(), tag);
        if (h.size() == got.size()) {
            size_t bad = 0;
            for (size_t k = 0; k < h.size(); ++k) {
                const float x = ggml_fp16_to_fp32(static_cast<ggml_fp16_t>(h[k]));
                bad += !(std::fabs(x - got[k]) <= 1e-3f * std::fabs(got[k]) + 1e-6f);
            }
            CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " f16 rows off");
        }
    }

    std::printf("  rows vs teacher-forced single-sequence rows: max relative L2 %.2e\n", worst_rel);

    // Seeds: the same seed draws the same tokens; another seed draws others.
    {
        DecodeLoop again(tc, prompt, sample_params(n, max_tokens, seed), {});
        again.advance(max_tokens, nullptr);
        CHECK_MSG(all_tokens(again) == first, "the same seed drew different tokens");
        DecodeLoop other(tc, prompt, sample_params(n, max_tokens, seed + 1), {});
        other.advance(max_tokens, nullptr);
        const auto second = all_tokens(other);
        int same = 0;
        for (int s = 0; s < n; ++s) same += second[s] == first[s];
        CHECK_MSG(same < n / 2, std::to_string(same) + " of " + std::to_string(n) + " samples equal under another seed");
    }
    std::vector<uint32_t> seeds;
    for (int i = 0; i < 64; ++i) seeds.push_back(sample_seed(seed, i));
    CHECK(sample_seed(seed, 5) == seeds[5]);
    CHECK(sample_seed(seed + 1, 5) != seeds[5]);
    std::sort(seeds.begin(), seeds.end());
    CHECK_MSG(std::adjacent_find(seeds.begin(), seeds.end()) == seeds.end(), "sample_seed repeats within 64 indices");
}

// advance() in steps, stop() mid-run, and the samples left alone are not disturbed.
void test_parallel_control() {
    auto model = shared_model();
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int n = 6, max_tokens = 24, keep = 3;
    const uint32_t seed = 777;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    SampleParams sp = sample_params(n, max_tokens, seed);
    sp.ignore_eos = true;  // every sample is still live at the stop

    MlpPostReducer ref_rows(false);
    DecodeLoop ref(tc, prompt, sp, {&ref_rows});
    CHECK(ref.advance(max_tokens, nullptr) == 0);
    const auto unpruned = all_tokens(ref);
    for (const auto& t : unpruned) CHECK(t.size() == static_cast<size_t>(max_tokens));
    std::vector<std::vector<float>> ref_f32;
    for (int s = 0; s < n; ++s) ref_f32.push_back(ref_rows.rows_f32(s));

    MlpPostReducer rows(false);
    ActiveCountReducer counts(0.0f);
    DecodeLoop ps(tc, prompt, sp, {&rows, &counts});
    EXPECT_THROW(ParamError, ps.advance(0, nullptr), "advance(0)");
    EXPECT_THROW(ParamError, ps.advance(-5, nullptr), "advance(-5)");
    CHECK(ps.advance(8, nullptr) == n);
    for (int s = 0; s < n; ++s) {
        const auto& t = ps.sample(s).tokens;
        CHECK(ps.sample(s).live && ps.sample(s).finish_reason().empty());
        CHECK(t.size() == 8u);
        CHECK(std::equal(t.begin(), t.end(), unpruned[s].begin()));
    }
    CHECK(ps.advance(8, nullptr) == n);  // already there: no step
    CHECK(ps.sample(0).tokens.size() == 8u);
    CHECK(ps.decode_steps() == 7);

    EXPECT_THROW(ParamError, ps.stop({n}), "stop(n)");
    EXPECT_THROW(ParamError, ps.stop({-1}), "stop(-1)");
    CHECK(ps.n_live() == n);
    std::vector<int> others;
    for (int s = 0; s < n; ++s)
        if (s != keep) others.push_back(s);
    ps.stop(others);
    CHECK(ps.n_live() == 1);
    EXPECT_NO_THROW(ps.stop({others[0]}), "stopping a stopped sample again");
    llama_memory_t mem = llama_get_memory(tc.ctx());
    for (int s : others) {
        CHECK(!ps.sample(s).live);
        CHECK(ps.sample(s).finish_reason() == "stopped");
        CHECK_MSG(llama_memory_seq_pos_max(mem, s) == -1, "stopped sample " + std::to_string(s) + " keeps KV cells");
    }
    CHECK(llama_memory_seq_pos_max(mem, keep) >= static_cast<llama_pos>(prompt.size()));

    CHECK(ps.advance(max_tokens, nullptr) == 0);
    CHECK(ps.sample(keep).finish_reason() == "length");
    CHECK_MSG(ps.sample(keep).tokens == unpruned[keep], "the kept sample drew other tokens once the rest stopped");
    const double rel = max_row_rel_l2(rows.rows_f32(keep), ref_f32[keep], F);
    CHECK_MSG(rel < 5e-3, "kept sample: max relative L2 " + std::to_string(rel));
    for (int s : others) {
        CHECK(ps.sample(s).tokens.size() == 8u && ps.sample(s).finish_reason() == "stopped");
        CHECK(counts.counts(s).size() == 8u * L);
        CHECK(rows.rows_f32(s).size() == size_t(8) * L * F);
        if (rows.rows_f32(s).size() == size_t(8) * L * F && ref_f32[s].size() >= size_t(8) * L * F) {
            std::vector<float> prefix(ref_f32[s].begin(), ref_f32[s].begin() + 8 * L * F);
            CHECK(max_row_rel_l2(rows.rows_f32(s), prefix, F) < 5e-3);
        }
    }
    CHECK(counts.counts(keep).size() == static_cast<size_t>(max_tokens) * L);
    CHECK(ps.advance(max_tokens, nullptr) == 0);  // nothing left: a no-op
    CHECK(ps.sample(keep).tokens.size() == static_cast<size_t>(max_tokens));
    for (int s = 0; s < n; ++s) CHECK(llama_memory_seq_pos_max(mem, s) == -1);

    // Stopped before the run starts: no tokens, no rows, and the others run as usual.
    MlpPostReducer early_rows(false);
    ActiveCountReducer early_counts(0.0f);
    DecodeLoop early(tc, prompt, sp, {&early_rows, &early_counts});
    early.stop({0, 1});  // sample 0's sequence holds the prompt until it is copied
    CHECK(early.n_live() == n - 2);
    CHECK(early.advance(4, nullptr) == n - 2);
    for (int s : {0, 1}) {
        CHECK(early.sample(s).tokens.empty() && early.sample(s).finish_reason() == "stopped");
        CHECK(early_rows.rows_f32(s).empty());
        CHECK(early_counts.counts(s).empty());
        CHECK_MSG(llama_memory_seq_pos_max(mem, s) == -1, "sample " + std::to_string(s) + " stopped before the start keeps KV cells");
    }
    for (int s : {2, 3, 5}) {
        const auto& t = early.sample(s).tokens;
        CHECK(t.size() == 4u && std::equal(t.begin(), t.end(), unpruned[s].begin()));
        CHECK(early_rows.rows_f32(s).size() == size_t(4) * L * F);
    }
}

// A race decided early hands its winner to a context of its own: the KV state moves (rewritten
// from the race's per-sequence streams to one stream), the sampler goes on where it stood, and the
// winner draws exactly what it draws when it never moves.
// A method the loop has never heard of steers it through Steering alone: it forces a token at one
// position, and ends each sample as its own exit after a few tokens.
class ToyMethod : public Steering {
public:
    ToyMethod(llama_token token, int at, int end_after) : token_(token), at_(at), end_after_(end_after) {}
    void begin(int, int, int64_t, int) override {}
    void on_row(int, int, int, const float*) override {}
    void finish(int, int) override {}
    const char* name() const override { return "toy"; }
    const char* exit_reason() const override { return "toy_exit"; }
    bool steers() const override { return true; }
    Pick before_sample(int, int j, float*, llama_token* token) override {
        if (j != at_) return Pick::Sample;
        *token = token_;
        return Pick::Forced;
    }
    Decision after_commit(int, const SampleView& v, bool mine) override {
        if (mine) ++forced_;
        if (static_cast<int>(v.tokens.size()) < end_after_) return {};
        return {Decision::End, 0, v.text.size() - v.piece.size()};  // its last piece dropped
    }
    int forced_ = 0;

private:
    llama_token token_;
    int at_, end_after_;
};

void test_new_method() {
    auto model = shared_model();
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    TappedContext tc(model, parallel_context(2));
    SampleParams sp = sample_params(2, 16, 7);
    sp.ignore_eos = true;
    const llama_token forced = model->tokenize(" Paris", false, false).at(0);
    ToyMethod toy(forced, 2, 5);
    DecodeLoop loop(tc, prompt, sp, {}, {&toy});
    loop.advance(16, nullptr);
    CHECK(toy.forced_ == 2);
    for (int s = 0; s < 2; ++s) {
        const SampleState& st = loop.sample(s);
        CHECK(st.tokens.size() == 5u && st.tokens[2] == forced);
        CHECK(st.finish == Finish::Exit && st.exit_by == &toy && st.finish_reason() == "toy_exit");
        CHECK(st.text.size() == st.piece_end[3]);
    }
    SampleParams forcing = sp;
    forcing.forced = {forced};
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, forcing, {}, {&toy}), "toy cannot steer teacher-forced",
                     "a steering method with teacher forcing");
    ToyMethod other(forced, 1, 3);
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, sp, {}, {&toy, &other}), "cannot steer the same run",
                     "two steering methods");
}

void test_hand_off() {
    auto model = shared_model();
    const int n = 4, max_tokens = 40, race = 12, pick = 2;
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    SampleParams sp = sample_params(n, max_tokens, 99);
    sp.ignore_eos = true;
    TappedContext full_ctx(model, parallel_context(n));
    DecodeLoop ref(full_ctx, prompt, sp, {});
    ref.advance(max_tokens, nullptr);

    ContextParams small = parallel_context(n);
    small.n_ctx = n * 256;  // room for the race only
    TappedContext race_ctx(model, small);
    SampleParams rp = sp;
    rp.kv_tokens = race;
    DecodeLoop r(race_ctx, prompt, rp, {});
    EXPECT_THROW_MSG(ParamError, r.advance(race + 1, nullptr), "hand a sample off", "beyond the race");
    r.advance(race, nullptr);
    EXPECT_THROW(ParamError, r.hand_off(n), "hand_off(n)");
    Handoff h = r.hand_off(pick);
    CHECK(!r.sample(pick).live && r.sample(pick).finish_reason() == "stopped");
    EXPECT_THROW(ParamError, r.hand_off(pick), "a sample handed off twice");

    ContextParams one = small_context();
    TappedContext cont_ctx(model, one);
    SampleParams cp = sp;
    cp.tap = false;
    DecodeLoop tail(cont_ctx, std::move(h), cp, {});
    CHECK(tail.sample(0).tokens.size() == static_cast<size_t>(race));
    tail.advance(max_tokens, nullptr);
    CHECK(tail.sample(0).tokens == ref.sample(pick).tokens);
    CHECK(tail.sample(0).text == ref.sample(pick).text);
    CHECK(tail.tokens_sampled() == max_tokens - race);
    EXPECT_THROW(ParamError, DecodeLoop(cont_ctx, std::move(h), cp, {}), "a used handoff");
}

void test_parallel_errors() {
    auto model = shared_model();
    const int n = 6;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    const int np = static_cast<int>(prompt.size());
    const int per_seq = static_cast<int>(llama_n_ctx_seq(tc.ctx()));
    CHECK(per_seq == 256);
    auto make = [&](const std::vector<llama_token>& p, const SampleParams& sp, std::vector<Reducer*> reds = {}) {
        DecodeLoop ps(tc, p, sp, std::move(reds));
    };

    EXPECT_THROW(ParamError, make(prompt, sample_params(0, 8, 1)), "n=0");
    EXPECT_THROW(ParamError, make(prompt, sample_params(-1, 8, 1)), "n=-1");
    EXPECT_THROW(ParamError, make(prompt, sample_params(2, 0, 1)), "max_tokens 0");
    EXPECT_THROW(ParamError, make(prompt, sample_params(2, -4, 1)), "max_tokens -4");
    EXPECT_THROW_MSG(ParamError, make(prompt, sample_params(n + 1, 8, 1)), "sequences", "n > n_seq_max");
    EXPECT_THROW_MSG(ContextError, make(prompt, sample_params(2, per_seq - np + 1, 1)), "cells per sequence",
                     "prompt + max_tokens one past the cells of a sequence");
    EXPECT_NO_THROW(make(prompt, sample_params(n, per_seq - np, 1)), "prompt + max_tokens exactly the cells of a sequence");
    EXPECT_THROW(ContextError, make(std::vector<llama_token>(300, prompt.back()), sample_params(1, 1, 1)),
                 "a prompt longer than a sequence");
    EXPECT_THROW(ParamError, make({}, sample_params(2, 8, 1)), "empty prompt");
    std::vector<llama_token> bad = prompt;
    bad.push_back(model->info().n_vocab);
    EXPECT_THROW(ParamError, make(bad, sample_params(2, 8, 1)), "token id == n_vocab");
    SampleParams lp = sample_params(2, 8, 1);
    lp.top_logprobs = 101;
    EXPECT_THROW(ParamError, make(prompt, lp), "top_logprobs 101");
    lp.top_logprobs = -1;
    EXPECT_THROW(ParamError, make(prompt, lp), "top_logprobs -1");
    lp.top_logprobs = 100;
    EXPECT_NO_THROW(make(prompt, lp), "top_logprobs 100");
    SampleParams temp = sample_params(2, 8, 1);
    temp.temperature = -1.0f;
    EXPECT_THROW(ParamError, make(prompt, temp), "temperature -1");
    // A reducer that rejects the run (a watched neuron outside the model) after the samplers
    // were made: nothing may leak (LeakSanitizer checks).
    WatchReducer outside({{0, 0}, {model->info().n_layers, 0}});
    EXPECT_THROW(ParamError, make(prompt, sample_params(n, 8, 1), {&outside}), "watched layer == n_layers");

    // After all that, the context still samples.
    DecodeLoop ok(tc, prompt, sample_params(n, 4, 1), {});
    int live = -1;
    EXPECT_NO_THROW(live = ok.advance(4, nullptr), "a run after the errors");
    CHECK(live == 0);
    for (int s = 0; s < n; ++s) CHECK(!ok.sample(s).tokens.empty() || ok.sample(s).finish_reason() == "eos");
}

// OpenAI's logit_bias: a banned token is never drawn, a forced one always; bad entries are
// refused before any sampler exists (LeakSanitizer checks nothing leaks).
void test_logit_bias() {
    auto model = shared_model();
    const int V = model->info().n_vocab;
    TappedContext tc(model, parallel_context(2));
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    SampleParams greedy = sample_params(2, 6, 5);
    greedy.temperature = 0.0f;
    greedy.ignore_eos = true;
    DecodeLoop plain(tc, prompt, greedy, {});
    plain.advance(6, nullptr);
    const llama_token first = plain.sample(0).tokens.at(0);

    SampleParams ban = greedy;
    ban.logit_bias = {{first, -100.0f}};
    DecodeLoop banned(tc, prompt, ban, {});
    banned.advance(6, nullptr);
    for (int s = 0; s < 2; ++s)
        for (llama_token t : banned.sample(s).tokens) CHECK_MSG(t != first, "a banned token was drawn");

    const llama_token paris = model->tokenize(" Paris", false, false).at(0);
    SampleParams force = sample_params(2, 6, 5);  // sampled: +100 outweighs every other logit
    force.ignore_eos = true;  // merged into the same bias list
    force.logit_bias = {{paris, 100.0f}};
    DecodeLoop forced(tc, prompt, force, {});
    forced.advance(6, nullptr);
    for (int s = 0; s < 2; ++s) CHECK(forced.sample(s).tokens == std::vector<llama_token>(6, paris));

    auto make = [&](const SampleParams& sp) { DecodeLoop loop(tc, prompt, sp, {}); };
    SampleParams bad = greedy;
    bad.logit_bias = {{paris, 1.0f}, {V, 1.0f}};
    EXPECT_THROW_MSG(ParamError, make(bad), "outside the vocabulary", "logit_bias token == n_vocab");
    bad.logit_bias = {{-1, 1.0f}};
    EXPECT_THROW_MSG(ParamError, make(bad), "outside the vocabulary", "logit_bias token -1");
    bad.logit_bias = {{paris, NAN}};
    EXPECT_THROW(ParamError, make(bad), "logit_bias NaN");
    bad.logit_bias = {{paris, INFINITY}};
    EXPECT_THROW(ParamError, make(bad), "logit_bias +inf");
    bad.logit_bias = {{paris, -INFINITY}};
    EXPECT_NO_THROW(make(bad), "logit_bias -inf bans");
}

// log_softmax of a logits row, in double.
std::vector<double> log_softmax(const float* logits, int n_vocab) {
    double mx = logits[0];
    for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    double sum = 0;
    for (int i = 0; i < n_vocab; ++i) sum += std::exp(logits[i] - mx);
    const double lse = mx + std::log(sum);
    std::vector<double> out(static_cast<size_t>(n_vocab));
    for (int i = 0; i < n_vocab; ++i) out[i] = logits[i] - lse;
    return out;
}

void test_parallel_logprobs() {
    auto model = shared_model();
    const int n = 4, k = 5, max_tokens = 12;
    const int V = model->info().n_vocab;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    SampleParams sp = sample_params(n, max_tokens, 99);
    sp.top_logprobs = k;
    DecodeLoop ps(tc, prompt, sp, {});
    ps.advance(max_tokens, nullptr);

    // Single-sequence logits of the same tokens: the reference for every position.
    ContextParams cp = small_context();
    cp.install_tap = false;
    TappedContext single(model, cp);
    const int np = static_cast<int>(prompt.size());
    for (int s = 0; s < n; ++s) {
        const std::string tag = "sample " + std::to_string(s);
        const SampleState& st = ps.sample(s);
        const size_t nt = st.tokens.size();
        CHECK_MSG(st.token_logprob.size() == nt, tag);
        CHECK_MSG(st.top_logprobs.size() == nt * k && st.top_ids.size() == nt * k, tag);
        if (st.token_logprob.size() != nt || st.top_logprobs.size() != nt * k || st.top_ids.size() != nt * k) continue;
        single.clear();
        single.decode_seq(prompt.data(), np, 0, 0, nullptr);
        double worst = 0;
        for (size_t j = 0; j < nt; ++j) {
            const float lp = st.token_logprob[j];
            const float* top = st.top_logprobs.data() + j * k;
            const int32_t* ids = st.top_ids.data() + j * k;
            CHECK_MSG(std::isfinite(lp) && lp <= 0.0f, tag + ", token " + std::to_string(j));
            for (int i = 0; i < k; ++i) {
                CHECK(std::isfinite(top[i]) && top[i] <= 0.0f);
                CHECK(ids[i] >= 0 && ids[i] < V);
                if (i > 0) CHECK_MSG(top[i] <= top[i - 1], tag + ": top_logprobs not sorted");
                for (int i2 = 0; i2 < i; ++i2) CHECK(ids[i2] != ids[i]);
                if (ids[i] == st.tokens[j]) CHECK(std::fabs(top[i] - lp) < 1e-6f);
            }
            CHECK_MSG(lp <= top[0] + 1e-5f, tag + ": the sampled token beats the top entry");

            const std::vector<double> ref = log_softmax(llama_get_logits_ith(single.ctx(), -1), V);
            worst = std::max(worst, std::fabs(ref[static_cast<size_t>(st.tokens[j])] - lp));
            for (int i = 0; i < k; ++i) worst = std::max(worst, std::fabs(ref[static_cast<size_t>(ids[i])] - top[i]));
            single.decode_seq(&st.tokens[j], 1, np + static_cast<int>(j), 0, nullptr);
        }
        CHECK_MSG(worst < 0.05, tag + ": log-probabilities off the single-sequence ones by " + std::to_string(worst));
    }
}

// One KV stream shared by the samples (the prompt's cells once): the same tokens and counts as
// per-sequence streams, with samples ending at different steps; an ended sample's cells stay
// until the run ends (freed mid-run, they would take the live samples' next tokens out of order).
void test_shared_stream() {
    auto model = shared_model();
    const int n = 6, max_tokens = 24;
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    const SampleParams sp = sample_params(n, max_tokens, 99);
    TappedContext per_stream(model, parallel_context(n));
    ActiveCountReducer ref_counts(0.0f);
    DecodeLoop ref(per_stream, prompt, sp, {&ref_counts});
    CHECK(ref.advance(max_tokens, nullptr) == 0);

    ContextParams cp = parallel_context(n);
    cp.n_ctx = 256;  // prompt + n x max_tokens, padded
    cp.kv_unified = true;
    TappedContext shared(model, cp);
    ActiveCountReducer counts(0.0f);
    DecodeLoop ps(shared, prompt, sp, {&counts});
    llama_memory_t mem = llama_get_memory(shared.ctx());
    bool ended_first = false;
    for (int until = 1; ps.advance(until, nullptr) > 0; ++until)
        for (int s = 0; s < n; ++s)
            if (!ps.sample(s).live) {
                ended_first = true;
                CHECK_MSG(llama_memory_seq_pos_max(mem, s) >= 0, "ended sample " + std::to_string(s) + " freed mid-run");
            }
    CHECK_MSG(ended_first, "no sample ended before the others: the case is not exercised");
    for (int s = 1; s < n; ++s) CHECK(llama_memory_seq_pos_max(mem, s) == -1);  // freed at the end
    CHECK_MSG(all_tokens(ps) == all_tokens(ref), "a shared stream drew other tokens than per-sequence streams");
    for (int s = 0; s < n; ++s) CHECK(counts.counts(s) == ref_counts.counts(s));

    // Too small for prompt + n x max_tokens: refused before decoding.
    SampleParams big = sp;
    big.max_tokens = 64;
    EXPECT_THROW(ContextError, DecodeLoop(shared, prompt, big, {}), "prompt + n x max_tokens over the stream");
    big.kv_tokens = 24;  // a race holds kv_tokens + 1 per sample
    EXPECT_NO_THROW(DecodeLoop(shared, prompt, big, {}), "a race of n x (kv_tokens + 1) fits");
}

}  // namespace

std::vector<TestCase> decode_loop_tests() {
    return {
        {"decode_loop", "parallel_sampling", test_parallel_sampling, true},
        {"decode_loop", "parallel_control", test_parallel_control, true},
        {"decode_loop", "parallel_errors", test_parallel_errors, true},
        {"decode_loop", "parallel_logprobs", test_parallel_logprobs, true},
        {"decode_loop", "hand_off", test_hand_off, true},
        {"decode_loop", "new_method", test_new_method, true},
        {"decode_loop", "logit_bias", test_logit_bias, true},
        {"decode_loop", "shared_stream", test_shared_stream, true},
    };
}
