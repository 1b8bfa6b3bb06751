// The one decode loop: N samples of one prompt decoded in parallel (a single generation is a run
// of one). The prompt is decoded once and its KV cells copied to every sequence; each step decodes
// one batch holding the next token of every live sample; each sample has its own sampler chain
// and RNG; tapped rows are routed to (sample, token) and streamed into reducers. Samples can be
// stopped mid-run (their KV cells are freed) and the others continued. Methods (NEAT, NeuReasoner)
// steer it only through the Steering interface (steering.h): the loop knows none by name.
#pragma once
#include <chrono>
#include <string>
#include <vector>

#include "runtime/reducer.h"
#include "runtime/sampling.h"
#include "runtime/steering.h"
#include "runtime/tapped_context.h"

namespace neurotap {

// Why a sample ended: the one list every run reports. Exit: a method ended it (SampleState::exit_by).
enum class Finish : int { Live = 0, Eos, Length, Stop, Stopped, Cancelled, Exit };
// "", "eos", "length", "stop", "stopped", "cancelled", "exit" (a method's exit has its own name:
// SampleState::finish_reason).
const char* finish_name(Finish f);

// A run's parameters: the sampler's (flat: temperature, top_p, ..., seed is the run's seed) and
// the run's own.
struct SampleParams : SamplingParams {
    int n = 16;
    int max_tokens = 256;
    bool seed_per_sample = true;   // sample i draws with sample_seed(seed, i); false: every one with seed
    std::vector<std::string> stop;
    // Teacher forcing: these tokens are fed first instead of sampled, one per step as generation
    // decodes (an end-of-generation token among them is kept, stop strings are not applied to
    // them); sampling goes on after them up to max_tokens.
    std::vector<llama_token> forced;
    // Per-sample teacher forcing (one stream per sample, n of them; their lengths may differ):
    // sample i is fed forced_per_sample[i] instead of `forced` (then samples up to max_tokens).
    std::vector<std::vector<llama_token>> forced_per_sample;
    bool tap = true;
    int top_logprobs = 0;          // > 0: record the top-k log-probabilities of every sampled position
    // > 0: this context holds KV cells for only the first `kv_tokens` tokens of each sample (a
    // race decided early, whose winner goes on elsewhere: see Handoff); advance stops there.
    int kv_tokens = 0;
    // The context's sequence ids (KV slots) of samples 0..n-1, increasing; empty: 0..n-1. A
    // scheduler (Batcher) gives each run its own slots of one shared context.
    std::vector<int> seqs;
    // Reuse the KV cells of the longest prefix of the prompt that the first slot already holds
    // (an earlier run's prompt and tokens) instead of decoding it again: Exact keeps only cells
    // that give the tokens of a run without reuse, Prefix every common one (see PromptReuse). Only
    // the prompt's last token is ever tapped, and it is always decoded, so reuse never hides a
    // row from a reducer.
    PromptReuse reuse_prompt = PromptReuse::Exact;
    // ParamError for what is wrong whatever the model (what the model bounds, DecodeLoop checks).
    void validate() const;
};

// The teacher-forced tokens of sample s: its own stream, or the run's one stream for every sample.
inline const std::vector<llama_token>& forced_tokens(const SampleParams& p, int s) {
    return p.forced_per_sample.empty() ? p.forced : p.forced_per_sample[static_cast<size_t>(s)];
}

struct SampleState {
    std::vector<llama_token> tokens;    // end-of-generation token excluded (unless forced)
    std::string text;                   // raw bytes, cut at a stop string
    Finish finish = Finish::Live;
    const Steering* exit_by = nullptr;  // with Finish::Exit: the method that ended it
    bool live = true;
    llama_token eog_token = -1;         // the end-of-generation token that ended it
    int logits_row = 0;                 // row of the last decode holding this sample's logits
    std::vector<float> token_logprob;   // [tokens] with top_logprobs > 0
    std::vector<float> mean_logprob;    // [tokens] mean of log p over the whole vocabulary (self-certainty)
    std::vector<int32_t> top_ids;       // [tokens, top_logprobs]
    std::vector<float> top_logprobs;    // [tokens, top_logprobs]
    std::vector<uint32_t> piece_end;    // text size after each token (a rollback cuts the text there)
    int reseeds = 0;                    // rollbacks so far (each reseeds the sampler)
    bool cells_to_free = false;         // ended with KV cells not yet freed (one shared stream: at the run's end)
    // The one name of why it ended: finish_name, or the exiting method's exit_reason ("neat_exit").
    std::string finish_reason() const { return finish == Finish::Exit && exit_by ? exit_by->exit_reason() : finish_name(finish); }
};

// A live sample moved out of a run to go on in another context: its KV cells (llama.cpp's
// sequence state), tokens, text and its sampler chain with its RNG where it stands, so that it
// draws exactly the tokens it would have drawn had it stayed (and the race's KV can be freed).
struct Handoff {
    std::vector<llama_token> prompt;
    std::vector<uint8_t> kv;
    std::vector<llama_token> tokens;
    std::string text;
    std::vector<uint32_t> piece_end;   // text size after each token
    llama_sampler* sampler = nullptr;  // owned
    int index = 0;                     // the sample's index in the run it came from
    Handoff() = default;
    Handoff(Handoff&& o) noexcept { *this = std::move(o); }
    Handoff& operator=(Handoff&& o) noexcept;
    ~Handoff();
};

class DecodeLoop : public RowSink {
public:
    // Checks that the request fits the context (ContextError says what fits) and the parameters.
    // `methods` steer the run (each is fed like the reducers, after them); at most one changes tokens.
    DecodeLoop(TappedContext& tc, std::vector<llama_token> prompt, SampleParams params,
               std::vector<Reducer*> reducers, std::vector<Steering*> methods = {});
    // A run of one that continues a handed-off sample in this context (which must hold at least
    // prompt + params.max_tokens cells); params.n must be 1, its sampler settings are the sample's.
    DecodeLoop(TappedContext& tc, Handoff&& from, SampleParams params, std::vector<Reducer*> reducers);
    ~DecodeLoop() override;
    DecodeLoop(const DecodeLoop&) = delete;
    DecodeLoop& operator=(const DecodeLoop&) = delete;

