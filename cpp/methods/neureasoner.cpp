#include "methods/neureasoner.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <cstring>

#include "base/errors.h"
#include "base/gguf_file.h"
#include "kernels/kernels.h"
#include "runtime/model.h"
#include "weights/mapped_weights.h"

namespace neurotap {

SpectralWindow::SpectralWindow(int window) : w_(window) {
    if (window < 4 || window > 512) throw ParamError("NeuReasoner window must be in [4, 512] tokens, got " + std::to_string(window));
    const int K = w_ / 2;
    cos_.resize(static_cast<size_t>(K + 1) * w_);
    sin_.resize(cos_.size());
    const double two_pi = 6.283185307179586476925286766559;
    for (int k = 1; k <= K; ++k)
        for (int t = 0; t < w_; ++t) {
            // (k * t) mod W keeps the angle exact for long windows
            const double ang = two_pi * static_cast<double>((static_cast<int64_t>(k) * t) % w_) / w_;
            cos_[static_cast<size_t>(k) * w_ + t] = std::cos(ang);
            sin_[static_cast<size_t>(k) * w_ + t] = std::sin(ang);
        }
}

void SpectralWindow::features(const float* x, float* out) const {
    const int W = w_, K = w_ / 2;
    double mean = 0;
    for (int t = 0; t < W; ++t) mean += x[t];
    mean /= W;
    double var = 0, tv = 0;
    for (int t = 0; t < W; ++t) {
        const double d = x[t] - mean;
        var += d * d;
        if (t) {
            const double g = static_cast<double>(x[t]) - x[t - 1];
            tv += g * g;
        }
    }
    for (int f = 0; f < kNumSpectral; ++f) out[f] = 0.0f;
    if (!(var > 1e-30) || !std::isfinite(var)) return;  // a flat window has no spectrum
    double power[257];
    double total = 0, top = 0;
    for (int k = 1; k <= K; ++k) {
        double re = 0, im = 0;
        const double* c = cos_.data() + static_cast<size_t>(k) * W;
        const double* s = sin_.data() + static_cast<size_t>(k) * W;
        for (int t = 0; t < W; ++t) {
            const double d = x[t] - mean;
            re += d * c[t];
            im -= d * s[t];
        }
        power[k] = re * re + im * im;
        total += power[k];
        top = std::max(top, power[k]);
    }
    if (!(total > 0)) return;
    const int low = std::max(1, W / 8), high = W / 4;
    double lo = 0, hi = 0, ent = 0;
    for (int k = 1; k <= K; ++k) {
        if (k <= low) lo += power[k];
        if (k > high) hi += power[k];
        const double p = power[k] / total;
        if (p > 0) ent -= p * std::log(p);
    }
    out[kHighRatio] = static_cast<float>(hi / total);
    out[kLowRatio] = static_cast<float>(lo / total);
    out[kDominantRatio] = static_cast<float>(top / total);
    out[kEntropy] = static_cast<float>(K > 1 ? ent / std::log(static_cast<double>(K)) : 0.0);
    out[kTvEnergy] = static_cast<float>(tv / var);  // var here is the sum: W * variance
}

void Mlp::validate() const {
    const size_t n = mean.size();
    if (n == 0 || scale.size() != n) throw ParamError("NeuReasoner MLP: the scaler's mean and scale must have one value per input");
    for (float s : scale)
        if (!(s > 0) || !std::isfinite(s)) throw ParamError("NeuReasoner MLP: the scaler's scale must be positive and finite");
    if (weights.empty() || weights.size() != biases.size()) throw ParamError("NeuReasoner MLP: weights and biases per layer");
    size_t in = n;
    for (size_t l = 0; l < weights.size(); ++l) {
        const size_t out = biases[l].size();
        if (out == 0 || weights[l].size() != in * out)
            throw ParamError("NeuReasoner MLP: layer " + std::to_string(l) + " is " + std::to_string(weights[l].size()) +
                             " weights, expected " + std::to_string(in) + " x " + std::to_string(out));
        for (float v : weights[l])
            if (!std::isfinite(v)) throw ParamError("NeuReasoner MLP: non-finite weights");
        for (float v : biases[l])
            if (!std::isfinite(v)) throw ParamError("NeuReasoner MLP: non-finite biases");
        in = out;
    }
    if (in != 1) throw ParamError("NeuReasoner MLP: the last layer must have one output (a binary classifier)");
}

float Mlp::probability(const float* x) const {
    thread_local std::vector<double> a, b;
    a.assign(mean.size(), 0.0);
    for (size_t i = 0; i < mean.size(); ++i) a[i] = (static_cast<double>(x[i]) - mean[i]) / scale[i];
    for (size_t l = 0; l < weights.size(); ++l) {
        const size_t in = a.size(), out = biases[l].size();
        b.assign(biases[l].begin(), biases[l].end());
        for (size_t i = 0; i < in; ++i) {
            const float* w = weights[l].data() + i * out;
            for (size_t j = 0; j < out; ++j) b[j] += a[i] * w[j];
        }
        if (l + 1 < weights.size())
            for (double& v : b) v = std::max(v, 0.0);  // ReLU
        std::swap(a, b);
    }
    const double z = a[0];
    return static_cast<float>(z >= 0 ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z) / (1.0 + std::exp(z)));
}

