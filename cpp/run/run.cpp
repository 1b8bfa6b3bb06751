#include "run/run.h"

#include "base/errors.h"

namespace neurotap {

void RunOptions::validate() const {
    sampling.validate();
    const RecordOptions& r = record;
    if (static_cast<int>(r.mlp_post) < 0 || static_cast<int>(r.mlp_post) > 2)
        throw ParamError("mlp_post (capture) must be 0 (none), 1 (float32) or 2 (float16)");
    if (!sampling.tap && (r.mlp_post != RowFormat::None || r.ln2_normalized || r.resid_post || r.router_probs || neat || neureasoner))
        throw ParamError("capture, hooks, neat and neureasoner read the tap: they need tap=True");
    if (r.active_chunk < 0 || r.contribution_chunk < 0) throw ParamError("chunk must be at least 1 token");
    if (r.contribution_chunk > 0) {
        if (r.contribution_variant != "down" && r.contribution_variant != "gate")
            throw ParamError("contribution must be one of ('down', 'gate'): the down projection's input, or "
                             "act(gate) as in the paper's code; got '" + r.contribution_variant + "'");
        if (r.contribution_top < 1) throw ParamError("contribution_top must be at least 1");
        if (r.eta_rank < 1) throw ParamError("eta_rank must be at least 1");
    }
}

Run::Run(TappedContext& tc, std::vector<llama_token> prompt, RunOptions options)
    : tc_(tc), opts_(std::move(options)) {
    opts_.validate();
    const RecordOptions& r = opts_.record;
    const ModelInfo& mi = tc_.model().info();
    const bool tap = opts_.sampling.tap;
    std::vector<Reducer*> reds;
    if (tap && r.counts) reds.push_back((counts_ = std::make_unique<ActiveCountReducer>(r.active_threshold)).get());
    if (tap && r.active_chunk > 0)
        reds.push_back((active_sets_ = std::make_unique<ActiveSetReducer>(r.active_chunk, r.active_threshold)).get());
    if (tap && !r.watch.empty()) reds.push_back((watch_ = std::make_unique<WatchReducer>(r.watch)).get());
    if (tap && r.mlp_post != RowFormat::None)
        reds.push_back((mlp_post_ = std::make_unique<MlpPostReducer>(r.mlp_post == RowFormat::Float16)).get());
    if (r.ln2_normalized) reds.push_back((norm_ = std::make_unique<HiddenRowReducer>(TapKind::Ln2Normalized)).get());
    if (r.resid_post) reds.push_back((resid_ = std::make_unique<HiddenRowReducer>(TapKind::ResidPost)).get());
    if (tap && r.contribution_chunk > 0) {
        ContributionParams cp;
        cp.chunk = r.contribution_chunk;
        cp.top_per_layer = r.contribution_top;
        cp.eta_rank = r.eta_rank;
        cp.gate_variant = r.contribution_variant == "gate";
        cp.gelu = mi.act_name == "ffn_geglu";
        cp.keep_top = r.keep_top;
        cp.n_threads = tc_.params().n_threads;
        reds.push_back((contrib_ = std::make_unique<ContributionReducer>(tc_.model().contribution_weights(), cp)).get());
    }
    if (tap && (r.routing || r.router_probs)) {
        if (!mi.moe.moe())
            throw ParamError("routing records (routing, mlp.hook_router_probs) need a mixture-of-experts model; " +
                             mi.architecture + " is dense");
        reds.push_back((route_ = std::make_unique<MoeRouteReducer>(mi.moe, r.router_probs)).get());
    }
    // The methods: registered here, each in its own files (the loop steers through Steering).
    std::vector<Steering*> methods;
    if (opts_.neat) methods.push_back((neat_ = std::make_unique<NeatMonitor>(*opts_.neat, mi.n_layers, mi.n_ff, mi.n_vocab)).get());
    if (opts_.neureasoner) methods.push_back((nr_ = std::make_unique<NeuReasonerMonitor>(*opts_.neureasoner, tc_.model())).get());
    loop_ = std::make_unique<DecodeLoop>(tc_, std::move(prompt), opts_.sampling, std::move(reds), std::move(methods));
}

Run::Run(TappedContext& tc, Handoff&& from, RunOptions options) : tc_(tc), opts_(std::move(options)) {
    opts_.sampling.tap = false;
    opts_.record = RecordOptions{};
    opts_.neat.reset();
    opts_.neureasoner.reset();
    loop_ = std::make_unique<DecodeLoop>(tc_, std::move(from), opts_.sampling, std::vector<Reducer*>{});
}

}  // namespace neurotap
