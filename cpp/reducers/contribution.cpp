#include "reducers/contribution.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <numeric>

#include "base/errors.h"
#include "kernels/kernels.h"

namespace neurotap {

namespace {

inline float silu(float x) { return x < -80.0f ? -0.0f : x / (1.0f + std::exp(-x)); }  // exp overflow at -inf
inline float gelu(float x) {  // ggml's tanh approximation
    constexpr float k = 0.79788456080286535588f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + std::tanh(k * x * (1.0f + 0.044715f * x * x)));
}

}  // namespace

ContributionReducer::ContributionReducer(std::shared_ptr<const ContributionWeights> w, ContributionParams p)
    : w_(std::move(w)), p_(p) {
    if (!w_) throw ParamError("contribution reducer needs weights");
    if (p_.chunk < 1) throw ParamError("chunk must be at least 1 token");
    if (p_.top_per_layer < 1) throw ParamError("top_per_layer must be at least 1");
    if (p_.eta_rank < 1) throw ParamError("eta_rank must be at least 1");
    if (p_.n_threads < 1) p_.n_threads = 1;
    if (p_.gate_variant && w_->moe().moe())
        throw ParamError("the gate contribution variant reads the FFN gate, which mixture-of-experts layers do not "
                         "tap: use contribution='down'");
}

int64_t ContributionReducer::auto_budget(int64_t file_bytes, int n_samples, int n_layers, int64_t n_ff) {
    const int64_t rows = static_cast<int64_t>(n_samples) * n_layers * n_ff * static_cast<int64_t>(sizeof(float));
    return std::min(file_bytes / 20, std::max<int64_t>(0, (file_bytes * 12 / 100 - rows) / 2));
}

void ContributionReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    if (n_layers != w_->n_layers() || n_ff != w_->n_ff())
        throw ParamError("contribution weights are for another model shape");
    n_layers_ = n_layers;
    n_ff_ = n_ff;
    n_words_ = (n_layers * n_ff + 63) / 64;
    k_ = static_cast<int>(std::min<int64_t>(p_.top_per_layer, n_ff));
    bufs_.clear();
    ran_.clear();
    exps_.clear();
    const MoeLayout& moe = w_->moe();
    compact_ = moe.moe() ? int64_t{moe.n_used} * moe.n_ff_exp + moe.n_ff_shexp : 0;
    route_.assign(w_->moe().moe() ? n_samples : 0,
                  std::vector<float>(static_cast<size_t>(n_layers * moe_route_width(w_->moe())), 0.0f));
    free_.clear();
    cur_.assign(n_samples, -1);  // a buffer is taken at a sample's first row of a step
    sets_.begin(n_samples, static_cast<int64_t>(n_layers) * n_ff);
    eta_.assign(n_samples, {});
    count_.assign(n_samples, {});
    top_c_.assign(n_samples, {});
    top_i_.assign(n_samples, {});
    kth_.assign(n_samples, std::vector<float>(static_cast<size_t>(n_layers), -INFINITY));
    queue_.clear();
    held_ = 0;
    sel_c_.clear();
    sel_i_.clear();
    sel_eta_.clear();
    sel_kth_.clear();
    const size_t per_token = static_cast<size_t>(n_layers) * n_ff * sizeof(float);
    const int64_t share = auto_budget(static_cast<int64_t>(w_->mapped_bytes()), n_samples, n_layers, n_ff);
    cache_slots_ = static_cast<int>(
        std::min<int64_t>((p_.cache_bytes < 0 ? share : p_.cache_bytes) / static_cast<int64_t>(per_token), 1 << 20));
    // No floor: a budget below one step's tokens selects and passes every step (W_down is small
    // where the rows of a step are large against the file).
    queue_budget_ = p_.queue_bytes < 0 ? share : p_.queue_bytes;
    // A pass holds, per token it selects, its top values and (per thread) one layer of its
    // projection: within the queue's budget, in passes of 16 tokens where that is empty (the
    // default model at n = 64, where the rows in flight alone take 12% of the file). MoE: a
    // token's projections are its experts' (compact_), and an expert's targets gather their
    // unembedding rows; passes then carry n_expert / n_used times more tokens, so that a flush is
    // one pass (each pass dequantizes every expert its tokens ran: at OLMoE's shape and n = 16 a
    // flush was a pass of 382 tokens and one of 18).
    const int64_t per_thread = compact_ > 0 ? (compact_ + w_->n_embd()) * 4 : n_ff * 4;
    const int64_t pass_bytes = static_cast<int64_t>(n_layers) * k_ * 8 + 4 +
                               static_cast<int64_t>(p_.n_threads) * per_thread + w_->n_embd() * 4;
    group_tokens_ = p_.pass_tokens > 0 ? p_.pass_tokens : std::max<int64_t>(16, queue_budget_ / pass_bytes);
    // Allocated once and never zeroed: growing would reallocate, copying the cache and holding up
    // to 3x its size at once (and 0.12 s at the 1B shape), and zeroing each slot as it was taken
    // wrote every page of it, where an MoE slot is only read at the experts its id's tokens ran
    // (valid_; OLMoE: 16 of 64 per layer). Pages not yet written cost no resident memory.
    cache_floats_ = static_cast<size_t>(cache_slots_) * static_cast<size_t>(n_layers) * static_cast<size_t>(n_ff);
    cache_.reset();
    if (cache_floats_ > 0) {
        // Page-aligned, so that an expert's 4 KiB of projections (OLMoE) lie in one page, not two.
        // Uninitialised: operator new throws std::bad_alloc itself.
        cache_.reset(static_cast<float*>(::operator new(cache_floats_ * sizeof(float), kCacheAlign)));
    }
    cache_token_.clear();
    cache_used_.clear();
    cache_index_.clear();
    valid_.clear();
    expert_proj_ = expert_proj_cached_ = 0;
    step_ = hits_ = misses_ = 0;
}