    // Decodes until every live sample holds `until` tokens (or ends); starts the run on the first
    // call. Returns the number of live samples. A cancel request returns early, samples still live.
    int advance(int until, Progress* progress);

    // The pieces of advance a scheduler (Batcher) drives, holding the context's use lock itself:
    // begin() decodes the prompt (once; false when it was started already); plan() appends the
    // next row of every live sample holding fewer than `until` tokens to a shared batch (in
    // increasing sequence order) and returns how many it added; after the one shared decode, in
    // which the scheduler routes this run's rows to on_rows by their order in plan(), commit()
    // samples and commits them. `seconds`: the step's wall time, counted as this run's decoding.
    bool begin();
    // begin() in two halves, for a scheduler that decodes several untapped runs' prompts in one
    // llama_decode (TappedContext::decode_prompts): begin_prompt() starts the run and returns its
    // prompt rows still to decode (the reused cells kept); once they are decoded, end_prompt()
    // with the batch index of their last row (its logits) and when the decode began. Untapped
    // runs only (ParamError): a tapped prompt's last row is fed to the run by begin().
    PromptSpan begin_prompt();
    void end_prompt(int last_row, std::chrono::steady_clock::time_point t0);
    int plan(int until, std::vector<llama_token>& tokens, std::vector<int>& pos, std::vector<llama_seq_id>& seqs);
    void commit(double seconds);
    bool started() const { return started_; }
    // The run pauses (a scheduler hands it to its owner): every reducer's records made readable,
    // as advance() leaves them (a reducer may hold the last step's rows until then).
    void sync();
    // Live samples holding fewer than `until` tokens (the rows plan would add).
    int pending(int until) const;
    // Sets where the scheduler put this run's own row `local` in the shared batch (its logits).
    void place(int local, int batch_row);
    // Why the run cannot go on ("" while it can); fail() marks it so (a shared decode failed).
    const std::string& failed() const { return failed_; }
    void fail(const std::string& why) { if (failed_.empty()) failed_ = why; }
    bool tapped() const { return params_.tap; }
    const TappedContext& context() const { return tc_; }
    // Stops feeding the records (a decided race's winner goes on untapped): every reducer ends
    // the live samples where they stand, as a hand-off to a context of its own would. Not for a
    // run that methods steer (ParamError).
    void untap();
    llama_seq_id slot(int s) const { return seqs_.at(static_cast<size_t>(s)); }
    // Ends the given samples now ("stopped") and frees their KV cells.
    void stop(const std::vector<int>& samples);
    // Ends every live sample with `why` (Cancelled after an interrupted advance, say).
    void finish_live(Finish why);
    // Moves live sample `s` out (it ends here as "stopped", its cells freed), to go on elsewhere.
    Handoff hand_off(int s);

