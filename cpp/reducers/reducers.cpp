#include "reducers/reducers.h"

#include <algorithm>

#include "base/errors.h"
#include "ggml.h"

namespace neurotap {

void ActiveCountReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    n_layers_ = n_layers;
    n_ff_ = n_ff;
    counts_.assign(n_samples, {});
}

void ActiveCountReducer::on_row(int sample, int token, int layer, const float* a) {
    int32_t c = 0;
    for (int64_t i = 0; i < n_ff_; ++i) c += a[i] > thr_;
    slot(counts_[sample], token, n_layers_)[layer] = c;
}

bool ActiveCountReducer::on_moe_row(int sample, int token, const MoeRows& m, int r) {
    // A scattered zero is active when 0 > threshold: then only the full row counts the same.
    if (0.0f > thr_ || m.layout->width() != n_ff_) return false;
    const MoeLayout& L = *m.layout;
    const int64_t n = int64_t{L.n_used} * L.n_ff_exp;
    const float* a = m.act + static_cast<size_t>(r) * static_cast<size_t>(n);
    int32_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += a[i] > thr_;
    if (L.n_ff_shexp > 0) {
        const float* s = m.shexp_act + static_cast<size_t>(r) * static_cast<size_t>(L.n_ff_shexp);
        for (int64_t i = 0; i < L.n_ff_shexp; ++i) c += s[i] > thr_;
    }
    slot(counts_[sample], token, n_layers_)[m.layer] = c;
    return true;
}

void ActiveCountReducer::finish(int sample, int n_tokens) {
    counts_[sample].resize(static_cast<size_t>(n_tokens) * n_layers_);
}

ActiveSetReducer::ActiveSetReducer(int chunk, float threshold) : chunk_(chunk), thr_(threshold) {
    if (chunk < 1) throw ParamError("chunk must be at least 1 token");
}

void ActiveSetReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    n_layers_ = n_layers;
    n_ff_ = n_ff;
    n_words_ = (n_layers * n_ff + 63) / 64;
    sets_.begin(n_samples, static_cast<int64_t>(n_layers) * n_ff);
    pending_.assign(n_samples, std::vector<uint64_t>(static_cast<size_t>(n_words_), 0));
    dirty_.assign(n_samples, {});
    all_dirty_.assign(n_samples, 0);
}

void ActiveSetReducer::on_row(int sample, int, int layer, const float* a) {
    all_dirty_[sample] = 1;
    uint64_t* w = pending_[sample].data();
    const int64_t base = static_cast<int64_t>(layer) * n_ff_;
    for (int64_t i = 0; i < n_ff_; ++i) {
        const int64_t bit = base + i;
        w[bit >> 6] |= static_cast<uint64_t>(a[i] > thr_) << (bit & 63);
    }
}

bool ActiveSetReducer::on_moe_row(int sample, int, const MoeRows& m, int r) {
    if (0.0f > thr_ || m.layout->width() != n_ff_) return false;  // idle zeros would be active
    uint64_t* w = pending_[sample].data();
    auto& dirty = dirty_[sample];
    std::vector<MoeSegment>& seg = seg_;
    moe_row_segments(m, r, seg);
    for (size_t j = 0; j < seg.size(); ++j) {
        const int64_t base = static_cast<int64_t>(m.layer) * n_ff_ + seg[j].offset;
        const float* a = seg[j].a;
        for (int64_t i = 0; i < seg[j].width; ++i) {
            const int64_t bit = base + i;
            w[bit >> 6] |= static_cast<uint64_t>(a[i] > thr_) << (bit & 63);
        }
        // Segments come in ascending order: extend the last range where they touch.
        const int64_t w0 = base >> 6, w1 = (base + seg[j].width - 1) >> 6;
        if (!dirty.empty() && dirty.back().second + 1 >= w0 && dirty.back().first <= w0)
            dirty.back().second = std::max(dirty.back().second, w1);
        else
            dirty.emplace_back(w0, w1);
    }
    return true;
}

void ActiveSetReducer::commit(int sample, int token, int32_t) {
    uint64_t* w = sets_.chunk(sample, token / chunk_);
    auto& p = pending_[sample];
    auto& dirty = dirty_[sample];
    if (all_dirty_[sample]) {
        for (int64_t k = 0; k < n_words_; ++k) w[k] |= p[k];
        std::fill(p.begin(), p.end(), 0);
    } else {
        // Only words compact rows wrote hold bits (OR then clear: overlapping ranges are harmless).
        for (const auto& [k0, k1] : dirty)
            for (int64_t k = k0; k <= k1; ++k) {
                w[k] |= p[k];
                p[k] = 0;
            }
    }
    dirty.clear();
    all_dirty_[sample] = 0;
}

void ActiveSetReducer::finish(int sample, int n_tokens) {
    const size_t n_chunks = (static_cast<size_t>(n_tokens) + chunk_ - 1) / chunk_;
    sets_.finish(sample, static_cast<int64_t>(n_chunks));
    std::fill(pending_[sample].begin(), pending_[sample].end(), 0);
    dirty_[sample].clear();
    all_dirty_[sample] = 0;
}

WatchReducer::WatchReducer(std::vector<std::pair<int, int>> neurons) : neurons_(std::move(neurons)) {}

void WatchReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    by_layer_.assign(n_layers, {});
    for (size_t s = 0; s < neurons_.size(); ++s) {
        const auto [layer, idx] = neurons_[s];
        if (layer < 0 || layer >= n_layers || idx < 0 || idx >= n_ff)
            throw ParamError("watched neuron (" + std::to_string(layer) + ", " + std::to_string(idx) +
                             ") is outside the model's " + std::to_string(n_layers) + " layers x " +
                             std::to_string(n_ff) + " neurons");
        by_layer_[layer].push_back({static_cast<int>(s), idx});
    }
    values_.assign(n_samples, {});
}

