#include "methods/neat.h"

#include <cmath>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <string>

#include "base/errors.h"
#include "kernels/kernels.h"
#include "weights/mapped_weights.h"

#include <algorithm>
#include <limits>

namespace neurotap {

NeatMonitor::NeatMonitor(NeatConfig config, int n_layers, int64_t n_ff, int n_vocab) : c_(std::move(config)) {
    if (c_.neurons.empty()) throw ParamError("NEAT needs at least one watched neuron");
    if (c_.reference.size() != c_.neurons.size())
        throw ParamError("NEAT reference has " + std::to_string(c_.reference.size()) + " values for " +
                         std::to_string(c_.neurons.size()) + " neurons");
    by_layer_.assign(n_layers, {});
    double rn = 0;
    for (size_t k = 0; k < c_.neurons.size(); ++k) {
        const auto [layer, idx] = c_.neurons[k];
        if (layer < 0 || layer >= n_layers || idx < 0 || idx >= n_ff)
            throw ParamError("NEAT neuron (" + std::to_string(layer) + ", " + std::to_string(idx) +
                             ") is outside this model's " + std::to_string(n_layers) + " layers x " +
                             std::to_string(n_ff) + " neurons");
        if (!std::isfinite(c_.reference[k])) throw ParamError("NEAT reference holds a non-finite value");
        by_layer_[layer].push_back({static_cast<int>(k), idx});
        rn += double(c_.reference[k]) * c_.reference[k];
    }
    ref_norm_ = static_cast<float>(std::sqrt(rn));
    if (!(ref_norm_ > 0)) throw ParamError("NEAT reference pattern is all zeros");
    for (float t : {c_.exit_similarity, c_.ban_similarity, c_.magnitude})
        if (!std::isfinite(t)) throw ParamError("NEAT thresholds must be finite");
    for (const auto* v : {&c_.ban_tokens, &c_.exit_tokens})
        for (llama_token t : *v)
            if (t < 0 || t >= n_vocab) throw ParamError("NEAT token id out of range: " + std::to_string(t));
}

void NeatMonitor::begin(int n_samples, int n_layers, int64_t, int) {
    if (n_layers != static_cast<int>(by_layer_.size())) throw ParamError("NEAT monitor built for another model");
    cur_.assign(n_samples, std::vector<float>(c_.neurons.size(), 0.0f));
    track_.assign(static_cast<size_t>(n_samples), Track{});
}

Pick NeatMonitor::before_sample(int sample, int j, float* logits, llama_token* token) {
    Track& t = track_[static_cast<size_t>(sample)];
    const auto& exit = c_.exit_tokens;
    if (t.exited) {
        if (t.queued < exit.size()) {
            *token = exit[t.queued++];
            return Pick::Exit;
        }
        return Pick::Sample;  // after the exit tokens the model writes on (e.g. the answer after "Answer:")
    }
    if (c_.line_starts_only && !t.line_start) return Pick::Sample;
    float sim = 0, mag = 0;
    const int action = decide(sample, &sim, &mag);
    t.events.push_back({j, action, sim, mag});
    if (action == kNeatBan) ban(logits);
    if (action != kNeatExit || exit.empty()) return Pick::Sample;
    t.exited = true;
    t.exit_at = j;
    t.queued = 1;
    *token = exit[0];
    return Pick::Exit;
}

Decision NeatMonitor::after_commit(int sample, const SampleView& v, bool) {
    track_[static_cast<size_t>(sample)].line_start = !v.piece.empty() && v.piece.back() == '\n';
    return {};
}

void NeatMonitor::on_row(int sample, int, int layer, const float* a) {
    float* out = cur_[sample].data();
    for (const auto& [slot, idx] : by_layer_[layer]) out[slot] = a[idx];
}

int NeatMonitor::decide(int sample, float* sim, float* mag) const {
    const std::vector<float>& v = cur_[static_cast<size_t>(sample)];
    double dot = 0, vn = 0;
    for (size_t k = 0; k < v.size(); ++k) {
        dot += double(v[k]) * c_.reference[k];
        vn += double(v[k]) * v[k];
    }
    vn = std::sqrt(vn);
    const float s = vn > 0 ? static_cast<float>(dot / (vn * ref_norm_)) : 0.0f;
    const float m = static_cast<float>(vn / ref_norm_);
    if (sim) *sim = s;
    if (mag) *mag = m;
    if (s > c_.exit_similarity && m > c_.magnitude) return kNeatExit;
    if (s > c_.ban_similarity) return kNeatBan;
    return kNeatContinue;
}

void NeatMonitor::ban(float* logits) const {
    for (llama_token t : c_.ban_tokens) logits[t] = -INFINITY;
}

std::vector<double> neat_attribution(const ContributionWeights& w, const std::vector<float>& norm_weight, float eps,
                                     const std::vector<float>& h, const std::vector<float>& a,
                                     const std::vector<float>& cols, int32_t token, int n_threads) {
    const int64_t E = w.n_embd();
    const int V = w.n_vocab();
    const size_t C = a.size();
    if (static_cast<int64_t>(h.size()) != E || static_cast<int64_t>(norm_weight.size()) != E)
        throw ParamError("residual and norm weight must have n_embd = " + std::to_string(E) + " values");
    if (cols.size() != C * static_cast<size_t>(E)) throw ParamError("cols must be [n_candidates, n_embd]");
    if (token < 0 || token >= V) throw ParamError("token id out of range: " + std::to_string(token));
    if (!(eps > 0)) throw ParamError("eps must be positive");
    // Row 0 is the unperturbed state; row 1 + c the state with candidate c's output added.
    const size_t R = C + 1;
    std::vector<float> Y(R * E);
    for (size_t r = 0; r < R; ++r) {
        std::vector<double> x(h.begin(), h.end());
        if (r > 0)
            for (int64_t e = 0; e < E; ++e) x[e] += double(a[r - 1]) * cols[(r - 1) * E + e];
        double ss = 0;
        for (double v : x) ss += v * v;
        const double inv = 1.0 / std::sqrt(ss / E + eps);
        for (int64_t e = 0; e < E; ++e) Y[r * E + e] = static_cast<float>(x[e] * inv * norm_weight[e]);
    }
    // Online log-sum-exp over the vocabulary, per row; threads take vocabulary blocks.
    const DotsFn dots = dots_kernel();
    const int T = std::max(1, n_threads);
    std::vector<double> mx(static_cast<size_t>(T) * R, -std::numeric_limits<double>::infinity());
    std::vector<double> sm(static_cast<size_t>(T) * R, 0.0);
    std::vector<double> target(R, 0.0);
#pragma omp parallel num_threads(T)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num();
#else
        const int t = 0;
#endif
        std::vector<float> u(static_cast<size_t>(E)), out(static_cast<size_t>(kMaxBatch));
        double* m = mx.data() + static_cast<size_t>(t) * R;
        double* s = sm.data() + static_cast<size_t>(t) * R;
#pragma omp for schedule(static)
        for (int v = 0; v < V; ++v) {
            w.unembed_row(v, u.data());
            for (size_t r0 = 0; r0 < R; r0 += kMaxBatch) {
                const int n = static_cast<int>(std::min<size_t>(kMaxBatch, R - r0));
                dots(u.data(), Y.data() + r0 * E, n, E, out.data());
                for (int q = 0; q < n; ++q) {
                    const double z = out[q];
                    double& M = m[r0 + q];
                    if (z > M) {
                        s[r0 + q] = s[r0 + q] * std::exp(M - z) + 1.0;
                        M = z;
                    } else {
                        s[r0 + q] += std::exp(z - M);
                    }
                    if (v == token) target[r0 + q] = z;
                }
            }
        }
    }
    std::vector<double> logp(R);
    for (size_t r = 0; r < R; ++r) {
        double M = -std::numeric_limits<double>::infinity();
        for (int t = 0; t < T; ++t) M = std::max(M, mx[static_cast<size_t>(t) * R + r]);
        double S = 0;
        for (int t = 0; t < T; ++t) {
            const double mt = mx[static_cast<size_t>(t) * R + r];
            if (sm[static_cast<size_t>(t) * R + r] > 0) S += sm[static_cast<size_t>(t) * R + r] * std::exp(mt - M);
        }
        logp[r] = target[r] - (M + std::log(S));
    }
    std::vector<double> scores(C);
    for (size_t c = 0; c < C; ++c) scores[c] = logp[c + 1] - logp[0];
    return scores;
}

}  // namespace neurotap
