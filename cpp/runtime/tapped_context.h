// A llama_context created with the FFN tap installed as its eval callback (llama.cpp only
// takes the callback at context creation), plus the batch plumbing every decode loop needs.
#pragma once
#include <memory>
#include <mutex>
#include <vector>

#include "runtime/ffn_tap.h"
#include "llama.h"
#include "runtime/model.h"

namespace neurotap {

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

    // Decodes tokens[i] at pos0 + i of sequence `seq`. With a sink, every row requests logits
    // and is tapped; without, only the last row requests logits (or none if logits_last=false).
    void decode_seq(const llama_token* tokens, int n, int pos0, llama_seq_id seq, RowSink* sink,
                    bool logits_last = true);

    // One row per entry, all requesting logits (the parallel decode step). The caller keeps
    // the rows in increasing seq order so that llama.cpp keeps them in batch order.
    void decode_rows(const llama_token* tokens, const int* pos, const llama_seq_id* seqs, int n, RowSink* sink);

private:
    void run_decode(int n_rows, RowSink* sink);
    std::shared_ptr<Model> model_;
    ContextParams params_;
    FfnTap tap_;
    llama_context* ctx_ = nullptr;
    std::mutex use_mu_;
    llama_batch batch_{};
};

}  // namespace neurotap
