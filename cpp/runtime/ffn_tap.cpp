#include "runtime/ffn_tap.h"

#include <algorithm>
#include <atomic>
#include <cmath>
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
    const int ip = other(moe_.moe() && (kinds_ & tap_bit(TapKind::MoeProbs)), "ffn_moe_probs", TapKind::MoeProbs);
    if (ip >= 0) return ip;
    const int ia = other(kinds_ & tap_bit(TapKind::AttnZ), attention_name_, TapKind::AttnZ);
    return ia == attention_layer_ ? ia : -1;  // one layer: each asked node costs a sync
}

void FfnTap::set_moe(const MoeLayout& layout, const std::string& norm_name) {
    moe_ = layout;
    if (!norm_name.empty()) norm_name_ = norm_name;
    moe_weights_.assign(static_cast<size_t>(n_layers_), nullptr);
    moe_read_.assign(static_cast<size_t>(n_layers_), nullptr);
    pending_.assign(static_cast<size_t>(moe_.moe() ? n_layers_ : 0), Pending{});
}

// The other nodes of an MoE layer the tap follows. The gate weights pass through up to four named
// stages (llama-graph.cpp build_moe_ffn: ffn_moe_weights, then _softmax, _norm, _scaled where the
// architecture has them), each computed from the previous: the last one offered before the
// activation is the one the layer multiplies by, which ffn_moe_weighted confirms.
static constexpr int kMoeWeighted = 16;
int FfnTap::moe_node(const char* name, int* part) const {
    auto is = [&](const char* prefix, int p) {
        const size_t n = std::strlen(prefix);
        if (std::strncmp(name, prefix, n) != 0 || name[n] != '-') return -1;
        const int il = parse_layer(name + n + 1);
        if (il < 0 || il >= n_layers_) return -1;
        *part = p;
        return il;
    };
    if (std::strncmp(name, "ffn_", 4) != 0) return -1;  // every name below starts so: one compare for most nodes
    for (const char* w : {"ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled"})
        if (const int il = is(w, kMoeWeights); il >= 0) return il;
    if (const int il = is("ffn_moe_weighted", kMoeWeighted); il >= 0) return il;
    if (moe_.n_ff_shexp > 0) {
        if (const int il = is(moe_.shexp_act.c_str(), kMoeShexpAct); il >= 0) return il;
        if (const int il = is(moe_.shexp_gate.c_str(), kMoeShexpGate); il >= 0) return il;
    }
    return -1;
}

bool FfnTap::callback(ggml_tensor* t, bool ask, void* user_data) {
    auto* self = static_cast<FfnTap*>(user_data);
    if (ask) return self->on_ask(t);
    self->on_data(t);
    return true;  // false would abort the rest of the graph split while decode reports success
}

bool FfnTap::on_ask(const ggml_tensor* t) {
    if (!sink_ && !discovering_) return false;
    if (moe_.moe()) {
        int part = 0;
        if (const int il = moe_node(t->name, &part); il >= 0) {
            if (discovering_) {
                if (part != kMoeWeighted) discovered_[il] |= static_cast<char>(part);
                return false;
            }
            if (part == kMoeWeights) {
                moe_weights_[il] = t;  // read with the activation, no sync of its own
                return false;
            }
            if (part == kMoeWeighted) {
                // The weights the layer multiplies by (through a reshape view) must be the ones read.
                const ggml_tensor* w = t->src[1];
                const ggml_tensor* read = moe_read_[il];
                moe_read_[il] = nullptr;
                if (error_.empty() && sink_ && read && (!w || (w != read && w->view_src != read)))
                    error_ = "layer " + std::to_string(il) + ": the gate weights that " + t->name +
                             " multiplies by are not the ffn_moe_weights* node the tap read (graph order changed)";
                return false;
            }
            return true;  // the shared expert's activation and gate
        }
    }
    TapKind kind;
    const int il = match(t->name, &kind);
    if (il < 0) return false;
    if (discovering_) {
        if (kind == TapKind::MlpPost) discovered_[il] |= kMoeAct;
        return false;
    }
    return true;
}

const float* FfnTap::read_f32(const ggml_tensor* t, size_t offset, size_t n, std::vector<float>& buf) {
    if (t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
        // GPU memory: copy now (only the rows wanted), the allocator reuses the buffer for later nodes.
        if (buf.size() < n) buf.resize(n);
        ggml_backend_tensor_get(t, buf.data(), offset * sizeof(float), n * sizeof(float));
        g_device_copies.fetch_add(1, std::memory_order_relaxed);
        return buf.data();
    }
    g_host_reads.fetch_add(1, std::memory_order_relaxed);
    return static_cast<const float*>(t->data) + offset;
}