NeuReasonerMonitor::NeuReasonerMonitor(NeuReasonerConfig config, const Model& model)
    : c_(std::move(config)), spec_(c_.window) {
    const ModelInfo& mi = model.info();
    n_ff_ = static_cast<int>(mi.n_ff);
    n_head_ = mi.n_head;
    head_dim_ = static_cast<int>(mi.head_dim_v > 0 ? mi.head_dim_v : (mi.n_head ? mi.n_embd / mi.n_head : 0));
    n_embd_ = static_cast<int>(mi.n_embd);
    if (c_.layer < 0 || c_.layer >= mi.n_layers)
        throw ParamError("NeuReasoner layer " + std::to_string(c_.layer) + " is outside this model's " +
                         std::to_string(mi.n_layers) + " layers");
    if (static_cast<int>(c_.levels.size()) != kNrLevels)
        throw ParamError("NeuReasoner needs exactly 3 levels (intra-step, inter-step, instance)");
    if (c_.max_retries < 0 || c_.max_actions < 0 || c_.cooldown < 0)
        throw ParamError("NeuReasoner max_retries, max_actions and cooldown must be >= 0");
    std::vector<char> want(static_cast<size_t>(n_components()), c_.record ? 1 : 0);
    for (int l = 0; l < kNrLevels; ++l) {
        const NrLevelConfig& lv = c_.levels[static_cast<size_t>(l)];
        if (!lv.enabled) continue;
        if (lv.components.empty()) throw ParamError("NeuReasoner level " + std::to_string(l) + " has no components");
        for (int i : lv.components) {
            if (i < 0 || i >= n_components())
                throw ParamError("NeuReasoner component " + std::to_string(i) + " is outside this model's " +
                                 std::to_string(n_ff_) + " neurons + " + std::to_string(n_head_) + " heads");
            want[static_cast<size_t>(i)] = 1;
        }
        if (lv.features.empty()) throw ParamError("NeuReasoner level " + std::to_string(l) + " reads no features");
        for (int f : lv.features)
            if (f < 0 || f >= kNumSpectral) throw ParamError("NeuReasoner feature index out of range: " + std::to_string(f));
        lv.mlp.validate();
        if (lv.mlp.n_inputs() != static_cast<int>(lv.features.size()))
            throw ParamError("NeuReasoner level " + std::to_string(l) + ": the MLP reads " +
                             std::to_string(lv.mlp.n_inputs()) + " inputs, the level gives " +
                             std::to_string(lv.features.size()) + " features");
        if (lv.action < kNrNone || lv.action > kNrExit) throw ParamError("NeuReasoner action must be 0..3");
        if (!(lv.threshold >= 0.0f && lv.threshold <= 1.0f)) throw ParamError("NeuReasoner threshold must be in [0, 1]");
        if (lv.action == kNrExit && c_.exit_tokens.empty()) throw ParamError("NeuReasoner exit action needs exit tokens");
        if (lv.action == kNrRedirect && c_.redirect_tokens.empty())
            throw ParamError("NeuReasoner redirect action needs redirect tokens");
    }
    for (llama_token t : c_.exit_tokens)
        if (t < 0 || t >= mi.n_vocab) throw ParamError("NeuReasoner exit token id out of range");
    for (llama_token t : c_.redirect_tokens)
        if (t < 0 || t >= mi.n_vocab) throw ParamError("NeuReasoner redirect token id out of range");
    for (int i = 0; i < n_components(); ++i)
        if (want[static_cast<size_t>(i)]) watched_.push_back(i);
    heads_ = !watched_.empty() && watched_.back() >= n_ff_;
    if (heads_ && (head_dim_ <= 0 || int64_t{n_head_} * head_dim_ <= 0))
        throw ParamError("NeuReasoner: this model's attention head sizes are unknown");

    model.check_file_unchanged();
    w_ = model.contribution_weights();  // the unembedding and W_down, mapped from the file
    const bool all_neurons = c_.record;
    if (!all_neurons) {
        // Only the watched neurons' columns, in float32: K x n_embd.
        std::vector<float> row(static_cast<size_t>(n_ff_));
        size_t k = 0;
        for (int i : watched_) k += i < n_ff_;
        cols_.assign(k * n_embd_, 0.0f);
        for (int e = 0; e < n_embd_; ++e) {
            w_->down_row(c_.layer, e, row.data());
            size_t q = 0;
            for (int i : watched_)
                if (i < n_ff_) cols_[q++ * n_embd_ + e] = row[static_cast<size_t>(i)];
        }
    }
    if (heads_) {
        // W_O of this layer ({n_head * head_dim, n_embd} in the file: row e holds every head's
        // weights to output dimension e), transposed so that a head's slice is contiguous rows.
        const GgufFile file(mi.path);
        const std::string name = "blk." + std::to_string(c_.layer) + ".attn_output.weight";
        const TensorInfo* ti = file.find_tensor(name);
        const int64_t hd = int64_t{n_head_} * head_dim_;
        if (!ti || ti->ne[0] != hd || ti->ne[1] != n_embd_)
            throw ParamError("NeuReasoner watches attention heads, but " + name +
                             (ti ? " has an unexpected shape" : " is not in the file"));
        const std::vector<float> wo = file.read_rows(name, 0, n_embd_);
        wo_.assign(static_cast<size_t>(hd) * n_embd_, 0.0f);
        for (int64_t e = 0; e < n_embd_; ++e)
            for (int64_t k = 0; k < hd; ++k) wo_[static_cast<size_t>(k * n_embd_ + e)] = wo[static_cast<size_t>(e * hd + k)];
    }
}

