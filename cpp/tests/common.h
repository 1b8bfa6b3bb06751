// Shared fixtures of the native tests: the harness (CHECK, EXPECT_THROW, TestCase), the real
// model loaded once, scratch files, and the helpers more than one component's tests use. One
// .cpp per component (a ctest group) includes this; main.cpp runs them.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/errors.h"
#include "base/gguf_file.h"
#include "base/log_capture.h"
#include "gguf.h"
#include "kernels/kernels.h"
#include "methods/neat.h"
#include "methods/neat_file.h"
#include "methods/neureasoner.h"
#include "reducers/contribution.h"
#include "reducers/jaccard.h"
#include "reducers/reducers.h"
#include "reducers/set_record.h"
#include "run/generate.h"
#include "runtime/decode_loop.h"
#include "runtime/ffn_tap.h"
#include "runtime/model.h"
#include "runtime/tapped_context.h"
#include "weights/mapped_weights.h"

using namespace neurotap;
namespace fs = std::filesystem;

inline int g_check_failures = 0;  // failed checks in the current test

inline void report_failure(const char* file, int line, const std::string& what) {
    ++g_check_failures;
    std::fprintf(stderr, "  CHECK failed at %s:%d: %s\n", file, line, what.c_str());
}

#define CHECK(cond)                                             \
    do {                                                        \
        if (!(cond)) report_failure(__FILE__, __LINE__, #cond); \
    } while (0)

#define CHECK_MSG(cond, msg)                                                                    \
    do {                                                                                        \
        if (!(cond)) report_failure(__FILE__, __LINE__, std::string(#cond) + " -- " + (msg)); \
    } while (0)

// Runs `fn` and checks that it throws E (or a subclass) whose message contains `needle` (if
// given): the right error for the right reason. Anything else is a failure.
template <typename E>
inline bool expect_throw_impl(const std::function<void()>& fn, const char* type_name, const std::string& what,
                       const char* needle, const char* file, int line) {
    try {
        fn();
    } catch (const E& e) {
        if (needle && !std::strstr(e.what(), needle)) {
            report_failure(file, line, what + ": " + type_name + " without '" + needle + "': " + e.what());
            return false;
        }
        return true;
    } catch (const std::exception& e) {
        report_failure(file, line, what + ": expected " + type_name + ", got another exception: " + e.what());
        return false;
    } catch (...) {
        report_failure(file, line, what + ": expected " + type_name + ", got a non-std exception");
        return false;
    }
    report_failure(file, line, what + ": expected " + type_name + ", nothing was thrown");
    return false;
}

// Runs `fn` and checks that it does not throw.
inline void expect_no_throw_impl(const std::function<void()>& fn, const std::string& what, const char* file, int line) {
    try {
        fn();
    } catch (const std::exception& e) {
        report_failure(file, line, what + ": unexpected exception: " + e.what());
    } catch (...) {
        report_failure(file, line, what + ": unexpected non-std exception");
    }
}

#define EXPECT_THROW(E, expr, desc) expect_throw_impl<E>([&] { expr; }, #E, (desc), nullptr, __FILE__, __LINE__)
#define EXPECT_THROW_MSG(E, expr, needle, desc) \
    expect_throw_impl<E>([&] { expr; }, #E, (desc), (needle), __FILE__, __LINE__)
#define EXPECT_NO_THROW(expr, desc) expect_no_throw_impl([&] { expr; }, (desc), __FILE__, __LINE__)

struct TestCase {
    const char* group;  // the component under test: one ctest test per group (CMakeLists.txt)
    const char* name;
    void (*fn)();
    bool needs_model = false;  // runs with the real model (NEUROTAP_TEST_MODEL)
};

inline std::string g_model_path;

// A scratch directory from mkdtemp, removed with everything in it.
class TempDir {
public:
    TempDir() {
        const char* base = std::getenv("TMPDIR");
        std::string tmpl = std::string(base && *base ? base : "/tmp") + "/neurotap-native-XXXXXX";
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
        path_ = buf.data();
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path_, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    std::string file(const std::string& name) const { return path_ + "/" + name; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

inline void write_bytes(const std::string& path, const void* data, size_t n) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    if (!out) throw std::runtime_error("cannot write " + path);
}

inline std::vector<char> read_prefix(const std::string& path, size_t n) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::vector<char> buf(n);
    in.read(buf.data(), static_cast<std::streamsize>(n));
    buf.resize(static_cast<size_t>(in.gcount()));
    return buf;
}

inline bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

inline bool any_nonzero(const std::vector<float>& v) {
    for (float x : v)
        if (x != 0.0f) return true;
    return false;
}

// The real model, loaded once for all end-to-end tests; main() frees it before returning, ahead
// of llama.cpp's static teardown.
inline std::shared_ptr<Model> g_model;
inline std::shared_ptr<Model> shared_model() {
    if (!g_model) g_model = Model::load(g_model_path, 0);
    return g_model;
}

// ---------------------------------------------------------------------------------------------
// 3. FfnTap with hand-built tensors

struct RecordedRows {
    TapKind kind;
    int layer;
    int row0;
    int n_rows;
    int64_t width;
    std::vector<float> data;
};

class RecordingSink : public RowSink {
public:
    std::vector<RecordedRows> calls;
    void on_rows(TapKind kind, int layer, int row0, int n_rows, const float* data, int64_t width) override {
        calls.push_back({kind, layer, row0, n_rows, width,
                         std::vector<float>(data, data + static_cast<size_t>(n_rows) * static_cast<size_t>(width))});
    }
};

// ---------------------------------------------------------------------------------------------
// 4. The real model end to end

inline ContextParams small_context() {
    ContextParams cp;
    cp.n_ctx = 512;
    cp.n_threads = 2;
    return cp;
}

inline GenerateParams greedy(int max_tokens) {
    GenerateParams gp;
    gp.max_tokens = max_tokens;
    gp.sampling.temperature = 0.0f;
    return gp;
}

// ---------------------------------------------------------------------------------------------
// 6. The parallel sampler on the real model

inline ContextParams parallel_context(int n) {
    ContextParams cp;
    cp.n_ctx = n * 256;
    cp.n_batch = 512;
    cp.n_seq_max = n;
    cp.n_threads = 2;
    cp.kv_unified = false;
    return cp;
}

inline SampleParams sample_params(int n, int max_tokens, uint32_t seed) {
    SampleParams sp;
    sp.n = n;
    sp.max_tokens = max_tokens;
    sp.temperature = 1.0f;
    sp.top_p = 1.0f;
    sp.top_k = 0;
    sp.seed = seed;
    return sp;
}

inline std::vector<llama_token> chat_prompt(const Model& model, const std::string& question) {
    return model.tokenize(model.apply_chat_template({{"user", question}}, true), false, true);
}

// ---------------------------------------------------------------------------------------------
// 7. NAD: activated-neuron sets from contributions, on synthetic weights

// A bit-by-bit reading of bit k of a bitset of 64-bit words.
inline bool bit_at(const uint64_t* set, int64_t k) { return (set[k / 64] >> (k % 64)) & 1u; }

// The reducer's output for one sample.
struct NadResult {
    std::vector<uint64_t> bits;
    std::vector<double> eta;
    std::vector<int32_t> n_active;
    std::vector<double> top_c;
    std::vector<int32_t> top_i;
};

inline NadResult snapshot(const ContributionReducer& red, int s) {
    NadResult r;
    r.bits = red.sets(s);
    r.eta.assign(red.eta(s).begin(), red.eta(s).end());
    r.n_active = red.n_active(s);
    r.top_c.assign(red.top_values(s).begin(), red.top_values(s).end());
    r.top_i = red.top_index(s);
    return r;
}

// Each component's tests, in the order they run (tests/test_<group>.cpp).
std::vector<TestCase> tap_tests();
std::vector<TestCase> gguf_tests();
std::vector<TestCase> reducers_tests();
std::vector<TestCase> moe_tests();
std::vector<TestCase> nad_tests();
std::vector<TestCase> neat_tests();
std::vector<TestCase> generate_tests();
std::vector<TestCase> decode_loop_tests();
std::vector<TestCase> batcher_tests();
std::vector<TestCase> neureasoner_tests();
