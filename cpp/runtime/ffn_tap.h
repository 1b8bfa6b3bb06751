// The FFN tap: llama.cpp's eval callback, which hands each layer's FFN neuron activations
// (the input of the down projection) to a RowSink while llama_decode runs.
//
// Protocol (ggml_backend_sched): every graph node is offered with ask=true; answering true
// makes the scheduler compute up to that node, synchronize, and call again with ask=false.
// Asking costs a compute boundary, so exactly one tensor per layer is asked for, plus one per
// further kind that the armed sink wants (the normed input, the gate, the residual). No Python runs here: the callback runs on
// the thread that called llama_decode.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "base/moe_layout.h"

struct ggml_tensor;

namespace neurotap {

// What the tap can read per layer, named as TransformerLens names the hook blocks.{l}.<hook>:
// MlpPost = mlp.hook_post (the FFN activation row: the down projection's input, one float per
// neuron), Ln2Normalized = ln2.hook_normalized (the normed FFN input), MlpPre = mlp.hook_pre (the
// gate's pre-activation), ResidPost = hook_resid_post (the residual after the block), AttnZ =
// attn.hook_z (every head's output before W_O; one layer only). Mixture-of-experts layers add
// MoeRoute (per row: the selected experts' ids as floats, their gate weights, then the shared
// expert's gate if the layer has one: moe_route_width floats; delivered with the MlpPost rows,
// just before them) and MoeProbs (the router's output ffn_moe_probs, n_expert floats a row; asked
// for only when a sink wants it: a sync per layer).
enum class TapKind : int { MlpPost = 0, Ln2Normalized = 1, MlpPre = 2, ResidPost = 3, AttnZ = 4, MoeRoute = 5, MoeProbs = 6 };
constexpr int kTapKinds = 7;
constexpr unsigned tap_bit(TapKind k) { return 1u << static_cast<int>(k); }
constexpr unsigned kTapMlpPost = tap_bit(TapKind::MlpPost);

// What a reader wants tapped besides the activation: further kinds (tap_bit masks) and, with
// TapKind::AttnZ, the one layer whose attention output is read (each asked node costs a sync).
struct TapRequest {
    unsigned kinds = 0;
    int attention_layer = -1;
    // Both requests: the kinds united, the attention layer of `o` if it names one.
    TapRequest& operator|=(const TapRequest& o) {
        kinds |= o.kinds;
        if (o.attention_layer >= 0) attention_layer = o.attention_layer;
        return *this;
    }
};


// One MoE layer's rows as llama.cpp computed them: only the selected experts' activations.
struct MoeRows {
    int layer = 0, row0 = 0, n_rows = 0;
    const MoeLayout* layout = nullptr;
    const float* act = nullptr;         // [n_rows][n_used][n_ff_exp]: slot j of row r is expert ids[r][j]
    const int32_t* ids = nullptr;       // [n_rows][n_used], checked: in range, distinct per row
    const float* weights = nullptr;     // [n_rows][n_used] the gate weights the layer multiplies by (finite)
    const float* shexp_act = nullptr;   // [n_rows][n_ff_shexp] or null
    const float* shexp_gate = nullptr;  // [n_rows] or null
};

class RowSink;
// The default RowSink::on_moe_rows: with TapKind::MoeRoute in `kinds`, the route rows, then the
// rows scattered to full width (zeros for the experts that did not run) as MlpPost, in chunks of
// at most ~1 MiB, so a 512-row prompt ubatch never needs a [512 x width] buffer.
void scatter_moe_rows(RowSink& sink, const MoeRows& m, unsigned kinds);
// Row r of m into `out` (layout width floats): the scatter, for one row.
void scatter_moe_row(const MoeRows& m, int r, float* out);
// Route row r of m into `out` (moe_route_width floats).
void moe_route_row(const MoeRows& m, int r, float* out);
// One computed piece of an MoE row: an expert that ran (slot j of the row) or the shared expert
// (slot n_used, expert n_expert): `width` values from flat neuron `offset` of the layer.
struct MoeSegment {
    int expert = 0, slot = 0;
    int64_t offset = 0, width = 0;
    const float* a = nullptr;
};
// Row r's segments in ascending flat order (the experts by id, then the shared one) into `out`
// (resized to their number).
void moe_row_segments(const MoeRows& m, int r, std::vector<MoeSegment>& out);
// The slots 0 .. n_used - 1 of a row ordered by their expert ids (id_of(slot)) into `order`: the
// flat order of their neurons. Insertion sort: n_used is small.
template <typename IdOf>
void order_slots_by_expert(int n_used, IdOf id_of, std::vector<int>& order) {
    order.resize(static_cast<size_t>(n_used));
    for (int j = 0; j < n_used; ++j) {
        int k = j;
        for (; k > 0 && id_of(order[static_cast<size_t>(k - 1)]) > id_of(j); --k)
            order[static_cast<size_t>(k)] = order[static_cast<size_t>(k - 1)];
        order[static_cast<size_t>(k)] = j;
    }
}

// Receives rows of one decode batch, per layer, in batch order.
class RowSink {
public:
    virtual ~RowSink() = default;
    // What this sink wants for the decode it is armed for (the activation always).
    virtual TapRequest tap_request() const { return {kTapMlpPost, -1}; }
    // rows [row0, row0 + n_rows) of the armed batch for `layer`; `data` holds n_rows rows of
    // `width` contiguous floats, valid only during the call.
    virtual void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) = 0;
    // An MoE layer's rows (instead of on_rows(MlpPost) for it); `kinds` are the armed tap kinds.
    // Override to use the compact form directly.
    virtual void on_moe_rows(const MoeRows& m, unsigned kinds) { scatter_moe_rows(*this, m, kinds); }
};