int FfnTap::rows_to_take(const ggml_tensor* t, int n_t, int seen, const std::string& where, int* first) {
    if (n_t < 1 || (last_row_only_ && n_t != armed_rows_ && n_t != 1)) {
        // A split batch (another ubatch) or another graph: its last row need not be the batch's.
        error_ = where + "tapped tensor " + t->name + " holds " + std::to_string(n_t) + " rows, neither the batch's " +
                 std::to_string(armed_rows_) + " nor its one output row (was the batch split into ubatches?)";
        return 0;
    }
    const int take = last_row_only_ ? 1 : n_t;
    const int most = last_row_only_ ? 1 : armed_rows_;
    if (seen + take > most) {
        error_ = where + "tapped tensor " + t->name + " delivered more rows than the batch holds (" +
                 std::to_string(seen + take) + " > " + std::to_string(most) + ")";
        return 0;
    }
    *first = n_t - take;
    return take;
}

// The expert ids of an MoE activation: src[2] of the MUL_MAT_ID (or the ADD_ID of an expert bias)
// that computed its gate or up input, a few nodes up (a view of a merged gate_up, a clamp).
static const ggml_tensor* find_expert_ids(const ggml_tensor* t) {
    const ggml_tensor* level[16];
    int n = 0;
    level[n++] = t;
    for (int depth = 0; depth < 4 && n > 0; ++depth) {
        const ggml_tensor* next[16];
        int m = 0;
        for (int i = 0; i < n; ++i) {
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                const ggml_tensor* src = level[i]->src[s];
                if (!src) continue;
                if ((src->op == GGML_OP_MUL_MAT_ID || src->op == GGML_OP_ADD_ID) && src->src[2]) return src->src[2];
                if (m < 16) next[m++] = src;
            }
        }
        std::copy(next, next + m, level);
        n = m;
    }
    return nullptr;
}

