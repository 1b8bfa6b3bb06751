// The C interface (neurotap.h) over the C++ core: the FFN tap (ffn_tap.h) installed in an
// application's context, NEAT's monitor and its per-sequence decisions (methods/neat.h, through
// the Steering calls the decode loop makes), NAD's active sets (ActiveSetReducer). No exception
// crosses the boundary.
#include "capi/neurotap.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "base/errors.h"
#include "methods/neat.h"
#include "methods/neat_file.h"
#include "reducers/jaccard.h"
#include "reducers/reducers.h"
#include "runtime/ffn_tap.h"
#include "runtime/model.h"

namespace {

thread_local std::string g_error;

// An error with its C status (the C++ core's exception types say less than the C codes).
struct CError {
    int32_t status;
    std::string message;
};

[[noreturn]] void fail(int32_t status, std::string message) { throw CError{status, std::move(message)}; }

// Runs f, turning every exception into a status and the thread's last error.
template <typename F>
int32_t guarded(const char* fn, int32_t model_error_status, F&& f) {
    try {
        f();
        return NEUROTAP_OK;
    } catch (const CError& e) {
        g_error = std::string(fn) + ": " + e.message;
        return e.status;
    } catch (const neurotap::ParamError& e) {
        g_error = std::string(fn) + ": " + e.what();
        return NEUROTAP_ERR_ARGUMENT;
    } catch (const neurotap::ModelError& e) {
        g_error = std::string(fn) + ": " + e.what();
        return model_error_status;
    } catch (const std::bad_alloc&) {
        g_error = std::string(fn) + ": out of memory";
        return NEUROTAP_ERR_NO_MEMORY;
    } catch (const std::exception& e) {
        g_error = std::string(fn) + ": " + e.what();
        return NEUROTAP_ERR_RUNTIME;
    } catch (...) {
        g_error = std::string(fn) + ": unknown error";
        return NEUROTAP_ERR_RUNTIME;
    }
}

bool readable(const char* path) {
    std::FILE* f = std::fopen(path, "rb");
    if (!f) return false;
    std::fclose(f);
    return true;
}

}  // namespace

using neurotap::TapKind;

// Per sequence (the sequence id is NEAT's sample index: the monitor keeps its line starts, exit
// tokens queued and events): the activated set and where the sequence stands.
struct SeqState {
    std::unique_ptr<neurotap::ActiveSetReducer> sets;
    int n_tokens = 0;      // accepted since the last reset: the index of the next token
    bool row = false;      // a row was decoded since the last accept
    bool decided = false;  // neurotap_neat_decide was called for that row
    bool ended = false;    // it got an end-of-generation token
    std::string broken;    // why the record is incomplete (a decode failed midway), until reset
};

// Maps the rows the tap delivers back to batch rows and sequences. Layers deliver every row of a
// ubatch, except the last layer, which llama.cpp computes for output rows only.
class BatchSink : public neurotap::RowSink {
public:
    explicit BatchSink(neurotap_tap* tap) : tap_(tap) {}
    void begin(const llama_batch& b, int n_layers);
    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override;
    // Empty when every layer delivered the batch's rows (or its output rows).
    std::string check() const;
    bool any_delivered() const { return any_; }
    const std::vector<int>& seqs_of(int row) const { return seqs_[static_cast<size_t>(row)]; }
    const std::vector<int>& out_rows() const { return out_rows_; }
    int n_rows() const { return static_cast<int>(seqs_.size()); }

private:
    void offer(int row, int layer, const float* a);
    neurotap_tap* tap_;
    std::vector<std::vector<int>> seqs_;  // per batch row
    std::vector<char> out_;               // per batch row: requests output
    std::vector<int> out_rows_;           // batch rows that request output, in order
    std::vector<int> delivered_;          // per layer
    int ub_start_ = 0, ub_n_ = 0;         // the ubatch being computed (from layer 0)
    bool any_ = false;
    std::string error_;
};

struct neurotap_tap {
    std::shared_ptr<neurotap::Model> model;
    std::unique_ptr<neurotap::FfnTap> ffn;
    BatchSink sink{this};
    // NEAT
    std::unique_ptr<neurotap::NeatMonitor> neat;
    std::vector<float> scratch_logits;  // bans land here when the caller gives no logits
    // Sets
    bool sets_on = false;
    float sets_threshold = 0.0f;
    // The application's own eval callback, chained.
    ggml_backend_sched_eval_callback app_cb = nullptr;
    void* app_ud = nullptr;
    bool app_asked = false;
    bool params_installed = false;
    llama_context* ctx = nullptr;
    std::vector<SeqState> seqs;
    bool armed = false;
};