int ContributionReducer::take_buffer() {
    if (!free_.empty()) {
        const int b = free_.back();
        free_.pop_back();
        return b;
    }
    bufs_.emplace_back(static_cast<size_t>(n_layers_) * static_cast<size_t>(w_->moe().moe() ? compact_ : n_ff_), 0.0f);
    ran_.emplace_back(static_cast<size_t>(n_layers_) * w_->moe().n_expert, uint8_t{0});
    exps_.emplace_back(static_cast<size_t>(n_layers_) * w_->moe().n_used, 0);
    return static_cast<int>(bufs_.size()) - 1;
}

float* ContributionReducer::row_buffer(int sample) {
    if (cur_[sample] < 0) cur_[sample] = take_buffer();
    return bufs_[cur_[sample]].data();
}

void ContributionReducer::on_hidden_row(TapKind kind, int sample, int, int layer, const float* h, int64_t width) {
    if (kind != TapKind::MoeRoute || route_.empty() || width != moe_route_width(w_->moe())) return;
    std::copy_n(h, width, route_[sample].data() + static_cast<size_t>(layer) * width);
}

void ContributionReducer::on_row(int sample, int, int layer, const float* a) {
    if (p_.gate_variant) return;
    const MoeLayout& m = w_->moe();
    if (!m.moe()) {
        std::memcpy(row_buffer(sample) + static_cast<size_t>(layer) * n_ff_, a, static_cast<size_t>(n_ff_) * sizeof(float));
        return;
    }
    // A full-width MoE row: its experts from the route row that came before it.
    const int64_t RW = moe_route_width(m), F = m.n_ff_exp;
    const float* route = route_[sample].data() + static_cast<size_t>(layer) * RW;
    const int U = m.n_used;
    store_moe_row(
        sample, layer, [&](int j) { return static_cast<int32_t>(route[j]); },  // checked in range by the tap
        [&](int j) { return route[U + j]; }, [&](int j) { return a + static_cast<int64_t>(route[j]) * F; },
        a + int64_t{m.n_expert} * F, m.n_ff_shexp > 0 ? route[2 * U] : 0.0f);
}

bool ContributionReducer::on_moe_row(int sample, int, const MoeRows& rows, int r) {
    const MoeLayout& m = w_->moe();
    if (p_.gate_variant || !m.moe() || rows.layout->width() != n_ff_ || rows.layout->n_used != m.n_used ||
        rows.layout->n_ff_exp != m.n_ff_exp)
        return false;
    const size_t U = static_cast<size_t>(m.n_used), at = static_cast<size_t>(r) * U;
    const int64_t F = m.n_ff_exp;
    store_moe_row(
        sample, rows.layer, [&](int j) { return rows.ids[at + j]; }, [&](int j) { return rows.weights[at + j]; },
        [&](int j) { return rows.act + (at + j) * F; },
        m.n_ff_shexp > 0 ? rows.shexp_act + static_cast<size_t>(r) * m.n_ff_shexp : nullptr,
        m.n_ff_shexp > 0 ? rows.shexp_gate[r] : 0.0f);
    return true;
}

