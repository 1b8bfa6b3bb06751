#include "runtime/decode_loop.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstring>

#include "base/errors.h"

namespace neurotap {

const char* finish_name(Finish f) {
    switch (f) {
        case Finish::Live: return "";
        case Finish::Eos: return "eos";
        case Finish::Length: return "length";
        case Finish::Stop: return "stop";
        case Finish::Stopped: return "stopped";
        case Finish::Cancelled: return "cancelled";
        case Finish::Exit: return "exit";
    }
    return "";
}

Handoff& Handoff::operator=(Handoff&& o) noexcept {
    if (this != &o) {
        if (sampler) llama_sampler_free(sampler);
        prompt = std::move(o.prompt);
        kv = std::move(o.kv);
        tokens = std::move(o.tokens);
        text = std::move(o.text);
        piece_end = std::move(o.piece_end);
        sampler = o.sampler;
        index = o.index;
        o.sampler = nullptr;
    }
    return *this;
}

Handoff::~Handoff() {
    if (sampler) llama_sampler_free(sampler);
}

void SampleParams::validate() const {
    if (n < 1) throw ParamError("n must be at least 1, got " + std::to_string(n));
    if (max_tokens <= 0) throw ParamError("max_tokens must be positive, got " + std::to_string(max_tokens));
    if (top_logprobs < 0 || top_logprobs > 100)
        throw ParamError("logprobs (top_logprobs) must be in [0, 100], got " + std::to_string(top_logprobs));
    if (kv_tokens < 0 || kv_tokens > max_tokens) throw ParamError("kv_tokens must be in [0, max_tokens]");
    SamplingParams::validate();
    if (!seqs.empty()) {
        if (seqs.size() != static_cast<size_t>(n))
            throw ParamError("seqs names " + std::to_string(seqs.size()) + " slots for n=" + std::to_string(n) + " samples");
        for (size_t i = 0; i < seqs.size(); ++i)
            if (seqs[i] < 0 || (i > 0 && seqs[i] <= seqs[i - 1]))
                throw ParamError("seqs must be increasing, non-negative sequence ids");
    }
    if (!forced_per_sample.empty()) {
        if (!forced.empty()) throw ParamError("give one forced stream for every sample or one per sample, not both");
        if (forced_per_sample.size() != static_cast<size_t>(n))
            throw ParamError("forced streams per sample: " + std::to_string(forced_per_sample.size()) +
                             " streams for n=" + std::to_string(n) + " samples");
    }
    for (int s = 0; s < n; ++s) {
        const std::vector<llama_token>& f = forced_tokens(*this, s);
        if (static_cast<int>(f.size()) > max_tokens)
            throw ParamError("more forced tokens (" + std::to_string(f.size()) + ") than max_tokens (" +
                             std::to_string(max_tokens) + ")");
    }
}

DecodeLoop::DecodeLoop(TappedContext& tc, std::vector<llama_token> prompt, SampleParams params,
                       std::vector<Reducer*> reducers, std::vector<Steering*> methods)
    : tc_(tc), prompt_(std::move(prompt)), params_(std::move(params)), reducers_(std::move(reducers)),
      methods_(std::move(methods)) {
    const ModelInfo& info = tc_.model().info();
    params_.validate();
    if (prompt_.empty()) throw ParamError("the prompt is empty (no tokens)");
    for (llama_token t : prompt_)
        if (t < 0 || t >= info.n_vocab) throw ParamError("prompt token id out of range: " + std::to_string(t));
    if (params_.n > tc_.params().n_seq_max)
        throw ParamError("n=" + std::to_string(params_.n) + " exceeds the context's " +
                         std::to_string(tc_.params().n_seq_max) + " sequences");
    if (params_.seqs.empty())
        for (int s = 0; s < params_.n; ++s) seqs_.push_back(s);
    else
        seqs_.assign(params_.seqs.begin(), params_.seqs.end());
    if (seqs_.back() >= tc_.params().n_seq_max)
        throw ParamError("sequence id " + std::to_string(seqs_.back()) + " is beyond the context's " +
                         std::to_string(tc_.params().n_seq_max) + " sequences");
    if (params_.n > tc_.params().n_batch)
        throw ParamError("n=" + std::to_string(params_.n) + " exceeds the context's batch of " +
                         std::to_string(tc_.params().n_batch));
    bool forcing = false;
    for (int s = 0; s < params_.n; ++s) {
        const std::vector<llama_token>& f = forced_tokens(params_, s);
        forcing = forcing || !f.empty();
        for (llama_token t : f)
            if (t < 0 || t >= info.n_vocab) throw ParamError("forced token id out of range: " + std::to_string(t));
    }
    const Steering* steering = nullptr;  // the one method that may change tokens
    for (const Steering* m : methods_) {
        const std::string name = m->name();
        if (!params_.tap) throw ParamError(name + " watches neurons: it needs the tap on");
        if (!m->steers()) continue;
        if (forcing) throw ParamError(name + " cannot steer teacher-forced tokens (a recording method can watch them)");
        if (steering)
            throw ParamError(std::string(steering->name()) + " and " + name + " cannot steer the same run");
        steering = m;
        if (!m->rolls_back()) continue;
        // Rollbacks change the token stream: every record must be able to follow.
        if (params_.kv_tokens > 0) throw ParamError(name + "'s rollbacks cannot run in an early-stopped race");
        // A rolled-back tail's cells, freed mid-run in one shared stream, would take the other
        // samples' next tokens out of order (see end_sample).
        if (tc_.params().kv_unified && params_.n > 1)
            throw ParamError(name + "'s rollbacks cannot run in samples that share one KV stream (share_prompt): "
                             "sample with per-sequence streams");
        for (Reducer* r : reducers_)
            if (!r->can_roll_back())
                throw ParamError(name + "'s rollbacks cannot be combined with chunked set records "
                                 "(active sets, NAD contributions): record them in a run without corrections");
    }
    for (Steering* m : methods_) reducers_.push_back(m);
    const int64_t np = static_cast<int64_t>(prompt_.size());
    if (tc_.params().kv_unified) {
        // One stream: the prompt's cells are shared, each sample adds its own tokens.
        const int64_t total = tc_.n_ctx();
        const int64_t held = params_.kv_tokens > 0 ? params_.kv_tokens + 1 : params_.max_tokens;
        if (np + int64_t(params_.n) * held > total) {
            const int64_t fit = std::max<int64_t>(0, (total - np) / params_.n);
            throw ContextError("the prompt (" + std::to_string(np) + " tokens) plus " +
                               (params_.n > 1 ? std::to_string(params_.n) + " x " : std::string()) + "max_tokens (" +
                               std::to_string(params_.max_tokens) + ") exceeds the context of " +
                               std::to_string(total) + " tokens; at most " + std::to_string(fit) +
                               " new tokens fit. Load with a larger n_ctx or lower max_tokens.");
        }
    } else {
        const int64_t per_seq = llama_n_ctx_seq(tc_.ctx());
        const int64_t held = params_.kv_tokens > 0 ? params_.kv_tokens + 1 : params_.max_tokens;
        if (np + held > per_seq)
            throw ContextError("n=" + std::to_string(params_.n) + " samples of prompt " + std::to_string(np) +
                               " + max_tokens " + std::to_string(params_.max_tokens) + " tokens need more than the " +
                               std::to_string(per_seq) + " cells per sequence of this context");
    }
    // Reducers first: one may reject the run (WatchReducer), and a throw from here on would leak
    // the samplers (the destructor does not run for a constructor that throws).
    for (Reducer* r : reducers_) {
        r->begin(params_.n, info.n_layers, info.n_ff, params_.max_tokens);
        want_ |= r->tap_request();
    }
    for (int i = 0; i < params_.n; ++i) {
        SamplingParams sp = params_;
        if (params_.seed_per_sample) sp.seed = sample_seed(params_.seed, i);
        samplers_.push_back(nullptr);
        samplers_.back() = make_sampler_chain(sp, tc_.model().vocab());  // validates before anything runs
    }
    samples_.resize(static_cast<size_t>(params_.n));
}

DecodeLoop::~DecodeLoop() {
    for (llama_sampler* s : samplers_)
        if (s) llama_sampler_free(s);
}

int DecodeLoop::n_live() const {
    int c = 0;
    for (const auto& s : samples_) c += s.live;
    return c;
}

void DecodeLoop::on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) {
    // A NaN/inf anywhere (a flipped weight scale, corrupt metadata) is found where it starts: the
    // first layer in graph order whose rows hold one. Reported after the decode (no throwing here).
    if (kind == TapKind::MlpPost) note_finite(layer, data, static_cast<int64_t>(n_rows) * width);
    for (int r = 0; r < n_rows; ++r) {
        const float* a = data + static_cast<int64_t>(r) * width;
        for_targets(row0 + r, [&](int s, int t) {
            for (Reducer* red : reducers_) {
                if (kind == TapKind::MlpPost) red->on_row(s, t, layer, a);
                else if (kind == TapKind::MlpPre) red->on_gate_row(s, t, layer, a);
                else red->on_hidden_row(kind, s, t, layer, a, width);
            }
        });
    }
}