bool NeuReasonerMonitor::acts() const {
    for (const auto& lv : c_.levels)
        if (lv.enabled && lv.action != kNrNone) return true;
    return false;
}

TapRequest NeuReasonerMonitor::tap_request() const {
    return heads_ ? TapRequest{tap_bit(TapKind::AttnZ), c_.layer} : TapRequest{};
}

void NeuReasonerMonitor::begin(int n_samples, int, int64_t n_ff, int) {
    if (n_ff != n_ff_) throw ParamError("NeuReasoner monitor built for another model shape");
    cur_a_.assign(static_cast<size_t>(n_samples), std::vector<float>(static_cast<size_t>(n_ff_), 0.0f));
    cur_z_.assign(static_cast<size_t>(n_samples),
                  std::vector<float>(heads_ ? static_cast<size_t>(n_head_) * head_dim_ : 0, 0.0f));
    sig_.assign(static_cast<size_t>(n_samples), {});
    prob_.assign(static_cast<size_t>(n_samples), {});
    rec_.assign(static_cast<size_t>(n_samples), {});
    u_.resize(static_cast<size_t>(n_embd_));
    proj_.resize(static_cast<size_t>(std::max(n_ff_, heads_ ? n_head_ * head_dim_ : 0)));
    contrib_.resize(static_cast<size_t>(n_components()));
    scratch_.resize(ContributionWeights::kProjectScratch);
    window_.resize(static_cast<size_t>(c_.window));
    feats_.resize(kNumSpectral);
    in_.resize(kNumSpectral);
    track_.assign(static_cast<size_t>(n_samples), Track{});
}

void NeuReasonerMonitor::on_row(int sample, int, int layer, const float* a) {
    if (layer == c_.layer) std::copy_n(a, n_ff_, cur_a_[static_cast<size_t>(sample)].data());
}