void FfnTap::moe_activation(const ggml_tensor* t, int il) {
    const int U = moe_.n_used;
    const int64_t F = moe_.n_ff_exp;
    const std::string layer = "layer " + std::to_string(il) + ": ";
    if (t->type != GGML_TYPE_F32 || t->ne[0] != F || t->ne[1] != U || t->ne[3] != 1 || !ggml_is_contiguous(t)) {
        error_ = layer + "tapped tensor " + t->name + " has an unexpected layout (type " + ggml_type_name(t->type) +
                 ", ne " + std::to_string(t->ne[0]) + " x " + std::to_string(t->ne[1]) + ", expected f32 " +
                 std::to_string(F) + " x " + std::to_string(U) + " (n_ff_exp x n_expert_used))";
        return;
    }
    // Tokens [first, first + n_rows) of the tensor's n_t (with last_row_only: its last one).
    const int n_t = static_cast<int>(t->ne[2]);
    Pending& p = pending_[static_cast<size_t>(il)];
    int first = 0;
    const int n_rows = rows_to_take(t, n_t, rows_seen_[0][il], layer, &first);
    if (n_rows == 0) return;
    if (p.parts && p.n_rows != n_rows) {
        error_ = layer + "tapped tensor " + t->name + " delivered more rows than the batch holds";
        return;
    }
    const ggml_tensor* ids = find_expert_ids(t);
    if (!ids || ids->type != GGML_TYPE_I32 || ids->ne[0] != U || ids->ne[1] != n_t) {
        error_ = layer + "no I32 [" + std::to_string(U) + " x " + std::to_string(n_t) + "] expert ids (MUL_MAT_ID src[2]) feed " +
                 t->name + ": cannot tell which experts ran";
        return;
    }
    // The ids are a strided view of the router's argsort: read them through nb[0], nb[1].
    const size_t span = static_cast<size_t>(ggml_nbytes(ids));
    const uint8_t* raw;
    if (ids->buffer && !ggml_backend_buffer_is_host(ids->buffer)) {
        id_bytes_.resize(span);
        ggml_backend_tensor_get(ids, id_bytes_.data(), 0, span);
        raw = id_bytes_.data();
    } else {
        raw = static_cast<const uint8_t*>(ids->data);
    }
    p.ids.resize(static_cast<size_t>(n_rows) * U);
    for (int r = 0; r < n_rows; ++r) {
        int32_t* row = p.ids.data() + static_cast<size_t>(r) * U;
        for (int j = 0; j < U; ++j) {
            std::memcpy(&row[j], raw + static_cast<size_t>(first + r) * ids->nb[1] + static_cast<size_t>(j) * ids->nb[0],
                        sizeof(int32_t));
            if (row[j] < 0 || row[j] >= moe_.n_expert) {
                error_ = layer + "the router selected expert id " + std::to_string(row[j]) + " outside [0, " +
                         std::to_string(moe_.n_expert) + ")";
                return;
            }
            for (int k = 0; k < j; ++k)
                if (row[k] == row[j]) {
                    error_ = layer + "the router selected expert " + std::to_string(row[j]) + " twice for one token";
                    return;
                }
        }
    }
    const ggml_tensor* w = moe_weights_[il];
    moe_weights_[il] = nullptr;
    moe_read_[il] = w;
    if (!w || w->type != GGML_TYPE_F32 || ggml_nelements(w) != int64_t{U} * n_t || !ggml_is_contiguous(w)) {
        error_ = layer + "the gate weights (ffn_moe_weights*, f32 [" + std::to_string(U) + " x " +
                 std::to_string(n_t) + "]) were not computed before " + t->name;
        return;
    }
    std::vector<float> wtmp;
    const float* wd = read_f32(w, static_cast<size_t>(first) * U, static_cast<size_t>(U) * n_rows, wtmp);
    p.weights.assign(wd, wd + static_cast<size_t>(U) * n_rows);
    for (size_t i = 0; i < p.weights.size(); ++i)
        if (!std::isfinite(p.weights[i])) {
            error_ = layer + "gate weight " + std::to_string(p.weights[i]) + " of expert " + std::to_string(p.ids[i]) +
                     " (row " + std::to_string(i / U) + ") is not finite";
            return;
        }
    const size_t n = static_cast<size_t>(n_rows) * U * F;
    const float* act = read_f32(t, static_cast<size_t>(first) * U * F, n, scratch_);
    p.n_rows = n_rows;
    p.parts |= kMoeAct;
    if (moe_.n_ff_shexp == 0) {
        MoeRows m{il, rows_seen_[0][il], n_rows, &moe_, act, p.ids.data(), p.weights.data(), nullptr, nullptr};
        p.parts = 0;
        sink_->on_moe_rows(m, kinds_);
        rows_seen_[0][il] += n_rows;
        return;
    }
    p.act.assign(act, act + n);  // the shared expert comes later in the graph
    if (p.parts == (kMoeAct | kMoeShexpAct | kMoeShexpGate)) moe_deliver(il);
}

void FfnTap::moe_piece(const ggml_tensor* t, int il, int part) {
    const int64_t width = part == kMoeShexpAct ? moe_.n_ff_shexp : 1;
    Pending& p = pending_[static_cast<size_t>(il)];
    const std::string layer = "layer " + std::to_string(il) + ": ";
    if (t->type != GGML_TYPE_F32 || t->ne[0] != width || t->ne[2] != 1 || t->ne[3] != 1 || !ggml_is_contiguous(t)) {
        error_ = layer + "shared-expert tensor " + t->name + " has an unexpected layout (expected f32 rows of " +
                 std::to_string(width) + ")";
        return;
    }
    int first = 0;
    const int n_rows = rows_to_take(t, static_cast<int>(t->ne[1]), rows_seen_[0][il], layer, &first);
    if (n_rows == 0) return;
    if ((p.parts && p.n_rows != n_rows) || (p.parts & part)) {
        error_ = layer + "shared-expert tensor " + t->name + " does not match the layer's rows";
        return;
    }
    const float* d = read_f32(t, static_cast<size_t>(first) * width, static_cast<size_t>(width) * n_rows, scratch_);
    std::vector<float>& dst = part == kMoeShexpAct ? p.shexp_act : p.shexp_gate;
    dst.assign(d, d + static_cast<size_t>(width) * n_rows);
    if (part == kMoeShexpGate)
        for (float g : dst)
            if (!std::isfinite(g)) {
                error_ = layer + "the shared expert's gate is not finite";
                return;
            }
    p.n_rows = n_rows;
    p.parts |= part;
    if (p.parts == (kMoeAct | kMoeShexpAct | kMoeShexpGate)) moe_deliver(il);
}

