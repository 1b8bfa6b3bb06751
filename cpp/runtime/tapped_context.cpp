#include "runtime/tapped_context.h"

#include <algorithm>
#include <thread>

#include "base/errors.h"
#include "base/log_capture.h"
#include "ggml-backend.h"

namespace neurotap {

const char* prompt_reuse_name(PromptReuse mode) {
    switch (mode) {
        case PromptReuse::Off: return "off";
        case PromptReuse::Prefix: return "prefix";
        default: return "exact";
    }
}

PromptReuse parse_prompt_reuse(const std::string& name) {
    if (name == "exact") return PromptReuse::Exact;
    if (name == "prefix") return PromptReuse::Prefix;
    if (name == "off") return PromptReuse::Off;
    throw ParamError("prompt reuse must be 'exact', 'prefix' or 'off', got '" + name + "'");
}

// Every device ggml offers is the CPU: nothing can take a batch's matmuls elsewhere (a GPU
// build offloads large batches' matmuls to the GPU even with no layer there: op offload).
static bool cpu_only_build() {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i)
        if (ggml_backend_dev_type(ggml_backend_dev_get(i)) != GGML_BACKEND_DEVICE_TYPE_CPU) return false;
    return true;
}

TappedContext::TappedContext(std::shared_ptr<Model> model, const ContextParams& params)
    : model_(std::move(model)),
      params_(params),
      tap_(model_->info().act_name, model_->info().n_layers, model_->info().n_ff, model_->info().n_embd) {
    {
        const ModelInfo& mi = model_->info();
        const int64_t dv = mi.head_dim_v > 0 ? mi.head_dim_v : (mi.n_head > 0 ? mi.n_embd / mi.n_head : 0);
        tap_.set_attention_width(int64_t{mi.n_head} * dv);
        tap_.set_moe(mi.moe, mi.norm_name);  // MoE layers: the expert ids, gate weights, shared expert
    }
    if (params_.n_ctx < 8) throw ParamError("n_ctx must be at least 8, got " + std::to_string(params_.n_ctx));
    if (params_.n_batch < 1) throw ParamError("n_batch must be positive");
    if (params_.n_seq_max < 1 || params_.n_seq_max > 256)
        throw ParamError("n_seq_max must be in [1, 256], got " + std::to_string(params_.n_seq_max));
    int threads = params_.n_threads > 0 ? params_.n_threads
                                        : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    cp.n_batch = static_cast<uint32_t>(params_.n_batch);
    cp.n_ubatch = static_cast<uint32_t>(params_.n_batch);
    cp.n_seq_max = static_cast<uint32_t>(params_.n_seq_max);
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.kv_unified = params_.kv_unified;
    cp.flash_attn_type = params_.flash_attn ? LLAMA_FLASH_ATTN_TYPE_AUTO : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    if (params_.install_tap) {
        cp.cb_eval = &FfnTap::callback;
        cp.cb_eval_user_data = &tap_;
    }
    take_logged_errors();
    ctx_ = llama_init_from_model(model_->get(), cp);
    if (!ctx_) {
        std::string why = take_logged_errors();
        throw ContextError("llama.cpp could not create a context with n_ctx=" + std::to_string(params_.n_ctx) +
                           (why.empty() ? "" : ": " + why));
    }
    // llama.cpp caps the batch at the context size it was asked for (before padding the
    // context): decode in batches of what it really accepts, or a long prompt aborts inside it.
    params_.n_batch = std::min<int>(params_.n_batch, static_cast<int>(llama_n_batch(ctx_)));
    batch_ = llama_batch_init(params_.n_batch, 0, 1);
    cells_.resize(static_cast<size_t>(params_.n_seq_max));
    made_.resize(static_cast<size_t>(params_.n_seq_max));
    // Flash attention AUTO is on for every layer on the CPU (llama.cpp turns it off only for a
    // device without the op).
    reuse_by_token_ = params_.flash_attn && params_.n_batch >= 2 * kLargeBatch && cpu_only_build();
    model_->attach(this);

    if (!params_.install_tap) return;
    // Load probe: prove the activation tensor exists in every layer of the real graph.
    llama_token probe = llama_vocab_bos(model_->vocab());
    if (probe < 0) probe = 0;
    tap_.begin_discovery();
    try {
        decode_seq(&probe, 1, 0, 0, nullptr);
    } catch (...) {
        tap_.end_discovery();
        llama_batch_free(batch_);
        llama_free(ctx_);
        ctx_ = nullptr;
        model_->detach(this);
        throw;
    }
    std::vector<int> missing = tap_.end_discovery();
    clear();
    if (!missing.empty()) {
        llama_batch_free(batch_);
        llama_free(ctx_);
        ctx_ = nullptr;
        model_->detach(this);
        throw ModelError("unsupported model: the llama.cpp graph of '" + model_->info().architecture + "' has no " +
                         tap_.act_name() + "-<layer> tensor for " + std::to_string(missing.size()) + " of " +
                         std::to_string(tap_.n_layers()) + " layers (first: " + std::to_string(missing[0]) + ")");
    }
}