void NeuReasonerMonitor::on_hidden_row(TapKind kind, int sample, int, int layer, const float* h, int64_t width) {
    auto& z = cur_z_[static_cast<size_t>(sample)];
    if (kind == TapKind::AttnZ && layer == c_.layer && width == static_cast<int64_t>(z.size()))
        std::copy_n(h, z.size(), z.data());
}

void NeuReasonerMonitor::commit(int sample, int token, int32_t token_id) {
    const auto si = static_cast<size_t>(sample);
    const std::vector<float>& a = cur_a_[si];
    w_->unembed_row(token_id, u_.data());
    // Contributions of the watched components to this token's logit.
    if (c_.record) {
        w_->project(c_.layer, u_.data(), 1, 0, n_ff_, proj_.data(), n_ff_, scratch_.data());
        for (int i = 0; i < n_ff_; ++i) contrib_[static_cast<size_t>(i)] = a[static_cast<size_t>(i)] * proj_[static_cast<size_t>(i)];
    } else {
        const DotsFn dot = dots_kernel();
        size_t q = 0;
        for (int i : watched_) {
            if (i >= n_ff_) break;
            float d;
            dot(cols_.data() + q++ * n_embd_, u_.data(), 1, n_embd_, &d);
            contrib_[static_cast<size_t>(i)] = a[static_cast<size_t>(i)] * d;
        }
    }
    if (heads_) {
        const DotsFn dot = dots_kernel();
        const std::vector<float>& z = cur_z_[si];
        for (int i : watched_) {
            if (i < n_ff_) continue;
            const int h = i - n_ff_;
            double s = 0;
            for (int k = 0; k < head_dim_; ++k) {
                float d;
                dot(wo_.data() + static_cast<size_t>(h * head_dim_ + k) * n_embd_, u_.data(), 1, n_embd_, &d);
                s += static_cast<double>(z[static_cast<size_t>(h * head_dim_ + k)]) * d;
            }
            contrib_[static_cast<size_t>(i)] = static_cast<float>(s);
        }
    }
    if (c_.record) {
        auto& r = rec_[si];
        r.resize(static_cast<size_t>(token) * n_components());
        r.insert(r.end(), contrib_.begin(), contrib_.end());
    }
    auto& sig = sig_[si];
    auto& prob = prob_[si];
    sig.resize(static_cast<size_t>(token) * kNrLevels);
    prob.resize(static_cast<size_t>(token) * kNrLevels);
    const int n = token + 1;
    for (int l = 0; l < kNrLevels; ++l) {
        const NrLevelConfig& lv = c_.levels[static_cast<size_t>(l)];
        double s = 0;
        if (lv.enabled)
            for (int i : lv.components) s += contrib_[static_cast<size_t>(i)];
        sig.push_back(static_cast<float>(s));
    }
    for (int l = 0; l < kNrLevels; ++l) {
        const NrLevelConfig& lv = c_.levels[static_cast<size_t>(l)];
        float p = std::numeric_limits<float>::quiet_NaN();
        if (lv.enabled && n >= c_.window) {
            for (int t = 0; t < c_.window; ++t)
                window_[static_cast<size_t>(t)] = sig[static_cast<size_t>(n - c_.window + t) * kNrLevels + l];
            spec_.features(window_.data(), feats_.data());
            for (size_t f = 0; f < lv.features.size(); ++f) in_[f] = feats_[static_cast<size_t>(lv.features[f])];
            p = lv.mlp.probability(in_.data());
        }
        prob.push_back(p);
    }
}

bool NeuReasonerMonitor::detected(int sample, int level, float* p) const {
    const auto& prob = prob_[static_cast<size_t>(sample)];
    if (prob.size() < kNrLevels || level < 0 || level >= kNrLevels) return false;
    const float q = prob[prob.size() - kNrLevels + static_cast<size_t>(level)];
    const NrLevelConfig& lv = c_.levels[static_cast<size_t>(level)];
    *p = q;
    return lv.enabled && q >= lv.threshold;  // NaN (window not full) never detects
}

void NeuReasonerMonitor::roll_back(int sample, int n_tokens) {
    const auto si = static_cast<size_t>(sample);
    const size_t n = static_cast<size_t>(n_tokens);
    if (sig_[si].size() > n * kNrLevels) sig_[si].resize(n * kNrLevels);
    if (prob_[si].size() > n * kNrLevels) prob_[si].resize(n * kNrLevels);
    if (rec_[si].size() > n * n_components()) rec_[si].resize(n * n_components());
}