// Tapped tensors read in this process so far: straight from host memory, or copied out of a
// device buffer (a GPU backend). The device tests check which path ran; two relaxed counters.
struct TapReads {
    uint64_t host = 0, device = 0;
};
TapReads tap_reads();

class FfnTap {
public:
    // act_name: graph name of the activation tensor without the layer suffix ("ffn_swiglu").
    FfnTap(std::string act_name, int n_layers, int64_t n_ff, int64_t n_embd);

    // The ggml_backend_sched_eval_callback; user_data is the FfnTap.
    static bool callback(ggml_tensor* t, bool ask, void* user_data);

    // Arms the tap for one llama_decode whose batch has n_rows rows, every one of which
    // requests logits (the last layer computes only those rows). `kinds` (tap_bit masks) says
    // what to read besides the activation: ffn_norm-<il>, ffn_gate-<il> (NAD's paper-code
    // variant), l_out-<il> (NEAT's calibration), kqv_out-<il> at `attention_layer`
    // only (NeuReasoner's heads). They hold for this decode only.
    // last_row_only: only the batch's last row requests logits, and only it is delivered (as row
    // 0 of 1). The batch must be one ubatch (a tapped context's n_ubatch is its n_batch) of one
    // sequence: each tapped tensor then holds all n_rows rows (layers before the last) or only
    // the output row (the last layer, after llama.cpp's ggml_get_rows(inp_out_ids)), and the
    // wanted row is its last either way. Any other row count is an error naming the tensor.
    void arm(int n_rows, RowSink* sink, unsigned kinds = kTapMlpPost, int attention_layer = -1,
             bool last_row_only = false);
    unsigned armed_kinds() const { return kinds_; }
    // Disarms; throws RuntimeError unless every tapped layer delivered exactly n_rows rows (1
    // with last_row_only).
    void disarm_and_check();
    void disarm();  // on error paths: no check
    bool armed() const { return sink_ != nullptr; }

