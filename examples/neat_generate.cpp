// Embedded early exit without Python: load a GGUF model, read a NEAT calibration written by
// `neurotap neat calibrate` (or the shipped models/neat-smollm2-135m.json), and generate greedily
// with NEAT ending the answer when its neurons say the reasoning is done. Only the core library.
//
//   neat_generate MODEL.gguf CALIBRATION.json "question" [--max-tokens N] [--threads T] [--no-neat]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "base/log_capture.h"
#include "methods/neat_file.h"
#include "run/generate.h"
#include "runtime/model.h"
#include "runtime/tapped_context.h"

int main(int argc, char** argv) {
    int max_tokens = 256, threads = 0;
    bool use_neat = true, ok = argc >= 4;
    for (int i = 4; ok && i < argc; ++i) {
        if (std::strcmp(argv[i], "--no-neat") == 0) use_neat = false;
        else if (std::strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) max_tokens = std::atoi(argv[++i]);
        else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = std::atoi(argv[++i]);
        else ok = false;
    }
    if (!ok) {
        std::fprintf(stderr, "usage: %s MODEL.gguf CALIBRATION.json \"question\" [--max-tokens N] [--threads T] [--no-neat]\n",
                     argv[0]);
        return 2;
    }
    try {
        neurotap::install_log_capture(false);  // llama.cpp's log: errors only, in exception messages
        auto model = neurotap::Model::load(argv[1], 0);
        const neurotap::NeatConfig neat = neurotap::neat_config(neurotap::load_neat_calibration(argv[2]), *model);
        neurotap::ContextParams cp;
        cp.n_ctx = 2048;
        cp.n_threads = threads;  // 0: all cores
        neurotap::TappedContext ctx(model, cp);
        const std::string chat = model->apply_chat_template({{"user", argv[3]}}, true);
        const auto prompt = model->tokenize(chat, false, true);

        neurotap::GenerateParams gp;
        gp.max_tokens = max_tokens;
        gp.sampling.temperature = 0.0f;  // greedy
        gp.neat = use_neat ? &neat : nullptr;
        const neurotap::GenerateResult r = neurotap::generate(ctx, prompt, gp, nullptr);

        std::printf("%s\n", r.text.c_str());
        int bans = 0;
        for (const auto& e : r.neat_events) bans += e.action == neurotap::kNeatBan;
        std::printf("[%zu tokens | finish: %s | NEAT: %zu decisions, %d bans, exit at %d | %.1f tok/s]\n",
                    r.tokens.size(), r.finish_reason.c_str(), r.neat_events.size(), bans, r.neat_exit_at,
                    r.decode_seconds > 0 ? (r.tokens.size() > 1 ? (r.tokens.size() - 1) / r.decode_seconds : 0) : 0.0);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "neat_generate: %s\n", e.what());
        return 1;
    }
}
