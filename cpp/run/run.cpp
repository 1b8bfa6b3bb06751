#include "run/run.h"

#include "base/errors.h"

namespace neurotap {

Run::Run(TappedContext& tc, std::vector<llama_token> prompt, RunOptions options)
    : tc_(tc), opts_(std::move(options)) {
    const RecordOptions& r = opts_.record;
    const ModelInfo& mi = tc_.model().info();
    const bool tap = opts_.sampling.tap;
    std::vector<Reducer*> reds;
    if (static_cast<int>(r.rows) < 0 || static_cast<int>(r.rows) > 2)
        throw ParamError("rows must be 0 (none), 1 (float32) or 2 (float16)");
    if (!tap && (r.rows != RowType::None || r.norm_inputs || r.residuals || opts_.neat || opts_.neureasoner))
        throw ParamError("rows, norm inputs, residuals, NEAT and NeuReasoner read the tap: they need it on");
    if (r.contribution_chunk > 0 && r.contribution_variant != "down" && r.contribution_variant != "gate")
        throw ParamError("contribution variant must be 'down' (the down projection's input) or 'gate' "
                         "(act(gate), as in the paper's code), got '" + r.contribution_variant + "'");
    if (tap && r.counts) reds.push_back((counts_ = std::make_unique<ActiveCountReducer>(r.active_threshold)).get());
    if (tap && r.active_chunk > 0)
        reds.push_back((active_sets_ = std::make_unique<ActiveSetReducer>(r.active_chunk, r.active_threshold)).get());
    if (tap && !r.watch.empty()) reds.push_back((watch_ = std::make_unique<WatchReducer>(r.watch)).get());
    if (tap && r.rows != RowType::None)
        reds.push_back((rows_ = std::make_unique<FullRowReducer>(r.rows == RowType::Float16)).get());
    if (r.norm_inputs) reds.push_back((norm_ = std::make_unique<HiddenRowReducer>(TapKind::NormInput)).get());
    if (r.residuals) reds.push_back((resid_ = std::make_unique<HiddenRowReducer>(TapKind::Residual)).get());
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
