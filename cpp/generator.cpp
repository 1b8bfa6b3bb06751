#include "generator.h"

#include <chrono>
#include <cmath>
#include <memory>

#include "errors.h"
#include "ggml.h"

namespace neurotap {

namespace {

struct SamplerDeleter {
    void operator()(llama_sampler* s) const { llama_sampler_free(s); }
};

// Writes the tapped rows of token `token` into the result.
class GenerationRecorder : public RowSink {
public:
    GenerationRecorder(GenerateResult& r, const GenerateParams& p) : r_(r), p_(p) {}
    int token = 0;

    void reserve(int max_tokens) {
        const size_t n = static_cast<size_t>(max_tokens);
        r_.active_counts.assign(n * r_.n_layer, 0);
        if (p_.capture == CaptureMode::Float32) r_.acts_f32.assign(n * r_.n_layer * r_.n_ff, 0.f);
        if (p_.capture == CaptureMode::Float16) r_.acts_f16.assign(n * r_.n_layer * r_.n_ff, 0);
        if (p_.capture_norm) r_.norm_inputs.assign(n * r_.n_layer * r_.n_embd, 0.f);
    }
    void truncate(int n_tokens) {
        const size_t n = static_cast<size_t>(n_tokens);
        r_.active_counts.resize(n * r_.n_layer);
        if (!r_.acts_f32.empty()) r_.acts_f32.resize(n * r_.n_layer * r_.n_ff);
        if (!r_.acts_f16.empty()) r_.acts_f16.resize(n * r_.n_layer * r_.n_ff);
        if (!r_.norm_inputs.empty()) r_.norm_inputs.resize(n * r_.n_layer * r_.n_embd);
    }

    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override {
        if (row0 != 0 || n_rows != 1) return;  // single-sequence decode steps hold one row
        const size_t slot = static_cast<size_t>(token) * r_.n_layer + layer;
        if (kind == TapKind::NormInput) {
            std::copy(data, data + width, r_.norm_inputs.begin() + slot * width);
            return;
        }
        int32_t count = 0;
        const float thr = p_.active_threshold;
        for (int64_t i = 0; i < width; ++i) count += data[i] > thr;
        r_.active_counts[slot] = count;
        if (p_.capture == CaptureMode::Float32)
            std::copy(data, data + width, r_.acts_f32.begin() + slot * width);
        else if (p_.capture == CaptureMode::Float16)
            ggml_fp32_to_fp16_row(data, reinterpret_cast<ggml_fp16_t*>(r_.acts_f16.data() + slot * width), width);
    }

private:
    GenerateResult& r_;
    const GenerateParams& p_;
};

}  // namespace

size_t find_stop(const std::string& text, size_t from, const std::vector<std::string>& stops) {
    size_t best = std::string::npos;
    for (const auto& s : stops) {
        if (s.empty()) continue;
        const size_t start = from >= s.size() ? from - s.size() + 1 : 0;
        const size_t pos = text.find(s, start);
        if (pos != std::string::npos && pos < best) best = pos;
    }
    return best;
}

llama_sampler* make_sampler_chain(const SamplingParams& p, const llama_vocab* vocab) {
    if (!std::isfinite(p.temperature) || p.temperature < 0) throw ParamError("temperature must be >= 0");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw ParamError("top_p must be in (0, 1]");
    if (p.top_k < 0) throw ParamError("top_k must be >= 0 (0 disables it)");
    if (!(p.min_p >= 0.0f && p.min_p < 1.0f)) throw ParamError("min_p must be in [0, 1)");
    llama_sampler* chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (p.ignore_eos) {
        std::vector<llama_logit_bias> bias;
        const int n_vocab = llama_vocab_n_tokens(vocab);
        for (llama_token t = 0; t < n_vocab; ++t)
            if (llama_vocab_is_eog(vocab, t)) bias.push_back({t, -INFINITY});
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(bias.size()),
                                                                     bias.data()));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (p.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    return chain;
}

GenerateResult generate(TappedContext& tc, const std::vector<llama_token>& prompt, const GenerateParams& params,
                        Progress* progress) {
    using clock = std::chrono::steady_clock;
    const Model& model = tc.model();
    const bool forcing = !params.forced.empty();
    if (params.max_tokens <= 0) throw ParamError("max_tokens must be positive, got " + std::to_string(params.max_tokens));
    if (prompt.empty()) throw ParamError("the prompt is empty (no tokens)");
    const int n_prompt = static_cast<int>(prompt.size());
    const int n_ctx = tc.n_ctx();
    if (n_prompt + params.max_tokens > n_ctx) {
        throw ContextError("the prompt (" + std::to_string(n_prompt) + " tokens) plus max_tokens (" +
                           std::to_string(params.max_tokens) + ") exceeds the context of " + std::to_string(n_ctx) +
                           " tokens; at most " + std::to_string(std::max(0, n_ctx - n_prompt)) +
                           " new tokens fit. Load with a larger n_ctx or lower max_tokens.");
    }
    for (llama_token t : prompt)
        if (t < 0 || t >= model.info().n_vocab) throw ParamError("prompt token id out of range: " + std::to_string(t));
    for (llama_token t : params.forced)
        if (t < 0 || t >= model.info().n_vocab) throw ParamError("forced token id out of range: " + std::to_string(t));
    if (forcing && static_cast<int>(params.forced.size()) != params.max_tokens)
        throw ParamError("max_tokens must equal the number of forced tokens");

    std::unique_ptr<llama_sampler, SamplerDeleter> sampler(make_sampler_chain(params.sampling, model.vocab()));

    GenerateResult r;
    r.prompt_tokens = prompt;
    r.n_layer = model.info().n_layer;
    r.n_ff = model.info().n_ff;
    r.n_embd = model.info().n_embd;
    GenerationRecorder rec(r, params);
    rec.reserve(params.max_tokens);
    RowSink* sink = params.tap ? &rec : nullptr;
    tc.tap().set_capture_norm(params.capture_norm);

    tc.clear();
    const auto t0 = clock::now();
    // The prompt's last position predicts the first generated token: decode it on its own so
    // that every tapped row requests logits.
    if (n_prompt > 1) tc.decode_seq(prompt.data(), n_prompt - 1, 0, 0, nullptr, false);
    rec.token = 0;
    tc.decode_seq(prompt.data() + n_prompt - 1, 1, n_prompt - 1, 0, sink);
    const auto t1 = clock::now();

    r.finish_reason = "length";
    for (int j = 0; j < params.max_tokens; ++j) {
        const llama_token tok = forcing ? params.forced[static_cast<size_t>(j)]
                                        : llama_sampler_sample(sampler.get(), tc.ctx(), -1);
        if (!forcing && model.is_eog(tok)) {
            r.finish_reason = "eos";
            break;
        }
        r.tokens.push_back(tok);
        const size_t before = r.text.size();
        r.text += model.token_piece(tok);
        if (progress) progress->tokens.store(j + 1, std::memory_order_relaxed);
        const size_t stop_at = forcing ? std::string::npos : find_stop(r.text, before, params.stop);
        if (stop_at != std::string::npos) {
            r.text.resize(stop_at);
            r.finish_reason = "stop";
            break;
        }
        if (j + 1 == params.max_tokens) break;
        if (progress && progress->cancel.load(std::memory_order_relaxed)) {
            r.finish_reason = "cancelled";
            break;
        }
        rec.token = j + 1;
        tc.decode_seq(&tok, 1, n_prompt + j, 0, sink);
    }
    const auto t2 = clock::now();
    rec.truncate(static_cast<int>(r.tokens.size()));
    if (!params.tap) r.active_counts.clear();
    r.prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    r.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
    return r;
}

}  // namespace neurotap