void FfnTap::moe_deliver(int il) {
    Pending& p = pending_[static_cast<size_t>(il)];
    MoeRows m{il, rows_seen_[0][il], p.n_rows, &moe_, p.act.data(), p.ids.data(), p.weights.data(),
              p.shexp_act.data(), p.shexp_gate.data()};
    p.parts = 0;
    sink_->on_moe_rows(m, kinds_);
    rows_seen_[0][il] += p.n_rows;
}

void FfnTap::on_data(const ggml_tensor* t) {
    if (!sink_ || !error_.empty()) return;
    if (moe_.moe()) {
        int part = 0;
        if (const int il = moe_node(t->name, &part); il >= 0) {
            if (part == kMoeShexpAct || part == kMoeShexpGate) moe_piece(t, il, part);
            return;
        }
    }
    TapKind kind;
    const int il = match(t->name, &kind);
    if (il < 0) return;
    if (kind == TapKind::MlpPost && moe_.moe()) {
        moe_activation(t, il);
        return;
    }
    const int64_t width = kind == TapKind::Ln2Normalized || kind == TapKind::ResidPost ? n_embd_
                          : kind == TapKind::AttnZ                          ? attention_width_
                          : kind == TapKind::MoeProbs                       ? int64_t{moe_.n_expert}
                                                                                : n_ff_;
    if (t->type != GGML_TYPE_F32 || t->ne[0] != width || t->ne[2] != 1 || t->ne[3] != 1 ||
        !ggml_is_contiguous(t)) {
        error_ = std::string("tapped tensor ") + t->name + " has an unexpected layout (type " +
                 ggml_type_name(t->type) + ", ne0 " + std::to_string(t->ne[0]) + ", expected f32 rows of " +
                 std::to_string(width) + ")";
        return;
    }
    int& seen = rows_seen_[static_cast<int>(kind)][il];
    int first = 0;
    const int n_rows = rows_to_take(t, static_cast<int>(t->ne[1]), seen, "", &first);
    if (n_rows == 0) return;
    const float* data = read_f32(t, static_cast<size_t>(first) * width, static_cast<size_t>(width) * n_rows, scratch_);
    sink_->on_rows(kind, il, seen, n_rows, data, width);
    seen += n_rows;
}

void FfnTap::arm(int n_rows, RowSink* sink, unsigned kinds, int attention_layer, bool last_row_only) {
    sink_ = sink;
    last_row_only_ = last_row_only;
    kinds_ = kinds | kTapMlpPost;
    attention_layer_ = sink ? attention_layer : -1;
    if (attention_layer_ < 0 || attention_layer_ >= n_layers_ || attention_width_ <= 0)
        kinds_ &= ~tap_bit(TapKind::AttnZ);
    if (!moe_.moe()) kinds_ &= ~(tap_bit(TapKind::MoeRoute) | tap_bit(TapKind::MoeProbs));
    armed_rows_ = n_rows;
    error_.clear();
    for (auto& seen : rows_seen_) std::fill(seen.begin(), seen.end(), 0);
    std::fill(moe_weights_.begin(), moe_weights_.end(), nullptr);
    std::fill(moe_read_.begin(), moe_read_.end(), nullptr);
    for (Pending& p : pending_) p.parts = 0;
    if (moe_.moe() && (kinds_ & tap_bit(TapKind::MlpPre)))
        error_ = "the FFN gate's pre-activation (mlp.hook_pre, the gate contribution variant) is not tapped on "
                 "mixture-of-experts layers";
}

void FfnTap::disarm() {
    sink_ = nullptr;
    kinds_ = kTapMlpPost;
}

