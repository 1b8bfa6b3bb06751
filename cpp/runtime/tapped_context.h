// A llama_context created with the FFN tap installed as its eval callback (llama.cpp only
// takes the callback at context creation), plus the batch plumbing every decode loop needs.
#pragma once
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/ffn_tap.h"
#include "llama.h"
#include "runtime/model.h"

namespace neurotap {

// How a run may reuse the KV cells its first sequence already holds (TappedContext::reusable_prefix).
//   Exact:  only cells that decoding the prompt itself computes bit for bit the same: the tokens are
//           those of a run without reuse.
//   Prefix: the longest common prefix, generated tokens' cells included (llama-server's
//           cache_prompt): fastest, but llama.cpp's values for a row depend on the batch it was
//           decoded in, so the tokens may differ from a run without reuse.
enum class PromptReuse { Off, Exact, Prefix };
const char* prompt_reuse_name(PromptReuse mode);              // "off", "exact", "prefix"
PromptReuse parse_prompt_reuse(const std::string& name);     // ParamError for another name

// What decides a row's values on llama.cpp's CPU backend with flash attention, besides its own
// token and the cells before it (measured, tests/test_prompt_reuse.py; the vendored ggml-cpu):
//   - the attention kernel, by the query rows per KV stream: kLargeBatch or more take the tiled F32
//     path (GGML_FA_TILE_Q), fewer the per-row F16 path, and one row alone over >= 512 cells a
//     split-KV path;
//   - the matmul, on weights ggml repacks (Q4_K, Q4_0, IQ4_NL, ...): rows in groups of 4 go
//     through its gemm, the batch's last n % 4 rows through its gemv, which differ in the last
//     bits on Q4_K (a Q4_K_M Gemma 3 gave another logit by up to 2).
//   - under kSmallBatch rows, another kernel still (on a Q4_K_M Gemma 3; not on Q4_0 or Q4_1 files).
// Within one such class a row's values do not depend on the batch's other rows. Exact prompt
// reuse keeps cells whose class equals the one decoding the prompt from the start gives them.
constexpr int kLargeBatch = 64;
constexpr int kSmallBatch = 8;

// One sequence's prompt rows to decode: tokens[0, n) at positions pos0.. of sequence `seq`.
struct PromptSpan {
    const llama_token* tokens = nullptr;
    int n = 0;
    int pos0 = 0;
    llama_seq_id seq = 0;
};

struct ContextParams {
    int n_ctx = 4096;      // total KV cells
    int n_batch = 512;     // max tokens per llama_decode
    int n_seq_max = 1;     // parallel sequences
    int n_threads = 0;     // 0: hardware concurrency
    bool kv_unified = true;
    bool flash_attn = true;
    bool install_tap = true;  // false: no eval callback at all (a baseline for measurements)
};

// A sequence's cells saved aside (the server's host-memory prompt cache): llama.cpp's state of the
// sequence and the record of what its cells hold and how they were made (seq_tokens and their
// classes), so that cells restored later are reused by the same rule as cells that never left.
struct SavedSeq {
    std::vector<llama_token> tokens;
    std::vector<uint8_t> made;
    std::vector<uint8_t> state;
    size_t bytes() const { return state.size() + tokens.size() * sizeof(llama_token) + made.size(); }
};

class TappedContext {
public:
    // Creates the context and runs the load probe: one token is decoded while the tap records
    // which layers have the activation tensor; a layer without it raises ModelError.
    TappedContext(std::shared_ptr<Model> model, const ContextParams& params);
    ~TappedContext();
    TappedContext(const TappedContext&) = delete;
    TappedContext& operator=(const TappedContext&) = delete;

    // The llama.cpp context; RuntimeError once closed (its model was closed).
    llama_context* ctx() const;
    // Frees the llama.cpp context now, after a decode in flight ends (Model::close calls it).
    void close();
    bool closed() const { return ctx_ == nullptr; }
    // Held by a decode loop for a whole advance, so that close() waits for it.
    std::unique_lock<std::mutex> lock_use() { return std::unique_lock<std::mutex>(use_mu_); }
    const Model& model() const { return *model_; }
    FfnTap& tap() { return tap_; }
    const ContextParams& params() const { return params_; }
    int n_ctx() const;  // cells actually allocated

    void clear();  // drops all KV cells