void BatchSink::begin(const llama_batch& b, int n_layers) {
    const int n = b.n_tokens;
    seqs_.assign(static_cast<size_t>(n), {});
    out_.assign(static_cast<size_t>(n), 0);
    out_rows_.clear();
    const int n_seq = static_cast<int>(tap_->seqs.size());
    for (int i = 0; i < n; ++i) {
        out_[i] = b.logits ? b.logits[i] != 0 : i == n - 1;  // llama.cpp: no flags, the last row
        if (!out_[i]) continue;
        out_rows_.push_back(i);
        const int k = b.seq_id ? (b.n_seq_id ? b.n_seq_id[i] : 1) : 1;
        if (k < 1) fail(NEUROTAP_ERR_ARGUMENT, "batch row " + std::to_string(i) + " has no sequence id");
        for (int j = 0; j < k; ++j) {
            const int s = b.seq_id ? b.seq_id[i][j] : 0;
            if (s < 0 || s >= n_seq)
                fail(NEUROTAP_ERR_ARGUMENT, "batch row " + std::to_string(i) + " has sequence id " + std::to_string(s) +
                                                ", outside the context's " + std::to_string(n_seq) + " sequences");
            seqs_[i].push_back(s);
        }
    }
    delivered_.assign(static_cast<size_t>(n_layers), 0);
    ub_start_ = ub_n_ = 0;
    any_ = false;
    error_.clear();
}

void BatchSink::offer(int row, int layer, const float* a) {
    for (int s : seqs_[static_cast<size_t>(row)]) {
        if (tap_->neat) tap_->neat->on_row(s, 0, layer, a);
        SeqState& st = tap_->seqs[static_cast<size_t>(s)];
        if (st.sets) st.sets->on_row(0, 0, layer, a);
    }
}

void BatchSink::on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) {
    if (kind != TapKind::MlpPost || !error_.empty()) return;
    try {  // runs inside llama_decode: nothing may be thrown into llama.cpp
        any_ = true;
        delivered_[static_cast<size_t>(layer)] += n_rows;
        if (layer == 0) ub_start_ = row0, ub_n_ = n_rows;  // layer 0 holds every row of its ubatch
        // row0 counts the rows this layer delivered before: all rows, or output rows only. When
        // both readings agree on row0 and n_rows, they name the same batch rows.
        const bool all_rows = row0 == ub_start_ && n_rows == ub_n_;
        for (int r = 0; r < n_rows; ++r) {
            int row;
            if (all_rows) {
                row = row0 + r;
                if (!out_[static_cast<size_t>(row)]) continue;
            } else {
                if (row0 + r >= static_cast<int>(out_rows_.size())) {
                    error_ = "layer " + std::to_string(layer) + " delivered more rows than the batch has outputs";
                    return;
                }
                row = out_rows_[static_cast<size_t>(row0 + r)];
            }
            offer(row, layer, data + static_cast<int64_t>(r) * width);
        }
    } catch (const std::exception& e) {
        error_ = e.what();
    } catch (...) {
        error_ = "unknown error while reading the rows";
    }
}

std::string BatchSink::check() const {
    if (!error_.empty()) return error_;
    const int n = n_rows(), n_out = static_cast<int>(out_rows_.size());
    for (size_t il = 0; il < delivered_.size(); ++il)
        if (delivered_[il] != n && delivered_[il] != n_out)
            return "layer " + std::to_string(il) + " delivered " + std::to_string(delivered_[il]) + " rows of " +
                   tap_->ffn->act_name() + ", expected " + std::to_string(n) + " (or its " + std::to_string(n_out) +
                   " output rows): was the context created with neurotap_tap_context_params, and was this batch "
                   "the one decoded?";
    return {};
}

