#include "runtime/sampling.h"

#include <cmath>
#include <string>

#include "base/errors.h"

namespace neurotap {

void SamplingParams::validate() const {
    if (!std::isfinite(temperature) || temperature < 0) throw ParamError("temperature must be >= 0");
    if (!(top_p > 0.0f && top_p <= 1.0f)) throw ParamError("top_p must be in (0, 1]");
    if (top_k < 0) throw ParamError("top_k must be >= 0 (0 disables it)");
    if (!(min_p >= 0.0f && min_p < 1.0f)) throw ParamError("min_p must be in [0, 1)");
    for (const llama_logit_bias& b : logit_bias)
        if (std::isnan(b.bias) || b.bias == INFINITY)  // -inf bans a token; +inf would make every logit inf
            throw ParamError("logit_bias of token " + std::to_string(b.token) + " must be a number or -inf");
}

llama_sampler* make_sampler_chain(const SamplingParams& p, const llama_vocab* vocab) {
    p.validate();
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (const llama_logit_bias& b : p.logit_bias)  // before anything is allocated
        if (b.token < 0 || b.token >= n_vocab)
            throw ParamError("logit_bias token id " + std::to_string(b.token) + " is outside the vocabulary [0, " +
                             std::to_string(n_vocab) + ")");
    llama_sampler* chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    std::vector<llama_logit_bias> bias = p.logit_bias;
    if (p.ignore_eos)
        for (llama_token t = 0; t < n_vocab; ++t)
            if (llama_vocab_is_eog(vocab, t)) bias.push_back({t, -INFINITY});
    if (!bias.empty())
        llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(bias.size()),
                                                                     bias.data()));
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (p.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    return chain;
}

size_t find_stop(const std::string& text, size_t from, const std::vector<std::string>& stops) {
    size_t best = std::string::npos;
    for (const auto& s : stops) {
        if (s.empty()) continue;
        const size_t start = from >= s.size() ? from - s.size() + 1 : 0;
        const size_t pos = text.find(s, start);
        if (pos != std::string::npos && pos < best) best = pos;
    }
    return best;
}

uint32_t sample_seed(uint32_t seed, int index) {
    // splitmix64 of (seed, index): neighbouring indices get unrelated streams.
    uint64_t z = (static_cast<uint64_t>(seed) << 32 | static_cast<uint32_t>(index)) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return static_cast<uint32_t>((z ^ (z >> 31)) & 0xFFFFFFFFu);
}

}  // namespace neurotap
