// Native tests of one component (ctest group "neat"); fixtures in common.h.
#include "tests/common.h"

namespace {

// NEAT's monitor: it gathers the watched neurons from the rows, decides by cosine similarity and
// norm ratio to the reference, bans in place, and refuses inconsistent configurations.
void test_neat_monitor() {
    const int L = 3, V = 10;
    const int64_t F = 8;
    NeatConfig c;
    c.neurons = {{0, 1}, {2, 7}};
    c.reference = {1.0f, 1.0f};
    c.exit_similarity = 0.6f;
    c.ban_similarity = 0.4f;
    c.magnitude = 0.5f;
    c.ban_tokens = {3, 4};
    c.exit_tokens = {9};
    NeatMonitor m(c, L, F, V);
    m.begin(2, L, F, 16);
    auto feed = [&](int s, float x, float y) {
        std::vector<float> row(static_cast<size_t>(F), 100.0f);  // unwatched neurons must not matter
        for (int l = 0; l < L; ++l) {
            row[1] = l == 0 ? x : 100.0f;
            row[7] = l == 2 ? y : 100.0f;
            m.on_row(s, 0, l, row.data());
        }
    };
    float sim = 0, mag = 0;
    feed(0, 1.0f, 1.0f);                       // same direction, same norm
    CHECK(m.decide(0, &sim, &mag) == kNeatExit);
    CHECK(std::fabs(sim - 1.0f) < 1e-6f && std::fabs(mag - 1.0f) < 1e-6f);
    feed(0, 0.2f, 0.2f);                       // same direction, too weak: ban, not exit
    CHECK(m.decide(0, &sim, &mag) == kNeatBan);
    CHECK(std::fabs(mag - 0.2f) < 1e-6f);
    feed(1, 1.0f, 0.0f);                       // cos 0.707: exit; the other sample is independent
    CHECK(m.decide(1, &sim, &mag) == kNeatExit);
    feed(1, 1.0f, -0.5f);                      // cos 0.316: continue
    CHECK(m.decide(1, &sim, &mag) == kNeatContinue);
    CHECK(std::fabs(sim - 0.31622776f) < 1e-5f);
    feed(1, 0.0f, 0.0f);                       // silent neurons: similarity 0, never NaN
    CHECK(m.decide(1, &sim, &mag) == kNeatContinue && sim == 0.0f && mag == 0.0f);
    std::vector<float> logits(V, 1.0f);
    m.ban(logits.data());
    CHECK(std::isinf(logits[3]) && std::isinf(logits[4]) && logits[2] == 1.0f && logits[5] == 1.0f);

    auto bad = [&](const std::function<void(NeatConfig&)>& edit, const char* needle) {
        NeatConfig b = c;
        edit(b);
        EXPECT_THROW_MSG(ParamError, NeatMonitor built(b, L, F, V), needle, "bad NEAT config");
    };
    bad([](NeatConfig& b) { b.neurons.clear(); b.reference.clear(); }, "at least one");
    bad([](NeatConfig& b) { b.reference = {1.0f}; }, "reference has 1 values for 2 neurons");
    bad([](NeatConfig& b) { b.neurons[1] = {3, 0}; }, "outside this model");
    bad([](NeatConfig& b) { b.neurons[1] = {2, 8}; }, "outside this model");
    bad([](NeatConfig& b) { b.reference = {0.0f, 0.0f}; }, "all zeros");
    bad([](NeatConfig& b) { b.reference[0] = NAN; }, "non-finite");
    bad([](NeatConfig& b) { b.ban_tokens = {10}; }, "token id out of range");
    bad([](NeatConfig& b) { b.exit_tokens = {-1}; }, "token id out of range");
    bad([](NeatConfig& b) { b.magnitude = INFINITY; }, "finite");
}

// NEAT calibration files read natively: the shipped file gives a configuration for the real model,
// and every truncation or corruption of it is a ModelError (never a crash, under the sanitizers).
void test_neat_file() {
    const std::string path = std::string(NEUROTAP_SOURCE_DIR) + "/models/neat-smollm2-135m.json";
    NeatCalibrationFile cal;
    EXPECT_NO_THROW(cal = load_neat_calibration(path), "the shipped calibration");
    CHECK(cal.version == 1 && !cal.neurons.empty() && cal.neurons.size() == cal.reference.size());
    auto model = shared_model();
    NeatConfig cfg;
    EXPECT_NO_THROW(cfg = neat_config(cal, *model), "a configuration for the model it was made for");
    CHECK(!cfg.exit_tokens.empty() && !cfg.ban_tokens.empty());
    EXPECT_NO_THROW(NeatMonitor(cfg, model->info().n_layers, model->info().n_ff, model->info().n_vocab),
                    "the monitor accepts it");
    NeatCalibrationFile other = cal;
    other.n_layers += 1;
    EXPECT_THROW_MSG(ModelError, neat_config(other, *model), "calibrate this model", "another model's shape");

    std::ifstream in(path, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    TempDir dir;
    const std::string tmp = dir.file("neat_cut.json");
    int refused = 0, tried = 0;
    for (size_t cut = 0; cut < text.size(); cut += 1 + text.size() / 200) {
        std::ofstream(tmp, std::ios::binary) << text.substr(0, cut);
        ++tried;
        try {
            load_neat_calibration(tmp);
        } catch (const ModelError&) {
            ++refused;
        }
    }
    CHECK_MSG(refused == tried, std::to_string(tried - refused) + " truncated files were accepted");
    std::mt19937 rng(7);
    for (int i = 0; i < 200; ++i) {
        std::string bad = text;
        for (int k = 0; k < 3; ++k) bad[rng() % bad.size()] = static_cast<char>(rng() % 256);
        std::ofstream(tmp, std::ios::binary) << bad;
        try {
            const NeatCalibrationFile c = load_neat_calibration(tmp);
            const NeatConfig nc = neat_config(c, *model);
            NeatMonitor(nc, model->info().n_layers, model->info().n_ff, model->info().n_vocab);
        } catch (const ModelError&) {
        } catch (const ParamError&) {  // neurons outside the model: the monitor refuses them
        }
    }
    EXPECT_THROW_MSG(ModelError, load_neat_calibration(path + ".missing"), "not found", "a missing file");
}

}  // namespace

std::vector<TestCase> neat_tests() {
    return {
        {"neat", "neat_monitor", test_neat_monitor, false},
        {"neat", "neat_file", test_neat_file, true},
    };
}
