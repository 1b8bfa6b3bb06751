#include "run/generate.h"

namespace neurotap {

RunOptions generate_options(const GenerateParams& p) {
    RunOptions o;
    o.sampling.n = 1;
    o.sampling.max_tokens = p.max_tokens;
    static_cast<SamplingParams&>(o.sampling) = p.sampling;
    o.sampling.seed_per_sample = false;
    o.sampling.stop = p.stop;
    o.sampling.forced = p.forced;
    o.sampling.tap = p.tap;
    o.record.counts = p.tap;
    o.record.active_threshold = p.active_threshold;
    o.record.mlp_post = p.capture;
    o.record.ln2_normalized = p.capture_norm;
    o.record.resid_post = p.capture_residual;
    if (p.neat) o.neat = *p.neat;
    return o;
}

GenerateResult generate(TappedContext& tc, const std::vector<llama_token>& prompt, const GenerateParams& params,
                        Progress* progress) {
    Run run(tc, prompt, generate_options(params));
    if (progress) progress->tokens = 0;
    run.advance(params.max_tokens, progress);
    run.finish_live(Finish::Cancelled);  // only an interrupted run has a live sample left
    const SampleState& st = run.loop().sample(0);
    const ModelInfo& mi = tc.model().info();
    GenerateResult r;
    r.prompt_tokens = prompt;
    r.tokens = st.tokens;
    r.text = st.text;
    r.finish_reason = st.finish_reason();
    r.n_layers = mi.n_layers;
    r.n_ff = mi.n_ff;
    r.n_embd = mi.n_embd;
    if (run.counts()) r.active_counts = run.counts()->counts(0);
    if (run.mlp_post()) {
        if (run.mlp_post()->half()) r.acts_f16 = run.mlp_post()->rows_f16(0);
        else r.acts_f32 = run.mlp_post()->rows_f32(0);
    }
    if (run.ln2_normalized()) r.norm_inputs = run.ln2_normalized()->rows(0);
    if (run.resid_post()) r.residuals = run.resid_post()->rows(0);
    if (run.neat()) {
        r.neat_events = run.neat()->events(0);
        r.neat_exit_at = run.neat()->exit_at(0);
    }
    r.eog_token = st.eog_token;
    r.prompt_seconds = run.loop().prompt_seconds();
    r.decode_seconds = run.loop().decode_seconds();
    return r;
}

}  // namespace neurotap