void NeuReasonerMonitor::finish(int sample, int n_tokens) { roll_back(sample, n_tokens); }

Pick NeuReasonerMonitor::before_sample(int sample, int, float*, llama_token* token) {
    Track& t = track_[static_cast<size_t>(sample)];
    if (t.queued >= t.queue.size()) return Pick::Sample;
    *token = t.queue[t.queued++];  // an exit or a redirect being written
    return t.exiting ? Pick::Exit : Pick::Forced;
}

Decision NeuReasonerMonitor::after_commit(int sample, const SampleView& v, bool mine) {
    Track& t = track_[static_cast<size_t>(sample)];
    if (mine && t.exiting && t.queued == t.queue.size()) t.answer_from = v.text.size();
    if (t.exiting && !mine && c_.exit_line && v.piece.find('\n') != std::string::npos) {
        // The answer line after the exit is written: the sample ends with it (the newline dropped).
        const size_t cut = v.text.size() - (v.piece.size() - v.piece.find('\n'));
        bool written = false;
        for (size_t i = t.answer_from; i < cut; ++i) written |= !std::isspace(static_cast<unsigned char>(v.text[i]));
        if (written) return {Decision::End, 0, cut};
    }
    if (t.queued == t.queue.size() && !t.exiting) return act(sample, v);
    return {};
}

Decision NeuReasonerMonitor::act(int s, const SampleView& v) {
    Track& nr = track_[static_cast<size_t>(s)];
    const int n = static_cast<int>(v.tokens.size());
    if (n < nr.next_check) return {};
    // Detect-only levels are recorded; the first acting level that detects (instance, inter-step,
    // intra-step) acts. A detect-only level never masks an acting one.
    int level = -1;
    float p = 0;
    for (int l : {kNrInstance, kNrInter, kNrIntra}) {
        float q = 0;
        if (!detected(s, l, &q)) continue;
        if (c_.levels[static_cast<size_t>(l)].action == kNrNone) nr.events.push_back({n, l, kNrNone, q, -1, 0});
        else if (level < 0) level = l, p = q;
    }
    if (level < 0) return {};
    const int action = c_.levels[static_cast<size_t>(level)].action;
    NrEvent ev{n, level, action, p, -1, 0};
    if (nr.actions >= c_.max_actions) {
        ev.action = kNrNone;
        nr.events.push_back(ev);
        nr.next_check = n + std::max(1, c_.cooldown);
        return {};
    }
    if (action == kNrExit) {
        nr.queue = c_.exit_tokens;
        nr.queued = 0;
        nr.exiting = true;
        nr.exit_at = n;
        ++nr.actions;
        nr.events.push_back(ev);
        return {};
    }
    // The current step: the tokens since the last line break before the newest token.
    int r = 0;
    for (int k = n - 1; k >= 1; --k) {
        const uint32_t a = k >= 2 ? v.piece_end[static_cast<size_t>(k - 2)] : 0, b = v.piece_end[static_cast<size_t>(k - 1)];
        if (b > a && std::memchr(v.text.data() + a, '\n', b - a)) {
            r = k;
            break;
        }
    }
    if (action == kNrResample) {
        if (nr.retry_step != r) nr.retry_step = r, nr.retries = 0;
        if (nr.retries >= c_.max_retries) {  // this step was resampled enough: let it stand
            ev.action = kNrNone;
            nr.events.push_back(ev);
            nr.next_check = n + std::max(1, c_.cooldown);
            return {};
        }
        ++nr.retries;
    }
    ev.rollback_to = r;  // its seed comes with rolled_back
    ++nr.actions;
    nr.events.push_back(ev);
    nr.next_check = r + c_.cooldown;
    if (action == kNrRedirect) {
        nr.queue = c_.redirect_tokens;
        nr.queued = 0;
        nr.next_check += static_cast<int>(c_.redirect_tokens.size());
    }
    return {Decision::RollBack, r, 0};
}

void NeuReasonerMonitor::rolled_back(int sample, uint32_t seed) {
    track_[static_cast<size_t>(sample)].events.back().seed = seed;
}

}  // namespace neurotap
