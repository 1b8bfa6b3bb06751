// The expert shape of a mixture-of-experts model: what the tap, the weights reader and the
// reducers agree on (a base type, so that every layer can use it).
#pragma once
#include <cstdint>
#include <string>

namespace neurotap {

// The shape of a mixture-of-experts model's FFN layers (all zero for a dense model). A neuron of
// an MoE layer is (layer, expert, unit); its flat index in the layer is expert * n_ff_exp + unit,
// and a shared expert's units follow the routed ones (n_expert * n_ff_exp + unit), so a layer is
// n_expert * n_ff_exp + n_ff_shexp neurons wide and every consumer of flat rows works unchanged.
struct MoeLayout {
    int n_expert = 0;         // routed experts per layer (0: a dense model)
    int n_used = 0;           // experts selected per token
    int64_t n_ff_exp = 0;     // units per routed expert
    int64_t n_ff_shexp = 0;   // units of the shared expert (0: none)
    std::string shexp_act;    // the shared expert's activation tensor ("ffn_swiglu"), "" without one
    std::string shexp_gate;   // its scalar gate (sigmoid of a router row), "" without one
    bool moe() const { return n_expert > 0; }
    int64_t width() const { return int64_t{n_expert} * n_ff_exp + n_ff_shexp; }
};
inline int64_t moe_route_width(const MoeLayout& m) { return 2 * int64_t{m.n_used} + (m.n_ff_shexp > 0 ? 1 : 0); }

}  // namespace neurotap