    // Discovery: while on, nothing is computed early; the callback only records which layers
    // have the activation tensor. Used once at load to prove the architecture is tappable.
    void begin_discovery();
    // Layers whose activation tensor was never seen during discovery.
    std::vector<int> end_discovery();

    // Makes the tap read mixture-of-experts layers: the activation act_name is then the compact
    // [n_ff_exp, n_used, n_rows] tensor, its expert ids come from the MUL_MAT_ID node that feeds
    // it and the gate weights from the layer's final ffn_moe_weights* node. norm_name: the normed
    // FFN input's tensor ("ffn_norm"; gpt-oss: "attn_post_norm").
    void set_moe(const MoeLayout& layout, const std::string& norm_name);
    const MoeLayout& moe() const { return moe_; }

    // Width of the attention output rows (n_head x head_dim_v); 0 leaves heads untappable.
    void set_attention_width(int64_t w) { attention_width_ = w; }
    const std::string& act_name() const { return act_name_; }
    int n_layers() const { return n_layers_; }
    int64_t n_ff() const { return n_ff_; }
    int64_t n_embd() const { return n_embd_; }

private:
    // Layer index if `name` is "<prefix>-<il>" for a tapped prefix, else -1.
    int match(const char* name, TapKind* kind) const;
    bool on_ask(const ggml_tensor* t);
    void on_data(const ggml_tensor* t);
    // MoE: what on_ask/on_data do with the layer's other nodes; true when `t` is one of them.
    enum MoePart { kMoeAct = 1, kMoeShexpAct = 2, kMoeShexpGate = 4, kMoeWeights = 8 };
    int moe_node(const char* name, int* part) const;  // layer, or -1
    void moe_activation(const ggml_tensor* t, int il);
    void moe_piece(const ggml_tensor* t, int il, int part);
    void moe_deliver(int il);
    // n floats of t from float `offset` on: in host memory, or copied into buf.
    const float* read_f32(const ggml_tensor* t, size_t offset, size_t n, std::vector<float>& buf);
    // Which of a tapped tensor's n_t rows go to the sink: returns how many, from *first on (all
    // of them, or with last_row_only the last one), or 0 with error_ set when n_t does not fit
    // the armed batch or `seen` plus them would exceed what the batch delivers.
    int rows_to_take(const ggml_tensor* t, int n_t, int seen, const std::string& where, int* first);

    // MoE state: the layout, each layer's last offered gate-weights node (read when its
    // activation is computed: it is computed before it and stays allocated until
    // ffn_moe_weighted), and a layer's pieces until all have come (a shared expert comes later).
    MoeLayout moe_;
    struct Pending {
        int parts = 0, n_rows = 0;
        std::vector<float> act, weights, shexp_act, shexp_gate;
        std::vector<int32_t> ids;
    };
    std::vector<const ggml_tensor*> moe_weights_;  // [layer] final gate weights offered, this graph
    std::vector<const ggml_tensor*> moe_read_;     // [layer] the weights read with the activation
    std::vector<Pending> pending_;
    std::vector<uint8_t> id_bytes_;

    std::string act_name_;
    std::string norm_name_ = "ffn_norm";
    std::string gate_name_ = "ffn_gate";
    std::string residual_name_ = "l_out";
    std::string attention_name_ = "kqv_out";
    int attention_layer_ = -1;  // of the armed sink
    int64_t attention_width_ = 0;
    int n_layers_;
    int64_t n_ff_;
    int64_t n_embd_;
    unsigned kinds_ = kTapMlpPost;

    RowSink* sink_ = nullptr;
    int armed_rows_ = 0;
    bool last_row_only_ = false;
    std::vector<int> rows_seen_[kTapKinds];  // per TapKind
    bool discovering_ = false;
    std::vector<char> discovered_;  // MoE: MoePart bits seen
    std::vector<float> scratch_;  // staging for tensors in non-host (GPU) buffers
    std::string error_;           // exceptions must not cross llama.cpp: kept, thrown at disarm
};

}  // namespace neurotap