namespace {

// llama.cpp's eval callback: neurotap's tap, then the application's own callback if it had one.
bool chained_callback(ggml_tensor* t, bool ask, void* user_data) {
    auto* tap = static_cast<neurotap_tap*>(user_data);
    if (ask) {
        const bool ours = neurotap::FfnTap::callback(t, true, tap->ffn.get());
        tap->app_asked = tap->app_cb && tap->app_cb(t, true, tap->app_ud);
        return ours || tap->app_asked;
    }
    neurotap::FfnTap::callback(t, false, tap->ffn.get());  // reads only the tensors it asked for
    if (!tap->app_asked) return true;
    // The scheduler asks for one node at a time, then computes up to it and delivers it: the
    // application gets the data calls of the nodes it asked for only.
    tap->app_asked = false;
    return tap->app_cb(t, false, tap->app_ud);
}

neurotap_tap* need(neurotap_tap* tap) {
    if (!tap) fail(NEUROTAP_ERR_ARGUMENT, "the tap is NULL");
    return tap;
}
const neurotap_tap* need(const neurotap_tap* tap) {
    if (!tap) fail(NEUROTAP_ERR_ARGUMENT, "the tap is NULL");
    return tap;
}

template <typename T>
void need_ptr(T* p, const char* what) {
    if (!p) fail(NEUROTAP_ERR_ARGUMENT, std::string(what) + " is NULL");
}

void need_unbound(const neurotap_tap* tap, const char* what) {
    if (tap->ctx) fail(NEUROTAP_ERR_STATE, std::string(what) + " must come before neurotap_tap_bind");
}

template <typename Tap>  // neurotap_tap or const neurotap_tap
auto& need_seq(Tap* tap, llama_seq_id seq) {
    if (!tap->ctx) fail(NEUROTAP_ERR_STATE, "the tap is not bound to a context (neurotap_tap_bind)");
    if (seq < 0 || seq >= static_cast<int>(tap->seqs.size()))
        fail(NEUROTAP_ERR_ARGUMENT, "sequence id " + std::to_string(seq) + " is outside the context's " +
                                        std::to_string(tap->seqs.size()) + " sequences");
    return tap->seqs[static_cast<size_t>(seq)];
}

void need_intact(const SeqState& st, llama_seq_id seq) {
    if (st.ended)
        fail(NEUROTAP_ERR_STATE, "sequence " + std::to_string(seq) + " ended with an end-of-generation token; "
                                 "neurotap_tap_reset starts it over");
    if (!st.broken.empty())
        fail(NEUROTAP_ERR_STATE, "sequence " + std::to_string(seq) + ": " + st.broken +
                                     "; neurotap_tap_reset starts it over");
}

void reset_seq(neurotap_tap* tap, llama_seq_id seq) {
    SeqState& st = tap->seqs[static_cast<size_t>(seq)];
    if (tap->neat) tap->neat->reset(seq);
    st.n_tokens = 0;
    st.row = st.decided = st.ended = false;
    st.broken.clear();
    st.sets.reset();
    if (tap->sets_on) {
        // One chunk spanning every token: the record is the union so far.
        st.sets = std::make_unique<neurotap::ActiveSetReducer>(INT_MAX, tap->sets_threshold);
        const auto& mi = tap->model->info();
        st.sets->begin(1, mi.n_layers, mi.n_ff, 0);
    }
}

std::vector<uint64_t> set_words(const SeqState& st) {
    if (!st.sets) fail(NEUROTAP_ERR_STATE, "sets are not recorded (neurotap_sets_enable before bind)");
    std::vector<uint64_t> w = st.sets->sets(0);  // chunks opened so far: none or the one
    w.resize(static_cast<size_t>(st.sets->n_words()), 0);
    return w;
}

}  // namespace