void DecodeLoop::note_finite(int layer, const float* data, int64_t n) {
    if (bad_layer_ >= 0 && layer >= bad_layer_) return;
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(data[i])) {
            bad_layer_ = layer;
            return;
        }
}

// The compact rows go to the reducers that take them (on_moe_row); a row is scattered to full
// width at most once, and only when some reducer declines it. Per row, as the default
// scatter_moe_rows orders them: the route row first, then the activations.
void DecodeLoop::on_moe_rows(const MoeRows& m, unsigned kinds) {
    const MoeLayout& L = *m.layout;
    const int64_t RW = moe_route_width(L);
    // The experts that did not run are zeros, finite: only the computed values are checked.
    note_finite(m.layer, m.act, static_cast<int64_t>(m.n_rows) * L.n_used * L.n_ff_exp);
    if (L.n_ff_shexp > 0) note_finite(m.layer, m.shexp_act, static_cast<int64_t>(m.n_rows) * L.n_ff_shexp);
    thread_local std::vector<float> route, full;  // the decode's thread: no allocation per layer
    route.resize(static_cast<size_t>(RW));
    for (int r = 0; r < m.n_rows; ++r) {
        if (kinds & tap_bit(TapKind::MoeRoute)) {
            moe_route_row(m, r, route.data());
            for_targets(m.row0 + r, [&](int s, int t) {
                for (Reducer* red : reducers_) red->on_hidden_row(TapKind::MoeRoute, s, t, m.layer, route.data(), RW);
            });
        }
        bool scattered = false;
        for_targets(m.row0 + r, [&](int s, int t) {
            for (Reducer* red : reducers_) {
                if (red->on_moe_row(s, t, m, r)) continue;
                if (!scattered) {
                    full.resize(static_cast<size_t>(L.width()));
                    scatter_moe_row(m, r, full.data());
                    scattered = true;
                }
                red->on_row(s, t, m.layer, full.data());
            }
        });
    }
}