// What reaches the residual is the expert's output times its gate weight (llama.cpp applies it
// after the down projection, so it scales each neuron's term): c = a * w * (W_down[e][:, i] . W_U[y]).
// Only the experts that ran are kept, by ascending id, so that a compact index orders as the flat one.
template <typename IdOf, typename WeightOf, typename ActOf>
void ContributionReducer::store_moe_row(int sample, int layer, IdOf id_of, WeightOf weight_of, ActOf act_of,
                                        const float* shexp, float shexp_gate) {
    const MoeLayout& m = w_->moe();
    const int U = m.n_used;
    const int64_t F = m.n_ff_exp;
    float* out = row_buffer(sample) + static_cast<size_t>(layer) * compact_;
    const size_t b = static_cast<size_t>(cur_[sample]);
    int32_t* exps = exps_[b].data() + static_cast<size_t>(layer) * U;
    uint8_t* ran = ran_[b].data() + static_cast<size_t>(layer) * m.n_expert;
    std::fill_n(ran, m.n_expert, uint8_t{0});
    order_slots_by_expert(U, id_of, order_);
    for (int k = 0; k < U; ++k) {
        const int j = order_[static_cast<size_t>(k)];
        const int32_t e = id_of(j);
        ran[e] = 1;
        exps[k] = e;
        const float* a = act_of(j);
        const float w = weight_of(j);
        float* seg = out + int64_t{k} * F;
        for (int64_t i = 0; i < F; ++i) seg[i] = a[i] * w;
    }
    float* seg = out + int64_t{U} * F;
    for (int64_t i = 0; i < m.n_ff_shexp; ++i) seg[i] = shexp[i] * shexp_gate;
}

void ContributionReducer::on_gate_row(int sample, int, int layer, const float* g) {
    if (!p_.gate_variant) return;
    float* out = row_buffer(sample) + static_cast<size_t>(layer) * n_ff_;
    for (int64_t i = 0; i < n_ff_; ++i) out[i] = p_.gelu ? gelu(g[i]) : silu(g[i]);
}

void ContributionReducer::commit(int sample, int token, int32_t token_id) {
    if (token_id < 0 || token_id >= w_->n_vocab()) throw ParamError("token id out of range: " + std::to_string(token_id));
    // The token's activations stay in their buffer until it is selected; the sample writes a fresh
    // one. Its next buffer is taken when its next rows come, after this step's selections have
    // freed the queue's: taking it now would hold n more rows at the peak (11.8 MB of the default
    // model's 98 MB file at n = 64).
    row_buffer(sample);
    queue_.push_back({sample, token, token_id, cur_[sample], -1});
    cur_[sample] = -1;
    ++held_;
}

int64_t ContributionReducer::queued_bytes() const {
    const int64_t selected = static_cast<int64_t>(queue_.size()) - held_;
    // Held tokens count at the width their buffers have: an MoE token holds only the experts it
    // ran (compact_), so the budget holds n_expert / n_used times more of them and a pass, which
    // dequantizes every expert its tokens ran, carries that many more ids.
    const int64_t width = compact_ > 0 ? compact_ : n_ff_;
    return held_ * n_layers_ * width * static_cast<int64_t>(sizeof(float)) +
           selected * n_layers_ * (k_ * 8 + 4) + selected * 4;
}

// A pass over W_down dequantizes all of it, whatever the number of ids it projects, so a pass
// should carry many new ids. When the queue fills its budget, the tokens whose projection is
// already cached (most of them on real text: 84% at n = 16) are selected, freeing their
// activations; the pass waits until the tokens still missing theirs fill half the budget, so it
// carries more new ids than flushing the whole queue did. Selections are recorded in token order
// at the pass, since a sample's chunks are encoded in order. (Flushing every step
// instead, at the default model's n = 16, cut the contribution mode's private memory from 15.7% to
// 11.3% of the file but made the pass 1.2-1.3x slower.)
void ContributionReducer::end_step() {
    if (queued_bytes() < queue_budget_) return;
    select_hits();
    if (2 * queued_bytes() >= queue_budget_) flush();
}

void ContributionReducer::sync() { flush(); }