extern "C" {

int32_t neurotap_c_api_version(void) { return NEUROTAP_C_API_VERSION; }

const char* neurotap_last_error(void) { return g_error.c_str(); }

const char* neurotap_status_name(int32_t status) {
    switch (status) {
        case NEUROTAP_OK: return "NEUROTAP_OK";
        case NEUROTAP_ERR_ARGUMENT: return "NEUROTAP_ERR_ARGUMENT";
        case NEUROTAP_ERR_FILE: return "NEUROTAP_ERR_FILE";
        case NEUROTAP_ERR_MODEL: return "NEUROTAP_ERR_MODEL";
        case NEUROTAP_ERR_STATE: return "NEUROTAP_ERR_STATE";
        case NEUROTAP_ERR_RUNTIME: return "NEUROTAP_ERR_RUNTIME";
        case NEUROTAP_ERR_NO_MEMORY: return "NEUROTAP_ERR_NO_MEMORY";
    }
    return "unknown status";
}

int32_t neurotap_model_params(llama_model_params* params) {
    return guarded("neurotap_model_params", NEUROTAP_ERR_MODEL, [&] {
        need_ptr(params, "params");
        if (neurotap::cpu_offers_amx_buffer()) params->use_extra_bufts = false;
    });
}

int32_t neurotap_tap_new(llama_model* model, const char* model_path, neurotap_tap** out) {
    return guarded("neurotap_tap_new", NEUROTAP_ERR_MODEL, [&] {
        need_ptr(out, "out");
        *out = nullptr;
        need_ptr(model, "model");
        need_ptr(model_path, "model_path");
        if (!readable(model_path)) fail(NEUROTAP_ERR_FILE, std::string("model file not found or unreadable: ") + model_path);
        auto tap = std::make_unique<neurotap_tap>();
        // The application chose its model params (neurotap_model_params offers the AMX-free ones).
        tap->model = neurotap::Model::borrow(model, model_path, true);
        const auto& mi = tap->model->info();
        tap->ffn = std::make_unique<neurotap::FfnTap>(mi.act_name, mi.n_layers, mi.n_ff, mi.n_embd);
        tap->ffn->set_moe(mi.moe, mi.norm_name);
        *out = tap.release();
    });
}

void neurotap_tap_free(neurotap_tap* tap) { delete tap; }

int32_t neurotap_tap_shape(const neurotap_tap* tap, int32_t* n_layers, int64_t* n_ff) {
    return guarded("neurotap_tap_shape", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        if (n_layers) *n_layers = tap->model->info().n_layers;
        if (n_ff) *n_ff = tap->model->info().n_ff;
    });
}

int32_t neurotap_tap_context_params(neurotap_tap* tap, llama_context_params* params) {
    return guarded("neurotap_tap_context_params", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(params, "params");
        need_unbound(tap, "neurotap_tap_context_params");
        if (params->cb_eval == &chained_callback && params->cb_eval_user_data == tap) return;  // already ours
        if (params->cb_eval == &chained_callback)
            fail(NEUROTAP_ERR_STATE, "these params already carry another neurotap tap's callback");
        tap->app_cb = params->cb_eval;
        tap->app_ud = params->cb_eval_user_data;
        params->cb_eval = &chained_callback;
        params->cb_eval_user_data = tap;
        tap->params_installed = true;
    });
}

int32_t neurotap_tap_bind(neurotap_tap* tap, llama_context* ctx) {
    return guarded("neurotap_tap_bind", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(ctx, "ctx");
        if (tap->ctx) fail(NEUROTAP_ERR_STATE, "the tap is already bound to a context");
        if (!tap->params_installed)
            fail(NEUROTAP_ERR_STATE, "the context must be created with params from neurotap_tap_context_params");
        if (llama_get_model(ctx) != tap->model->get())
            fail(NEUROTAP_ERR_ARGUMENT, "the context belongs to another model than the tap's");
        const int n_seq = static_cast<int>(llama_n_seq_max(ctx));
        const auto& mi = tap->model->info();
        if (tap->neat) tap->neat->begin(n_seq, mi.n_layers, mi.n_ff, 0);
        tap->seqs.clear();
        tap->seqs.resize(static_cast<size_t>(n_seq));
        tap->ctx = ctx;
        for (llama_seq_id s = 0; s < n_seq; ++s) reset_seq(tap, s);
    });
}

int32_t neurotap_tap_begin_batch(neurotap_tap* tap, const llama_batch* batch) {
    return guarded("neurotap_tap_begin_batch", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(batch, "batch");
        if (!tap->ctx) fail(NEUROTAP_ERR_STATE, "the tap is not bound to a context (neurotap_tap_bind)");
        if (tap->armed) fail(NEUROTAP_ERR_STATE, "a batch is already begun: neurotap_tap_end_batch first");
        if (batch->n_tokens < 1) fail(NEUROTAP_ERR_ARGUMENT, "the batch is empty");
        const int n_layers = tap->model->info().n_layers;
        tap->sink.begin(*batch, n_layers);
        if (n_layers == 1 && static_cast<int>(tap->sink.out_rows().size()) != batch->n_tokens)
            fail(NEUROTAP_ERR_ARGUMENT, "a one-layer model's rows can be read only when every row requests output");
        if (tap->sink.out_rows().empty()) return;  // nothing to read: no cost
        tap->ffn->arm(batch->n_tokens, &tap->sink, neurotap::kTapMlpPost);
        tap->armed = true;
    });
}