void DecodeLoop::record_logprobs(SampleState& st, const float* logits, llama_token chosen) {
    const int V = tc_.model().info().n_vocab;
    const int k = std::min(params_.top_logprobs, V);
    float mx = logits[0];
    for (int i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
    double sum = 0, total = 0;
    int finite = 0;
    for (int i = 0; i < V; ++i) {
        sum += std::exp(static_cast<double>(logits[i] - mx));
        if (std::isfinite(logits[i])) total += logits[i], ++finite;  // NEAT bans set -inf
    }
    const float lse = mx + static_cast<float>(std::log(sum));
    st.mean_logprob.push_back(static_cast<float>(total / std::max(finite, 1)) - lse);
    lp_scratch_.resize(static_cast<size_t>(V));
    for (int i = 0; i < V; ++i) lp_scratch_[i] = {logits[i], i};
    std::partial_sort(lp_scratch_.begin(), lp_scratch_.begin() + k, lp_scratch_.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int i = 0; i < k; ++i) {
        st.top_ids.push_back(lp_scratch_[i].second);
        st.top_logprobs.push_back(lp_scratch_[i].first - lse);
    }
    st.token_logprob.push_back(logits[chosen] - lse);
}

void DecodeLoop::check_finite() const {
    const std::string why = " (the model's weights or metadata hold NaN/inf, or its values overflow): "
                            "this model cannot be generated from";
    if (bad_layer_ >= 0)
        throw RuntimeError("non-finite activations from layer " + std::to_string(bad_layer_) + " (" +
                           tc_.tap().act_name() + "-" + std::to_string(bad_layer_) + ")" + why);
    const int V = tc_.model().info().n_vocab;
    for (int r : row_logits_) {
        const float* logits = llama_get_logits_ith(tc_.ctx(), r);
        for (int i = 0; i < V; ++i)
            if (std::isnan(logits[i]) || logits[i] == INFINITY)  // -inf is a legitimate ban
                throw RuntimeError("non-finite logits" + why);
    }
}

void DecodeLoop::end_sample(int s, Finish why) {
    SampleState& st = samples_[static_cast<size_t>(s)];
    st.live = false;
    st.finish = why;
    // The first sample's cells stay for a later run to reuse when it ended by itself (its slot's
    // record says what they hold); a stopped or cancelled sample's, and the others', are freed.
    const bool natural = why != Finish::Stopped && why != Finish::Cancelled;
    st.cells_to_free = !(params_.reuse_prompt != PromptReuse::Off && s == 0 && natural);
    // In one stream shared by the samples, cells freed mid-run take the next step's tokens, placed
    // before the live samples' earlier cells: flash attention visits a sample's cells in cell order
    // with an f16 accumulator, so its tokens would change with when the others ended. Those cells
    // go when the run ends (the context was sized to hold them all).
    if (!tc_.params().kv_unified || n_live() == 0) free_ended_cells();
    for (Reducer* r : reducers_) r->finish(s, static_cast<int>(st.tokens.size()));
}

void DecodeLoop::free_ended_cells() {
    if (tc_.closed()) return;
    for (size_t s = 0; s < samples_.size(); ++s)
        if (samples_[s].cells_to_free) {
            samples_[s].cells_to_free = false;
            tc_.seq_rm(seqs_[s], 0);
        }
}

void DecodeLoop::sample_and_commit(int s) {
    SampleState& st = samples_[static_cast<size_t>(s)];
    const int j = static_cast<int>(st.tokens.size());
    const std::vector<llama_token>& forced = forced_tokens(params_, s);
    const bool forcing = static_cast<size_t>(j) < forced.size();  // then sampling goes on
    llama_token tok = 0;
    Steering* by = nullptr;  // the method that gave the token
    Pick pick = Pick::Sample;
    if (forcing) {
        tok = forced[static_cast<size_t>(j)];  // no method steers a teacher-forced run
    } else {
        for (Steering* m : methods_)
            if ((pick = m->before_sample(s, j, llama_get_logits_ith(tc_.ctx(), st.logits_row), &tok)) != Pick::Sample) {
                by = m;
                break;
            }
        if (!by) tok = llama_sampler_sample(samplers_[static_cast<size_t>(s)], tc_.ctx(), st.logits_row);
    }
    ++tokens_sampled_;
    if (!forcing && tc_.model().is_eog(tok)) {
        st.eog_token = tok;
        if (pick == Pick::Exit) st.exit_by = by;
        end_sample(s, pick == Pick::Exit ? Finish::Exit : Finish::Eos);
        return;
    }
    if (params_.top_logprobs > 0) record_logprobs(st, llama_get_logits_ith(tc_.ctx(), st.logits_row), tok);
    for (Reducer* r : reducers_) r->commit(s, j, tok);
    st.tokens.push_back(tok);
    const size_t before = st.text.size();
    const std::string piece = tc_.model().token_piece(tok);
    st.text += piece;
    st.piece_end.push_back(static_cast<uint32_t>(st.text.size()));
    const size_t stop_at = forcing ? std::string::npos : find_stop(st.text, before, params_.stop);
    if (stop_at != std::string::npos) {
        st.text.resize(stop_at);
        end_sample(s, Finish::Stop);
        return;
    }
    if (static_cast<int>(st.tokens.size()) == params_.max_tokens) {
        end_sample(s, Finish::Length);
        return;
    }
    const SampleView view{st.tokens, st.text, st.piece_end, piece};
    for (Steering* m : methods_) {
        const Decision d = m->after_commit(s, view, m == by);
        if (d.kind == Decision::End) {
            st.text.resize(std::min(d.text_size, st.text.size()));
            st.exit_by = m;
            end_sample(s, Finish::Exit);
            return;
        }
        if (d.kind == Decision::RollBack) {
            if (d.keep < 0 || d.keep > static_cast<int>(st.tokens.size()))
                throw RuntimeError(std::string(m->name()) + " asked for a rollback outside the sample");
            m->rolled_back(s, roll_back(s, d.keep));
            return;
        }
    }
}

uint32_t DecodeLoop::roll_back(int s, int n) {
    SampleState& st = samples_[static_cast<size_t>(s)];
    st.tokens.resize(static_cast<size_t>(n));
    st.piece_end.resize(static_cast<size_t>(n));
    st.text.resize(n ? st.piece_end.back() : 0);
    if (params_.top_logprobs > 0) {
        const size_t k = static_cast<size_t>(std::min(params_.top_logprobs, tc_.model().info().n_vocab));
        st.token_logprob.resize(static_cast<size_t>(n));
        st.mean_logprob.resize(static_cast<size_t>(n));
        st.top_ids.resize(static_cast<size_t>(n) * k);
        st.top_logprobs.resize(static_cast<size_t>(n) * k);
    }
    // The cells from the position that predicts token n on: the next step decodes it again.
    const int np = static_cast<int>(prompt_.size());
    tc_.seq_rm(seqs_[static_cast<size_t>(s)], np + n - 1);
    for (Reducer* r : reducers_) r->roll_back(s, n);
    // A fresh sampler (its RNG and any penalty history restart) with a seed of its own, recorded:
    // the continuation is the one a fresh run from the kept tokens with that seed draws.
    SamplingParams sp = params_;
    const uint32_t base = params_.seed_per_sample ? sample_seed(params_.seed, s) : params_.seed;
    sp.seed = sample_seed(base, 1 + st.reseeds++);
    llama_sampler* fresh = make_sampler_chain(sp, tc_.model().vocab());
    llama_sampler_free(samplers_[static_cast<size_t>(s)]);
    samplers_[static_cast<size_t>(s)] = fresh;
    return sp.seed;
}

void DecodeLoop::start() {
    const auto t0 = std::chrono::steady_clock::now();
    const PromptSpan p = plan_prompt();
    broadcast_ = true;
    const int last = tc_.decode_seq(p.tokens, p.n, p.pos0, p.seq, params_.tap ? this : nullptr);
    broadcast_ = false;
    finish_prompt(last, t0);
}

PromptSpan DecodeLoop::plan_prompt() {
    started_ = true;
    const int np = static_cast<int>(prompt_.size());
    const llama_seq_id base = seqs_[0];
    // The longest prefix of the prompt whose cells the first slot holds already and may keep
    // (TappedContext::reusable_prefix: in Exact mode those that decoding the prompt would compute
    // the same), never its last token (its row is tapped and its logits are sampled). The rest is
    // decoded from there in one decode_seq, the last token in the last batch with the rows before
    // it (no llama_decode of its own); in Exact mode the cells, and so the tokens, are those of a
    // run without reuse.
    const int keep = tc_.reusable_prefix(base, prompt_, params_.reuse_prompt);
    for (size_t s = 1; s < seqs_.size(); ++s) tc_.seq_rm(seqs_[s], 0);
    tc_.seq_rm(base, keep);
    tc_.count_reused(keep);
    n_reused_ = keep;
    bad_layer_ = -1;
    return PromptSpan{prompt_.data() + keep, np - keep, keep, base};
}

void DecodeLoop::finish_prompt(int last, std::chrono::steady_clock::time_point t0) {
    const llama_seq_id base = seqs_[0];
    row_logits_.assign(1, last);  // the prompt's last row
    check_finite();
    for (int s = 1; s < params_.n; ++s)
        if (samples_[static_cast<size_t>(s)].live) tc_.seq_cp(base, seqs_[static_cast<size_t>(s)]);
    if (!samples_[0].live) tc_.seq_rm(base, 0);  // stopped before the start
    prompt_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int s = 0; s < params_.n; ++s) {
        if (!samples_[static_cast<size_t>(s)].live) continue;  // stopped before the start
        samples_[static_cast<size_t>(s)].logits_row = last;
        sample_and_commit(s);
    }
    for (Reducer* r : reducers_) r->end_step();
}

