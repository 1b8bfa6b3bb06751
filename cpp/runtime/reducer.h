// The reducer interface: what the decode loop offers every tapped row and committed token to. A
// parallel sampling run keeps only what the methods need (64 samples x 2,000 tokens x 46,080
// neurons would be 23 GB in float32): each row (sample, token, layer) is offered once to every
// reducer and then dropped. The reducers themselves live in reducers/, the methods in methods/.
#pragma once
#include <cstdint>

#include "runtime/ffn_tap.h"

namespace neurotap {

class Reducer {
public:
    virtual ~Reducer() = default;
    // Called once before the run.
    virtual void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) = 0;
    // Activations `a` (n_ff floats) of `layer` at the position that predicts token `token` of
    // sample `sample`. Rows of one token arrive layer by layer; tokens arrive in order.
    virtual void on_row(int sample, int token, int layer, const float* a) = 0;
    // Row r of an MoE layer's compact rows `m` (layer m.layer), at the position that predicts token
    // `token` of `sample`: only the experts that ran (ffn_tap.h MoeRows; flat neuron index expert *
    // n_ff_exp + unit, the shared expert last). Returns whether the reducer consumed it; false (the
    // default) has it offered to on_row instead, scattered to the full layer width with zeros for
    // the experts that did not run. Reducers that override it touch only the computed neurons.
    virtual bool on_moe_row(int sample, int token, const MoeRows& m, int r) {
        (void)sample, (void)token, (void)m, (void)r;
        return false;
    }
    // What the tap must read for this reducer besides the activation.
    virtual TapRequest tap_request() const { return {}; }
    // The FFN gate's pre-activation, for reducers that asked for TapKind::MlpPre (same order).
    virtual void on_gate_row(int sample, int token, int layer, const float* g) {
        (void)sample, (void)token, (void)layer, (void)g;
    }
    // A row of n_embd floats of a hidden-state kind (NormInput, Residual) the reducer asked for.
    virtual void on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t n_embd) {
        (void)kind, (void)sample, (void)token, (void)layer, (void)h, (void)n_embd;
    }
    // Token `token` (id `token_id`) of `sample` was sampled and kept (rows of a token that ends
    // the sample, such as an end-of-generation token, are offered but never committed).
    virtual void commit(int sample, int token, int32_t token_id) { (void)sample, (void)token, (void)token_id; }
    // A decode step's tokens have all been committed (reducers may batch their work here).
    virtual void end_step() {}
    // The run pauses (advance returns): everything must be readable now.
    virtual void sync() {}
    // The sample ends with n_tokens tokens: rows recorded for later tokens are dropped.
    virtual void finish(int sample, int n_tokens) = 0;
    // A rollback (a method steering the run asked for it): the sample goes on from its first
    // n_tokens tokens, as if the later ones had never been generated. Reducers whose records
    // cannot be cut (chunk unions) say no, and such a run is refused.
    virtual bool can_roll_back() const { return false; }
    virtual void roll_back(int sample, int n_tokens) { (void)sample, (void)n_tokens; }
};

}  // namespace neurotap
