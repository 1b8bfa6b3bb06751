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

// Query rows from which the CPU flash-attention kernel takes its tiled F32 path (GGML_FA_TILE_Q
// in ggml-cpu/common.h; fewer rows take the per-row F16 path, one row over >= 512 cells a split-KV
// path). Measured (tests/test_prompt_reuse.py): a row decoded in a one-sequence batch of at least
// this many rows is bit-identical however the prompt is split into such batches; in smaller
// batches it differs (up to 1.0 in a logit on SmolLM2-135M).
constexpr int kLargeBatch = 64;

struct ContextParams {
    int n_ctx = 4096;      // total KV cells
    int n_batch = 512;     // max tokens per llama_decode
    int n_seq_max = 1;     // parallel sequences
    int n_threads = 0;     // 0: hardware concurrency
    bool kv_unified = true;
    bool flash_attn = true;
    bool install_tap = true;  // false: no eval callback at all (a baseline for measurements)
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
    // How many leading cells of sequence s a run may keep when it decodes prompt[0, limit) with
    // decode_seq (its later tokens decoded apart, as a run's tapped last token is).
    // Prefix: the longest common prefix of the cells and the prompt, at most `limit`.
    // Exact: only cells that decode_seq(prompt, limit) would compute bit for bit the same.
    // llama.cpp's values for a row depend on the batch it was decoded in (a generated token's
    // cell, decoded alone, differs in the last bits from the same token's cell in a prompt batch,
    // and later tokens can change: a ten-turn chat did at its fifth turn). With reuse_by_token():
    // cells made in a large batch (kLargeBatch rows or more of one sequence, after large ones
    // only), keeping at least kLargeBatch rows to decode (or none), and none at all when
    // limit < kLargeBatch (decode_seq makes those rows in a small batch). Otherwise: whole prompt
    // chunks (n_batch tokens at a multiple of n_batch) that were decoded as such.
    int reusable_prefix(llama_seq_id s, const std::vector<llama_token>& prompt, int limit,
                        PromptReuse mode = PromptReuse::Exact) const;
    // Exact reuse at token granularity: CPU-only build (ggml lists no GPU or accelerator device,
    // which could take large batches' matmuls: op offload), flash attention on and n_batch >=
    // 2 * kLargeBatch (so decode_seq can always make batches of kLargeBatch rows or more). The
    // row-independence of large batches is measured only for the CPU kernels with flash
    // attention; with other kernels exact reuse keeps to whole chunks.
    bool reuse_by_token() const { return reuse_by_token_; }
    // Prompt cells reused instead of decoded, over this context's life.
    int64_t reused_cells() const { return reused_; }
    void count_reused(int n) { reused_ += n; }

    // Decodes tokens[i] at pos0 + i of sequence `seq`. With a sink, every row requests logits
    // and is tapped; without, only the last row requests logits (or none if logits_last=false).
    // Batches of n_batch rows; with reuse_by_token() the last two share their rows when the last
    // would hold fewer than kLargeBatch, so that n >= kLargeBatch rows are all made in large batches.
    void decode_seq(const llama_token* tokens, int n, int pos0, llama_seq_id seq, RowSink* sink,
                    bool logits_last = true);

    // One row per entry, all requesting logits (the parallel decode step). The caller keeps
    // the rows in increasing seq order so that llama.cpp keeps them in batch order.
    void decode_rows(const llama_token* tokens, const int* pos, const llama_seq_id* seqs, int n, RowSink* sink);

private:
    void run_decode(int n_rows, RowSink* sink);
    // What made a cell (bits): a whole prompt chunk; a large batch after large-batch cells only.
    enum : uint8_t { kWholeChunk = 1, kLargeRun = 2 };
    void note(llama_seq_id s, int pos, llama_token t, uint8_t made);
    std::shared_ptr<Model> model_;
    ContextParams params_;
    FfnTap tap_;
    llama_context* ctx_ = nullptr;
    std::mutex use_mu_;
    llama_batch batch_{};
    std::vector<std::vector<llama_token>> cells_;  // per sequence: see seq_tokens
    std::vector<std::vector<uint8_t>> made_;       // per sequence and position: kWholeChunk | kLargeRun
    bool reuse_by_token_ = false;
    int64_t reused_ = 0;
};

}  // namespace neurotap
