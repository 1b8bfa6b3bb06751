#include "runtime/batcher.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "base/errors.h"

namespace neurotap {

Batcher::Member* Batcher::find(DecodeLoop* loop) {
    for (Member& m : members_)
        if (m.loop == loop) return &m;
    return nullptr;
}

void Batcher::add(DecodeLoop* loop, int until) {
    if (!loop) throw ParamError("Batcher::add: no run");
    if (&loop->context() != &tc_) throw ParamError("the run decodes in another context than the batcher's");
    if (find(loop)) throw ParamError("the run was added already");
    // A member's ended samples never touch their slots again (a decided race's losers): those
    // slots may go to a new run at once.
    for (const Member& m : members_)
        for (int a = 0; a < m.loop->n(); ++a)
            for (int b = 0; b < loop->n(); ++b)
                if (m.loop->sample(a).live && m.loop->slot(a) == loop->slot(b))
                    throw ParamError("sequence slot " + std::to_string(loop->slot(b)) + " is held by another run");
    members_.push_back(Member{loop, until});
}

void Batcher::set_until(DecodeLoop* loop, int until) {
    Member* m = find(loop);
    if (!m) throw ParamError("set_until: the run is not in this batcher");
    m->until = until;
}

void Batcher::remove(DecodeLoop* loop) {
    members_.erase(std::remove_if(members_.begin(), members_.end(), [&](const Member& m) { return m.loop == loop; }),
                   members_.end());
}

bool Batcher::needs_owner(const Member& m) const {
    return m.loop->started() && (!m.loop->failed().empty() || m.loop->pending(m.until) == 0);
}

// Consecutive rows of one member with consecutive own rows go to it in one call:
// f(member, first batch row, end batch row) for each such run of tapped members' rows.
template <typename F>
void Batcher::for_member_runs(int row0, int n_rows, F&& f) {
    int r = row0;
    const int end = row0 + n_rows;
    while (r < end) {
        const int mi = row_member_[static_cast<size_t>(r)];
        int k = r + 1;
        while (k < end && row_member_[static_cast<size_t>(k)] == mi &&
               row_local_[static_cast<size_t>(k)] == row_local_[static_cast<size_t>(k - 1)] + 1)
            ++k;
        Member& m = members_[static_cast<size_t>(mi)];
        if (m.tapped) f(m, r, k);
        r = k;
    }
}

void Batcher::on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) {
    for_member_runs(row0, n_rows, [&](Member& m, int r, int k) {
        m.loop->on_rows(kind, layer, row_local_[static_cast<size_t>(r)], k - r,
                        data + static_cast<int64_t>(r - row0) * width, width);
    });
}

// An MoE layer's compact rows: each member gets its rows as a MoeRows of its own (row-major
// arrays: a sub-range is an offset into each).
void Batcher::on_moe_rows(const MoeRows& m, unsigned kinds) {
    const MoeLayout& L = *m.layout;
    const size_t U = static_cast<size_t>(L.n_used);
    for_member_runs(m.row0, m.n_rows, [&](Member& member, int r, int k) {
        const size_t i = static_cast<size_t>(r - m.row0);
        MoeRows sub = m;
        sub.row0 = row_local_[static_cast<size_t>(r)];
        sub.n_rows = k - r;
        sub.act = m.act + i * U * static_cast<size_t>(L.n_ff_exp);
        sub.ids = m.ids + i * U;
        sub.weights = m.weights + i * U;
        if (m.shexp_act) sub.shexp_act = m.shexp_act + i * static_cast<size_t>(L.n_ff_shexp);
        if (m.shexp_gate) sub.shexp_gate = m.shexp_gate + i;
        member.loop->on_moe_rows(sub, kinds);
    });
}

