#include "neat.h"

#include <cmath>
#include <string>

#include "errors.h"

namespace neurotap {

NeatMonitor::NeatMonitor(NeatConfig config, int n_layer, int64_t n_ff, int n_vocab) : c_(std::move(config)) {
    if (c_.neurons.empty()) throw ParamError("NEAT needs at least one watched neuron");
    if (c_.reference.size() != c_.neurons.size())
        throw ParamError("NEAT reference has " + std::to_string(c_.reference.size()) + " values for " +
                         std::to_string(c_.neurons.size()) + " neurons");
    by_layer_.assign(n_layer, {});
    double rn = 0;
    for (size_t k = 0; k < c_.neurons.size(); ++k) {
        const auto [layer, idx] = c_.neurons[k];
        if (layer < 0 || layer >= n_layer || idx < 0 || idx >= n_ff)
            throw ParamError("NEAT neuron (" + std::to_string(layer) + ", " + std::to_string(idx) +
                             ") is outside this model's " + std::to_string(n_layer) + " layers x " +
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

void NeatMonitor::begin(int n_samples, int n_layer, int64_t, int) {
    if (n_layer != static_cast<int>(by_layer_.size())) throw ParamError("NEAT monitor built for another model");
    cur_.assign(n_samples, std::vector<float>(c_.neurons.size(), 0.0f));
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

}  // namespace neurotap