void FfnTap::disarm_and_check() {
    const unsigned kinds = kinds_;
    const int expected = last_row_only_ ? 1 : armed_rows_;
    disarm();
    if (!error_.empty()) throw RuntimeError(error_);
    const std::string probs = "ffn_moe_probs";
    const std::string* names[kTapKinds] = {&act_name_, &norm_name_, &gate_name_, &residual_name_,
                                           &attention_name_, &act_name_, &probs};
    for (int k = 0; k < kTapKinds; ++k) {
        if (!(kinds & (1u << k)) || k == static_cast<int>(TapKind::MoeRoute)) continue;  // comes with MlpPost
        for (int il = 0; il < n_layers_; ++il) {
            if (k == static_cast<int>(TapKind::AttnZ) && il != attention_layer_) continue;
            if (rows_seen_[k][il] != expected) {
                throw RuntimeError("tap: layer " + std::to_string(il) + " delivered " +
                                   std::to_string(rows_seen_[k][il]) + " rows of " + *names[k] +
                                   ", expected " + std::to_string(expected) +
                                   (last_row_only_ ? " (the batch's last row)" : " (every tapped row must request logits)"));
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
    // An MoE layer needs its gate weights (and a shared expert's activation and gate) as well.
    const int need = !moe_.moe() ? kMoeAct
                     : moe_.n_ff_shexp > 0 ? kMoeAct | kMoeWeights | kMoeShexpAct | kMoeShexpGate
                                           : kMoeAct | kMoeWeights;
    std::vector<int> missing;
    for (int il = 0; il < n_layers_; ++il)
        if ((discovered_[il] & need) != need) missing.push_back(il);
    return missing;
}

void moe_route_row(const MoeRows& m, int r, float* out) {
    const int U = m.layout->n_used;
    for (int j = 0; j < U; ++j) {
        out[j] = static_cast<float>(m.ids[static_cast<size_t>(r) * U + j]);
        out[U + j] = m.weights[static_cast<size_t>(r) * U + j];
    }
    if (m.layout->n_ff_shexp > 0) out[2 * U] = m.shexp_gate[r];
}

void moe_row_segments(const MoeRows& m, int r, std::vector<MoeSegment>& out) {
    const MoeLayout& L = *m.layout;
    const int U = L.n_used;
    const int64_t F = L.n_ff_exp;
    const int32_t* ids = m.ids + static_cast<size_t>(r) * U;
    thread_local std::vector<int> order;
    order_slots_by_expert(U, [&](int j) { return ids[j]; }, order);
    out.resize(static_cast<size_t>(U) + (L.n_ff_shexp > 0 ? 1 : 0));
    for (int k = 0; k < U; ++k) {
        const int j = order[static_cast<size_t>(k)];
        out[static_cast<size_t>(k)] = MoeSegment{ids[j], j, int64_t{ids[j]} * F, F, m.act + (static_cast<size_t>(r) * U + j) * F};
    }
    if (L.n_ff_shexp > 0)
        out[U] = MoeSegment{L.n_expert, U, int64_t{L.n_expert} * F, L.n_ff_shexp, m.shexp_act + static_cast<size_t>(r) * L.n_ff_shexp};
}

void scatter_moe_row(const MoeRows& m, int r, float* out) {
    const MoeLayout& L = *m.layout;
    const int U = L.n_used;
    const int64_t F = L.n_ff_exp;
    std::fill_n(out, L.width(), 0.0f);
    for (int j = 0; j < U; ++j) {
        const int32_t e = m.ids[static_cast<size_t>(r) * U + j];
        std::memcpy(out + e * F, m.act + (static_cast<size_t>(r) * U + j) * F, static_cast<size_t>(F) * sizeof(float));
    }
    if (L.n_ff_shexp > 0)
        std::memcpy(out + int64_t{L.n_expert} * F, m.shexp_act + static_cast<size_t>(r) * L.n_ff_shexp,
                    static_cast<size_t>(L.n_ff_shexp) * sizeof(float));
}

void scatter_moe_rows(RowSink& sink, const MoeRows& m, unsigned kinds) {
    const int64_t W = m.layout->width(), RW = moe_route_width(*m.layout);
    const int chunk = static_cast<int>(std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(W, 1), 1, std::max(m.n_rows, 1)));
    thread_local std::vector<float> rows, route;  // the decode's thread: no allocation per layer
    rows.resize(static_cast<size_t>(chunk) * W);
    route.resize(static_cast<size_t>(chunk) * RW);
    for (int r0 = 0; r0 < m.n_rows; r0 += chunk) {
        const int c = std::min(chunk, m.n_rows - r0);
        if (kinds & tap_bit(TapKind::MoeRoute)) {
            for (int r = 0; r < c; ++r) moe_route_row(m, r0 + r, route.data() + static_cast<size_t>(r) * RW);
            sink.on_rows(TapKind::MoeRoute, m.layer, m.row0 + r0, c, route.data(), RW);
        }
        for (int r = 0; r < c; ++r) scatter_moe_row(m, r0 + r, rows.data() + static_cast<size_t>(r) * W);
        sink.on_rows(TapKind::MlpPost, m.layer, m.row0 + r0, c, rows.data(), W);
    }
}

}  // namespace neurotap