    int n() const { return params_.n; }
    int n_live() const;
    const SampleState& sample(int i) const { return samples_.at(static_cast<size_t>(i)); }
    int64_t tokens_sampled() const { return tokens_sampled_; }
    int n_prompt() const { return static_cast<int>(prompt_.size()); }
    int n_reused() const { return n_reused_; }  // prompt tokens whose cells were reused, not decoded
    double prompt_seconds() const { return prompt_seconds_; }
    double decode_seconds() const { return decode_seconds_; }
    int decode_steps() const { return steps_; }
    double sample_seconds() const { return sample_seconds_; }  // part of decode_seconds spent sampling

    TapRequest tap_request() const override { return want_; }
    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override;
    void on_moe_rows(const MoeRows& m, unsigned kinds) override;

private:
    // f(sample, token) for each (sample, token) that row `row` of the decode in flight belongs to:
    // one, or token 0 of every live sample for the prompt's last row.
    template <typename F>
    void for_targets(int row, F&& f) {
        if (broadcast_) {
            for (int s = 0; s < params_.n; ++s)
                if (samples_[static_cast<size_t>(s)].live) f(s, 0);  // not those stopped before the start
        } else {
            f(row_sample_[static_cast<size_t>(row)], row_token_[static_cast<size_t>(row)]);
        }
    }
    // Marks `layer` as the first bad one if data[0, n) holds NaN/inf and no earlier layer did.
    void note_finite(int layer, const float* data, int64_t n);
    void start();
    PromptSpan plan_prompt();
    void finish_prompt(int last, std::chrono::steady_clock::time_point t0);
    void step();
    void sample_and_commit(int s);
    void end_sample(int s, Finish why);
    void free_ended_cells();
    void record_logprobs(SampleState& st, const float* logits, llama_token chosen);
    // Sample s goes on from its first n tokens: tokens, text, records and KV cells cut, sampler
    // reseeded; returns the new seed.
    uint32_t roll_back(int s, int n);
    // RuntimeError naming the first layer (or the logits) where the last decode gave NaN/inf.
    void check_finite() const;

    TappedContext& tc_;
    std::vector<llama_token> prompt_;
    SampleParams params_;
    std::vector<Reducer*> reducers_;  // the methods last
    std::vector<Steering*> methods_;
    std::vector<llama_seq_id> seqs_;  // slot of each sample
    TapRequest want_{kTapMlpPost, -1};
    std::vector<SampleState> samples_;
    std::vector<llama_sampler*> samplers_;
    bool started_ = false;

    // Row routing for the decode in flight.
    bool broadcast_ = false;  // the prompt's last row belongs to token 0 of every sample
    std::vector<int> row_sample_;
    std::vector<int> row_token_;
    std::vector<int> row_logits_;  // the batch row of each of this run's rows (its logits)

    std::vector<llama_token> b_tokens_;
    std::vector<int> b_pos_;
    std::vector<llama_seq_id> b_seqs_;
    std::vector<std::pair<float, int32_t>> lp_scratch_;

    std::string failed_;  // why an advance failed: the run cannot go on (its KV state is unknown)
    int bad_layer_ = -1;  // first layer whose tapped rows held NaN/inf in the decode in flight
    int64_t tokens_sampled_ = 0;
    int steps_ = 0;
    int n_reused_ = 0;
    double prompt_seconds_ = 0, decode_seconds_ = 0, sample_seconds_ = 0;
};

}  // namespace neurotap
