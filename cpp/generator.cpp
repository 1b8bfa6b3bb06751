#include "generator.h"

#include <chrono>
#include <cmath>
#include <memory>

#include "errors.h"
#include "reducers.h"

namespace neurotap {

namespace {

struct SamplerDeleter {
    void operator()(llama_sampler* s) const { llama_sampler_free(s); }
};

// Streams the tapped rows of token `token` into the same reducers the parallel sampler uses
// (as sample 0), and keeps the debug-mode normed FFN inputs.
class GenerationRecorder : public RowSink {
public:
    GenerationRecorder(GenerateResult& r, const GenerateParams& p)
        : r_(r), p_(p), counts_(p.active_threshold), rows_(p.capture == CaptureMode::Float16) {
        counts_.begin(1, r_.n_layer, r_.n_ff, p.max_tokens);
        if (p_.capture != CaptureMode::None) rows_.begin(1, r_.n_layer, r_.n_ff, p.max_tokens);
        if (p_.capture_norm) r_.norm_inputs.assign(static_cast<size_t>(p.max_tokens) * r_.n_layer * r_.n_embd, 0.f);
        if (p_.capture_residual) r_.residuals.assign(static_cast<size_t>(p.max_tokens) * r_.n_layer * r_.n_embd, 0.f);
    }
    int token = 0;
    NeatMonitor* neat = nullptr;

    // Moves the records of the first n_tokens tokens into the result.
    void finish(int n_tokens) {
        counts_.finish(0, n_tokens);
        r_.active_counts = counts_.take_counts(0);
        if (p_.capture != CaptureMode::None) {
            rows_.finish(0, n_tokens);
            if (rows_.half()) r_.acts_f16 = rows_.take_f16(0);
            else r_.acts_f32 = rows_.take_f32(0);
        }
        if (p_.capture_norm) r_.norm_inputs.resize(static_cast<size_t>(n_tokens) * r_.n_layer * r_.n_embd);
        if (p_.capture_residual) r_.residuals.resize(static_cast<size_t>(n_tokens) * r_.n_layer * r_.n_embd);
    }

    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override {
        if (row0 != 0 || n_rows != 1 || kind == TapKind::Gate) return;  // one row per step; no gate use here
        if (kind == TapKind::NormInput || kind == TapKind::Residual) {
            const size_t slot = static_cast<size_t>(token) * r_.n_layer + layer;
            auto& dst = kind == TapKind::NormInput ? r_.norm_inputs : r_.residuals;
            std::copy(data, data + width, dst.begin() + slot * width);
            return;
        }
        if (neat) neat->on_row(0, token, layer, data);
        counts_.on_row(0, token, layer, data);
        if (p_.capture != CaptureMode::None) rows_.on_row(0, token, layer, data);
    }

private:
    GenerateResult& r_;
    const GenerateParams& p_;
    ActiveCountReducer counts_;
    FullRowReducer rows_;
};

}  // namespace

bool NeatTrack::before_sample(const NeatMonitor& mon, int sample, int j, float* logits, llama_token* forced) {
    const auto& exit = mon.config().exit_tokens;
    if (exited) {
        if (queued < exit.size()) {
            *forced = exit[queued++];
            return true;
        }
        return false;  // after the exit tokens the model writes on (e.g. the answer after "Answer:")
    }
    if (mon.config().line_starts_only && !line_start) return false;
    float sim = 0, mag = 0;
    const int action = mon.decide(sample, &sim, &mag);
    events.push_back({j, action, sim, mag});
    if (action == kNeatBan) mon.ban(logits);
    if (action != kNeatExit || exit.empty()) return false;
    exited = true;
    exit_at = j;
    queued = 1;
    *forced = exit[0];
    return true;
}

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
    std::unique_ptr<NeatMonitor> neat;
    NeatTrack track;
    if (params.neat) {
        if (!params.tap) throw ParamError("NEAT watches neurons: it needs the tap on");
        if (forcing) throw ParamError("NEAT cannot steer teacher-forced tokens");
        neat = std::make_unique<NeatMonitor>(*params.neat, r.n_layer, r.n_ff, model.info().n_vocab);
        neat->begin(1, r.n_layer, r.n_ff, params.max_tokens);
        rec.neat = neat.get();
    }
    RowSink* sink = params.tap ? &rec : nullptr;
    tc.tap().set_capture_norm(params.capture_norm);
    tc.tap().set_capture_gate(false);
    tc.tap().set_capture_residual(params.capture_residual);

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
        llama_token tok = 0;
        bool neat_token = neat && track.before_sample(*neat, 0, j, llama_get_logits_ith(tc.ctx(), -1), &tok);
        if (!neat_token) {
            tok = forcing ? params.forced[static_cast<size_t>(j)] : llama_sampler_sample(sampler.get(), tc.ctx(), -1);
        }
        if (!forcing && model.is_eog(tok)) {
            r.finish_reason = neat_token ? "neat_exit" : "eos";
            r.eog_token = tok;
            break;
        }
        r.tokens.push_back(tok);
        const size_t before = r.text.size();
        const std::string piece = model.token_piece(tok);
        r.text += piece;
        track.line_start = !piece.empty() && piece.back() == '\n';
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
    rec.finish(static_cast<int>(r.tokens.size()));
    r.neat_events = std::move(track.events);
    r.neat_exit_at = track.exit_at;
    if (!params.tap) r.active_counts.clear();
    r.prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    r.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
    return r;
}

}  // namespace neurotap