PromptSpan DecodeLoop::begin_prompt() {
    if (started_) throw ParamError("begin_prompt: the run was started already");
    if (!failed_.empty()) throw RuntimeError("this run failed earlier and cannot go on: " + failed_);
    if (params_.tap) throw ParamError("begin_prompt: a tapped run decodes its prompt itself (begin)");
    try {
        return plan_prompt();
    } catch (const std::exception& e) {
        failed_ = e.what();
        throw;
    }
}

void DecodeLoop::end_prompt(int last_row, std::chrono::steady_clock::time_point t0) {
    try {
        finish_prompt(last_row, t0);
    } catch (const std::exception& e) {
        failed_ = e.what();
        throw;
    }
}

bool DecodeLoop::begin() {
    if (started_) return false;
    if (!failed_.empty()) throw RuntimeError("this run failed earlier and cannot go on: " + failed_);
    try {
        start();
    } catch (const std::exception& e) {
        failed_ = e.what();
        throw;
    }
    return true;
}

int DecodeLoop::plan(int until, std::vector<llama_token>& tokens, std::vector<int>& pos,
                     std::vector<llama_seq_id>& seqs) {
    if (!failed_.empty()) throw RuntimeError("this run failed earlier and cannot go on: " + failed_);
    row_sample_.clear();
    row_token_.clear();
    row_logits_.clear();
    bad_layer_ = -1;
    const int np = static_cast<int>(prompt_.size());
    until = std::min(until, params_.max_tokens);
    // Increasing sequence ids: llama.cpp keeps batch order within and across ubatches.
    for (int s = 0; s < params_.n; ++s) {
        SampleState& st = samples_[static_cast<size_t>(s)];
        const int j = static_cast<int>(st.tokens.size());
        if (!st.live || j >= until) continue;
        st.logits_row = static_cast<int>(tokens.size());
        row_logits_.push_back(st.logits_row);
        // After a rollback to the start, the prompt's last token predicts the first one again.
        tokens.push_back(j > 0 ? st.tokens.back() : prompt_.back());
        pos.push_back(np + j - 1);
        seqs.push_back(seqs_[static_cast<size_t>(s)]);
        row_sample_.push_back(s);
        row_token_.push_back(j);  // this position predicts token j
    }
    return static_cast<int>(row_sample_.size());
}