TappedContext::~TappedContext() {
    close();
    model_->detach(this);
}

void TappedContext::close() {
    std::lock_guard<std::mutex> lock(use_mu_);
    if (!ctx_) return;
    llama_batch_free(batch_);
    llama_free(ctx_);
    ctx_ = nullptr;
}

llama_context* TappedContext::ctx() const {
    if (!ctx_) {
        model_->check_open();  // names the closed model when that is why
        throw RuntimeError("the context was closed");
    }
    return ctx_;
}

int TappedContext::n_ctx() const { return static_cast<int>(llama_n_ctx(ctx())); }

void TappedContext::clear() {
    llama_memory_clear(llama_get_memory(ctx()), true);
    for (auto& c : cells_) c.clear();
    for (auto& c : made_) c.clear();
}

static void check_seq(llama_seq_id s, size_t n) {
    if (s < 0 || static_cast<size_t>(s) >= n)
        throw ParamError("sequence id " + std::to_string(s) + " outside the context's " + std::to_string(n));
}

const std::vector<llama_token>& TappedContext::seq_tokens(llama_seq_id s) const {
    check_seq(s, cells_.size());
    return cells_[static_cast<size_t>(s)];
}

void TappedContext::set_seq_tokens(llama_seq_id s, std::vector<llama_token> tokens) {
    check_seq(s, cells_.size());
    made_[static_cast<size_t>(s)].assign(tokens.size(), 0);
    cells_[static_cast<size_t>(s)] = std::move(tokens);
}

int TappedContext::reusable_prefix(llama_seq_id s, const std::vector<llama_token>& prompt, int limit,
                                   PromptReuse mode) const {
    check_seq(s, cells_.size());
    if (mode == PromptReuse::Off) return 0;
    const auto& c = cells_[static_cast<size_t>(s)];
    const auto& w = made_[static_cast<size_t>(s)];
    const size_t most = std::min({c.size(), prompt.size(), static_cast<size_t>(std::max(limit, 0))});
    const uint8_t need = mode == PromptReuse::Prefix ? 0 : reuse_by_token_ ? kLargeRun : kWholeChunk;
    size_t k = 0;
    while (k < most && c[k] == prompt[k] && (w[k] & need) == need) ++k;
    const int n = static_cast<int>(k);
    if (mode == PromptReuse::Prefix) return n;
    if (!reuse_by_token_) return n / params_.n_batch * params_.n_batch;
    // decode_seq makes fewer than kLargeBatch rows in one small batch: no large-batch cell equals them.
    if (limit < kLargeBatch) return 0;
    if (n == limit) return n;  // nothing left to decode
    return std::min(n, limit - kLargeBatch);  // what is decoded again fills a large batch
}

void TappedContext::seq_rm(llama_seq_id s, int p0) {
    check_seq(s, cells_.size());
    llama_memory_seq_rm(llama_get_memory(ctx()), s, p0, -1);
    auto& c = cells_[static_cast<size_t>(s)];
    if (static_cast<size_t>(p0) < c.size()) c.resize(static_cast<size_t>(std::max(p0, 0)));
    auto& w = made_[static_cast<size_t>(s)];
    if (w.size() > c.size()) w.resize(c.size());
}

void TappedContext::seq_cp(llama_seq_id src, llama_seq_id dst) {
    check_seq(src, cells_.size());
    check_seq(dst, cells_.size());
    if (src == dst) return;
    seq_rm(dst, 0);
    llama_memory_seq_cp(llama_get_memory(ctx()), src, dst, -1, -1);
    cells_[static_cast<size_t>(dst)] = cells_[static_cast<size_t>(src)];
    made_[static_cast<size_t>(dst)] = made_[static_cast<size_t>(src)];
}