int32_t neurotap_tap_end_batch(neurotap_tap* tap, int32_t decode_result) {
    return guarded("neurotap_tap_end_batch", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        if (!tap->ctx) fail(NEUROTAP_ERR_STATE, "the tap is not bound to a context (neurotap_tap_bind)");
        const bool was_armed = tap->armed;
        tap->ffn->disarm();
        tap->armed = false;
        if (!was_armed) return;  // a batch without outputs (or none begun)
        const BatchSink& sink = tap->sink;
        if (decode_result != 0) {
            // Rows already read may have reached the records: the sequences need a reset.
            if (sink.any_delivered())
                for (int row : sink.out_rows())
                    for (int s : sink.seqs_of(row))
                        tap->seqs[static_cast<size_t>(s)].broken =
                            "llama_decode failed (" + std::to_string(decode_result) + ") after rows were read";
            return;
        }
        const std::string why = sink.check();
        for (int row : sink.out_rows())
            for (int s : sink.seqs_of(row)) {
                SeqState& st = tap->seqs[static_cast<size_t>(s)];
                if (!why.empty()) st.broken = "its rows were not read: " + why;
                st.row = true;
                st.decided = false;
            }
        if (!why.empty()) fail(NEUROTAP_ERR_RUNTIME, why);
    });
}

int32_t neurotap_tap_accept(neurotap_tap* tap, llama_seq_id seq, llama_token token) {
    return guarded("neurotap_tap_accept", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        SeqState& st = need_seq(tap, seq);
        need_intact(st, seq);
        if (token < 0 || token >= tap->model->info().n_vocab)
            fail(NEUROTAP_ERR_ARGUMENT, "token id " + std::to_string(token) + " is out of range");
        if (!st.row)
            fail(NEUROTAP_ERR_STATE, "sequence " + std::to_string(seq) + " has no decoded row since its last token: "
                                     "decode an output row of it between neurotap_tap_begin_batch and _end_batch first");
        st.row = st.decided = false;
        if (tap->model->is_eog(token)) {
            // The sequence ends: the row of an end-of-generation token is no token of the answer.
            if (st.sets) st.sets->finish(0, st.n_tokens);  // the pending row dropped, the union kept
            st.ended = true;
            return;
        }
        if (st.sets) st.sets->commit(0, st.n_tokens, token);
        ++st.n_tokens;
        if (tap->neat) {
            // NEAT reads the committed piece (line starts), as after a commit in the decode loop;
            // the tap keeps no token history, so the view's other fields are empty.
            static const std::vector<llama_token> no_tokens;
            static const std::vector<uint32_t> no_ends;
            static const std::string no_text;
            const std::string piece = tap->model->token_piece(token);
            tap->neat->after_commit(seq, neurotap::SampleView{no_tokens, no_text, no_ends, piece}, false);
        }
    });
}

int32_t neurotap_tap_reset(neurotap_tap* tap, llama_seq_id seq) {
    return guarded("neurotap_tap_reset", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_seq(tap, seq);
        reset_seq(tap, seq);
    });
}

int32_t neurotap_neat_load(neurotap_tap* tap, const char* calibration_path) {
    return guarded("neurotap_neat_load", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(calibration_path, "calibration_path");
        need_unbound(tap, "neurotap_neat_load");
        neurotap::NeatCalibrationFile cal;
        try {
            cal = neurotap::load_neat_calibration(calibration_path);
        } catch (const neurotap::ModelError& e) {
            fail(NEUROTAP_ERR_FILE, e.what());
        }
        const auto& mi = tap->model->info();
        tap->neat = std::make_unique<neurotap::NeatMonitor>(neurotap::neat_config(cal, *tap->model), mi.n_layers,
                                                            mi.n_ff, mi.n_vocab);
        tap->scratch_logits.assign(static_cast<size_t>(mi.n_vocab), 0.0f);
    });
}