void WatchReducer::on_row(int sample, int token, int layer, const float* a) {
    if (neurons_.empty()) return;
    float* out = slot(values_[sample], token, neurons_.size());
    for (const auto& [s, idx] : by_layer_[layer]) out[s] = a[idx];
}

bool WatchReducer::on_moe_row(int sample, int token, const MoeRows& m, int r) {
    if (neurons_.empty()) return true;
    const MoeLayout& L = *m.layout;
    const int U = L.n_used;
    const int64_t F = L.n_ff_exp, routed = int64_t{L.n_expert} * F;
    float* out = slot(values_[sample], token, neurons_.size());
    const int32_t* ids = m.ids + static_cast<size_t>(r) * U;
    for (const auto& [s, idx] : by_layer_[m.layer]) {
        float v = 0.0f;  // what the scatter writes for an expert that did not run
        if (idx >= routed) {
            v = m.shexp_act[static_cast<size_t>(r) * L.n_ff_shexp + static_cast<size_t>(idx - routed)];
        } else {
            for (int j = 0; j < U; ++j)
                if (ids[j] == idx / F) v = m.act[(static_cast<size_t>(r) * U + j) * F + static_cast<size_t>(idx % F)];
        }
        out[s] = v;
    }
    return true;
}

void WatchReducer::finish(int sample, int n_tokens) {
    values_[sample].resize(static_cast<size_t>(n_tokens) * neurons_.size());
}

void MlpPostReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    n_layers_ = n_layers;
    n_ff_ = n_ff;
    f32_.assign(half_ ? 0 : n_samples, {});
    f16_.assign(half_ ? n_samples : 0, {});
}

void MlpPostReducer::on_row(int sample, int token, int layer, const float* a) {
    const size_t stride = static_cast<size_t>(n_layers_) * n_ff_;
    if (half_) {
        uint16_t* out = slot(f16_[sample], token, stride) + static_cast<size_t>(layer) * n_ff_;
        ggml_fp32_to_fp16_row(a, reinterpret_cast<ggml_fp16_t*>(out), n_ff_);
    } else {
        std::copy(a, a + n_ff_, slot(f32_[sample], token, stride) + static_cast<size_t>(layer) * n_ff_);
    }
}

void MlpPostReducer::finish(int sample, int n_tokens) {
    const size_t n = static_cast<size_t>(n_tokens) * n_layers_ * n_ff_;
    if (half_) f16_[sample].resize(n); else f32_[sample].resize(n);
}

}  // namespace neurotap

namespace neurotap {

HiddenRowReducer::HiddenRowReducer(TapKind kind) : kind_(kind) {
    if (kind != TapKind::Ln2Normalized && kind != TapKind::ResidPost)
        throw ParamError("HiddenRowReducer reads NormInput or Residual rows");
}

void HiddenRowReducer::begin(int n_samples, int n_layers, int64_t, int) {
    n_layers_ = n_layers;
    rows_.assign(static_cast<size_t>(n_samples), {});
}

void HiddenRowReducer::on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t n_embd) {
    if (kind != kind_) return;
    n_embd_ = n_embd;  // the tap checked the width against the model's n_embd
    auto& v = rows_[static_cast<size_t>(sample)];
    float* dst = slot(v, static_cast<size_t>(token), static_cast<size_t>(n_layers_) * n_embd) +
                 static_cast<size_t>(layer) * n_embd;
    std::copy(h, h + n_embd, dst);
}

void HiddenRowReducer::finish(int sample, int n_tokens) {
    auto& v = rows_[static_cast<size_t>(sample)];
    v.resize(std::min(v.size(), static_cast<size_t>(n_tokens) * n_layers_ * n_embd_));
}

MoeRouteReducer::MoeRouteReducer(const MoeLayout& layout, bool probs) : m_(layout), probs_(probs) {
    if (!m_.moe()) throw ParamError("routing records need a mixture-of-experts model");
}

void MoeRouteReducer::begin(int n_samples, int n_layers, int64_t, int) {
    n_layers_ = n_layers;
    ids_.assign(n_samples, {});
    weights_.assign(n_samples, {});
    gate_.assign(n_samples, {});
    probs_rows_.assign(n_samples, {});
}

void MoeRouteReducer::on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t width) {
    const size_t t = static_cast<size_t>(token), L = static_cast<size_t>(n_layers_), U = static_cast<size_t>(m_.n_used);
    if (kind == TapKind::MoeProbs && width == m_.n_expert) {
        std::copy_n(h, width, slot(probs_rows_[sample], t, L * width) + static_cast<size_t>(layer) * width);
        return;
    }
    if (kind != TapKind::MoeRoute || width != moe_route_width(m_)) return;
    int32_t* ids = slot(ids_[sample], t, L * U) + layer * U;
    float* w = slot(weights_[sample], t, L * U) + layer * U;
    for (size_t j = 0; j < U; ++j) {
        ids[j] = static_cast<int32_t>(h[j]);
        w[j] = h[U + j];
    }
    slot(gate_[sample], t, L)[layer] = m_.n_ff_shexp > 0 ? h[2 * U] : 0.0f;
}

void MoeRouteReducer::finish(int sample, int n_tokens) {
    const size_t n = static_cast<size_t>(n_tokens), L = static_cast<size_t>(n_layers_);
    ids_[sample].resize(n * L * m_.n_used);
    weights_[sample].resize(n * L * m_.n_used);
    gate_[sample].resize(n * L);
    if (probs_) probs_rows_[sample].resize(n * L * m_.n_expert);
}

}  // namespace neurotap