void TappedContext::note(llama_seq_id s, int pos, llama_token t, uint8_t made) {
    auto& c = cells_[static_cast<size_t>(s)];
    auto& w = made_[static_cast<size_t>(s)];
    // A position past the record (after a restored state) leaves the record as it is: a prefix.
    if (pos < 0 || static_cast<size_t>(pos) > c.size()) return;
    c.resize(static_cast<size_t>(pos));
    w.resize(static_cast<size_t>(pos));
    // A row's values depend on the cells before it: a large-batch row equals a fresh decode's
    // only when every earlier cell does.
    if (pos > 0 && !(w.back() & kLargeRun)) made &= static_cast<uint8_t>(~kLargeRun);
    c.push_back(t);
    w.push_back(made);
}

void TappedContext::run_decode(int n_rows, RowSink* sink) {
    ctx();  // closed: RuntimeError, never a decode on freed memory
    batch_.n_tokens = n_rows;
    if (sink) {
        const TapRequest want = sink->tap_request();
        tap_.arm(n_rows, sink, want.kinds, want.attention_layer);
    }
    const int32_t rc = llama_decode(ctx_, batch_);
    if (rc != 0) {
        tap_.disarm();
        for (auto& c : cells_) c.clear();  // what the cells hold is unknown now: reuse nothing
        for (auto& c : made_) c.clear();
        std::string why = take_logged_errors();
        if (rc == 1)
            throw ContextError("llama_decode found no free KV cells for the batch (context full)" +
                               (why.empty() ? "" : ": " + why));
        throw RuntimeError("llama_decode failed with code " + std::to_string(rc) + (why.empty() ? "" : ": " + why));
    }
    if (sink) tap_.disarm_and_check();
    // One sequence's consecutive positions: a large batch from kLargeBatch rows, a whole prompt
    // chunk when n_batch of them start at a multiple of n_batch.
    bool run = true;
    for (int i = 1; i < n_rows && run; ++i)
        run = batch_.seq_id[i][0] == batch_.seq_id[0][0] && batch_.pos[i] == batch_.pos[0] + i;
    uint8_t made = 0;
    if (run && n_rows >= kLargeBatch) made |= kLargeRun;
    if (run && n_rows == params_.n_batch && batch_.pos[0] % params_.n_batch == 0) made |= kWholeChunk;
    for (int i = 0; i < n_rows; ++i) note(batch_.seq_id[i][0], batch_.pos[i], batch_.token[i], made);
}

void TappedContext::decode_seq(const llama_token* tokens, int n, int pos0, llama_seq_id seq, RowSink* sink,
                               bool logits_last) {
    if (sink && n > params_.n_batch) throw ParamError("a tapped decode must fit one batch");
    check_seq(seq, cells_.size());
    const int nb = params_.n_batch;
    for (int start = 0; start < n;) {
        int m = std::min(nb, n - start);
        // The last two batches share their rows rather than leave fewer than kLargeBatch to the
        // last (a small batch computes other values: see reusable_prefix).
        const int rest = n - start;
        if (reuse_by_token_ && rest > nb && rest < nb + kLargeBatch) m = (rest + 1) / 2;
        for (int i = 0; i < m; ++i) {
            batch_.token[i] = tokens[start + i];
            batch_.pos[i] = pos0 + start + i;
            batch_.n_seq_id[i] = 1;
            batch_.seq_id[i][0] = seq;
            const bool last = start + i == n - 1;
            batch_.logits[i] = sink != nullptr || (logits_last && last);
        }
        run_decode(m, sink);
        start += m;
    }
}

void TappedContext::decode_rows(const llama_token* tokens, const int* pos, const llama_seq_id* seqs, int n,
                                RowSink* sink) {
    if (n > params_.n_batch) throw ParamError("decode_rows: more rows than n_batch");
    for (int i = 0; i < n; ++i) check_seq(seqs[i], cells_.size());
    for (int i = 0; i < n; ++i) {
        batch_.token[i] = tokens[i];
        batch_.pos[i] = pos[i];
        batch_.n_seq_id[i] = 1;
        batch_.seq_id[i][0] = seqs[i];
        batch_.logits[i] = 1;
    }
    run_decode(n, sink);
}

}  // namespace neurotap