int32_t neurotap_neat_decide(neurotap_tap* tap, llama_seq_id seq, float* logits, neurotap_neat_decision* out) {
    return guarded("neurotap_neat_decide", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(out, "out");
        *out = neurotap_neat_decision{NEUROTAP_NEAT_CONTINUE, 0, -1, 0.0f, 0.0f};
        if (!tap->neat) fail(NEUROTAP_ERR_STATE, "no NEAT calibration is loaded (neurotap_neat_load)");
        SeqState& st = need_seq(tap, seq);
        need_intact(st, seq);
        if (!st.row)
            fail(NEUROTAP_ERR_STATE, "sequence " + std::to_string(seq) + " has no decoded row since its last token");
        if (st.decided)
            fail(NEUROTAP_ERR_STATE, "sequence " + std::to_string(seq) + ": this row was decided already");
        st.decided = true;
        const auto& events = tap->neat->events(seq);
        const size_t before = events.size();
        llama_token forced = -1;
        const neurotap::Pick pick =
            tap->neat->before_sample(seq, st.n_tokens, logits ? logits : tap->scratch_logits.data(), &forced);
        if (pick != neurotap::Pick::Sample) out->token = forced;
        if (events.size() > before) {
            const neurotap::NeatEvent& e = events.back();
            out->decided = 1;
            out->action = e.action;
            out->similarity = e.similarity;
            out->magnitude = e.magnitude;
        }
    });
}

int32_t neurotap_neat_apply_ban(const neurotap_tap* tap, float* logits) {
    return guarded("neurotap_neat_apply_ban", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(logits, "logits");
        if (!tap->neat) fail(NEUROTAP_ERR_STATE, "no NEAT calibration is loaded (neurotap_neat_load)");
        tap->neat->ban(logits);
    });
}

int32_t neurotap_neat_exit_tokens(const neurotap_tap* tap, llama_token* tokens, int32_t capacity, int32_t* n_tokens) {
    return guarded("neurotap_neat_exit_tokens", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(n_tokens, "n_tokens");
        if (capacity < 0 || (capacity > 0 && !tokens)) fail(NEUROTAP_ERR_ARGUMENT, "tokens is NULL or capacity negative");
        if (!tap->neat) fail(NEUROTAP_ERR_STATE, "no NEAT calibration is loaded (neurotap_neat_load)");
        const auto& ex = tap->neat->config().exit_tokens;
        *n_tokens = static_cast<int32_t>(ex.size());
        std::copy_n(ex.begin(), std::min<size_t>(ex.size(), static_cast<size_t>(capacity)), tokens);
    });
}

int32_t neurotap_sets_enable(neurotap_tap* tap, float threshold) {
    return guarded("neurotap_sets_enable", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_unbound(tap, "neurotap_sets_enable");
        if (!(threshold == threshold)) fail(NEUROTAP_ERR_ARGUMENT, "the threshold is NaN");
        tap->sets_on = true;
        tap->sets_threshold = threshold;
    });
}

int32_t neurotap_sets_n_words(const neurotap_tap* tap, int64_t* n_words) {
    return guarded("neurotap_sets_n_words", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(n_words, "n_words");
        const auto& mi = tap->model->info();
        *n_words = (static_cast<int64_t>(mi.n_layers) * mi.n_ff + 63) / 64;
    });
}

int32_t neurotap_sets_count(const neurotap_tap* tap, llama_seq_id seq, int64_t* count) {
    return guarded("neurotap_sets_count", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(count, "count");
        const SeqState& st = need_seq(tap, seq);
        const std::vector<uint64_t> w = set_words(st);
        *count = neurotap::popcount(w.data(), static_cast<int64_t>(w.size()));
    });
}

int32_t neurotap_sets_copy(const neurotap_tap* tap, llama_seq_id seq, uint64_t* words, int64_t n_words) {
    return guarded("neurotap_sets_copy", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(words, "words");
        const SeqState& st = need_seq(tap, seq);
        const std::vector<uint64_t> w = set_words(st);
        if (n_words != static_cast<int64_t>(w.size()))
            fail(NEUROTAP_ERR_ARGUMENT, "n_words is " + std::to_string(n_words) + ", a set has " + std::to_string(w.size()));
        std::copy(w.begin(), w.end(), words);
    });
}

int32_t neurotap_sets_jaccard(const neurotap_tap* tap, llama_seq_id a, llama_seq_id b, double* out) {
    return guarded("neurotap_sets_jaccard", NEUROTAP_ERR_MODEL, [&] {
        need(tap);
        need_ptr(out, "out");
        std::vector<uint64_t> both = set_words(need_seq(tap, a));
        const std::vector<uint64_t> wb = set_words(need_seq(tap, b));
        const int64_t W = static_cast<int64_t>(wb.size());
        both.insert(both.end(), wb.begin(), wb.end());
        *out = neurotap::jaccard_matrix(both.data(), 2, W)[1];
    });
}

}  // extern "C"