int DecodeLoop::pending(int until) const {
    until = std::min(until, params_.max_tokens);
    int c = 0;
    for (const SampleState& st : samples_) c += st.live && static_cast<int>(st.tokens.size()) < until;
    return c;
}

void DecodeLoop::place(int local, int batch_row) {
    row_logits_.at(static_cast<size_t>(local)) = batch_row;
    samples_[static_cast<size_t>(row_sample_.at(static_cast<size_t>(local)))].logits_row = batch_row;
}

void DecodeLoop::sync() {
    for (Reducer* r : reducers_) r->sync();
}

void DecodeLoop::untap() {
    if (!methods_.empty()) throw ParamError(std::string(methods_[0]->name()) + " steers this run: it cannot go on untapped");
    for (Reducer* r : reducers_) {
        for (int s = 0; s < params_.n; ++s) {
            const SampleState& st = samples_[static_cast<size_t>(s)];
            if (st.live) r->finish(s, static_cast<int>(st.tokens.size()));
        }
        r->sync();
    }
    reducers_.clear();
    params_.tap = false;
}

void DecodeLoop::commit(double seconds) {
    if (row_sample_.empty()) return;
    try {
        check_finite();
        ++steps_;
        const auto t0 = std::chrono::steady_clock::now();
        for (int s : row_sample_) sample_and_commit(s);
        for (Reducer* r : reducers_) r->end_step();
        sample_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } catch (const std::exception& e) {
        failed_ = e.what();
        throw;
    }
    decode_seconds_ += seconds;
    row_sample_.clear();
}

