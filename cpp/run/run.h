// A run: one request composed from option structs. It builds the reducers the options ask for,
// owns them and the decode loop, and tells the tap what to read for this run only. What Python
// runs (neurotap.Model.generate / sample) is exactly this; bindings.cpp only binds it.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "methods/neat.h"
#include "methods/neureasoner.h"
#include "reducers/contribution.h"
#include "reducers/reducers.h"
#include "runtime/decode_loop.h"
#include "runtime/tapped_context.h"

namespace neurotap {

enum class RowFormat : int { None = 0, Float32 = 1, Float16 = 2 };

// What a run keeps per sample besides its tokens and text.
struct RecordOptions {
    bool counts = false;                      // active neurons (activation > active_threshold) per token, layer
    float active_threshold = 0.0f;
    int active_chunk = 0;                     // > 0: active sets per chunk of this many tokens
    std::vector<std::pair<int, int>> watch;   // (layer, neuron) activations per token
    RowFormat mlp_post = RowFormat::None;     // every activation row (blocks.{l}.mlp.hook_post), in this format
    bool ln2_normalized = false;              // every normed FFN input (blocks.{l}.ln2.hook_normalized)
    bool resid_post = false;                  // every residual after the block (blocks.{l}.hook_resid_post)
    int contribution_chunk = 0;               // > 0: NAD's activated sets per chunk of this many tokens
    std::string contribution_variant = "down";  // "down" (down projection input) or "gate" (act(gate))
    int contribution_top = 64;
    int eta_rank = 500;
    bool keep_top = false;
    // Mixture-of-experts models: the routing per token and layer (experts, gate weights), and the
    // router's output over every expert (blocks.{l}.mlp.hook_router_probs; a sync per layer).
    bool routing = false;
    bool router_probs = false;
};

struct RunOptions {
    SampleParams sampling;                    // n, max_tokens, sampler, stop, forced, tap, logprobs
    RecordOptions record;
    std::optional<NeatConfig> neat;           // NEAT early exit per sample (needs the tap)
    std::optional<NeuReasonerConfig> neureasoner;  // NeuReasoner detection and correction (needs the tap)
    // The one check of a run's options (ParamError naming what is wrong): Run runs it, and Python
    // runs it before it plans contexts. What depends on the model is checked when the run is built.
    void validate() const;
};

class Run {
public:
    // Validates the options (ParamError / ContextError) before anything is decoded.
    Run(TappedContext& tc, std::vector<llama_token> prompt, RunOptions options);
    // A run of one continuing a sample handed off by another run (no records: the tap is off).
    Run(TappedContext& tc, Handoff&& from, RunOptions options);
    // Moves live sample s out of this run (see DecodeLoop::hand_off).
    Handoff hand_off(int s) { return loop_->hand_off(s); }

    int advance(int until, Progress* progress) { return loop_->advance(until, progress); }
    void stop(const std::vector<int>& samples) { loop_->stop(samples); }
    void finish_live(Finish why) { loop_->finish_live(why); }
    const DecodeLoop& loop() const { return *loop_; }
    DecodeLoop& decode_loop() { return *loop_; }  // for a scheduler (Batcher) to drive
    const RunOptions& options() const { return opts_; }
    const ModelInfo& model_info() const { return tc_.model().info(); }

    // The reducers this run keeps (null when not asked for).
    const ActiveCountReducer* counts() const { return counts_.get(); }
    const ActiveSetReducer* active_sets() const { return active_sets_.get(); }
    const WatchReducer* watch() const { return watch_.get(); }
    const MlpPostReducer* mlp_post() const { return mlp_post_.get(); }
    const HiddenRowReducer* ln2_normalized() const { return norm_.get(); }
    const HiddenRowReducer* resid_post() const { return resid_.get(); }
    const ContributionReducer* contributions() const { return contrib_.get(); }
    const MoeRouteReducer* routing() const { return route_.get(); }
    const NeatMonitor* neat() const { return neat_.get(); }
    const NeuReasonerMonitor* neureasoner() const { return nr_.get(); }

private:
    TappedContext& tc_;
    RunOptions opts_;
    std::unique_ptr<ActiveCountReducer> counts_;
    std::unique_ptr<ActiveSetReducer> active_sets_;
    std::unique_ptr<WatchReducer> watch_;
    std::unique_ptr<MlpPostReducer> mlp_post_;
    std::unique_ptr<HiddenRowReducer> norm_, resid_;
    std::unique_ptr<ContributionReducer> contrib_;
    std::unique_ptr<MoeRouteReducer> route_;
    std::unique_ptr<NeatMonitor> neat_;
    std::unique_ptr<NeuReasonerMonitor> nr_;
    std::unique_ptr<DecodeLoop> loop_;  // last: destroyed first, before the reducers it feeds
};

}  // namespace neurotap
