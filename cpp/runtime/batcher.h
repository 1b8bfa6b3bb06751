// Continuous batching: many runs (DecodeLoops, each with its own samples, reducers, methods, stop
// strings) decode as sequences of ONE context, one llama_decode per step over every run's rows.
// Runs join and leave between steps: the prompts of the runs joining are decoded before the next
// shared step (the others wait for them: prompt evaluation is what a join costs them), untapped
// ones together in one llama_decode where the context allows it without changing any row's
// values (TappedContext::decode_prompts), the others one by one; and a run
// that has ended or reached the token target its owner set simply adds no rows. Each run decodes
// on its own sequence slots (SampleParams::seqs), so its tokens and records are those it would
// produce alone: rows are kept in increasing sequence order (llama.cpp then keeps batch order,
// see the facts file on split_equal), and tapped rows are routed back to each run by row.
#pragma once
#include <memory>
#include <vector>

#include "runtime/decode_loop.h"
#include "runtime/sampling.h"
#include "runtime/tapped_context.h"

namespace neurotap {

class Batcher : public RowSink {
public:
    explicit Batcher(TappedContext& tc) : tc_(tc) {}
    Batcher(const Batcher&) = delete;
    Batcher& operator=(const Batcher&) = delete;

    // Adds a run (not owned; it must outlive its membership) that decodes until its live samples
    // hold `until` tokens. Its slots must not overlap another member's live samples' (ParamError).
    void add(DecodeLoop* loop, int until);
    // Sets a member's token target (a streamed or raced run goes on in steps its owner chooses).
    void set_until(DecodeLoop* loop, int until);
    // Removes a member (its samples stay as they are).
    void remove(DecodeLoop* loop);
    int size() const { return static_cast<int>(members_.size()); }

    // Decodes: starts members not started yet (their prompts), then shared steps, until a
    // member needs its owner (it reached its target or ended: every such member is returned),
    // `max_steps` steps were taken, or `progress` asks to stop. Returns the members that need
    // their owner now (started members with no rows left to decode).
    std::vector<DecodeLoop*> run(int max_steps, Progress* progress);
    // Shared decode steps taken so far, and rows decoded by them.
    int64_t steps() const { return steps_; }
    int64_t rows() const { return rows_; }
    // llama_decode calls that decoded several joining runs' prompts together.
    int64_t joint_prompt_decodes() const { return joins_; }

    TapRequest tap_request() const override { return want_; }
    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override;
    void on_moe_rows(const MoeRows& m, unsigned kinds) override;

private:
    struct Member {
        DecodeLoop* loop;
        int until;
        int row0 = 0, n_rows = 0;  // its rows in the step in flight (in batch order, see order_)
        bool tapped = false;       // fed tapped rows this step
    };
    Member* find(DecodeLoop* loop);
    template <typename F>
    void for_member_runs(int row0, int n_rows, F&& f);
    bool needs_owner(const Member& m) const;
    void join(Progress* progress);
    // One shared step over every member with rows; returns whether anything was decoded.
    bool step();

    TappedContext& tc_;
    std::vector<Member> members_;
    TapRequest want_;
    // The step in flight: rows in increasing sequence order, and per row its member and that
    // member's own row index.
    std::vector<llama_token> tokens_, m_tokens_;
    std::vector<int> pos_, m_pos_;
    std::vector<llama_seq_id> seqs_, m_seqs_;
    std::vector<int> row_member_, row_local_;
    std::vector<int> order_;
    int64_t steps_ = 0, rows_ = 0, joins_ = 0;
};

}  // namespace neurotap