void DecodeLoop::step() {
    b_tokens_.clear();
    b_pos_.clear();
    b_seqs_.clear();
    if (plan(params_.max_tokens, b_tokens_, b_pos_, b_seqs_) == 0) return;
    tc_.decode_rows(b_tokens_.data(), b_pos_.data(), b_seqs_.data(), static_cast<int>(b_tokens_.size()),
                    params_.tap ? this : nullptr);
    commit(0);
}

int DecodeLoop::advance(int until, Progress* progress) {
    using clock = std::chrono::steady_clock;
    if (until <= 0) throw ParamError("advance: the token target must be positive");
    if (!failed_.empty()) throw RuntimeError("this run failed earlier and cannot go on: " + failed_);
    until = std::min(until, params_.max_tokens);
    if (params_.kv_tokens > 0 && until > params_.kv_tokens)
        throw ParamError("this run holds KV cells for " + std::to_string(params_.kv_tokens) +
                         " tokens per sample: hand a sample off to continue it further");
    if (n_live() == 0) return 0;  // ended: nothing decodes (the context may belong to another run now)
    auto in_use = tc_.lock_use();  // Model::close waits for this advance
    tc_.ctx();                     // closed: RuntimeError
    auto t0 = clock::now();
    try {
        if (!started_) {
            start();  // its time is prompt_seconds, not decode time
            if (progress) progress->tokens.store(tokens_sampled_, std::memory_order_relaxed);
            t0 = clock::now();
        }
        for (;;) {
            bool more = false;
            for (const auto& st : samples_)
                if (st.live && static_cast<int>(st.tokens.size()) < until) more = true;
            if (!more) break;
            if (progress && progress->stop_requested()) break;
            step();
            if (progress) {
                progress->tokens.store(tokens_sampled_, std::memory_order_relaxed);
                progress->live.store(n_live(), std::memory_order_relaxed);
            }
        }
        for (Reducer* r : reducers_) r->sync();
    } catch (const std::exception& e) {
        failed_ = e.what();
        throw;
    }
    decode_seconds_ += std::chrono::duration<double>(clock::now() - t0).count();
    return n_live();
}

