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
    reuse_by_token_ = params_.flash_attn && cpu_only_build() && !model_->info().moe.moe();
    by_mod4_ = model_->info().repackable_weights;
#if defined(__x86_64__) || defined(_M_X64)
    joint_prompts_ = reuse_by_token_ && !by_mod4_ && !params_.kv_unified;
#endif
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

uint8_t TappedContext::batch_class(int i, int n) const {
    const uint8_t size = n >= kLargeBatch ? kTiled : n >= kSmallBatch ? kSmall : n >= 2 ? kTiny : kSingle;
    return static_cast<uint8_t>(kKnown | size | (by_mod4_ && i >= n - n % 4 ? kRemainder : 0));
}

uint8_t TappedContext::planned_class(int p, int limit) const {
    const int nb = params_.n_batch, start = p / nb * nb;
    return batch_class(p - start, std::min(start + nb, limit) - start);
}

int TappedContext::reusable_prefix(llama_seq_id s, const std::vector<llama_token>& prompt, PromptReuse mode) const {
    check_seq(s, cells_.size());
    return reusable(cells_[static_cast<size_t>(s)], made_[static_cast<size_t>(s)], prompt, mode);
}

static void check_saved(const SavedSeq& saved) {
    if (saved.made.size() != saved.tokens.size()) throw ParamError("a saved sequence's record is inconsistent");
}

int TappedContext::reusable_prefix(const SavedSeq& saved, const std::vector<llama_token>& prompt,
                                   PromptReuse mode) const {
    check_saved(saved);
    return reusable(saved.tokens, saved.made, prompt, mode);
}

SavedSeq TappedContext::save_seq(llama_seq_id s) {
    check_seq(s, cells_.size());
    auto in_use = lock_use();
    SavedSeq out;
    const size_t size = llama_state_seq_get_size(ctx(), s);
    out.state.resize(size);
    if (llama_state_seq_get_data(ctx_, out.state.data(), size, s) != size)
        throw RuntimeError("could not read the KV state of sequence " + std::to_string(s));
    out.tokens = cells_[static_cast<size_t>(s)];
    out.made = made_[static_cast<size_t>(s)];
    return out;
}

void TappedContext::restore_seq(llama_seq_id s, const SavedSeq& saved) {
    check_seq(s, cells_.size());
    check_saved(saved);
    auto in_use = lock_use();
    seq_rm(s, 0);
    // Host memory: llama.cpp reads the saved stream into s's own (the header's sequence id is
    // not used), so cells saved from one slot may go to another.
    if (llama_state_seq_set_data(ctx(), saved.state.data(), saved.state.size(), s) != saved.state.size()) {
        seq_rm(s, 0);
        std::string why = take_logged_errors();
        throw RuntimeError("could not restore the saved KV cells into sequence " + std::to_string(s) +
                           " (another model or context layout?)" + (why.empty() ? "" : ": " + why));
    }
    cells_[static_cast<size_t>(s)] = saved.tokens;
    made_[static_cast<size_t>(s)] = saved.made;
}

int TappedContext::reusable(const std::vector<llama_token>& c, const std::vector<uint8_t>& w,
                            const std::vector<llama_token>& prompt, PromptReuse mode) const {
    if (mode == PromptReuse::Off || prompt.empty()) return 0;
    // The planned decode is the whole prompt; its last token is always decoded (tapped, sampled).
    const int limit = static_cast<int>(prompt.size());
    const size_t most = std::min(c.size(), prompt.size() - 1);
    size_t k = 0;
    if (mode == PromptReuse::Prefix) {
        while (k < most && c[k] == prompt[k]) ++k;
        return static_cast<int>(k);
    }
    if (!reuse_by_token_) {
        while (k < most && c[k] == prompt[k] && (w[k] & kWholeChunk)) ++k;
        return static_cast<int>(k) / params_.n_batch * params_.n_batch;
    }
    // Cells of the class decoding the prompt whole gives them, but those of batches under
    // kSmallBatch rows (a single row alone may have taken the split-KV path, whose choice depends
    // on the cells in the stream; under kSmallBatch rows some kernels vary with the batch).
    auto reliable = [](uint8_t cls) { const uint8_t z = cls & kSizeMask; return z == kSmall || z == kTiled; };
    while (k < most && c[k] == prompt[k] && (w[k] & kClassMask) == planned_class(static_cast<int>(k), limit) &&
           reliable(w[k]))
        ++k;
    // The rest's first batch runs from the kept cells to the end of the planned batch there: its
    // rows get the planned classes when it is that batch, or holds as many rows mod 4 (where the
    // weights make that matter) in the same size class (a reliable one).
    const int nb = params_.n_batch;
    for (int n = static_cast<int>(k); n > 0; --n) {
        const int start = n / nb * nb, end = std::min(start + nb, limit);
        const uint8_t part = batch_class(0, end - n), planned = batch_class(0, end - start);
        if (n == start || ((!by_mod4_ || (n - start) % 4 == 0) && (part & kSizeMask) == (planned & kSizeMask) && reliable(part)))
            return n;
    }
    return 0;
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
    // A row's values depend on the cells before it: its class tells what it equals only when
    // every earlier cell's does.
    if (pos > 0 && !(w.back() & kKnown)) made &= static_cast<uint8_t>(~kClassMask);
    c.push_back(t);
    w.push_back(made);
}

