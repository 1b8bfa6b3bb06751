#include "runtime/ffn_tap.h"

#include <atomic>
#include <cstring>

#include "base/errors.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace neurotap {

FfnTap::FfnTap(std::string act_name, int n_layers, int64_t n_ff, int64_t n_embd)
    : act_name_(std::move(act_name)), n_layers_(n_layers), n_ff_(n_ff), n_embd_(n_embd) {
    for (auto& seen : rows_seen_) seen.assign(n_layers_, 0);
    discovered_.assign(n_layers_, 0);
}

static std::atomic<uint64_t> g_host_reads{0}, g_device_copies{0};

TapReads tap_reads() {
    return {g_host_reads.load(std::memory_order_relaxed), g_device_copies.load(std::memory_order_relaxed)};
}

static int parse_layer(const char* s) {
    if (*s < '0' || *s > '9') return -1;
    int v = 0;
    for (; *s; ++s) {
        if (*s < '0' || *s > '9' || v > 100000) return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

int FfnTap::match(const char* name, TapKind* kind) const {
    const size_t na = act_name_.size();
    if (std::strncmp(name, act_name_.c_str(), na) == 0 && name[na] == '-') {
        *kind = TapKind::MlpPost;
        const int il = parse_layer(name + na + 1);
        return il < n_layers_ ? il : -1;
    }
    auto other = [&](bool on, const std::string& prefix, TapKind k) {
        const size_t n = prefix.size();
        if (!on || std::strncmp(name, prefix.c_str(), n) != 0 || name[n] != '-') return -1;
        *kind = k;
        const int il = parse_layer(name + n + 1);
        return il < n_layers_ ? il : -1;
    };
    if (discovering_) return -1;  // discovery looks for the activation only
    const int il = other(kinds_ & tap_bit(TapKind::Ln2Normalized), norm_name_, TapKind::Ln2Normalized);
    if (il >= 0) return il;
    const int ig = other(kinds_ & tap_bit(TapKind::MlpPre), gate_name_, TapKind::MlpPre);
    if (ig >= 0) return ig;
    const int ir = other(kinds_ & tap_bit(TapKind::ResidPost), residual_name_, TapKind::ResidPost);
    if (ir >= 0) return ir;
    const int ia = other(kinds_ & tap_bit(TapKind::AttnZ), attention_name_, TapKind::AttnZ);
    return ia == attention_layer_ ? ia : -1;  // one layer: each asked node costs a sync
}

bool FfnTap::callback(ggml_tensor* t, bool ask, void* user_data) {
    auto* self = static_cast<FfnTap*>(user_data);
    if (ask) return self->on_ask(t);
    self->on_data(t);
    return true;  // false would abort the rest of the graph split while decode reports success
}

bool FfnTap::on_ask(const ggml_tensor* t) {
    if (!sink_ && !discovering_) return false;
    TapKind kind;
    const int il = match(t->name, &kind);
    if (il < 0) return false;
    if (discovering_) {
        if (kind == TapKind::MlpPost) discovered_[il] = 1;
        return false;
    }
    return true;
}

void FfnTap::on_data(const ggml_tensor* t) {
    if (!sink_ || !error_.empty()) return;
    TapKind kind;
    const int il = match(t->name, &kind);
    if (il < 0) return;
    const int64_t width = kind == TapKind::Ln2Normalized || kind == TapKind::ResidPost ? n_embd_
                          : kind == TapKind::AttnZ                          ? attention_width_
                                                                                : n_ff_;
    if (t->type != GGML_TYPE_F32 || t->ne[0] != width || t->ne[2] != 1 || t->ne[3] != 1 ||
        !ggml_is_contiguous(t)) {
        error_ = std::string("tapped tensor ") + t->name + " has an unexpected layout (type " +
                 ggml_type_name(t->type) + ", ne0 " + std::to_string(t->ne[0]) + ", expected f32 rows of " +
                 std::to_string(width) + ")";
        return;
    }
    const int n_rows = static_cast<int>(t->ne[1]);
    int& seen = rows_seen_[static_cast<int>(kind)][il];
    if (seen + n_rows > armed_rows_) {
        error_ = std::string("tapped tensor ") + t->name + " delivered more rows than the batch holds (" +
                 std::to_string(seen + n_rows) + " > " + std::to_string(armed_rows_) + ")";
        return;
    }
    const float* data;
    if (t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
        // GPU memory: copy now, the allocator reuses the buffer for later nodes.
        const size_t n = static_cast<size_t>(width) * n_rows;
        if (scratch_.size() < n) scratch_.resize(n);
        ggml_backend_tensor_get(t, scratch_.data(), 0, n * sizeof(float));
        data = scratch_.data();
        g_device_copies.fetch_add(1, std::memory_order_relaxed);
    } else {
        data = static_cast<const float*>(t->data);
        g_host_reads.fetch_add(1, std::memory_order_relaxed);
    }
    sink_->on_rows(kind, il, seen, n_rows, data, width);
    seen += n_rows;
}

void FfnTap::arm(int n_rows, RowSink* sink, unsigned kinds, int attention_layer) {
    sink_ = sink;
    kinds_ = kinds | kTapMlpPost;
    attention_layer_ = sink ? attention_layer : -1;
    if (attention_layer_ < 0 || attention_layer_ >= n_layers_ || attention_width_ <= 0)
        kinds_ &= ~tap_bit(TapKind::AttnZ);
    armed_rows_ = n_rows;
    error_.clear();
    for (auto& seen : rows_seen_) std::fill(seen.begin(), seen.end(), 0);
}

void FfnTap::disarm() {
    sink_ = nullptr;
    kinds_ = kTapMlpPost;
}

void FfnTap::disarm_and_check() {
    const unsigned kinds = kinds_;
    disarm();
    if (!error_.empty()) throw RuntimeError(error_);
    const std::string* names[kTapKinds] = {&act_name_, &norm_name_, &gate_name_, &residual_name_, &attention_name_};
    for (int k = 0; k < kTapKinds; ++k) {
        if (!(kinds & (1u << k))) continue;
        for (int il = 0; il < n_layers_; ++il) {
            if (k == static_cast<int>(TapKind::AttnZ) && il != attention_layer_) continue;
            if (rows_seen_[k][il] != armed_rows_) {
                throw RuntimeError("tap: layer " + std::to_string(il) + " delivered " +
                                   std::to_string(rows_seen_[k][il]) + " rows of " + *names[k] +
                                   ", expected " + std::to_string(armed_rows_) +
                                   " (every tapped row must request logits)");
            }
        }
    }
}

void FfnTap::begin_discovery() {
    std::fill(discovered_.begin(), discovered_.end(), 0);
    discovering_ = true;
}

std::vector<int> FfnTap::end_discovery() {
    discovering_ = false;
    std::vector<int> missing;
    for (int il = 0; il < n_layers_; ++il)
        if (!discovered_[il]) missing.push_back(il);
    return missing;
}

}  // namespace neurotap