// A sequence's KV state as the pinned llama.cpp writes it (llama_state_seq_get_data): an 8-byte
// header (a tag, then the sequence id), the stream count, then per stream a cell count and, when
// non-zero, that stream's cells. A per-sequence-stream cache writes one stream per sequence, all
// empty but the sequence's own; a context with one stream reads only one. This keeps that stream
// (and names sequence 0), after checking the layout is the one expected.
static std::vector<uint8_t> single_stream_state(const std::vector<uint8_t>& state, uint32_t seq) {
    auto u32 = [&](size_t at) {
        if (at + 4 > state.size()) throw RuntimeError("KV state shorter than its header");
        uint32_t v;
        std::memcpy(&v, state.data() + at, 4);
        return v;
    };
    constexpr size_t kHeader = 8;
    if (u32(4) != seq) throw RuntimeError("KV state of another layout (its header does not name the sequence)");
    const uint32_t n_stream = u32(kHeader);
    if (seq >= n_stream) throw RuntimeError("KV state of another layout (no stream " + std::to_string(seq) + ")");
    const size_t before = kHeader + 4 + 4 * size_t{seq}, after = 4 * size_t{n_stream - seq - 1};
    if (state.size() < before + 4 + after) throw RuntimeError("KV state shorter than its streams");
    for (uint32_t k = 0; k < seq; ++k)
        if (u32(kHeader + 4 + 4 * size_t{k}) != 0) throw RuntimeError("KV state of another layout (another stream is not empty)");
    for (size_t k = 0; k < after / 4; ++k)
        if (u32(state.size() - 4 * (k + 1)) != 0) throw RuntimeError("KV state of another layout (a later stream is not empty)");
    std::vector<uint8_t> out(state.begin(), state.begin() + kHeader + 4);
    const uint32_t zero = 0, one = 1;
    std::memcpy(out.data() + 4, &zero, 4);        // now the state of sequence 0
    std::memcpy(out.data() + kHeader, &one, 4);   // of a one-stream cache
    out.insert(out.end(), state.begin() + static_cast<std::ptrdiff_t>(before), state.end() - static_cast<std::ptrdiff_t>(after));
    return out;
}