void TappedContext::run_decode(int n_rows, RowSink* sink, bool last_row_only, const uint8_t* made) {
    ctx();  // closed: RuntimeError, never a decode on freed memory
    batch_.n_tokens = n_rows;
    if (sink) {
        const TapRequest want = sink->tap_request();
        tap_.arm(n_rows, sink, want.kinds, want.attention_layer, last_row_only);
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
    // Each row's class (see kLargeBatch): known for one sequence's consecutive positions (a
    // prompt's batch), and a whole prompt chunk when n_batch of them start at a multiple of
    // n_batch. A decode step's rows (one per sequence) are never reused in Exact mode: unknown.
    bool run = true;
    for (int i = 1; i < n_rows && run; ++i)
        run = batch_.seq_id[i][0] == batch_.seq_id[0][0] && batch_.pos[i] == batch_.pos[0] + i;
    const bool whole = run && n_rows == params_.n_batch && batch_.pos[0] % params_.n_batch == 0;
    for (int i = 0; i < n_rows; ++i)
        note(batch_.seq_id[i][0], batch_.pos[i], batch_.token[i],
             made ? made[i] : static_cast<uint8_t>((whole ? kWholeChunk : 0) | (run ? batch_class(i, n_rows) : 0)));
}

int TappedContext::decode_seq(const llama_token* tokens, int n, int pos0, llama_seq_id seq, RowSink* sink,
                              bool logits_last) {
    check_seq(seq, cells_.size());
    if (sink && !logits_last) throw ParamError("decode_seq: the tapped last row requests logits");
    const int nb = params_.n_batch;
    int row = -1;
    for (int start = 0; start < n;) {
        // Batches end at multiples of n_batch (positions): a prompt's rest after reused cells is cut
        // where decoding it whole cuts it (reusable_prefix).
        const int m = std::min(n - start, nb - (pos0 + start) % nb);
        const bool final_batch = start + m == n;
        for (int i = 0; i < m; ++i) {
            batch_.token[i] = tokens[start + i];
            batch_.pos[i] = pos0 + start + i;
            batch_.n_seq_id[i] = 1;
            batch_.seq_id[i][0] = seq;
            batch_.logits[i] = logits_last && final_batch && i == m - 1;
        }
        // The last batch is one ubatch (n_ubatch == n_batch) of one sequence: its last row is the
        // last row of every tensor the tap reads (last_row_only).
        run_decode(m, final_batch ? sink : nullptr, true);
        row = m - 1;
        start += m;
    }
    return row;
}

// llama.cpp splits a batch of several KV streams into ubatches with split_equal(n_ubatch,
// sequential): each ubatch takes the next unfinished sequences with consecutive ids, as many rows
// of each as the shortest has left (at most n_ubatch in all). A span's rows keep their solo values
// when every piece of it goes through the kernels its solo batch does: the per-row attention path
// (under kLargeBatch rows per stream, as its solo batch has), and a matmul of at least 2 rows (a
// lone row takes other kernels and, over >= 512 cells, the split-KV attention path); the weights
// have no row-index dependence (joint_prompts). The solo batch: 2 to kLargeBatch - 1 rows, not
// crossing a multiple of n_batch (decode_seq cuts there).
int TappedContext::joint_breaker(const std::vector<PromptSpan>& spans) const {
    const int nb = params_.n_batch;
    int total = 0;
    for (size_t j = 0; j < spans.size(); ++j) {
        const PromptSpan& p = spans[j];
        if (p.n < 2 || p.n >= kLargeBatch || p.pos0 % nb + p.n > nb) return static_cast<int>(j);
        if (j > 0 && p.seq <= spans[j - 1].seq) return static_cast<int>(j);
        total += p.n;
        if (total > nb) return static_cast<int>(j);
    }
    std::vector<int> left(spans.size());
    for (size_t j = 0; j < spans.size(); ++j) left[j] = spans[j].n;
    for (;;) {
        std::vector<size_t> set;
        for (size_t j = 0; j < spans.size(); ++j)
            if (left[j] > 0 && (set.empty() || spans[j].seq == spans[set.back()].seq + 1)) set.push_back(j);
        if (set.empty()) return -1;
        const int ns = static_cast<int>(set.size());
        int k = nb / ns;
        for (size_t j : set) k = std::min(k, left[j]);
        if (k < 1) return static_cast<int>(set[0]);
        for (size_t j : set)
            if (k * ns < 2 || k >= kLargeBatch) return static_cast<int>(j);
        for (size_t j : set) left[j] -= k;
    }
}

std::vector<int> TappedContext::decode_prompts(const std::vector<PromptSpan>& spans) {
    if (!joint_prompts_) throw ParamError("decode_prompts: this context decodes prompts one by one");
    if (joint_breaker(spans) >= 0) throw ParamError("decode_prompts: these prompts cannot be decoded together exactly");
    for (const PromptSpan& p : spans) check_seq(p.seq, cells_.size());
    std::vector<int> last;
    std::vector<uint8_t> made;
    int r = 0;
    for (const PromptSpan& p : spans) {
        for (int i = 0; i < p.n; ++i, ++r) {
            batch_.token[r] = p.tokens[i];
            batch_.pos[r] = p.pos0 + i;
            batch_.n_seq_id[r] = 1;
            batch_.seq_id[r][0] = p.seq;
            batch_.logits[r] = i == p.n - 1;
            made.push_back(batch_class(i, p.n));  // the class decode_seq gives it (its values)
        }
        last.push_back(r - 1);
    }
    run_decode(r, nullptr, false, made.data());
    return last;
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