// MoE: a cached id counts as a hit only when its slot holds every expert the token ran, at every
// layer. The others wait for the pass: selecting one now dequantized each expert it still lacked
// for that single projection (a whole expert's W_down, about 7 projections' worth of products at
// OLMoE's shape), while the pass dequantizes those experts anyway for its new ids.
void ContributionReducer::select_hits() {
    const auto t0 = std::chrono::steady_clock::now();
    which_.clear();
    for (size_t q = 0; q < queue_.size(); ++q) {
        if (queue_[q].buf < 0) continue;
        const auto it = cache_index_.find(queue_[q].token_id);
        if (it != cache_index_.end() && cached_all_experts(it->second, queue_[q].buf)) which_.push_back(static_cast<int>(q));
    }
    assign_sources(which_);  // all cached: no new ids
    select(which_);
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The source of each queued token's projection d(y) = W_down^T W_U[y] (all layers), for the
// tokens in `which`: its cache slot (slot_of_), and, for an id not cached, a row of this pass's
// projections (row_of_; missing_ids_ lists the pass's ids in row order, missing_slot_ the slot each
// one is then cached in, -1 when every slot is taken by this pass: the cache never outgrows its
// budget, however many distinct ids a pass carries). A contribution is c = a * d(y), and d depends
// on the token only, not on the context, so tokens that recur across samples and steps (most of
// them) cost one multiply per neuron.
void ContributionReducer::assign_sources(const std::vector<int>& which) {
    ++step_;
    slot_of_.resize(queue_.size());
    row_of_.resize(queue_.size());
    missing_ids_.clear();
    missing_slot_.clear();
    pass_row_.clear();
    for (const int q : which) {
        const int32_t y = queue_[q].token_id;
        row_of_[q] = -1;
        slot_of_[q] = -1;
        if (const auto it = cache_index_.find(y); it != cache_index_.end()) {
            slot_of_[q] = it->second;
            cache_used_[static_cast<size_t>(it->second)] = step_;
            ++hits_;
            continue;
        }
        if (const auto it = pass_row_.find(y); it != pass_row_.end()) {  // an id already new in this pass
            row_of_[q] = it->second;
            ++hits_;
            continue;
        }
        // A free slot, or the least recently used one not needed by this pass, or none.
        int slot = -1;
        if (static_cast<int>(cache_token_.size()) < cache_slots_) {
            slot = static_cast<int>(cache_token_.size());
            cache_token_.push_back(y);
            cache_used_.push_back(step_);
        } else {
            int64_t oldest = INT64_MAX;
            for (int k = 0; k < cache_slots_; ++k)
                if (cache_used_[static_cast<size_t>(k)] < oldest && cache_used_[static_cast<size_t>(k)] != step_)
                    oldest = cache_used_[static_cast<size_t>(k)], slot = k;
            if (slot >= 0) {
                cache_index_.erase(cache_token_[static_cast<size_t>(slot)]);
                cache_token_[static_cast<size_t>(slot)] = y;
                cache_used_[static_cast<size_t>(slot)] = step_;
            }
        }
        if (slot >= 0) cache_index_[y] = slot;
        row_of_[q] = static_cast<int>(missing_ids_.size());
        pass_row_[y] = row_of_[q];
        missing_ids_.push_back(y);
        missing_slot_.push_back(slot);
        ++misses_;
    }
    if (const int segs = moe_segments(); segs > 0) {
        // MoE: a slot holds the projections of the experts computed so far for its id; a slot
        // given to a new id holds none.
        const size_t per = static_cast<size_t>(n_layers_) * segs;
        valid_.resize(cache_token_.size() * per, 0);
        for (const int slot : missing_slot_)
            if (slot >= 0) std::fill_n(valid_.begin() + static_cast<std::ptrdiff_t>(slot * per), per, uint8_t{0});
    }
}

bool ContributionReducer::cached_all_experts(int slot, int buf) const {
    const int segs = moe_segments();
    if (segs == 0) return true;
    const MoeLayout& moe = w_->moe();
    const uint8_t* valid = valid_.data() + static_cast<size_t>(slot) * n_layers_ * segs;
    const int32_t* exps = exps_[static_cast<size_t>(buf)].data();
    for (int l = 0; l < n_layers_; ++l, valid += segs, exps += moe.n_used) {
        for (int k = 0; k < moe.n_used; ++k)
            if (!valid[exps[k]]) return false;
        if (segs > moe.n_expert && !valid[moe.n_expert]) return false;  // the shared expert
    }
    return true;
}

int ContributionReducer::moe_segments() const {
    const MoeLayout& m = w_->moe();
    return m.moe() ? m.n_expert + (m.n_ff_shexp > 0 ? 1 : 0) : 0;
}

// MoE: layer l's projections d(y) = W_down^T W_U[y] of the experts the pass's tokens ran, and no
// others (llama.cpp ran n_used of n_expert; the others' contributions are not candidates), into
// the thread's pool, expert by expert: all of an expert's projections in one project() call, so its
// W_down is dequantized once per pass (in chunks of 64 ids it was dequantized again per chunk). A
// new id of the pass finds its experts through s.at; they also go into its cache slot, if it has
// one; for an id already cached, only into the slot, where an expert it now needs was never
// computed. u_ holds the unembedding rows of the pass's new ids, then of its cached ids (hit_row_).
// The pool holds only the experts the pass's tokens ran (at most compact_ floats a token), where a
// full-width row per new id was n_expert / n_used times larger.
void ContributionReducer::project_experts(int l, const std::vector<int>& which, Scratch& s) {
    const MoeLayout& moe = w_->moe();
    const int segs = moe_segments();
    const int64_t E = w_->n_embd(), total = static_cast<int64_t>(n_layers_) * n_ff_;
    const int M = static_cast<int>(missing_ids_.size());
    // Targets per segment: (u row, pass row or -1, cache slot or -1).
    s.targets.assign(static_cast<size_t>(segs), {});
    s.at.assign(static_cast<size_t>(M) * segs, -1);
    for (const int q : which) {
        const uint8_t* ran = ran_[static_cast<size_t>(queue_[q].buf)].data() + static_cast<size_t>(l) * moe.n_expert;
        for (int e = 0; e < segs; ++e) {
            if (e < moe.n_expert && !ran[e]) continue;  // the shared expert always runs
            if (const int m = row_of_[q]; m >= 0) {
                int64_t& at = s.at[static_cast<size_t>(m) * segs + e];
                if (at >= 0) continue;
                at = 0;  // placed below
                s.targets[static_cast<size_t>(e)].push_back({m, m, missing_slot_[static_cast<size_t>(m)]});
            } else {
                const int slot = slot_of_[q];
                uint8_t& v = valid_[(static_cast<size_t>(slot) * n_layers_ + l) * segs + e];
                if (v) continue;
                v = 1;  // scheduled now (one thread per layer: no other writer of this byte)
                s.targets[static_cast<size_t>(e)].push_back({M + hit_row_.at(slot), -1, slot});
            }
        }
    }
    auto width_of = [&](int e) { return e < moe.n_expert ? moe.n_ff_exp : moe.n_ff_shexp; };
    int64_t pool = 0;
    for (int e = 0; e < segs; ++e) pool += static_cast<int64_t>(s.targets[static_cast<size_t>(e)].size()) * width_of(e);
    s.pool.resize(static_cast<size_t>(pool));
    int64_t base = 0;
    for (int e = 0; e < segs; ++e) {
        const auto& tg = s.targets[static_cast<size_t>(e)];
        if (tg.empty()) continue;
        expert_proj_ += static_cast<int64_t>(tg.size());
        for (const Target& t : tg) expert_proj_cached_ += t.prow < 0;
        const int64_t off = int64_t{e} * moe.n_ff_exp, width = width_of(e);
        const int mn = static_cast<int>(tg.size());
        s.u.resize(static_cast<size_t>(mn) * E);
        for (int k = 0; k < mn; ++k)
            std::copy_n(u_.data() + static_cast<size_t>(tg[k].urow) * E, E, s.u.data() + static_cast<size_t>(k) * E);
        float* D = s.pool.data() + base;
        w_->project(l, s.u.data(), mn, off, off + width, D, width, s.row.data());
        for (int k = 0; k < mn; ++k) {
            const Target& t = tg[k];
            const int64_t at = base + int64_t{k} * width;
            if (t.prow >= 0) s.at[static_cast<size_t>(t.prow) * segs + e] = at;
            if (t.slot >= 0) {
                std::copy_n(s.pool.data() + at, width, cache_.get() + static_cast<size_t>(t.slot) * total + static_cast<size_t>(l) * n_ff_ + off);
                valid_[(static_cast<size_t>(t.slot) * n_layers_ + l) * segs + e] = 1;
            }
        }
        base += int64_t{mn} * width;
    }
}

// The exact top k of one layer's contributions c (n values): descending, ties by lower index.
// idx (room for n) holds the m candidates c[i] >= guess, ascending, guess being a value believed
// to lie below the k-th largest (the same layer's k-th value on the sample's previous token,
// halved): when m >= k the top k are among them and only those are ranked; otherwise every value
// is. Exact either way; returns the k-th value.
static float layer_top(const float* c, int64_t n, int k, int32_t* idx, int64_t m, std::vector<float>& scratch,
                       float* top_c, int32_t* top_i) {
    if (m < k) {
        std::iota(idx, idx + n, 0);
        m = n;
    }
    scratch.resize(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) scratch[j] = c[idx[j]];
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    const float kth = scratch[k - 1];
    // Candidates above the k-th value, then ties at it by lowest index, in one pass over the
    // candidates: a tie is >= guess, so it is one of them (idx is ascending). Scanning the whole
    // row for ties instead went half of it on average (the k-th value is mostly unique).
    int64_t w = 0, ties = 0;
    for (int64_t j = 0; j < m; ++j) {
        const int32_t i = idx[j];
        if (c[i] > kth) idx[w++] = i;  // w <= j: never overwrites a candidate still to read
        else if (c[i] == kth && ties < k) scratch[ties++] = static_cast<float>(i);  // tie indices (exact below 2^24)
    }
    ties = std::min<int64_t>(ties, k - w);  // the lowest-index ties that complete the top k
    for (int64_t t = 0; t < ties; ++t) idx[w++] = static_cast<int32_t>(scratch[t]);
    std::sort(idx, idx + w, [c](int32_t x, int32_t y) { return c[x] != c[y] ? c[x] > c[y] : x < y; });
    for (int r = 0; r < k; ++r) {
        top_c[r] = c[idx[r]];
        top_i[r] = idx[r];
    }
    return kth;
}

// MoE: the products over the computed neurons only, ranked in the compact order (ascending
// expert id, the shared expert last: the flat order), their indices then mapped to flat ones. The
// neurons of experts that did not run are no candidates (-inf); they only matter where fewer than
// k neurons ran or the k-th value is -inf, when the row is ranked at full width as those ties need.
float ContributionReducer::moe_layer_top(const float* a, const int32_t* exps, const float* const* d, float guess,
                                         Scratch& s, float* top_c, int32_t* top_i, ProductsFn products) const {
    const MoeLayout& moe = w_->moe();
    const int U = moe.n_used;
    const int64_t F = moe.n_ff_exp, Fs = moe.n_ff_shexp, routed = int64_t{moe.n_expert} * F, nc = compact_;
    // The products segment by segment, each read in place from its expert's projections (gathering
    // them into one row first copied 32 KiB a token and layer at OLMoE's shape): the same values,
    // and the candidates' compact indices come out ascending as from one call over the whole row.
    int64_t mc = 0;
    for (int k = 0; k <= U; ++k) {
        const int64_t off = int64_t{k} * F, width = k < U ? F : Fs;
        if (width == 0) continue;  // no shared expert
        const int64_t m = products(a + off, d[k], width, guess, s.c.data() + off, s.idx.data() + mc);
        for (int64_t j = mc; j < mc + m; ++j) s.idx[static_cast<size_t>(j)] += static_cast<int32_t>(off);
        mc += m;
    }
    auto flat = [&](int64_t i) { return i < int64_t{U} * F ? int64_t{exps[i / F]} * F + i % F : routed + (i - int64_t{U} * F); };
    if (nc >= k_) {
        const float kth = layer_top(s.c.data(), nc, k_, s.idx.data(), mc, s.top, top_c, top_i);
        if (kth != -INFINITY) {
            for (int r = 0; r < k_; ++r) top_i[r] = static_cast<int32_t>(flat(top_i[r]));
            return kth;
        }
    }
    s.full.assign(static_cast<size_t>(n_ff_), -INFINITY);
    for (int64_t i = 0; i < nc; ++i) s.full[static_cast<size_t>(flat(i))] = s.c[static_cast<size_t>(i)];
    return layer_top(s.full.data(), n_ff_, k_, s.idx.data(), 0, s.top, top_c, top_i);
}

// Selects the queued tokens in `which` (their activations held, their projections' sources
// assigned): contributions, each layer's top k, eta; frees their activations. One layer at a time
// per thread: the layer's new projections (dense: W_down's rows for the layer streamed once per 64
// ids; MoE: each expert's once per pass), cached where they have a slot, then every token's products
// and top k at that layer; only one layer's projections of the pass's new ids are held per thread.
void ContributionReducer::select(const std::vector<int>& which) {
    const int W = static_cast<int>(which.size());
    if (W == 0) return;
    const int64_t E = w_->n_embd();
    const int64_t total = static_cast<int64_t>(n_layers_) * n_ff_;
    const int M = static_cast<int>(missing_ids_.size());
    const MoeLayout& moe = w_->moe();
    // MoE: the cached ids may lack experts their tokens ran now, so their unembedding rows follow.
    hit_row_.clear();
    if (moe.moe())
        for (const int q : which)
            if (slot_of_[q] >= 0 && !hit_row_.count(slot_of_[q])) hit_row_.emplace(slot_of_[q], static_cast<int>(hit_row_.size()));
    u_.resize(static_cast<size_t>(M + hit_row_.size()) * E);
    for (int m = 0; m < M; ++m) w_->unembed_row(missing_ids_[static_cast<size_t>(m)], u_.data() + static_cast<size_t>(m) * E);
    for (const auto& [slot, row] : hit_row_)
        w_->unembed_row(cache_token_[static_cast<size_t>(slot)], u_.data() + static_cast<size_t>(M + row) * E);
    const int K = n_layers_ * k_;
    const size_t base = sel_eta_.size();
    sel_c_.resize((base + W) * K);
    sel_i_.resize((base + W) * K);
    sel_eta_.resize(base + W);
    sel_kth_.resize(static_cast<size_t>(W) * n_layers_);
    const int threads = (static_cast<int64_t>(M + W) * total > 200000) ? p_.n_threads : 1;
    if (static_cast<int>(scratch_.size()) < threads) scratch_.resize(static_cast<size_t>(threads));
    std::atomic<int> next_scratch{0};
    std::atomic<int64_t> project_ns{0};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch& s = scratch_[static_cast<size_t>(next_scratch.fetch_add(1))];
        if (!moe.moe()) s.proj.resize(static_cast<size_t>(M) * n_ff_);
        s.row.resize(ContributionWeights::kProjectScratch);
        s.c.resize(static_cast<size_t>(n_ff_));
        s.idx.resize(static_cast<size_t>(n_ff_));
        s.guess.resize(kth_.size());
        const ProductsFn products = products_kernel();
#pragma omp for schedule(dynamic)
        for (int l = 0; l < n_layers_; ++l) {
            const auto t0 = std::chrono::steady_clock::now();
            if (moe.moe()) {
                project_experts(l, which, s);
            } else {
                for (int m0 = 0; m0 < M; m0 += kMaxBatch) {
                    const int mn = std::min(kMaxBatch, M - m0);
                    w_->project(l, u_.data() + static_cast<size_t>(m0) * E, mn, 0, n_ff_,
                                s.proj.data() + static_cast<size_t>(m0) * n_ff_, n_ff_, s.row.data());
                }
                for (int m = 0; m < M; ++m)
                    if (const int slot = missing_slot_[static_cast<size_t>(m)]; slot >= 0)
                        std::copy_n(s.proj.data() + static_cast<size_t>(m) * n_ff_, n_ff_,
                                    cache_.get() + static_cast<size_t>(slot) * total + static_cast<size_t>(l) * n_ff_);
            }
            project_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
            // Each sample's guess at this layer: from its last token selected before the pass, then
            // from its previous token in the pass (queue order is token order within a sample), so
            // a pass's tokens after a sample's first are pruned too (the first pass of a run has no
            // earlier token: ranking all of a row's values, for every token, took an eighth of it).
            for (size_t k = 0; k < kth_.size(); ++k) s.guess[k] = kth_[k][static_cast<size_t>(l)];
            for (int j = 0; j < W; ++j) {
                const int q = which[j];
                const size_t at = base + j;
                // c = a * d(y) in a buffer that stays in L1, and the candidates.
                const float* cached = row_of_[q] >= 0 ? nullptr
                                                      : cache_.get() + static_cast<size_t>(slot_of_[q]) * total +
                                                            static_cast<size_t>(l) * n_ff_;
                // kth_ is read only here and written after the pass.
                const float guess = s.guess[static_cast<size_t>(queue_[q].sample)];
                // No finite guess: no candidates, so layer_top ranks every value.
                const float g = std::isfinite(guess) ? guess : INFINITY;
                float* top_c = sel_c_.data() + at * K + l * k_;
                int32_t* top_i = sel_i_.data() + at * K + l * k_;
                float kth;
                if (moe.moe()) {
                    const size_t b = static_cast<size_t>(queue_[q].buf);
                    const int32_t* exps = exps_[b].data() + static_cast<size_t>(l) * moe.n_used;
                    // Its experts' projections: in the cache, or (a new id of the pass) in the pool.
                    const int segs = moe_segments();
                    s.seg.resize(static_cast<size_t>(moe.n_used) + 1);
                    for (int k = 0; k <= moe.n_used; ++k) {
                        const int e = k < moe.n_used ? exps[k] : moe.n_expert;  // the shared expert last
                        if (e == moe.n_expert && segs == moe.n_expert) {
                            s.seg[static_cast<size_t>(k)] = nullptr;  // none
                        } else if (cached) {
                            s.seg[static_cast<size_t>(k)] = cached + int64_t{e} * moe.n_ff_exp;
                        } else {
                            const int64_t at = s.at[static_cast<size_t>(row_of_[q]) * segs + e];
                            s.seg[static_cast<size_t>(k)] = s.pool.data() + at;
                        }
                    }
                    kth = moe_layer_top(bufs_[b].data() + static_cast<size_t>(l) * compact_, exps, s.seg.data(), g, s,
                                        top_c, top_i, products);
                } else {
                    const float* d = cached ? cached : s.proj.data() + static_cast<size_t>(row_of_[q]) * n_ff_;
                    const float* a = bufs_[queue_[q].buf].data() + static_cast<size_t>(l) * n_ff_;
                    const int64_t mc = products(a, d, n_ff_, g, s.c.data(), s.idx.data());
                    kth = layer_top(s.c.data(), n_ff_, k_, s.idx.data(), mc, s.top, top_c, top_i);
                }
                // A positive guess prunes; otherwise rank all.
                sel_kth_[static_cast<size_t>(j) * n_layers_ + l] = s.guess[static_cast<size_t>(queue_[q].sample)] =
                    kth > 0 ? 0.5f * kth : -INFINITY;
            }
        }
#pragma omp for
        for (int j = 0; j < W; ++j) {
            const size_t at = base + j;
            const int rank = std::min(p_.eta_rank, K);
            s.top.assign(sel_c_.data() + at * K, sel_c_.data() + (at + 1) * K);
            std::nth_element(s.top.begin(), s.top.begin() + (rank - 1), s.top.end(), std::greater<float>());
            sel_eta_[at] = s.top[rank - 1];
        }
    }
    dot_seconds_ += static_cast<double>(project_ns.load()) * 1e-9 / threads;
    for (int j = 0; j < W; ++j) {
        Queued& e = queue_[which[j]];
        e.sel = static_cast<int>(base) + j;
        std::copy_n(sel_kth_.data() + static_cast<size_t>(j) * n_layers_, n_layers_, kth_[e.sample].data());
        free_.push_back(e.buf);
        e.buf = -1;
        --held_;
    }
}