Handoff DecodeLoop::hand_off(int s) {
    if (s < 0 || s >= params_.n) throw ParamError("sample index out of range: " + std::to_string(s));
    SampleState& st = samples_[static_cast<size_t>(s)];
    if (!st.live || !started_) throw ParamError("only a live sample of a started run can be handed off");
    if (!params_.forced.empty() || !params_.forced_per_sample.empty())
        throw ParamError("a teacher-forced run cannot hand off");
    if (!methods_.empty()) throw ParamError(std::string("a run ") + methods_[0]->name() + " watches cannot hand off");
    auto in_use = tc_.lock_use();
    Handoff h;
    const llama_seq_id slot = seqs_[static_cast<size_t>(s)];
    const size_t size = llama_state_seq_get_size(tc_.ctx(), slot);
    h.kv.resize(size);
    if (llama_state_seq_get_data(tc_.ctx(), h.kv.data(), size, slot) != size)
        throw RuntimeError("could not read the KV state of sample " + std::to_string(s));
    // Per-sequence streams: sequence s lives in stream s (one stream: nothing to cut).
    if (!tc_.params().kv_unified) h.kv = single_stream_state(h.kv, static_cast<uint32_t>(slot));
    h.prompt = prompt_;
    h.tokens = st.tokens;
    h.text = st.text;
    h.piece_end = st.piece_end;
    h.index = s;
    std::swap(h.sampler, samplers_[static_cast<size_t>(s)]);  // its RNG goes on where it stands
    samplers_[static_cast<size_t>(s)] = make_sampler_chain(params_, tc_.model().vocab());
    in_use.unlock();
    end_sample(s, Finish::Stopped);
    return h;
}

DecodeLoop::DecodeLoop(TappedContext& tc, Handoff&& from, SampleParams params, std::vector<Reducer*> reducers)
    : DecodeLoop(tc, from.prompt, [&] {
          params.n = 1;
          params.kv_tokens = 0;
          params.seqs.clear();  // the handed-off state goes into sequence 0
          return params;
      }(), std::move(reducers)) {
    if (!from.sampler) throw ParamError("the handoff was used already");
    // What was decided on is recorded in the race; the winner's tail costs only its decoding.
    if (!reducers_.empty() || params_.tap) throw ParamError("a handed-off sample continues with the tap off");
    if (static_cast<int>(from.tokens.size()) >= params_.max_tokens)
        throw ParamError("the handed-off sample already holds max_tokens tokens");
    tc_.clear();
    if (llama_state_seq_set_data(tc_.ctx(), from.kv.data(), from.kv.size(), 0) == 0)
        throw RuntimeError("could not restore the handed-off KV state (another model or context layout?)");
    tc_.set_seq_tokens(0, from.prompt);  // what is surely there: the prompt (its tokens' cells follow)
    llama_sampler_free(samplers_[0]);  // the fresh chain of the delegated constructor: the sample's own goes on
    samplers_[0] = from.sampler;
    from.sampler = nullptr;            // a handoff is used once
    SampleState& st = samples_[0];
    st.tokens = from.tokens;
    st.text = from.text;
    st.piece_end = from.piece_end;
    st.logits_row = 0;
    started_ = true;  // the prompt and the tokens so far are in the cells; the next step decodes the last token
}

void DecodeLoop::stop(const std::vector<int>& which) {
    for (int s : which) {
        if (s < 0 || s >= params_.n) throw ParamError("sample index out of range: " + std::to_string(s));
        if (samples_[static_cast<size_t>(s)].live) end_sample(s, Finish::Stopped);
    }
}

void DecodeLoop::finish_live(Finish why) {
    for (int s = 0; s < params_.n; ++s)
        if (samples_[static_cast<size_t>(s)].live) end_sample(s, why);
}

}  // namespace neurotap