bool Batcher::step() {
    tokens_.clear(), pos_.clear(), seqs_.clear();
    m_tokens_.clear(), m_pos_.clear(), m_seqs_.clear();
    std::vector<int> owner;  // member of each planned row (in planning order)
    want_ = TapRequest{};
    int attention = -1;
    bool any_tap = false;
    for (size_t i = 0; i < members_.size(); ++i) {
        Member& m = members_[i];
        m.n_rows = 0;
        m.tapped = false;
        if (!m.loop->started() || !m.loop->failed().empty()) continue;
        const TapRequest w = m.loop->tap_request();
        const bool taps = m.loop->tapped();
        // One attention layer per decode: a run wanting another waits for a later step.
        if (taps && w.attention_layer >= 0) {
            if (attention >= 0 && attention != w.attention_layer) continue;
            attention = w.attention_layer;
        }
        m.row0 = static_cast<int>(m_tokens_.size());
        m.n_rows = m.loop->plan(m.until, m_tokens_, m_pos_, m_seqs_);
        if (m.n_rows == 0) continue;
        owner.resize(m_tokens_.size(), static_cast<int>(i));
        if (taps) {
            m.tapped = any_tap = true;
            want_ |= w;
        }
    }
    const int n = static_cast<int>(m_tokens_.size());
    if (n == 0) return false;
    // Increasing sequence ids over the whole batch (slots of different runs may interleave).
    order_.resize(static_cast<size_t>(n));
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [&](int a, int b) { return m_seqs_[static_cast<size_t>(a)] < m_seqs_[static_cast<size_t>(b)]; });
    row_member_.resize(static_cast<size_t>(n));
    row_local_.resize(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) {
        const int src = order_[static_cast<size_t>(r)];
        tokens_.push_back(m_tokens_[static_cast<size_t>(src)]);
        pos_.push_back(m_pos_[static_cast<size_t>(src)]);
        seqs_.push_back(m_seqs_[static_cast<size_t>(src)]);
        const int mi = owner[static_cast<size_t>(src)];
        Member& m = members_[static_cast<size_t>(mi)];
        row_member_[static_cast<size_t>(r)] = mi;
        row_local_[static_cast<size_t>(r)] = src - m.row0;
        m.loop->place(src - m.row0, r);  // its logits are in batch row r
    }
    const auto t0 = std::chrono::steady_clock::now();
    try {
        tc_.decode_rows(tokens_.data(), pos_.data(), seqs_.data(), n, any_tap ? this : nullptr);
    } catch (const std::exception& e) {
        // The cells of every run in the step are unknown now: each of them fails.
        for (Member& m : members_)
            if (m.n_rows) m.loop->fail(e.what());
        return true;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++steps_;
    rows_ += n;
    for (Member& m : members_) {
        if (!m.n_rows) continue;
        try {
            m.loop->commit(seconds);
        } catch (const std::exception&) {
            // commit recorded why (DecodeLoop::failed): the others go on.
        }
    }
    return true;
}

// Joining runs' prompts, before the next shared step: untapped ones together in one llama_decode
// where the context can keep each row's values those of its prompt decoded alone (a span that
// cannot goes alone, and the rest are tried again), the others one after another.
void Batcher::join(Progress* progress) {
    std::vector<DecodeLoop*> together;
    for (Member& m : members_) {
        if (m.loop->started() || !m.loop->failed().empty()) continue;
        if (progress) progress->tokens.fetch_add(1, std::memory_order_relaxed);
        if (tc_.joint_prompts() && !m.loop->tapped()) {
            together.push_back(m.loop);
            continue;
        }
        try {
            m.loop->begin();
        } catch (const std::exception&) {
            // begin recorded why
        }
    }
    if (together.empty()) return;
    std::sort(together.begin(), together.end(), [](DecodeLoop* a, DecodeLoop* b) { return a->slot(0) < b->slot(0); });
    std::vector<PromptSpan> spans;
    std::vector<DecodeLoop*> loops;
    for (DecodeLoop* loop : together) {
        try {
            spans.push_back(loop->begin_prompt());
            loops.push_back(loop);
        } catch (const std::exception&) {
            // begin_prompt recorded why
        }
    }
    auto alone = [&](size_t j) {
        const auto t0 = std::chrono::steady_clock::now();
        try {
            const PromptSpan& p = spans[j];
            const int last = tc_.decode_seq(p.tokens, p.n, p.pos0, p.seq, nullptr);
            loops[j]->end_prompt(last, t0);
        } catch (const std::exception& e) {
            loops[j]->fail(e.what());
        }
    };
    for (int bad; spans.size() > 1 && (bad = tc_.joint_breaker(spans)) >= 0;) {
        alone(static_cast<size_t>(bad));
        spans.erase(spans.begin() + bad);
        loops.erase(loops.begin() + bad);
    }
    if (spans.size() == 1) alone(0);
    if (spans.size() < 2) return;
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<int> last;
    try {
        last = tc_.decode_prompts(spans);
    } catch (const std::exception& e) {
        for (DecodeLoop* loop : loops) loop->fail(e.what());  // their cells are unknown now
        return;
    }
    ++joins_;
    for (size_t j = 0; j < loops.size(); ++j) {
        try {
            loops[j]->end_prompt(last[j], t0);
        } catch (const std::exception&) {
            // end_prompt recorded why
        }
    }
}

std::vector<DecodeLoop*> Batcher::run(int max_steps, Progress* progress) {
    auto in_use = tc_.lock_use();  // Model::close waits for this
    tc_.ctx();                     // closed: RuntimeError
    std::vector<DecodeLoop*> out;
    auto collect = [&] {
        out.clear();
        for (const Member& m : members_)
            if (needs_owner(m)) out.push_back(m.loop);
        return !out.empty();
    };
    join(progress);
    for (int taken = 0; !collect() && taken < max_steps; ++taken) {
        if (progress && progress->stop_requested()) break;
        if (!step()) break;
        if (progress) progress->tokens.fetch_add(1, std::memory_order_relaxed);
    }
    // The runs handed back are read by their owners: their records must be readable, as after
    // DecodeLoop::advance (the contribution reducer keeps the last step's rows until a sync).
    // The others go on batching their work.
    for (DecodeLoop* loop : out)
        if (loop->started() && loop->failed().empty()) loop->sync();
    return out;
}

}  // namespace neurotap