    // What each sequence's cells hold: seq_tokens(s)[p] is the token at position p, for the
    // positions 0..size-1 known to be in the cache (decodes append; removals cut). A prefix of the
    // truth: cells past it may exist (a restored state) and are removed before a prompt reuses it.
    const std::vector<llama_token>& seq_tokens(llama_seq_id s) const;
    void set_seq_tokens(llama_seq_id s, std::vector<llama_token> tokens);
    // Removes sequence s's cells from position p0 on (0: all of them).
    void seq_rm(llama_seq_id s, int p0);
    // Sequence dst holds exactly src's cells afterwards (its own removed first; with one stream
    // the cells are shared, with a stream per sequence they are copied).
    void seq_cp(llama_seq_id src, llama_seq_id dst);
    // How many leading cells of sequence s a run may keep when it decodes the whole prompt with
    // decode_seq: at most all but the prompt's last token (always decoded: its row is tapped and
    // its logits sampled).
    // Prefix: the longest common prefix of the cells and the prompt (but its last token).
    // Exact: only cells that decode_seq(prompt) would compute bit for bit the same, so that
    // the tokens are those of a run without reuse. llama.cpp's values for a row depend on the
    // batch it was decoded in (see kLargeBatch). With reuse_by_token(): decode_seq cuts batches at
    // multiples of n_batch, so the class it gives each position is known (batch_class); a cell
    // is kept when its class is that one and every cell before it was kept, and the batch the rest
    // starts in gives its rows their classes too (as many rows mod 4, on the same side of
    // kLargeBatch). Otherwise: whole prompt chunks (n_batch tokens at a multiple of n_batch) that
    // were decoded as such.
    int reusable_prefix(llama_seq_id s, const std::vector<llama_token>& prompt,
                        PromptReuse mode = PromptReuse::Exact) const;
    // The same for cells saved aside, were they restored into a sequence.
    int reusable_prefix(const SavedSeq& saved, const std::vector<llama_token>& prompt,
                        PromptReuse mode = PromptReuse::Exact) const;
    // Sequence s's cells and their record, copied out (the cells stay).
    SavedSeq save_seq(llama_seq_id s);
    // Sequence s holds exactly the saved cells afterwards (its own removed first); RuntimeError
    // (s then empty) for a state this context cannot take (another model or layout).
    void restore_seq(llama_seq_id s, const SavedSeq& saved);
    // Exact reuse at token granularity: CPU-only build (ggml lists no GPU or accelerator device,
    // which could take large batches' matmuls: op offload), flash attention on, and a dense FFN
    // (an MoE layer's expert matmuls group the rows routed to each expert, so a row's class
    // depends on the other rows' routing). With other kernels exact reuse keeps to whole chunks.
    bool reuse_by_token() const { return reuse_by_token_; }
    // Prompt cells reused instead of decoded, over this context's life.
    int64_t reused_cells() const { return reused_; }
    void count_reused(int n) { reused_ += n; }

    // Decodes tokens[i] at pos0 + i of sequence `seq`. Only the last row requests logits (none if
    // logits_last=false); with a sink, that row alone is tapped, in the batch decoding it with the
    // rows before it (delivered as row 0 of 1). Batches end at multiples of n_batch (a prompt
    // decoded from its start: n_batch rows each, the last one the rest), so the batches of a
    // prompt's rest after reused cells are the ones decoding it whole makes, but the first, cut
    // short at its start (see reusable_prefix). Returns the last row's index in its batch (for
    // llama_get_logits_ith), -1 for n = 0.
    int decode_seq(const llama_token* tokens, int n, int pos0, llama_seq_id seq, RowSink* sink,
                   bool logits_last = true);

    // Whether prompts of several sequences may be decoded in one llama_decode (decode_prompts)
    // with every row's values those decode_seq gives it alone: token-granular exact classes
    // (reuse_by_token), no weights whose matmul rows depend on their batch index, a KV stream
    // per sequence (each prompt's attention sees its own rows only) and an x86-64 build (whose
    // kernels the classes were measured on).
    bool joint_prompts() const { return joint_prompts_; }
    // -1 when decode_prompts(spans) gives every row the values decode_seq gives it alone, else
    // the index of a span that breaks it (a piece of it that llama.cpp's split into ubatches
    // would decode in another class). Spans: increasing, distinct sequences.
    int joint_breaker(const std::vector<PromptSpan>& spans) const;
    // Decodes the spans in one llama_decode (joint_breaker(spans) must be -1), untapped, each
    // span's last row requesting logits; returns each span's last row's batch index.
    std::vector<int> decode_prompts(const std::vector<PromptSpan>& spans);

    // One row per entry, all requesting logits and tapped with a sink (the parallel decode step).
    // The caller keeps the rows in increasing seq order so that llama.cpp keeps them in batch order.
    void decode_rows(const llama_token* tokens, const int* pos, const llama_seq_id* seqs, int n, RowSink* sink);

private:
    // last_row_only: see FfnTap::arm (a decode_seq batch, which requests logits on its last row only).
    // made: each row's class (decode_prompts), else found from the batch's layout.
    void run_decode(int n_rows, RowSink* sink, bool last_row_only = false, const uint8_t* made = nullptr);
    // What made a cell (bits): kWholeChunk, a whole prompt chunk; kKnown, a batch whose row class
    // is known (its size class, and kRemainder), after known cells only.
    enum : uint8_t { kWholeChunk = 1, kKnown = 2, kTiny = 0, kSmall = 4, kTiled = 8, kSingle = 12, kSizeMask = 12,
                     kRemainder = 16 };
    static constexpr uint8_t kClassMask = kKnown | kSizeMask | kRemainder;
    // The class decode_seq gives row `i` of a one-sequence batch of n rows.
    uint8_t batch_class(int i, int n) const;
    // The class decode_seq(prompt from position 0, limit rows) gives position p.
    uint8_t planned_class(int p, int limit) const;
    void note(llama_seq_id s, int pos, llama_token t, uint8_t made);
    int reusable(const std::vector<llama_token>& c, const std::vector<uint8_t>& w,
                 const std::vector<llama_token>& prompt, PromptReuse mode) const;
    std::shared_ptr<Model> model_;
    ContextParams params_;
    FfnTap tap_;
    llama_context* ctx_ = nullptr;
    std::mutex use_mu_;
    llama_batch batch_{};
    std::vector<std::vector<llama_token>> cells_;  // per sequence: see seq_tokens
    std::vector<std::vector<uint8_t>> made_;       // per sequence and position: kWholeChunk, class bits
    bool reuse_by_token_ = false;
    bool by_mod4_ = true;  // a row's class holds its index mod 4 (ModelInfo::repackable_weights)
    bool joint_prompts_ = false;
    int64_t reused_ = 0;
};

}  // namespace neurotap