// The held tokens go through passes of at most group_tokens_ at a time, in queue order; after each
// one, the queue's prefix whose selections are all made is recorded.
void ContributionReducer::flush() {
    if (queue_.empty()) return;
    const auto t0 = std::chrono::steady_clock::now();
    while (held_ > 0) {
        which_.clear();
        for (size_t q = 0; q < queue_.size() && static_cast<int64_t>(which_.size()) < group_tokens_; ++q)
            if (queue_[q].buf >= 0) which_.push_back(static_cast<int>(q));
        assign_sources(which_);
        select(which_);
        record_prefix();  // everything up to the pass's last token
    }
    record_prefix();
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Records the queue's selected prefix (sets, eta, counts) and drops it; the selections still
// pending (made early, for cached ids, behind a token still waiting) move down.
void ContributionReducer::record_prefix() {
    const int K = n_layers_ * k_;
    size_t p = 0;
    for (; p < queue_.size() && queue_[p].sel >= 0; ++p) {
        const Queued& e = queue_[p];
        const int sample = e.sample, token = e.token;
        const float* tc = sel_c_.data() + static_cast<size_t>(e.sel) * K;
        const int32_t* ti = sel_i_.data() + static_cast<size_t>(e.sel) * K;
        const float eta = sel_eta_[static_cast<size_t>(e.sel)];
        uint64_t* w = sets_.chunk(sample, token / p_.chunk);
        int32_t active = 0;
        for (int l = 0; l < n_layers_; ++l) {
            for (int r = 0; r < k_; ++r) {
                const size_t at = static_cast<size_t>(l) * k_ + r;
                if (!(tc[at] > eta)) break;  // descending within a layer
                const int64_t bit = static_cast<int64_t>(l) * n_ff_ + ti[at];
                w[bit >> 6] |= uint64_t{1} << (bit & 63);
                ++active;
            }
        }
        slot(eta_[sample], static_cast<size_t>(token), 1)[0] = eta;
        slot(count_[sample], static_cast<size_t>(token), 1)[0] = active;
        if (p_.keep_top) {
            std::copy(tc, tc + K, slot(top_c_[sample], static_cast<size_t>(token), static_cast<size_t>(K)));
            std::copy(ti, ti + K, slot(top_i_[sample], static_cast<size_t>(token), static_cast<size_t>(K)));
        }
        tokens_ += 1;
    }
    if (p == 0) return;
    queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(p));
    // In order of their index, so that none is overwritten before it moves.
    pending_.clear();
    for (Queued& e : queue_)
        if (e.sel >= 0) pending_.push_back(&e);
    std::sort(pending_.begin(), pending_.end(), [](const Queued* a, const Queued* b) { return a->sel < b->sel; });
    for (size_t j = 0; j < pending_.size(); ++j) {
        const size_t from = static_cast<size_t>(pending_[j]->sel);
        std::copy_n(sel_c_.data() + from * K, K, sel_c_.data() + j * K);
        std::copy_n(sel_i_.data() + from * K, K, sel_i_.data() + j * K);
        sel_eta_[j] = sel_eta_[from];
        pending_[j]->sel = static_cast<int>(j);
    }
    sel_c_.resize(pending_.size() * K);
    sel_i_.resize(pending_.size() * K);
    sel_eta_.resize(pending_.size());
}

void ContributionReducer::finish(int sample, int n_tokens) {
    flush();  // the sample's last token may still be queued
    const size_t n = static_cast<size_t>(n_tokens);
    sets_.finish(sample, static_cast<int64_t>((n + p_.chunk - 1) / p_.chunk));
    eta_[sample].resize(n);
    count_[sample].resize(n);
    if (p_.keep_top) {
        top_c_[sample].resize(n * n_layers_ * k_);
        top_i_[sample].resize(n * n_layers_ * k_);
    }
}

}  // namespace neurotap
