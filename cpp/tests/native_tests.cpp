// Native tests of the neurotap core: GGUF validation, the FFN tap protocol, and generation on
// a real model. No framework: each test is a function, CHECK records failures, and the last
// line is "N passed, N failed". Built under NEUROTAP_BUILD_TESTS; cpp/tests/run_sanitized.sh
// runs it under ASan/UBSan.
//
// Usage: neurotap_native_tests [MODEL.gguf]   (else $NEUROTAP_TEST_MODEL)
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

#include "contribution.h"
#include "errors.h"
#include "ffn_tap.h"
#include "generate.h"
#include "gguf.h"
#include "gguf_file.h"
#include "log_capture.h"
#include "model.h"
#include "neat.h"
#include "neat_file.h"
#include "neureasoner.h"
#include "decode_loop.h"
#include "reducers.h"
#include "set_record.h"
#include "tapped_context.h"

using namespace neurotap;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Minimal harness

namespace {

int g_check_failures = 0;  // failed checks in the current test

void report_failure(const char* file, int line, const std::string& what) {
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
bool expect_throw_impl(const std::function<void()>& fn, const char* type_name, const std::string& what,
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
void expect_no_throw_impl(const std::function<void()>& fn, const std::string& what, const char* file, int line) {
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
};

std::string g_model_path;

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

void write_bytes(const std::string& path, const void* data, size_t n) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    if (!out) throw std::runtime_error("cannot write " + path);
}

std::vector<char> read_prefix(const std::string& path, size_t n) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + path);
    std::vector<char> buf(n);
    in.read(buf.data(), static_cast<std::streamsize>(n));
    buf.resize(static_cast<size_t>(in.gcount()));
    return buf;
}

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

bool any_nonzero(const std::vector<float>& v) {
    for (float x : v)
        if (x != 0.0f) return true;
    return false;
}

// The real model, loaded once for all end-to-end tests; main() frees it before returning, ahead
// of llama.cpp's static teardown.
std::shared_ptr<Model> g_model;
std::shared_ptr<Model> shared_model() {
    if (!g_model) g_model = Model::load(g_model_path, 0);
    return g_model;
}

// Writes a GGUF file through the gguf C API: general.architecture = `arch` (nullptr: no key),
// <arch>.block_count (< 0: none), and optionally three small tensors (F32, F16, Q4_1) so that
// the tensor table and data section are non-trivial.
void write_synthetic_gguf(const std::string& path, const char* arch, int block_count, bool with_tensors) {
    gguf_context* g = gguf_init_empty();
    if (arch) gguf_set_val_str(g, "general.architecture", arch);
    if (block_count >= 0 && arch) gguf_set_val_u32(g, (std::string(arch) + ".block_count").c_str(), block_count);
    ggml_context* tctx = nullptr;
    if (with_tensors) {
        ggml_init_params ip{/*mem_size=*/1 << 20, /*mem_buffer=*/nullptr, /*no_alloc=*/false};
        tctx = ggml_init(ip);
        // ffn_down as the tap expects it: ne = {n_ff, n_embd}.
        ggml_tensor* down = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, 64, 8);
        ggml_set_name(down, "blk.0.ffn_down.weight");
        for (int64_t i = 0; i < ggml_nelements(down); ++i) static_cast<float*>(down->data)[i] = 0.01f * i;
        ggml_tensor* half = ggml_new_tensor_2d(tctx, GGML_TYPE_F16, 32, 4);
        ggml_set_name(half, "token_embd.weight");
        for (int64_t i = 0; i < ggml_nelements(half); ++i)
            static_cast<ggml_fp16_t*>(half->data)[i] = ggml_fp32_to_fp16(0.5f * i);
        ggml_tensor* q = ggml_new_tensor_2d(tctx, GGML_TYPE_Q4_1, 64, 2);
        ggml_set_name(q, "output_norm.weight");
        std::memset(q->data, 0, ggml_nbytes(q));
        for (ggml_tensor* t : {down, half, q}) gguf_add_tensor(g, t);
    }
    const bool ok = gguf_write_to_file(g, path.c_str(), /*only_meta=*/false);
    gguf_free(g);
    if (tctx) ggml_free(tctx);
    if (!ok) throw std::runtime_error("gguf_write_to_file failed for " + path);
}

// Opens a damaged file and reads everything it offers. Acceptable outcomes: a good object,
// ModelError or ParamError; returns an empty string if so, else what went wrong. `parsed`
// tells whether the file was accepted.
std::string probe_damaged_file(const std::string& path, bool* parsed) {
    *parsed = false;
    try {
        GgufFile f(path);
        *parsed = true;
        if (f.has_key("general.architecture")) (void)f.architecture();
        if (f.has_key("llama.block_count")) (void)f.get_int("llama.block_count");
        for (const TensorInfo& t : f.tensors()) {
            try {
                (void)f.read_rows(t.name, 0, 1);
                (void)f.read_rows(t.name, t.ne[1], 1);  // one past the end of a 2-D tensor
            } catch (const ModelError&) {
            } catch (const ParamError&) {
            }
            if (t.nbytes <= (1u << 20)) {
                try {
                    (void)f.read_all(t.name);
                } catch (const ModelError&) {
                } catch (const ParamError&) {
                }
            }
        }
    } catch (const ModelError&) {
    } catch (const ParamError&) {
    } catch (const std::exception& e) {
        return std::string("unexpected exception: ") + e.what();
    } catch (...) {
        return "unexpected non-std exception";
    }
    return "";
}

// ---------------------------------------------------------------------------------------------
// 1. GgufFile on the real model

void test_gguf_real_model() {
    GgufFile f(g_model_path);
    CHECK(f.architecture() == "llama");
    CHECK(f.file_size() > 1000000);
    CHECK(f.get_int("llama.block_count") == 30);
    CHECK(f.has_key("general.architecture"));
    CHECK(!f.has_key("no.such.key"));
    EXPECT_THROW(ModelError, f.get_string("no.such.key"), "missing string key");
    EXPECT_THROW(ModelError, f.get_int("no.such.key"), "missing int key");
    EXPECT_THROW(ModelError, f.get_int("general.architecture"), "string key read as int");
    EXPECT_THROW(ModelError, f.get_string("llama.block_count"), "int key read as string");

    const std::string name = "blk.0.ffn_down.weight";
    const TensorInfo* t = f.find_tensor(name);
    CHECK(t != nullptr);
    if (!t) return;
    CHECK(t->ne[0] == 1536);
    CHECK(t->ne[1] == 576);
    CHECK(t->ne[2] == 1 && t->ne[3] == 1);
    CHECK(t->file_offset + t->nbytes <= f.file_size());
    CHECK(f.find_tensor("blk.0.no_such.weight") == nullptr);
    CHECK(f.tensors().size() > 30);

    std::vector<float> rows = f.read_rows(name, 3, 4);
    CHECK(rows.size() == 4u * 1536u);
    CHECK(all_finite(rows));
    CHECK(any_nonzero(rows));
    // Reading the same rows again, or as part of a larger range, gives the same values.
    std::vector<float> wider = f.read_rows(name, 2, 6);
    CHECK(wider.size() == 6u * 1536u);
    CHECK(std::equal(rows.begin(), rows.end(), wider.begin() + 1536));
    std::vector<float> last = f.read_rows(name, 575, 1);
    CHECK(last.size() == 1536u && all_finite(last));
    CHECK(f.read_rows(name, 576, 0).empty());  // an empty range at the end is valid

    EXPECT_THROW(ParamError, f.read_rows(name, 576, 1), "row0 == n_rows");
    EXPECT_THROW(ParamError, f.read_rows(name, 575, 2), "range past the end");
    EXPECT_THROW(ParamError, f.read_rows(name, 0, 577), "n_rows > rows");
    EXPECT_THROW(ParamError, f.read_rows(name, -1, 1), "negative row0");
    EXPECT_THROW(ParamError, f.read_rows(name, 0, -1), "negative n_rows");
    EXPECT_THROW(ParamError, f.read_rows(name, 1, INT64_MAX), "huge n_rows");
    EXPECT_THROW(ParamError, f.read_rows(name, INT64_MAX, INT64_MAX), "huge row0 and n_rows");
    EXPECT_THROW(ParamError, f.read_rows(name, INT64_MIN, 1), "INT64_MIN row0");
    EXPECT_THROW(ModelError, f.read_rows("blk.0.no_such.weight", 0, 1), "missing tensor");
}

// ---------------------------------------------------------------------------------------------
// 2. Damaged and foreign files: ModelError, never a crash

void expect_model_error_file(const std::string& path, const std::string& what) {
    EXPECT_THROW(ModelError, GgufFile f(path), "GgufFile: " + what);
    EXPECT_THROW(ModelError, Model::load(path, 0), "Model::load: " + what);
}

void test_bad_files() {
    TempDir dir;
    expect_model_error_file(dir.file("does-not-exist.gguf"), "missing path");
    expect_model_error_file(dir.path(), "a directory");

    const std::string text = dir.file("text.gguf");
    const std::string hello = "hello, this is not a model\n";
    write_bytes(text, hello.data(), hello.size());
    expect_model_error_file(text, "a text file");

    const std::string empty = dir.file("empty.gguf");
    write_bytes(empty, "", 0);
    expect_model_error_file(empty, "an empty file");

    const std::string magic_only = dir.file("magic-only.gguf");
    write_bytes(magic_only, "GGU", 3);
    expect_model_error_file(magic_only, "3 bytes of magic");

    // Truncated inside the header: the magic is intact, the rest is cut.
    for (size_t cut : {4, 8, 24, 100, 1000, 10000}) {
        std::vector<char> head = read_prefix(g_model_path, cut);
        CHECK(head.size() == cut);
        const std::string p = dir.file("head-" + std::to_string(cut) + ".gguf");
        write_bytes(p, head.data(), head.size());
        expect_model_error_file(p, "header truncated at " + std::to_string(cut) + " bytes");
    }

    // The full header (metadata and tensor table) with no tensor data, and half the model:
    // gguf parses these, the tensor bounds check must reject them.
    {
        GgufFile real(g_model_path);
        uint64_t first_data = UINT64_MAX;
        for (const TensorInfo& t : real.tensors()) first_data = std::min(first_data, t.file_offset);
        std::vector<char> head = read_prefix(g_model_path, static_cast<size_t>(first_data));
        const std::string p = dir.file("header-only.gguf");
        write_bytes(p, head.data(), head.size());
        expect_model_error_file(p, "header without tensor data");

        const std::string half = dir.file("half.gguf");
        fs::copy_file(g_model_path, half);
        CHECK(::truncate(half.c_str(), static_cast<off_t>(real.file_size() / 2)) == 0);
        expect_model_error_file(half, "model truncated to half its size");
    }
}

// Random byte flips in the first 64 KiB of the real header (which cut it inside the
// vocabulary) and in a small complete synthetic GGUF (so flips also reach the tensor table and
// data). Fixed seeds: a failure reproduces.
void fuzz_file(const std::vector<char>& original, const std::string& path, uint32_t seed, int iterations,
               size_t hot_prefix, const char* label) {
    std::mt19937 rng(seed);
    int constructed = 0;
    for (int it = 0; it < iterations; ++it) {
        std::vector<char> buf = original;
        const int n_flips = 1 + static_cast<int>(rng() % 8);
        for (int k = 0; k < n_flips; ++k) {
            // Half the flips hit the hot prefix (counts, first keys, types), the rest anywhere.
            const size_t range = (rng() & 1) ? std::min(hot_prefix, buf.size()) : buf.size();
            const size_t pos = rng() % range;
            buf[pos] = static_cast<char>(buf[pos] ^ static_cast<char>(1 + rng() % 255));
        }
        write_bytes(path, buf.data(), buf.size());
        bool parsed = false;
        const std::string err = probe_damaged_file(path, &parsed);
        CHECK_MSG(err.empty(), std::string(label) + " iteration " + std::to_string(it) + ": " + err);
        constructed += parsed;
    }
    std::printf("  %s: %d of %d damaged copies parsed, the rest were rejected\n", label, constructed, iterations);
}

void test_fuzz_headers() {
    TempDir dir;
    std::vector<char> head = read_prefix(g_model_path, 64 * 1024);
    CHECK(head.size() == 64u * 1024u);
    fuzz_file(head, dir.file("fuzz-head.gguf"), 12345, 200, 1024, "real header (64 KiB)");

    const std::string synth = dir.file("synthetic.gguf");
    write_synthetic_gguf(synth, "llama", 1, true);
    {
        GgufFile f(synth);  // the unflipped file must be valid, or the fuzz proves nothing
        CHECK(f.architecture() == "llama");
        CHECK(f.tensors().size() == 3);
        std::vector<float> down = f.read_all("blk.0.ffn_down.weight");
        CHECK(down.size() == 64u * 8u && down[10] == 0.01f * 10);
        std::vector<float> half = f.read_rows("token_embd.weight", 1, 1);
        CHECK(half.size() == 32u && half[0] == 0.5f * 32);
    }
    const std::vector<char> synth_bytes = read_prefix(synth, 1 << 20);
    fuzz_file(synth_bytes, dir.file("fuzz-synth.gguf"), 777, 200, 512, "synthetic GGUF");
}

// A tensor table entry that gguf accepts (zero elements, so zero bytes) but whose row count
// overflows int64 when multiplied out: reading it must be a clean error, not UB.
void test_gguf_overflowing_shape() {
    TempDir dir;
    const std::string p = dir.file("overflow.gguf");
    gguf_context* g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    ggml_init_params ip{/*mem_size=*/1 << 16, /*mem_buffer=*/nullptr, /*no_alloc=*/true};
    ggml_context* tctx = ggml_init(ip);
    const int64_t big = int64_t(1) << 40;
    ggml_tensor* t = ggml_new_tensor_4d(tctx, GGML_TYPE_F32, 0, big, big, 1);
    ggml_set_name(t, "weird.weight");
    float dummy = 0.0f;
    t->data = &dummy;  // the writer insists on a data pointer, even for zero bytes
    gguf_add_tensor(g, t);
    const bool ok = gguf_write_to_file(g, p.c_str(), /*only_meta=*/false);
    gguf_free(g);
    ggml_free(tctx);
    CHECK(ok);
    if (!ok) return;
    try {
        GgufFile f(p);
        EXPECT_THROW(ModelError, (void)f.read_all("weird.weight"), "read_all of an overflowing shape");
    } catch (const ModelError&) {
        // Rejecting the file up front is just as good.
    }
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

// A host tensor as the CPU backend hands it to the eval callback: contiguous rows of `ne0`.
struct FakeTensor {
    ggml_tensor t;
    std::vector<uint8_t> storage;

    FakeTensor(const std::string& name, int64_t ne0, int64_t n_rows, ggml_type type = GGML_TYPE_F32) {
        std::memset(&t, 0, sizeof(t));
        std::strncpy(t.name, name.c_str(), sizeof(t.name) - 1);
        t.type = type;
        t.buffer = nullptr;  // host memory
        t.ne[0] = ne0;
        t.ne[1] = n_rows;
        t.ne[2] = 1;
        t.ne[3] = 1;
        t.nb[0] = ggml_type_size(type);
        t.nb[1] = t.nb[0] * static_cast<size_t>(ne0);
        t.nb[2] = t.nb[1] * static_cast<size_t>(n_rows);
        t.nb[3] = t.nb[2];
        storage.assign(t.nb[2], 0);
        t.data = storage.data();
    }
    float* f32() { return reinterpret_cast<float*>(storage.data()); }
};

// Value of element i of row r of layer il, distinct everywhere.
float cell(int il, int r, int64_t i) { return il * 1000.0f + r * 100.0f + static_cast<float>(i); }

bool ask(FfnTap& tap, const std::string& name) {
    FakeTensor ft(name, tap.n_ff(), 1);
    return FfnTap::callback(&ft.t, true, &tap);
}

// Offers rows [row0, row0 + n) of layer `il` the way the scheduler does: ask, then data.
void deliver(FfnTap& tap, const std::string& prefix, int il, int row0, int n, int64_t width,
             ggml_type type = GGML_TYPE_F32) {
    FakeTensor ft(prefix + "-" + std::to_string(il), width, n, type);
    if (type == GGML_TYPE_F32)
        for (int r = 0; r < n; ++r)
            for (int64_t i = 0; i < width; ++i) ft.f32()[r * width + i] = cell(il, row0 + r, i);
    FfnTap::callback(&ft.t, true, &tap);
    const bool keep_going = FfnTap::callback(&ft.t, false, &tap);
    CHECK(keep_going);  // false would abort the graph split
}

constexpr int kLayers = 30;
constexpr int64_t kFf = 16;
constexpr int64_t kEmbd = 8;

void test_tap_matching() {
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    RecordingSink sink;
    CHECK(!tap.armed());
    CHECK(!ask(tap, "ffn_swiglu-0"));  // unarmed: nothing is computed early

    tap.arm(1, &sink);
    CHECK(tap.armed());
    CHECK(ask(tap, "ffn_swiglu-0"));
    CHECK(ask(tap, "ffn_swiglu-7"));
    CHECK(ask(tap, "ffn_swiglu-29"));
    CHECK(!ask(tap, "ffn_swiglu-30"));
    CHECK(!ask(tap, "ffn_swiglu-100"));
    CHECK(!ask(tap, "ffn_swiglu-"));
    CHECK(!ask(tap, "ffn_swiglu"));
    CHECK(!ask(tap, "ffn_swiglux-1"));
    CHECK(!ask(tap, "ffn_swiglu-1a"));
    CHECK(!ask(tap, "ffn_swiglu--1"));
    CHECK(!ask(tap, "ffn_swiglu-99999999999999999999"));
    CHECK(!ask(tap, "xffn_swiglu-1"));
    CHECK(!ask(tap, "ffn_swiglu_exp-1"));
    CHECK(!ask(tap, "ffn_norm-3"));
    CHECK(!ask(tap, "attn_norm-3"));
    CHECK(!ask(tap, "ffn_out-3"));
    CHECK(!ask(tap, ""));

    tap.arm(1, &sink, kTapActivation | tap_bit(TapKind::NormInput));  // this decode also reads the norm
    CHECK(tap.armed_kinds() == (kTapActivation | tap_bit(TapKind::NormInput)));
    CHECK(ask(tap, "ffn_norm-3"));
    CHECK(ask(tap, "ffn_swiglu-3"));
    CHECK(!ask(tap, "ffn_norm-30"));
    CHECK(!ask(tap, "attn_norm-3"));
    CHECK(!ask(tap, "ffn_norm-"));
    CHECK(!ask(tap, "l_out-3"));
    tap.arm(1, &sink);  // the next decode does not: kinds hold for one arm only
    CHECK(!ask(tap, "ffn_norm-3"));

    tap.disarm();
    CHECK(!tap.armed());
    CHECK(!ask(tap, "ffn_swiglu-3"));
    CHECK(sink.calls.empty());  // asking alone never delivers rows

    FfnTap geglu("ffn_geglu", 4, kFf, kEmbd);
    geglu.arm(1, &sink);
    CHECK(ask(geglu, "ffn_geglu-3"));
    CHECK(!ask(geglu, "ffn_swiglu-3"));
    CHECK(!ask(geglu, "ffn_geglu-4"));
    geglu.disarm();
}

void test_tap_delivery() {
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    RecordingSink sink;
    const int n_rows = 3;
    tap.arm(n_rows, &sink);
    // Layer 4 arrives in two ubatches (2 rows, then 1); the others in one.
    for (int il = 0; il < kLayers; ++il) {
        if (il == 4) {
            deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
            deliver(tap, "ffn_swiglu", il, 2, 1, kFf);
        } else {
            deliver(tap, "ffn_swiglu", il, 0, n_rows, kFf);
        }
    }
    // Nodes that are not tapped pass through untouched.
    FakeTensor other("attn_norm-2", kFf, n_rows);
    CHECK(FfnTap::callback(&other.t, false, &tap));
    EXPECT_NO_THROW(tap.disarm_and_check(), "complete delivery");
    CHECK(!tap.armed());

    CHECK(sink.calls.size() == static_cast<size_t>(kLayers + 1));
    int total_rows[kLayers] = {};
    bool data_ok = true;
    for (const RecordedRows& c : sink.calls) {
        CHECK(c.kind == TapKind::Activation);
        CHECK(c.width == kFf);
        CHECK(c.layer >= 0 && c.layer < kLayers);
        if (c.layer < 0 || c.layer >= kLayers) continue;
        CHECK(c.row0 == total_rows[c.layer]);  // row cursor continues across ubatches
        total_rows[c.layer] += c.n_rows;
        CHECK(c.data.size() == static_cast<size_t>(c.n_rows * kFf));
        for (int r = 0; r < c.n_rows; ++r)
            for (int64_t i = 0; i < kFf; ++i)
                data_ok = data_ok && c.data[r * kFf + i] == cell(c.layer, c.row0 + r, i);
    }
    CHECK(data_ok);
    for (int il = 0; il < kLayers; ++il) CHECK_MSG(total_rows[il] == n_rows, "layer " + std::to_string(il));

    // Data arriving after disarm goes nowhere.
    const size_t before = sink.calls.size();
    deliver(tap, "ffn_swiglu", 0, 0, 1, kFf);
    CHECK(sink.calls.size() == before);
}

void test_tap_norm_capture() {
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    const unsigned norm = kTapActivation | tap_bit(TapKind::NormInput);
    RecordingSink sink;

    // Activations alone are not enough once norm capture is on.
    tap.arm(1, &sink, norm);
    for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 1, kFf);
    EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), "rows of ffn_norm", "norm capture without norm rows");

    sink.calls.clear();
    tap.arm(2, &sink, norm);
    for (int il = 0; il < kLayers; ++il) {
        deliver(tap, "ffn_norm", il, 0, 2, kEmbd);
        deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
    }
    EXPECT_NO_THROW(tap.disarm_and_check(), "activations and norm inputs delivered");
    int norm_calls = 0;
    for (const RecordedRows& c : sink.calls) {
        if (c.kind != TapKind::NormInput) continue;
        ++norm_calls;
        CHECK(c.width == kEmbd);
        CHECK(c.n_rows == 2 && c.row0 == 0);
        CHECK(c.data.size() == 2u * kEmbd && c.data[kEmbd + 1] == cell(c.layer, 1, 1));
    }
    CHECK(norm_calls == kLayers);

    // A norm row with the activation width is a layout error.
    tap.arm(1, &sink, norm);
    deliver(tap, "ffn_norm", 0, 0, 1, kFf);
    EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), "unexpected layout", "norm input with the wrong width");
}

// Arms for n_rows, delivers every layer correctly, then lets `spoil` do one bad thing.
// `needle` is part of the expected message; at most `max_calls_to_sink` deliveries may reach
// the sink (none after the bad one).
void expect_tap_error(int n_rows, const std::function<void(FfnTap&)>& spoil, const std::string& what,
                      const char* needle, size_t max_calls_to_sink) {
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    RecordingSink sink;
    tap.arm(n_rows, &sink);
    spoil(tap);
    EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), needle, what);
    CHECK_MSG(sink.calls.size() <= max_calls_to_sink, what + ": the sink got rows it should not have");
    CHECK(!tap.armed());

    // The next arm starts clean.
    tap.arm(1, &sink);
    for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 1, kFf);
    EXPECT_NO_THROW(tap.disarm_and_check(), what + ": re-arm after an error");
}

void test_tap_errors() {
    const size_t all = kLayers;
    expect_tap_error(3, [](FfnTap& tap) {
        for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, il == 5 ? 2 : 3, kFf);
    }, "a layer delivered fewer rows than armed", "layer 5 delivered 2 rows", all);

    expect_tap_error(2, [](FfnTap& tap) {
        for (int il = 0; il < kLayers; ++il)
            if (il != 17) deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
    }, "a layer delivered nothing", "layer 17 delivered 0 rows", all);

    expect_tap_error(2, [](FfnTap& tap) {
        for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
        deliver(tap, "ffn_swiglu", 9, 2, 1, kFf);
    }, "rows exceed armed (extra ubatch)", "more rows than the batch holds", all);

    expect_tap_error(2, [](FfnTap& tap) {
        deliver(tap, "ffn_swiglu", 0, 0, 3, kFf);
        for (int il = 1; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
    }, "rows exceed armed (one tensor)", "more rows than the batch holds", 0);

    expect_tap_error(1, [](FfnTap& tap) {
        for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 1, il == 3 ? kFf + 1 : kFf);
    }, "wrong ne0", "unexpected layout", 3);  // layers 0-2 were fine; nothing after the bad one reaches the sink

    expect_tap_error(1, [](FfnTap& tap) {
        for (int il = 0; il < kLayers; ++il)
            deliver(tap, "ffn_swiglu", il, 0, 1, kFf, il == 0 ? GGML_TYPE_F16 : GGML_TYPE_F32);
    }, "type F16", "unexpected layout", 0);

    expect_tap_error(1, [](FfnTap& tap) {
        FakeTensor ft("ffn_swiglu-0", kFf, 1);
        ft.t.ne[2] = 2;  // a 3-D tensor (e.g. MoE experts) is not rows of a batch
        ft.t.nb[3] = ft.t.nb[2] * 2;
        ft.storage.resize(ft.t.nb[3]);
        ft.t.data = ft.storage.data();
        FfnTap::callback(&ft.t, true, &tap);
        FfnTap::callback(&ft.t, false, &tap);
        for (int il = 1; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 1, kFf);
    }, "ne2 != 1", "unexpected layout", 0);

    expect_tap_error(2, [](FfnTap& tap) {
        FakeTensor ft("ffn_swiglu-0", kFf, 2);
        ft.t.nb[1] = ft.t.nb[1] * 2;  // strided rows: a view, not contiguous
        ft.t.nb[2] = ft.t.nb[1] * 2;
        ft.t.nb[3] = ft.t.nb[2];
        ft.storage.resize(ft.t.nb[2]);
        ft.t.data = ft.storage.data();
        FfnTap::callback(&ft.t, true, &tap);
        FfnTap::callback(&ft.t, false, &tap);
        for (int il = 1; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, 2, kFf);
    }, "non-contiguous rows", "unexpected layout", 0);
}

void test_tap_discovery() {
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    tap.begin_discovery();
    bool any_asked = false;
    for (int il = 0; il < kLayers; ++il) {
        if (il == 7) continue;
        any_asked = ask(tap, "ffn_swiglu-" + std::to_string(il)) || any_asked;
        any_asked = ask(tap, "ffn_norm-" + std::to_string(il)) || any_asked;
    }
    any_asked = ask(tap, "ffn_norm-7") || any_asked;  // the norm does not count as the activation
    CHECK(!any_asked);  // discovery never forces a compute boundary
    std::vector<int> missing = tap.end_discovery();
    CHECK(missing == std::vector<int>{7});

    // A second round starts from scratch; names outside [0, n_layers) are ignored.
    tap.begin_discovery();
    ask(tap, "ffn_swiglu-0");
    ask(tap, "ffn_swiglu-30");
    missing = tap.end_discovery();
    CHECK(missing.size() == static_cast<size_t>(kLayers - 1));
    CHECK(!missing.empty() && missing.front() == 1 && missing.back() == kLayers - 1);

    tap.begin_discovery();
    for (int il = 0; il < kLayers; ++il) ask(tap, "ffn_swiglu-" + std::to_string(il));
    CHECK(tap.end_discovery().empty());
    CHECK(!ask(tap, "ffn_swiglu-0"));  // after discovery, unarmed again
}

// ---------------------------------------------------------------------------------------------
// 4. The real model end to end

ContextParams small_context() {
    ContextParams cp;
    cp.n_ctx = 512;
    cp.n_threads = 2;
    return cp;
}

GenerateParams greedy(int max_tokens) {
    GenerateParams gp;
    gp.max_tokens = max_tokens;
    gp.sampling.temperature = 0.0f;
    return gp;
}

void test_model_info() {
    auto model = shared_model();
    const ModelInfo& i = model->info();
    CHECK(i.architecture == "llama");
    CHECK(i.act_name == "ffn_swiglu");
    CHECK(i.n_layers == 30);
    CHECK(i.n_ff == 1536);
    CHECK(i.n_embd == 576);
    CHECK(i.n_vocab > 1000);
    CHECK(i.has_chat_template);
    std::vector<llama_token> toks = model->tokenize("Hello world", false, false);
    CHECK(!toks.empty());
    CHECK(model->detokenize(toks) == "Hello world");
}

void test_generation() {
    auto model = shared_model();
    TappedContext tc(model, small_context());
    CHECK(tc.n_ctx() >= 512);
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int64_t E = model->info().n_embd;
    const std::vector<llama_token> prompt =
        model->tokenize("Once upon a time, in a small village by the sea, there lived", true, false);
    CHECK(prompt.size() > 5);
    const int n_gen = 24;

    GenerateParams p32 = greedy(n_gen);
    p32.capture = RowType::Float32;
    GenerateResult a = generate(tc, prompt, p32, nullptr);
    GenerateResult b = generate(tc, prompt, p32, nullptr);
    CHECK(a.tokens.size() == static_cast<size_t>(n_gen));
    CHECK(a.finish_reason == "length");
    CHECK(!a.text.empty());
    CHECK(a.prompt_tokens == prompt);
    CHECK(a.tokens == b.tokens);
    CHECK(a.text == b.text);
    CHECK(a.active_counts == b.active_counts);
    CHECK(a.acts_f32 == b.acts_f32);

    const size_t n = a.tokens.size();
    CHECK(a.n_layers == L && a.n_ff == F && a.n_embd == E);
    CHECK(a.active_counts.size() == n * L);
    CHECK(a.acts_f32.size() == n * L * F);
    CHECK(a.acts_f16.empty() && a.norm_inputs.empty());
    CHECK(all_finite(a.acts_f32));
    CHECK(any_nonzero(a.acts_f32));
    if (a.active_counts.size() == n * L && a.acts_f32.size() == n * L * F) {
        int mismatches = 0;
        int64_t total_active = 0;
        for (size_t t = 0; t < n; ++t) {
            for (int l = 0; l < L; ++l) {
                const float* row = a.acts_f32.data() + (t * L + l) * F;
                int32_t count = 0;
                for (int64_t i = 0; i < F; ++i) count += row[i] > 0.0f;
                mismatches += count != a.active_counts[t * L + l];
                total_active += a.active_counts[t * L + l];
            }
        }
        CHECK_MSG(mismatches == 0, std::to_string(mismatches) + " rows whose active count disagrees");
        CHECK(total_active > 0 && total_active < static_cast<int64_t>(n * L * F));
        // Rows of different tokens differ: each token's row is really its own.
        CHECK(!std::equal(a.acts_f32.begin(), a.acts_f32.begin() + L * F, a.acts_f32.begin() + L * F));
    }

    // The same rows through TappedContext::decode_seq and a plain sink: checks the generator's
    // token/layer bookkeeping against an independent path, and the decode API itself.
    if (a.acts_f32.size() == n * L * F) {
        tc.clear();
        const int np = static_cast<int>(prompt.size());
        tc.decode_seq(prompt.data(), np - 1, 0, 0, nullptr, false);
        std::vector<llama_token> fed = {prompt.back(), a.tokens[0], a.tokens[1], a.tokens[2]};
        int mismatched_rows = 0;
        for (int j = 0; j < static_cast<int>(fed.size()); ++j) {
            RecordingSink rs;
            tc.decode_seq(&fed[j], 1, np - 1 + j, 0, &rs);
            CHECK(rs.calls.size() == static_cast<size_t>(L));
            std::vector<int> layers_seen(L, 0);
            for (const RecordedRows& c : rs.calls) {
                CHECK(c.kind == TapKind::Activation && c.n_rows == 1 && c.row0 == 0 && c.width == F);
                if (c.layer < 0 || c.layer >= L || c.data.size() != static_cast<size_t>(F)) continue;
                ++layers_seen[c.layer];
                const float* want = a.acts_f32.data() + (static_cast<size_t>(j) * L + c.layer) * F;
                mismatched_rows += !std::equal(c.data.begin(), c.data.end(), want);
            }
            CHECK(std::all_of(layers_seen.begin(), layers_seen.end(), [](int k) { return k == 1; }));
        }
        CHECK_MSG(mismatched_rows == 0, std::to_string(mismatched_rows) + " rows differ from the generator's");

        // A tapped multi-row decode: every row requests logits, so even the last layer
        // delivers all of them (llama.cpp drops rows without logits before its FFN).
        tc.clear();
        RecordingSink rs;
        EXPECT_NO_THROW(tc.decode_seq(prompt.data(), np, 0, 0, &rs), "tapped prompt decode");
        std::vector<int> rows_per_layer(L, 0);
        bool finite = true;
        for (const RecordedRows& c : rs.calls) {
            if (c.layer >= 0 && c.layer < L) rows_per_layer[c.layer] += c.n_rows;
            for (float x : c.data) finite = finite && std::isfinite(x);
        }
        CHECK(finite);
        CHECK(std::all_of(rows_per_layer.begin(), rows_per_layer.end(), [&](int k) { return k == np; }));
        tc.clear();
    }

    // The tap must not change what the model computes.
    GenerateParams off = greedy(n_gen);
    off.tap = false;
    GenerateResult c = generate(tc, prompt, off, nullptr);
    CHECK(c.tokens == a.tokens);
    CHECK(c.active_counts.empty() && c.acts_f32.empty());

    // Half-precision capture, with the normed FFN input as well.
    GenerateParams p16 = greedy(n_gen);
    p16.capture = RowType::Float16;
    p16.capture_norm = true;
    GenerateResult d = generate(tc, prompt, p16, nullptr);
    CHECK(d.tokens == a.tokens);
    CHECK(d.active_counts == a.active_counts);
    CHECK(d.acts_f32.empty());
    CHECK(d.acts_f16.size() == a.acts_f32.size());
    if (d.tokens == a.tokens && d.acts_f16.size() == a.acts_f32.size()) {
        size_t bad = 0;
        double max_rel = 0;
        for (size_t i = 0; i < a.acts_f32.size(); ++i) {
            const float x = a.acts_f32[i];
            const float h = ggml_fp16_to_fp32(static_cast<ggml_fp16_t>(d.acts_f16[i]));
            const double err = std::fabs(static_cast<double>(h) - x);
            if (err > 1e-2 * std::fabs(x) + 1e-6) ++bad;  // absolute slack for half's subnormals
            if (std::fabs(x) > 1e-3) max_rel = std::max(max_rel, err / std::fabs(x));
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " f16 values off by more than 1% (max rel " +
                                std::to_string(max_rel) + ")");
    }
    CHECK(d.norm_inputs.size() == d.tokens.size() * L * E);
    CHECK(all_finite(d.norm_inputs));
    CHECK(any_nonzero(d.norm_inputs));

    // Progress counts tokens; cancellation stops early.
    Progress progress;
    GenerateResult e = generate(tc, prompt, greedy(n_gen), &progress);
    CHECK(progress.tokens.load() == static_cast<int64_t>(e.tokens.size()));
    Progress cancel;
    cancel.cancel = true;
    GenerateResult f = generate(tc, prompt, greedy(n_gen), &cancel);
    CHECK(f.finish_reason == "cancelled");
    CHECK(f.tokens.size() == 1 && f.active_counts.size() == static_cast<size_t>(L));
    CHECK(!f.tokens.empty() && f.tokens[0] == a.tokens[0]);

    // A stop string cuts the text where it starts.
    if (a.text.size() > 8) {
        GenerateParams ps = greedy(n_gen);
        const std::string stop = a.text.substr(a.text.size() / 2, 3);
        ps.stop = {stop};
        GenerateResult s = generate(tc, prompt, ps, nullptr);
        CHECK(s.finish_reason == "stop");
        CHECK(s.text == a.text.substr(0, a.text.find(stop)));
        CHECK(s.active_counts.size() == s.tokens.size() * L);
    }
}

void test_generation_errors() {
    auto model = shared_model();
    TappedContext tc(model, small_context());
    const std::vector<llama_token> prompt = model->tokenize("The capital of France is", true, false);
    const int n_vocab = model->info().n_vocab;

    EXPECT_THROW(ParamError, generate(tc, prompt, greedy(0), nullptr), "max_tokens 0");
    EXPECT_THROW(ParamError, generate(tc, prompt, greedy(-3), nullptr), "max_tokens -3");
    EXPECT_THROW(ParamError, generate(tc, {}, greedy(4), nullptr), "empty prompt");
    const std::vector<llama_token> long_prompt(600, prompt.back());
    EXPECT_THROW_MSG(ContextError, generate(tc, long_prompt, greedy(4), nullptr), "exceeds the context",
                     "600-token prompt, n_ctx 512");
    const std::vector<llama_token> fits(500, prompt.back());
    EXPECT_THROW(ContextError, generate(tc, fits, greedy(100), nullptr), "prompt fits but max_tokens does not");

    std::vector<llama_token> bad = prompt;
    bad.push_back(n_vocab);
    EXPECT_THROW(ParamError, generate(tc, bad, greedy(4), nullptr), "token id == n_vocab");
    bad.back() = -1;
    EXPECT_THROW(ParamError, generate(tc, bad, greedy(4), nullptr), "token id -1");

    auto sampled = [&](float temperature, float top_p, int top_k, float min_p) {
        GenerateParams gp = greedy(4);
        gp.sampling.temperature = temperature;
        gp.sampling.top_p = top_p;
        gp.sampling.top_k = top_k;
        gp.sampling.min_p = min_p;
        return gp;
    };
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(-1.0f, 0.9f, 40, 0.0f), nullptr), "temperature -1");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(NAN, 0.9f, 40, 0.0f), nullptr), "temperature NaN");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.0f, 40, 0.0f), nullptr), "top_p 0");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 1.5f, 40, 0.0f), nullptr), "top_p 1.5");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, NAN, 40, 0.0f), nullptr), "top_p NaN");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.9f, -1, 0.0f), nullptr), "top_k -1");
    EXPECT_THROW(ParamError, generate(tc, prompt, sampled(0.8f, 0.9f, 40, 1.0f), nullptr), "min_p 1");

    // After all those errors the context still works, and seeded sampling is reproducible.
    GenerateParams gp = sampled(0.8f, 0.9f, 40, 0.05f);
    gp.sampling.seed = 42;
    gp.max_tokens = 8;
    GenerateResult r1, r2;
    EXPECT_NO_THROW(r1 = generate(tc, prompt, gp, nullptr), "sampling after errors");
    EXPECT_NO_THROW(r2 = generate(tc, prompt, gp, nullptr), "sampling again");
    CHECK(!r1.tokens.empty());
    CHECK(r1.tokens == r2.tokens);

    ContextParams tiny = small_context();
    tiny.n_ctx = 4;
    EXPECT_THROW(ParamError, TappedContext t(model, tiny), "n_ctx 4");
    ContextParams seqs = small_context();
    seqs.n_seq_max = 0;
    EXPECT_THROW(ParamError, TappedContext t(model, seqs), "n_seq_max 0");
}

void test_unsupported_models() {
    TempDir dir;
    const std::string bert = dir.file("bert.gguf");
    write_synthetic_gguf(bert, "bert", -1, false);
    EXPECT_THROW_MSG(ModelError, Model::load(bert, 0), "unsupported architecture 'bert'", "architecture bert");

    const std::string no_arch = dir.file("no-arch.gguf");
    write_synthetic_gguf(no_arch, nullptr, -1, false);
    EXPECT_THROW(ModelError, Model::load(no_arch, 0), "no general.architecture");

    const std::string bare = dir.file("llama-bare.gguf");
    write_synthetic_gguf(bare, "llama", -1, false);
    EXPECT_THROW(ModelError, Model::load(bare, 0), "llama without block_count or tensors");

    const std::string no_tensors = dir.file("llama-no-tensors.gguf");
    write_synthetic_gguf(no_tensors, "llama", 30, false);
    EXPECT_THROW_MSG(ModelError, Model::load(no_tensors, 0), "blk.0.ffn_down.weight' missing",
                     "llama with block_count 30 and no tensors");

    // Passes neurotap's own checks (block_count 1, blk.0.ffn_down.weight present), so
    // llama.cpp itself gets to reject it.
    const std::string partial = dir.file("llama-partial.gguf");
    write_synthetic_gguf(partial, "llama", 1, true);
    EXPECT_THROW_MSG(ModelError, Model::load(partial, 0), "llama.cpp could not load",
                     "llama missing hyperparameters and weights");

    for (const char* arch : {"llama", "qwen2", "qwen3", "gemma3", "gemma"})
        EXPECT_NO_THROW(activation_tensor_for(arch), arch);
    CHECK(activation_tensor_for("gemma3") == "ffn_geglu");
    EXPECT_THROW(ModelError, activation_tensor_for("bert"), "activation tensor for bert");
    EXPECT_THROW(ModelError, activation_tensor_for(""), "activation tensor for ''");
}

// ---------------------------------------------------------------------------------------------
// 5. Reducers on synthetic rows

// Activations of one sample, [tokens, layers, n_ff]: uniform in [-1, 1], with about one value
// in eight exactly at the threshold (not active: the comparison is strict).
struct SynthRows {
    int n_tokens;
    int n_layers;
    int64_t n_ff;
    std::vector<float> v;
    SynthRows(int T, int L, int64_t F, uint32_t seed, float thr) : n_tokens(T), n_layers(L), n_ff(F) {
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        v.resize(static_cast<size_t>(T) * L * F);
        for (float& x : v) x = (rng() % 8 == 0) ? thr : u(rng);
    }
    float* row(int t, int l) { return v.data() + (static_cast<size_t>(t) * n_layers + l) * n_ff; }
    const float* row(int t, int l) const { return v.data() + (static_cast<size_t>(t) * n_layers + l) * n_ff; }
};

// The reference bitset of neurons active on tokens [t0, t1): bit layer*n_ff + i of
// little-endian uint64 words.
std::vector<uint64_t> reference_bits(const SynthRows& r, int t0, int t1, float thr) {
    const int64_t n_bits = r.n_layers * r.n_ff;
    std::vector<uint64_t> w(static_cast<size_t>((n_bits + 63) / 64), 0);
    for (int t = t0; t < t1; ++t)
        for (int l = 0; l < r.n_layers; ++l)
            for (int64_t i = 0; i < r.n_ff; ++i)
                if (r.row(t, l)[i] > thr) {
                    const int64_t bit = l * r.n_ff + i;
                    w[static_cast<size_t>(bit / 64)] |= uint64_t(1) << (bit % 64);
                }
    return w;
}

bool all_zero(const std::vector<uint64_t>& w) {
    return std::all_of(w.begin(), w.end(), [](uint64_t x) { return x == 0; });
}

void test_reducers_synthetic() {
    // 3 x 37 = 111 neurons: two words, the second one partly padding.
    const int L = 3;
    const int64_t F = 37;
    const float thr = 0.25f;
    const int chunk = 3;
    const int n_samples = 3;
    // Sample s keeps n_keep[s] tokens and then offers the rows of one more token that is never
    // committed (an end-of-generation token); its rows are all active, so a leak would show.
    const int n_keep[n_samples] = {8, 6, 0};
    std::vector<SynthRows> rows;
    for (int s = 0; s < n_samples; ++s) {
        rows.emplace_back(n_keep[s] + 1, L, F, 100 + s, thr);
        for (int l = 0; l < L; ++l) std::fill(rows[s].row(n_keep[s], l), rows[s].row(n_keep[s], l) + F, 1.0f);
    }

    ActiveCountReducer counts(thr);
    ActiveSetReducer bitsets(chunk, thr);
    const std::vector<std::pair<int, int>> watched = {{2, 5}, {0, 0}, {1, 36}, {0, 36}, {2, 5}, {1, 0}};
    WatchReducer watch(watched);
    FullRowReducer full32(false), full16(true);
    std::vector<Reducer*> all = {&counts, &bitsets, &watch, &full32, &full16};
    const int max_tokens = 10;
    for (Reducer* r : all) r->begin(n_samples, L, F, max_tokens);
    CHECK(bitsets.n_words() == 2);
    CHECK(bitsets.chunk() == chunk);
    CHECK(watch.n_watched() == static_cast<int>(watched.size()));
    CHECK(!full32.half() && full16.half());

    // As the sampler offers them: token by token, layer by layer, samples interleaved; then
    // each sample's token is committed, or the sample finishes.
    bool committed_early = false;     // bits visible before commit(), or an open chunk changed
    bool other_sample_touched = false;
    bool prefix_mismatch = false;     // the open chunk after each commit
    for (int t = 0; t <= n_keep[0]; ++t) {
        for (int l = 0; l < L; ++l)
            for (int s = 0; s < n_samples; ++s)
                if (t <= n_keep[s])
                    for (Reducer* r : all) r->on_row(s, t, l, rows[s].row(t, l));
        for (int s = 0; s < n_samples; ++s) {
            if (t > n_keep[s]) continue;
            if (t == n_keep[s]) {
                for (Reducer* r : all) r->finish(s, n_keep[s]);
                continue;
            }
            // Rows offered, not committed yet: the token's chunk holds only earlier tokens.
            const int c = t / chunk;
            const auto& b = bitsets.sets(s);
            const size_t W = static_cast<size_t>(bitsets.n_words());
            if (b.size() >= (c + 1) * W) {
                std::vector<uint64_t> open(b.begin() + c * W, b.begin() + (c + 1) * W);
                committed_early = committed_early || open != reference_bits(rows[s], c * chunk, t, thr);
            } else if (t % chunk != 0) {
                committed_early = true;  // the chunk was opened by an earlier commit
            }
            const std::vector<uint64_t> before_other = s + 1 < n_samples ? bitsets.sets(s + 1) : std::vector<uint64_t>{};
            for (Reducer* r : all) r->commit(s, t, 0);
            if (s + 1 < n_samples) other_sample_touched = other_sample_touched || bitsets.sets(s + 1) != before_other;
            const auto& after = bitsets.sets(s);
            if (after.size() < (c + 1) * W) {
                prefix_mismatch = true;
            } else {
                std::vector<uint64_t> open(after.begin() + c * W, after.begin() + (c + 1) * W);
                prefix_mismatch = prefix_mismatch || open != reference_bits(rows[s], c * chunk, t + 1, thr);
            }
        }
    }
    CHECK_MSG(!committed_early, "bits of a token appeared before its commit()");
    CHECK_MSG(!other_sample_touched, "commit() of one sample changed another sample's bits");
    CHECK_MSG(!prefix_mismatch, "an open chunk is not the union of the tokens committed so far");

    for (int s = 0; s < n_samples; ++s) {
        const std::string tag = "sample " + std::to_string(s);
        const int n = n_keep[s];
        const SynthRows& r = rows[s];

        // Active counts, trimmed to the kept tokens.
        const auto& cnt = counts.counts(s);
        CHECK_MSG(cnt.size() == static_cast<size_t>(n) * L, tag);
        if (cnt.size() == static_cast<size_t>(n) * L) {
            int bad = 0;
            for (int t = 0; t < n; ++t)
                for (int l = 0; l < L; ++l) {
                    int32_t want = 0;
                    for (int64_t i = 0; i < F; ++i) want += r.row(t, l)[i] > thr;
                    bad += cnt[static_cast<size_t>(t) * L + l] != want;
                }
            CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " wrong active counts");
        }

        // Chunk bitsets: ceil(n / chunk) chunks, each the union of its committed tokens; the
        // uncommitted all-active token left nothing behind.
        const auto& b = bitsets.sets(s);
        const size_t W = static_cast<size_t>(bitsets.n_words());
        const size_t n_chunks = static_cast<size_t>((n + chunk - 1) / chunk);
        CHECK_MSG(b.size() == n_chunks * W, tag + ": " + std::to_string(b.size()) + " words");
        if (b.size() == n_chunks * W) {
            for (size_t c = 0; c < n_chunks; ++c) {
                const int t0 = static_cast<int>(c) * chunk;
                const int t1 = std::min(n, t0 + chunk);
                std::vector<uint64_t> got(b.begin() + c * W, b.begin() + (c + 1) * W);
                const std::vector<uint64_t> want = reference_bits(r, t0, t1, thr);
                CHECK_MSG(got == want, tag + ", chunk " + std::to_string(c));
                CHECK_MSG(!all_zero(want), tag + ": a chunk without active neurons proves little");
                CHECK_MSG(got[W - 1] >> (L * F - 64) == 0, tag + ": padding bits set");
            }
        }

        // Watched neurons, in the listed order.
        const auto& wv = watch.values(s);
        const size_t K = watched.size();
        CHECK_MSG(wv.size() == static_cast<size_t>(n) * K, tag);
        if (wv.size() == static_cast<size_t>(n) * K) {
            int bad = 0;
            for (int t = 0; t < n; ++t)
                for (size_t k = 0; k < K; ++k)
                    bad += wv[t * K + k] != r.row(t, watched[k].first)[watched[k].second];
            CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " wrong watched values");
        }

        // Full rows: float32 exact, half within half's precision.
        const size_t n_vals = static_cast<size_t>(n) * L * F;
        CHECK_MSG(full32.rows_f32(s).size() == n_vals, tag);
        if (full32.rows_f32(s).size() == n_vals)
            CHECK_MSG(std::equal(r.v.begin(), r.v.begin() + n_vals, full32.rows_f32(s).begin()), tag + ": f32 rows");
        CHECK_MSG(full16.rows_f16(s).size() == n_vals, tag);
        if (full16.rows_f16(s).size() == n_vals) {
            size_t bad = 0;
            for (size_t k = 0; k < n_vals; ++k) {
                const float h = ggml_fp16_to_fp32(static_cast<ggml_fp16_t>(full16.rows_f16(s)[k]));
                bad += !(std::fabs(h - r.v[k]) <= 1e-3f * std::fabs(r.v[k]) + 1e-7f);
            }
            CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " f16 values not close");
        }
    }

    // The bit layout, spelled out: 2 layers x 40 neurons = 80 bits in two words.
    {
        ActiveSetReducer lay(1, 0.0f);
        lay.begin(1, 2, 40, 4);
        CHECK(lay.n_words() == 2);
        std::vector<float> l0(40, -1.0f), l1(40, -1.0f);
        l0[0] = 1.0f;   // bit 0
        l1[23] = 1.0f;  // bit 63: the top bit of word 0
        l1[39] = 1.0f;  // bit 79: word 1, bit 15
        lay.on_row(0, 0, 0, l0.data());
        lay.on_row(0, 0, 1, l1.data());
        lay.commit(0, 0, 0);
        const std::vector<float> ones(40, 0.5f);
        lay.on_row(0, 1, 0, ones.data());
        lay.on_row(0, 1, 1, ones.data());
        lay.commit(0, 1, 0);
        lay.finish(0, 2);
        const std::vector<uint64_t> want = {uint64_t(1) | (uint64_t(1) << 63), uint64_t(1) << 15,  // token 0
                                            ~uint64_t(0), (uint64_t(1) << 16) - 1};                // token 1
        CHECK(lay.sets(0) == want);
        // As bytes (what numpy sees of the uint64 buffer on a little-endian host): bit k is
        // bit k % 8 of byte k / 8.
        const uint16_t probe = 1;
        uint8_t first = 0;
        std::memcpy(&first, &probe, 1);
        if (first == 1 && lay.sets(0).size() == 4) {
            uint8_t bytes[16];
            std::memcpy(bytes, lay.sets(0).data(), 16);
            const uint8_t want_bytes[16] = {0x01, 0, 0, 0, 0, 0, 0, 0x80, 0, 0x80, 0, 0, 0, 0, 0, 0};
            CHECK(std::memcmp(bytes, want_bytes, 16) == 0);
        }
    }

    // A run of one sample whose only token is never committed, and a chunk of 1.
    {
        ActiveSetReducer one(1, 0.0f);
        one.begin(1, 2, 40, 4);
        const std::vector<float> ones(40, 1.0f);
        one.on_row(0, 0, 0, ones.data());
        one.on_row(0, 0, 1, ones.data());
        one.finish(0, 0);
        CHECK(one.sets(0).empty());
    }

    EXPECT_THROW(ParamError, ActiveSetReducer(0, 0.0f), "chunk 0");
    EXPECT_THROW(ParamError, ActiveSetReducer(-2, 0.0f), "chunk -2");

    // Watched neurons outside the model: ParamError in begin(), which names the neuron.
    for (const auto& bad : std::vector<std::pair<int, int>>{{3, 0}, {-1, 0}, {0, 37}, {0, -1}, {2, 37}}) {
        WatchReducer w({{0, 0}, bad});
        const std::string what = "watch (" + std::to_string(bad.first) + ", " + std::to_string(bad.second) + ")";
        EXPECT_THROW_MSG(ParamError, w.begin(1, L, F, 4), ("(" + std::to_string(bad.first) + ", ").c_str(), what);
    }
    WatchReducer edge({{2, 36}, {0, 0}});
    EXPECT_NO_THROW(edge.begin(1, L, F, 4), "watch the last neuron of the last layer");
    WatchReducer none({});
    EXPECT_NO_THROW(none.begin(2, L, F, 4), "watch nothing");
    none.on_row(0, 0, 1, rows[0].row(0, 1));
    none.finish(0, 1);
    CHECK(none.values(0).empty() && none.n_watched() == 0);
}

// ---------------------------------------------------------------------------------------------
// 6. The parallel sampler on the real model

ContextParams parallel_context(int n) {
    ContextParams cp;
    cp.n_ctx = n * 256;
    cp.n_batch = 512;
    cp.n_seq_max = n;
    cp.n_threads = 2;
    cp.kv_unified = false;
    return cp;
}

SampleParams sample_params(int n, int max_tokens, uint32_t seed) {
    SampleParams sp;
    sp.n = n;
    sp.max_tokens = max_tokens;
    sp.sampling.temperature = 1.0f;
    sp.sampling.top_p = 1.0f;
    sp.sampling.top_k = 0;
    sp.sampling.seed = seed;
    return sp;
}

std::vector<llama_token> chat_prompt(const Model& model, const std::string& question) {
    return model.tokenize(model.apply_chat_template({{"user", question}}, true), false, true);
}

const char* kQuestion = "What is the capital of France? Answer briefly.";

std::vector<std::vector<llama_token>> all_tokens(const DecodeLoop& ps) {
    std::vector<std::vector<llama_token>> out;
    for (int i = 0; i < ps.n(); ++i) out.push_back(ps.sample(i).tokens);
    return out;
}

// The largest relative L2 distance between a row of `got` and the same row of `want`, both
// [tokens, layers, n_ff]. Infinity when the sizes differ.
double max_row_rel_l2(const std::vector<float>& got, const std::vector<float>& want, int64_t n_ff) {
    if (got.size() != want.size() || n_ff <= 0) return INFINITY;
    double worst = 0;
    for (size_t r = 0; r * n_ff < got.size(); ++r) {
        double d2 = 0, w2 = 0;
        for (int64_t i = 0; i < n_ff; ++i) {
            const double g = got[r * n_ff + i], w = want[r * n_ff + i];
            d2 += (g - w) * (g - w);
            w2 += w * w;
        }
        const double rel = std::sqrt(d2) / std::max(std::sqrt(w2), 1e-12);
        if (!(rel <= worst)) worst = rel;  // NaN sticks
    }
    return worst;
}

// The rows of `tokens` fed one by one to a single-sequence context: the reference.
std::vector<float> teacher_forced_rows(TappedContext& single, const std::vector<llama_token>& prompt,
                                       const std::vector<llama_token>& tokens) {
    GenerateParams gp;
    gp.max_tokens = static_cast<int>(tokens.size());
    gp.forced = tokens;
    gp.capture = RowType::Float32;
    gp.sampling.temperature = 0.0f;
    GenerateResult r = generate(single, prompt, gp, nullptr);
    if (r.tokens != tokens) return {};
    return r.acts_f32;
}

void test_parallel_sampling() {
    auto model = shared_model();
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int n = 6, max_tokens = 24;
    const uint32_t seed = 1234;
    TappedContext tc(model, parallel_context(n));
    TappedContext single(model, small_context());
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    CHECK(prompt.size() > 10);

    ActiveCountReducer counts(0.0f);
    ActiveSetReducer bitsets(4, 0.0f);
    const std::vector<std::pair<int, int>> watched = {{29, 1535}, {0, 0}, {14, 700}};
    WatchReducer watch(watched);
    FullRowReducer rows(false), half(true);
    DecodeLoop ps(tc, prompt, sample_params(n, max_tokens, seed), {&counts, &bitsets, &watch, &rows, &half});
    CHECK(ps.n() == n && ps.n_live() == n && ps.n_prompt() == static_cast<int>(prompt.size()));
    Progress progress;
    CHECK(ps.advance(max_tokens, &progress) == 0);
    CHECK(ps.n_live() == 0);

    int64_t total = 0;
    std::vector<size_t> lengths;
    for (int s = 0; s < n; ++s) {
        const SampleState& st = ps.sample(s);
        lengths.push_back(st.tokens.size());
        total += static_cast<int64_t>(st.tokens.size()) + (st.finish_reason() == "eos");
        CHECK(!st.live);
        CHECK(st.tokens.size() <= static_cast<size_t>(max_tokens));
        CHECK_MSG(st.finish_reason() == (st.tokens.size() == static_cast<size_t>(max_tokens) ? "length" : "eos"),
                  "sample " + std::to_string(s) + ": " + st.finish_reason());
        CHECK(st.text == model->detokenize(st.tokens));
        CHECK(st.token_logprob.empty() && st.top_ids.empty());
    }
    std::printf("  sample lengths:");
    for (size_t k : lengths) std::printf(" %zu", k);
    std::printf("\n");
    CHECK(ps.tokens_sampled() == total);  // end-of-generation tokens are sampled too
    CHECK(progress.tokens.load() == total);
    CHECK_MSG(*std::min_element(lengths.begin(), lengths.end()) < *std::max_element(lengths.begin(), lengths.end()),
              "all samples ended at the same step: nothing checks the routing after one ends");
    CHECK(ps.decode_steps() == static_cast<int>(*std::max_element(lengths.begin(), lengths.end())) - 1 ||
          ps.decode_steps() == static_cast<int>(*std::max_element(lengths.begin(), lengths.end())));
    const auto first = all_tokens(ps);
    CHECK_MSG(std::count(first.begin(), first.end(), first[0]) < n, "every sample drew the same tokens");

    // Every sample's rows are the rows of its own tokens: a single-sequence teacher-forced run
    // of the same tokens computes them again, and the other reducers agree with the rows.
    double worst_rel = 0;
    for (int s = 0; s < n; ++s) {
        const std::string tag = "sample " + std::to_string(s);
        const auto& toks = ps.sample(s).tokens;
        const size_t nt = toks.size();
        const auto& got = rows.rows_f32(s);
        CHECK_MSG(got.size() == nt * L * F, tag);
        if (nt == 0 || got.size() != nt * L * F) continue;
        const std::vector<float> want = teacher_forced_rows(single, prompt, toks);
        CHECK_MSG(want.size() == got.size(), tag + ": teacher-forced run");
        const double rel = max_row_rel_l2(got, want, F);
        worst_rel = std::max(worst_rel, rel);
        CHECK_MSG(rel < 5e-3, tag + ": max relative L2 " + std::to_string(rel));
        // A wrong row (the next token's, or another sample's) is far from it.
        if (nt > 1) {
            std::vector<float> shifted(want.begin() + L * F, want.end());
            shifted.insert(shifted.end(), want.end() - L * F, want.end());
            CHECK_MSG(max_row_rel_l2(got, shifted, F) > 0.1, tag + ": rows are not token-specific");
        }

        const auto& cnt = counts.counts(s);
        CHECK_MSG(cnt.size() == nt * L, tag);
        int bad_counts = 0;
        if (cnt.size() == nt * L)
            for (size_t r = 0; r < nt * L; ++r)
                bad_counts += cnt[r] != std::count_if(got.begin() + r * F, got.begin() + (r + 1) * F,
                                                      [](float x) { return x > 0.0f; });
        CHECK_MSG(bad_counts == 0, tag + ": active counts disagree with the rows");

        const size_t W = static_cast<size_t>(bitsets.n_words());
        CHECK(W == static_cast<size_t>((L * F + 63) / 64));
        const size_t n_chunks = (nt + 3) / 4;
        CHECK_MSG(bitsets.sets(s).size() == n_chunks * W, tag);
        if (bitsets.sets(s).size() == n_chunks * W) {
            std::vector<uint64_t> want_bits(n_chunks * W, 0);
            for (size_t t = 0; t < nt; ++t)
                for (int64_t k = 0; k < L * F; ++k)
                    if (got[t * L * F + k] > 0.0f) want_bits[(t / 4) * W + k / 64] |= uint64_t(1) << (k % 64);
            CHECK_MSG(bitsets.sets(s) == want_bits, tag + ": chunk bitsets disagree with the rows");
        }

        const auto& wv = watch.values(s);
        CHECK_MSG(wv.size() == nt * watched.size(), tag);
        if (wv.size() == nt * watched.size()) {
            int bad = 0;
            for (size_t t = 0; t < nt; ++t)
                for (size_t k = 0; k < watched.size(); ++k)
                    bad += wv[t * watched.size() + k] !=
                           got[(t * L + watched[k].first) * F + watched[k].second];
            CHECK_MSG(bad == 0, tag + ": watched values disagree with the rows");
        }

        const auto& h = half.rows_f16(s);
        CHECK_MSG(h.size() == got.size(), tag);
        if (h.size() == got.size()) {
            size_t bad = 0;
            for (size_t k = 0; k < h.size(); ++k) {
                const float x = ggml_fp16_to_fp32(static_cast<ggml_fp16_t>(h[k]));
                bad += !(std::fabs(x - got[k]) <= 1e-3f * std::fabs(got[k]) + 1e-6f);
            }
            CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " f16 rows off");
        }
    }

    std::printf("  rows vs teacher-forced single-sequence rows: max relative L2 %.2e\n", worst_rel);

    // Seeds: the same seed draws the same tokens; another seed draws others.
    {
        DecodeLoop again(tc, prompt, sample_params(n, max_tokens, seed), {});
        again.advance(max_tokens, nullptr);
        CHECK_MSG(all_tokens(again) == first, "the same seed drew different tokens");
        DecodeLoop other(tc, prompt, sample_params(n, max_tokens, seed + 1), {});
        other.advance(max_tokens, nullptr);
        const auto second = all_tokens(other);
        int same = 0;
        for (int s = 0; s < n; ++s) same += second[s] == first[s];
        CHECK_MSG(same < n / 2, std::to_string(same) + " of " + std::to_string(n) + " samples equal under another seed");
    }
    std::vector<uint32_t> seeds;
    for (int i = 0; i < 64; ++i) seeds.push_back(sample_seed(seed, i));
    CHECK(sample_seed(seed, 5) == seeds[5]);
    CHECK(sample_seed(seed + 1, 5) != seeds[5]);
    std::sort(seeds.begin(), seeds.end());
    CHECK_MSG(std::adjacent_find(seeds.begin(), seeds.end()) == seeds.end(), "sample_seed repeats within 64 indices");
}

// advance() in steps, stop() mid-run, and the samples left alone are not disturbed.
void test_parallel_control() {
    auto model = shared_model();
    const int L = model->info().n_layers;
    const int64_t F = model->info().n_ff;
    const int n = 6, max_tokens = 24, keep = 3;
    const uint32_t seed = 777;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    SampleParams sp = sample_params(n, max_tokens, seed);
    sp.sampling.ignore_eos = true;  // every sample is still live at the stop

    FullRowReducer ref_rows(false);
    DecodeLoop ref(tc, prompt, sp, {&ref_rows});
    CHECK(ref.advance(max_tokens, nullptr) == 0);
    const auto unpruned = all_tokens(ref);
    for (const auto& t : unpruned) CHECK(t.size() == static_cast<size_t>(max_tokens));
    std::vector<std::vector<float>> ref_f32;
    for (int s = 0; s < n; ++s) ref_f32.push_back(ref_rows.rows_f32(s));

    FullRowReducer rows(false);
    ActiveCountReducer counts(0.0f);
    DecodeLoop ps(tc, prompt, sp, {&rows, &counts});
    EXPECT_THROW(ParamError, ps.advance(0, nullptr), "advance(0)");
    EXPECT_THROW(ParamError, ps.advance(-5, nullptr), "advance(-5)");
    CHECK(ps.advance(8, nullptr) == n);
    for (int s = 0; s < n; ++s) {
        const auto& t = ps.sample(s).tokens;
        CHECK(ps.sample(s).live && ps.sample(s).finish_reason().empty());
        CHECK(t.size() == 8u);
        CHECK(std::equal(t.begin(), t.end(), unpruned[s].begin()));
    }
    CHECK(ps.advance(8, nullptr) == n);  // already there: no step
    CHECK(ps.sample(0).tokens.size() == 8u);
    CHECK(ps.decode_steps() == 7);

    EXPECT_THROW(ParamError, ps.stop({n}), "stop(n)");
    EXPECT_THROW(ParamError, ps.stop({-1}), "stop(-1)");
    CHECK(ps.n_live() == n);
    std::vector<int> others;
    for (int s = 0; s < n; ++s)
        if (s != keep) others.push_back(s);
    ps.stop(others);
    CHECK(ps.n_live() == 1);
    EXPECT_NO_THROW(ps.stop({others[0]}), "stopping a stopped sample again");
    llama_memory_t mem = llama_get_memory(tc.ctx());
    for (int s : others) {
        CHECK(!ps.sample(s).live);
        CHECK(ps.sample(s).finish_reason() == "stopped");
        CHECK_MSG(llama_memory_seq_pos_max(mem, s) == -1, "stopped sample " + std::to_string(s) + " keeps KV cells");
    }
    CHECK(llama_memory_seq_pos_max(mem, keep) >= static_cast<llama_pos>(prompt.size()));

    CHECK(ps.advance(max_tokens, nullptr) == 0);
    CHECK(ps.sample(keep).finish_reason() == "length");
    CHECK_MSG(ps.sample(keep).tokens == unpruned[keep], "the kept sample drew other tokens once the rest stopped");
    const double rel = max_row_rel_l2(rows.rows_f32(keep), ref_f32[keep], F);
    CHECK_MSG(rel < 5e-3, "kept sample: max relative L2 " + std::to_string(rel));
    for (int s : others) {
        CHECK(ps.sample(s).tokens.size() == 8u && ps.sample(s).finish_reason() == "stopped");
        CHECK(counts.counts(s).size() == 8u * L);
        CHECK(rows.rows_f32(s).size() == size_t(8) * L * F);
        if (rows.rows_f32(s).size() == size_t(8) * L * F && ref_f32[s].size() >= size_t(8) * L * F) {
            std::vector<float> prefix(ref_f32[s].begin(), ref_f32[s].begin() + 8 * L * F);
            CHECK(max_row_rel_l2(rows.rows_f32(s), prefix, F) < 5e-3);
        }
    }
    CHECK(counts.counts(keep).size() == static_cast<size_t>(max_tokens) * L);
    CHECK(ps.advance(max_tokens, nullptr) == 0);  // nothing left: a no-op
    CHECK(ps.sample(keep).tokens.size() == static_cast<size_t>(max_tokens));
    for (int s = 0; s < n; ++s) CHECK(llama_memory_seq_pos_max(mem, s) == -1);

    // Stopped before the run starts: no tokens, no rows, and the others run as usual.
    FullRowReducer early_rows(false);
    ActiveCountReducer early_counts(0.0f);
    DecodeLoop early(tc, prompt, sp, {&early_rows, &early_counts});
    early.stop({0, 1});  // sample 0's sequence holds the prompt until it is copied
    CHECK(early.n_live() == n - 2);
    CHECK(early.advance(4, nullptr) == n - 2);
    for (int s : {0, 1}) {
        CHECK(early.sample(s).tokens.empty() && early.sample(s).finish_reason() == "stopped");
        CHECK(early_rows.rows_f32(s).empty());
        CHECK(early_counts.counts(s).empty());
        CHECK_MSG(llama_memory_seq_pos_max(mem, s) == -1, "sample " + std::to_string(s) + " stopped before the start keeps KV cells");
    }
    for (int s : {2, 3, 5}) {
        const auto& t = early.sample(s).tokens;
        CHECK(t.size() == 4u && std::equal(t.begin(), t.end(), unpruned[s].begin()));
        CHECK(early_rows.rows_f32(s).size() == size_t(4) * L * F);
    }
}

// A race decided early hands its winner to a context of its own: the KV state moves (rewritten
// from the race's per-sequence streams to one stream), the sampler goes on where it stood, and the
// winner draws exactly what it draws when it never moves.
void test_hand_off() {
    auto model = shared_model();
    const int n = 4, max_tokens = 40, race = 12, pick = 2;
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    SampleParams sp = sample_params(n, max_tokens, 99);
    sp.sampling.ignore_eos = true;
    TappedContext full_ctx(model, parallel_context(n));
    DecodeLoop ref(full_ctx, prompt, sp, {});
    ref.advance(max_tokens, nullptr);

    ContextParams small = parallel_context(n);
    small.n_ctx = n * 256;  // room for the race only
    TappedContext race_ctx(model, small);
    SampleParams rp = sp;
    rp.kv_tokens = race;
    DecodeLoop r(race_ctx, prompt, rp, {});
    EXPECT_THROW_MSG(ParamError, r.advance(race + 1, nullptr), "hand a sample off", "beyond the race");
    r.advance(race, nullptr);
    EXPECT_THROW(ParamError, r.hand_off(n), "hand_off(n)");
    Handoff h = r.hand_off(pick);
    CHECK(!r.sample(pick).live && r.sample(pick).finish_reason() == "stopped");
    EXPECT_THROW(ParamError, r.hand_off(pick), "a sample handed off twice");

    ContextParams one = small_context();
    TappedContext cont_ctx(model, one);
    SampleParams cp = sp;
    cp.tap = false;
    DecodeLoop tail(cont_ctx, std::move(h), cp, {});
    CHECK(tail.sample(0).tokens.size() == static_cast<size_t>(race));
    tail.advance(max_tokens, nullptr);
    CHECK(tail.sample(0).tokens == ref.sample(pick).tokens);
    CHECK(tail.sample(0).text == ref.sample(pick).text);
    CHECK(tail.tokens_sampled() == max_tokens - race);
    EXPECT_THROW(ParamError, DecodeLoop(cont_ctx, std::move(h), cp, {}), "a used handoff");
}

void test_parallel_errors() {
    auto model = shared_model();
    const int n = 6;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    const int np = static_cast<int>(prompt.size());
    const int per_seq = static_cast<int>(llama_n_ctx_seq(tc.ctx()));
    CHECK(per_seq == 256);
    auto make = [&](const std::vector<llama_token>& p, const SampleParams& sp, std::vector<Reducer*> reds = {}) {
        DecodeLoop ps(tc, p, sp, std::move(reds));
    };

    EXPECT_THROW(ParamError, make(prompt, sample_params(0, 8, 1)), "n=0");
    EXPECT_THROW(ParamError, make(prompt, sample_params(-1, 8, 1)), "n=-1");
    EXPECT_THROW(ParamError, make(prompt, sample_params(2, 0, 1)), "max_tokens 0");
    EXPECT_THROW(ParamError, make(prompt, sample_params(2, -4, 1)), "max_tokens -4");
    EXPECT_THROW_MSG(ParamError, make(prompt, sample_params(n + 1, 8, 1)), "sequences", "n > n_seq_max");
    EXPECT_THROW_MSG(ContextError, make(prompt, sample_params(2, per_seq - np + 1, 1)), "cells per sequence",
                     "prompt + max_tokens one past the cells of a sequence");
    EXPECT_NO_THROW(make(prompt, sample_params(n, per_seq - np, 1)), "prompt + max_tokens exactly the cells of a sequence");
    EXPECT_THROW(ContextError, make(std::vector<llama_token>(300, prompt.back()), sample_params(1, 1, 1)),
                 "a prompt longer than a sequence");
    EXPECT_THROW(ParamError, make({}, sample_params(2, 8, 1)), "empty prompt");
    std::vector<llama_token> bad = prompt;
    bad.push_back(model->info().n_vocab);
    EXPECT_THROW(ParamError, make(bad, sample_params(2, 8, 1)), "token id == n_vocab");
    SampleParams lp = sample_params(2, 8, 1);
    lp.top_logprobs = 101;
    EXPECT_THROW(ParamError, make(prompt, lp), "top_logprobs 101");
    lp.top_logprobs = -1;
    EXPECT_THROW(ParamError, make(prompt, lp), "top_logprobs -1");
    lp.top_logprobs = 100;
    EXPECT_NO_THROW(make(prompt, lp), "top_logprobs 100");
    SampleParams temp = sample_params(2, 8, 1);
    temp.sampling.temperature = -1.0f;
    EXPECT_THROW(ParamError, make(prompt, temp), "temperature -1");
    // A reducer that rejects the run (a watched neuron outside the model) after the samplers
    // were made: nothing may leak (LeakSanitizer checks).
    WatchReducer outside({{0, 0}, {model->info().n_layers, 0}});
    EXPECT_THROW(ParamError, make(prompt, sample_params(n, 8, 1), {&outside}), "watched layer == n_layers");

    // After all that, the context still samples.
    DecodeLoop ok(tc, prompt, sample_params(n, 4, 1), {});
    int live = -1;
    EXPECT_NO_THROW(live = ok.advance(4, nullptr), "a run after the errors");
    CHECK(live == 0);
    for (int s = 0; s < n; ++s) CHECK(!ok.sample(s).tokens.empty() || ok.sample(s).finish_reason() == "eos");
}

// log_softmax of a logits row, in double.
std::vector<double> log_softmax(const float* logits, int n_vocab) {
    double mx = logits[0];
    for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    double sum = 0;
    for (int i = 0; i < n_vocab; ++i) sum += std::exp(logits[i] - mx);
    const double lse = mx + std::log(sum);
    std::vector<double> out(static_cast<size_t>(n_vocab));
    for (int i = 0; i < n_vocab; ++i) out[i] = logits[i] - lse;
    return out;
}

void test_parallel_logprobs() {
    auto model = shared_model();
    const int n = 4, k = 5, max_tokens = 12;
    const int V = model->info().n_vocab;
    TappedContext tc(model, parallel_context(n));
    const std::vector<llama_token> prompt = chat_prompt(*model, kQuestion);
    SampleParams sp = sample_params(n, max_tokens, 99);
    sp.top_logprobs = k;
    DecodeLoop ps(tc, prompt, sp, {});
    ps.advance(max_tokens, nullptr);

    // Single-sequence logits of the same tokens: the reference for every position.
    ContextParams cp = small_context();
    cp.install_tap = false;
    TappedContext single(model, cp);
    const int np = static_cast<int>(prompt.size());
    for (int s = 0; s < n; ++s) {
        const std::string tag = "sample " + std::to_string(s);
        const SampleState& st = ps.sample(s);
        const size_t nt = st.tokens.size();
        CHECK_MSG(st.token_logprob.size() == nt, tag);
        CHECK_MSG(st.top_logprobs.size() == nt * k && st.top_ids.size() == nt * k, tag);
        if (st.token_logprob.size() != nt || st.top_logprobs.size() != nt * k || st.top_ids.size() != nt * k) continue;
        single.clear();
        single.decode_seq(prompt.data(), np, 0, 0, nullptr);
        double worst = 0;
        for (size_t j = 0; j < nt; ++j) {
            const float lp = st.token_logprob[j];
            const float* top = st.top_logprobs.data() + j * k;
            const int32_t* ids = st.top_ids.data() + j * k;
            CHECK_MSG(std::isfinite(lp) && lp <= 0.0f, tag + ", token " + std::to_string(j));
            for (int i = 0; i < k; ++i) {
                CHECK(std::isfinite(top[i]) && top[i] <= 0.0f);
                CHECK(ids[i] >= 0 && ids[i] < V);
                if (i > 0) CHECK_MSG(top[i] <= top[i - 1], tag + ": top_logprobs not sorted");
                for (int i2 = 0; i2 < i; ++i2) CHECK(ids[i2] != ids[i]);
                if (ids[i] == st.tokens[j]) CHECK(std::fabs(top[i] - lp) < 1e-6f);
            }
            CHECK_MSG(lp <= top[0] + 1e-5f, tag + ": the sampled token beats the top entry");

            const std::vector<double> ref = log_softmax(llama_get_logits_ith(single.ctx(), -1), V);
            worst = std::max(worst, std::fabs(ref[static_cast<size_t>(st.tokens[j])] - lp));
            for (int i = 0; i < k; ++i) worst = std::max(worst, std::fabs(ref[static_cast<size_t>(ids[i])] - top[i]));
            single.decode_seq(&st.tokens[j], 1, np + static_cast<int>(j), 0, nullptr);
        }
        CHECK_MSG(worst < 0.05, tag + ": log-probabilities off the single-sequence ones by " + std::to_string(worst));
    }
}

// ---------------------------------------------------------------------------------------------
// 7. NAD: activated-neuron sets from contributions, on synthetic weights

// A bit-by-bit reading of bit k of a bitset of 64-bit words.
bool bit_at(const uint64_t* set, int64_t k) { return (set[k / 64] >> (k % 64)) & 1u; }

void test_nad_jaccard() {
    std::mt19937_64 rng(2024);
    for (int64_t words : {0, 1, 3}) {
        const int n = 9;
        std::vector<uint64_t> sets(static_cast<size_t>(n) * words, 0);
        // Rows 0 and 1 empty, row 2 full, row 3 a subset of row 4, the rest random of various densities.
        for (int64_t k = 0; k < words; ++k) {
            sets[2 * words + k] = ~uint64_t(0);
            sets[4 * words + k] = rng();
            sets[3 * words + k] = sets[4 * words + k] & rng();
            sets[5 * words + k] = rng() & rng() & rng();  // sparse
            sets[6 * words + k] = rng() | rng();          // dense
            sets[7 * words + k] = rng();
            sets[8 * words + k] = k == 0 ? uint64_t(1) << 63 : 0;  // a single bit
        }
        const std::string tag = std::to_string(words) + " words";
        const int64_t n_bits = 64 * words;
        for (int i = 0; i < n; ++i) {
            int64_t want = 0;
            for (int64_t b = 0; b < n_bits; ++b) want += bit_at(sets.data() + i * words, b);
            CHECK_MSG(popcount(sets.data() + i * words, words) == want, tag + ", set " + std::to_string(i));
        }
        const std::vector<double> got = jaccard_matrix(sets.data(), n, words);
        CHECK_MSG(got.size() == static_cast<size_t>(n) * n, tag);
        if (got.size() != static_cast<size_t>(n) * n) continue;
        int bad = 0;
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                int64_t inter = 0, uni = 0;
                for (int64_t b = 0; b < n_bits; ++b) {
                    const bool x = bit_at(sets.data() + i * words, b), y = bit_at(sets.data() + j * words, b);
                    inter += x && y;
                    uni += x || y;
                }
                const double want = uni == 0 ? 1.0 : double(inter) / double(uni);
                bad += got[static_cast<size_t>(i) * n + j] != want;
            }
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " entries differ from the bit-by-bit Jaccard");
        CHECK_MSG(got[0 * n + 1] == 1.0, tag + ": two empty sets");
        for (int i = 0; i < n; ++i) CHECK_MSG(got[static_cast<size_t>(i) * n + i] == 1.0, tag + ": diagonal");
        if (words > 0) {
            CHECK_MSG(got[0 * n + 2] == 0.0 && got[2 * n + 0] == 0.0, tag + ": empty vs full");
            CHECK_MSG(got[2 * n + 8] == 1.0 / double(n_bits), tag + ": full vs one bit");
        }
    }
    // By hand: {0, 1, 3} and {1, 2}: 1 in common of 4.
    const uint64_t pair[2] = {0xB, 0x6};
    const std::vector<double> j2 = jaccard_matrix(pair, 2, 1);
    CHECK(j2 == (std::vector<double>{1.0, 0.25, 0.25, 1.0}));
    CHECK(popcount(pair, 1) == 3 && popcount(pair + 1, 1) == 2 && popcount(pair, 2) == 5);
    CHECK(popcount(nullptr, 0) == 0);

    CHECK(jaccard_matrix(nullptr, 0, 4).empty());
    CHECK(jaccard_matrix(pair, 1, 1) == std::vector<double>{1.0});
    const uint64_t zero = 0;
    CHECK(jaccard_matrix(&zero, 1, 1) == std::vector<double>{1.0});
    EXPECT_THROW(ParamError, jaccard_matrix(pair, -1, 1), "jaccard n = -1");
    EXPECT_THROW(ParamError, jaccard_matrix(pair, 1, -1), "jaccard words = -1");
}

// Compact chunk set records (set_record.h): every chunk decodes to the set it was given, in
// order or by prefix unions, at every density; the spelled-out layout; malformed records refused.
void test_set_records() {
    std::mt19937_64 rng(16);
    auto keys_of = [](const std::vector<uint64_t>& w) {
        std::vector<uint32_t> k;
        for (size_t i = 0; i < w.size() * 64; ++i)
            if ((w[i / 64] >> (i % 64)) & 1) k.push_back(static_cast<uint32_t>(i));
        return k;
    };
    for (int64_t n_bits : {1, 63, 64, 100, 4096, 46080}) {
        const int64_t W = (n_bits + 63) / 64;
        // Chunks of various densities; later ones drawn partly from the earlier ones (as NAD's are).
        const double dens[] = {0.0, 1.0, 0.001, 0.01, 0.2, 0.6, 0.05, 0.0, 0.3, 0.002, 1.0, 0.5};
        std::vector<std::vector<uint64_t>> sets;
        std::vector<uint64_t> uni(static_cast<size_t>(W), 0);
        for (double d : dens) {
            std::vector<uint64_t> s(static_cast<size_t>(W), 0);
            std::bernoulli_distribution pick(d), again(0.7);
            for (int64_t k = 0; k < n_bits; ++k)
                if (pick(rng) || (d > 0 && d < 0.5 && bit_at(uni.data(), k) && again(rng) && pick(rng)))
                    s[static_cast<size_t>(k / 64)] |= uint64_t{1} << (k % 64);
            if (d == 0.01) s[0] |= 1, s[static_cast<size_t>(W - 1)] |= uint64_t{1} << ((n_bits - 1) % 64);  // both ends
            for (int64_t w = 0; w < W; ++w) uni[static_cast<size_t>(w)] |= s[static_cast<size_t>(w)];
            sets.push_back(s);
        }
        const std::string tag = std::to_string(n_bits) + " bits";
        SetRecord rec;
        rec.n_bits = n_bits;
        SetEncoder enc(n_bits);
        for (const auto& s : sets) enc.append(s.data(), rec);
        EXPECT_NO_THROW(rec.validate(), tag + ": validate");
        CHECK_MSG(rec.n_chunks() == static_cast<int64_t>(sets.size()), tag);
        int bad = 0, big = 0;
        SetDecoder dec(rec);
        std::vector<uint64_t> seen(static_cast<size_t>(W), 0);
        std::vector<uint32_t> keys;
        for (size_t c = 0; c < sets.size(); ++c) {
            dec.next(keys);
            bad += keys != keys_of(sets[c]);
            bad += rec.counts[c] != static_cast<int32_t>(keys.size());
            for (int64_t w = 0; w < W; ++w) seen[static_cast<size_t>(w)] |= sets[c][static_cast<size_t>(w)];
            bad += dec.seen() != seen;
            bad += rec.union_size(static_cast<int64_t>(c) + 1) != static_cast<int64_t>(keys_of(seen).size());
            // Never more than the dense bitset and 3 bytes (a kind byte per list, a rounding byte).
            big += rec.offsets[c + 1] - rec.offsets[c] > (n_bits + 7) / 8 + 3;
        }
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " chunks decode to other sets");
        CHECK_MSG(big == 0, tag + ": " + std::to_string(big) + " chunks larger than their dense bitsets");
        // Skipping (the union of a prefix) and OR-ing into words agree with reading every list.
        for (size_t k = 0; k <= sets.size(); ++k) {
            SetDecoder d(rec);
            std::vector<uint64_t> want(static_cast<size_t>(W), 0), got(static_cast<size_t>(W), 0);
            for (size_t c = 0; c < k; ++c) {
                d.skip();
                for (int64_t w = 0; w < W; ++w) want[static_cast<size_t>(w)] |= sets[c][static_cast<size_t>(w)];
            }
            CHECK_MSG(d.seen() == want, tag + ": union of " + std::to_string(k) + " chunks");
            if (k < sets.size()) {
                d.next_or(got.data());
                CHECK_MSG(got == sets[k], tag + ": chunk " + std::to_string(k) + " after skips");
            }
        }
        // A record continued by a fresh encoder equals one encoded in one go.
        SetRecord half;
        half.n_bits = n_bits;
        SetEncoder e1(n_bits);
        for (size_t c = 0; c < 5; ++c) e1.append(sets[c].data(), half);
        SetEncoder e2(n_bits);
        e2.resume(half);
        for (size_t c = 5; c < sets.size(); ++c) e2.append(sets[c].data(), half);
        CHECK_MSG(half == rec, tag + ": resumed encoding differs");
    }

    // Sparse sets at a large shape are far below their dense size: 300 keys of 458,752.
    {
        const int64_t n_bits = 458752, W = n_bits / 64;
        std::vector<uint64_t> s(static_cast<size_t>(W), 0);
        std::uniform_int_distribution<int64_t> key(0, n_bits - 1);
        for (int i = 0; i < 300; ++i) {
            const int64_t k = key(rng);
            s[static_cast<size_t>(k / 64)] |= uint64_t{1} << (k % 64);
        }
        const int64_t n = popcount(s.data(), W);  // about 300 (draws may collide)
        SetRecord r;
        r.n_bits = n_bits;
        SetEncoder e(n_bits);
        e.append(s.data(), r);
        e.append(s.data(), r);  // the same set again: n ranks among n, an n-bit bitmap
        CHECK_MSG(r.offsets[1] < 2 * n, std::to_string(n) + " sparse keys take " + std::to_string(r.offsets[1]) + " bytes");
        CHECK_MSG(r.offsets[2] - r.offsets[1] == 1 + (n + 7) / 8, "a repeated chunk is a bitmap of its union");
    }

    // The layout, spelled out (set_record.h). 100 bits; chunk 0 = {3, 10}: fresh ranks 3, 10, gaps
    // 3 and 6, Rice b = 2 (7 bits): kind 3, bits 1|11 01|10 -> 0b1010111. Chunk 1 = {3, 50}: 50 is
    // fresh, rank 48 among the 98 keys outside {3, 10}: b = 5, bits 01|00001 -> kind 6, 0b1000010;
    // 3 is rank 0 of the union's 2 keys: a 1-byte bitmap (as short as its Rice code) -> kind 0, 0x01.
    {
        SetRecord r;
        r.n_bits = 100;
        SetEncoder e(100);
        uint64_t a[2] = {(uint64_t{1} << 3) | (uint64_t{1} << 10), 0}, b[2] = {(uint64_t{1} << 3) | (uint64_t{1} << 50), 0};
        e.append(a, r);
        e.append(b, r);
        CHECK(r.data == (std::vector<uint8_t>{0x03, 0x57, 0x06, 0x42, 0x00, 0x01}));
        CHECK(r.offsets == (std::vector<int64_t>{0, 2, 6}));
        CHECK(r.counts == (std::vector<int32_t>{2, 2}) && r.fresh == (std::vector<int32_t>{2, 1}));

        // Malformed copies: refused by validate() or by the decoder, never read out of bounds.
        auto decode_all = [](const SetRecord& x) {
            x.validate();
            SetDecoder d(x);
            std::vector<uint32_t> k;
            while (d.position() < x.n_chunks()) d.next(k);
        };
        EXPECT_NO_THROW(decode_all(r), "the spelled-out record");
        SetRecord bad = r;
        bad.offsets = {0, 2, 5};
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "offsets short of the data");
        bad = r;
        bad.data.pop_back(), bad.offsets.back() = 5;
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "a bitmap cut short");
        bad = r;
        bad.data[0] = 40;
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "an unknown kind");
        bad = r;
        bad.data[1] = 0x07;  // 1|11 then 0s to the end of the chunk: the second code never ends
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "a code past the chunk");
        bad = r;
        bad.counts[1] = 3;  // 2 seen keys claimed of a union of 2: the bitmap holds only 1
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "a count the bitmap does not hold");
        bad = r;
        bad.counts[0] = 3;  // 1 seen key in the first chunk: nothing was seen before it
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "seen keys in the first chunk");
        bad = r;
        bad.data[3] = 0xF8;  // 0001|1111 0: rank 3 * 32 + 15 = 111, beyond the 98 keys outside the union
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "a key outside its universe");
        bad = r;
        bad.fresh.pop_back();
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "malformed", "arrays of other lengths");
        bad = r;
        bad.data.push_back(0), bad.offsets.back() = 7;
        EXPECT_THROW_MSG(ParamError, decode_all(bad), "left over", "a byte left over");
        uint64_t stray[2] = {0, uint64_t{1} << 40};  // bit 104 of a 100-bit set
        EXPECT_THROW_MSG(ParamError, e.append(stray, r), "beyond", "a key beyond n_bits");
        EXPECT_THROW(ParamError, SetEncoder(-1), "negative n_bits");
    }

    // The recorder: chunks encoded as later ones open; snapshots see the open chunk; finish cuts.
    {
        SetRecorder rec;
        rec.begin(2, 70);
        rec.chunk(0, 0)[0] |= 5;
        rec.chunk(0, 2)[1] |= 2;  // chunk 1 never written: empty
        CHECK(rec.dense(0) == (std::vector<uint64_t>{5, 0, 0, 0, 0, 2}));
        CHECK(rec.dense(1).empty());
        const SetRecord s3 = rec.snapshot(0, 4);
        CHECK(s3.n_chunks() == 4 && s3.counts == (std::vector<int32_t>{2, 0, 1, 0}));
        CHECK(rec.snapshot(0, 1).counts == std::vector<int32_t>{2});
        rec.chunk(0, 2)[0] |= 8;
        rec.finish(0, 3);
        CHECK(rec.dense(0) == (std::vector<uint64_t>{5, 0, 0, 0, 8, 2}));
        EXPECT_THROW(RuntimeError, rec.chunk(0, 3), "a chunk after finish");
        rec.finish(0, 2);  // a second finish cuts
        CHECK(rec.dense(0) == (std::vector<uint64_t>{5, 0, 0, 0}));
        rec.chunk(1, 1)[0] |= 1;
        EXPECT_THROW(RuntimeError, rec.chunk(1, 0), "a chunk already encoded");
        rec.finish(1, 3);
        CHECK(rec.dense(1) == (std::vector<uint64_t>{0, 0, 1, 0, 0, 0}));
    }
}

void test_nad_dots() {
    const DotsFn dots = dots_kernel();
    CHECK(dots != nullptr);
    if (!dots) return;
    CHECK(dots_kernel() == dots);  // chosen once
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    std::printf("  CPU %s AVX2+FMA: the kernel under test is the %s one\n",
                __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "has" : "lacks",
                __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "AVX2" : "generic");
#endif
    // The chosen kernel, then the portable one (which the dispatch skips on AVX2 machines).
    for (const DotsFn kernel : {dots, dots_kernel_generic()}) {
        std::mt19937 rng(31337);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        std::uniform_int_distribution<int> small(-5, 5);
        int bad = 0, bad_exact = 0, checked = 0;
        double worst = 0;
        for (int64_t E : {1, 7, 8, 576, 577}) {
            for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, kMaxBatch}) {
                for (int variant = 0; variant < 3; ++variant) {
                    // 0: aligned vectors; 1: both one float past an allocation's start (unaligned);
                    // 2: small integers, whose dot products float computes exactly. Every buffer ends
                    // exactly where the kernel must stop reading (or writing), so ASan sees overruns.
                    const size_t skip = variant == 1 ? 1 : 0;
                    std::vector<float> col_buf(skip + E), u_buf(skip + static_cast<size_t>(n) * E);
                    for (float& x : col_buf) x = variant == 2 ? float(small(rng)) : u(rng);
                    for (float& x : u_buf) x = variant == 2 ? float(small(rng)) : u(rng);
                    const float* col = col_buf.data() + skip;
                    const float* U = u_buf.data() + skip;
                    std::vector<float> out(static_cast<size_t>(n), NAN);
                    kernel(col, U, n, E, out.data());
                    for (int q = 0; q < n; ++q) {
                        double ref = 0, mag = 0;
                        for (int64_t e = 0; e < E; ++e) {
                            const double p = double(col[e]) * double(U[static_cast<size_t>(q) * E + e]);
                            ref += p;
                            mag += std::fabs(p);
                        }
                        const double err = std::fabs(double(out[q]) - ref);
                        ++checked;
                        if (variant == 2) {
                            bad_exact += !(double(out[q]) == ref);
                        } else {
                            bad += !(err <= 1e-5 * mag);
                            if (mag > 0) worst = std::max(worst, err / mag);
                        }
                    }
                }
            }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " dot products off by more than 1e-5 of the sum of |products|");
        CHECK_MSG(bad_exact == 0, std::to_string(bad_exact) + " integer dot products not exact");
        std::printf("  %d dot products, worst error %.2e of the sum of |products|\n", checked, worst);

        // n = 0 writes nothing.
        float sentinel = 42.0f;
        const float one = 1.0f;
        kernel(&one, &one, 0, 1, &sentinel);
        CHECK(sentinel == 42.0f);
    }
}

// The projection's kernels: the AVX2 dequantizers give exactly ggml's to_float values, and the
// four-row axpy adds in the generic kernel's order.
void test_nad_projection_kernels() {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(-3.0f, 3.0f);
    for (ggml_type type : {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0}) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
        CHECK(!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c") || dequant_kernel(type) != nullptr);
#endif
        // The chosen one is the first that passed its check against to_float (here: the first).
        CHECK(dequant_kernels(type).empty() ? dequant_kernel(type) == nullptr : dequant_kernel(type) == dequant_kernels(type).front());
    }
    for (ggml_type type : {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0})
      for (const DequantFn fast : dequant_kernels(type)) {  // each kernel the CPU runs, not only the chosen one
        const int64_t n = 32 * 37;
        const size_t bytes = ggml_row_size(type, n);
        std::vector<uint8_t> blocks(bytes);
        for (auto& b : blocks) b = static_cast<uint8_t>(byte(rng));
        const size_t bsz = ggml_type_size(type);
        for (size_t b = 0; b < bytes / bsz; ++b) {  // finite scales, a zero and a subnormal among them
            const float d = b == 3 ? 0.0f : b == 5 ? 3e-6f : scale(rng);
            const ggml_fp16_t h = ggml_fp32_to_fp16(d);
            std::memcpy(blocks.data() + b * bsz, &h, sizeof h);
            if (type == GGML_TYPE_Q4_1) {  // and the offset m, finite
                const ggml_fp16_t m = ggml_fp32_to_fp16(b == 7 ? 0.0f : scale(rng));
                std::memcpy(blocks.data() + b * bsz + 2, &m, sizeof m);
            }
        }
        std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n), -1.0f);
        ggml_get_type_traits(type)->to_float(blocks.data(), want.data(), n);
        fast(blocks.data(), got.data(), n, 16);
        int bad = 0;
        for (int64_t i = 0; i < n; ++i) bad += std::memcmp(&want[i], &got[i], sizeof(float)) != 0;
        CHECK_MSG(bad == 0, std::string(ggml_type_name(type)) + ": " + std::to_string(bad) + " values differ from to_float");
        // Into 16-value column blocks `stride` floats apart (the packed panel), nothing else written.
        const int64_t stride = 16 * 3 + 5;
        std::vector<float> packed(static_cast<size_t>(n / 16 * stride), -7.0f);
        fast(blocks.data(), packed.data(), n, stride);
        bad = 0;
        for (int64_t i = 0; i < n; ++i) bad += std::memcmp(&want[i], &packed[(i / 16) * stride + i % 16], sizeof(float)) != 0;
        for (int64_t g = 0; g < n / 16; ++g)
            for (int64_t j = 16; j < stride; ++j) bad += packed[g * stride + j] != -7.0f;
        CHECK_MSG(bad == 0, std::string(ggml_type_name(type)) + ": " + std::to_string(bad) + " strided values wrong");
    }
    CHECK(dequant_kernel(GGML_TYPE_F16) == nullptr);
    // axpy4: every length around the vector width, the chosen kernel against an FMA reference.
    std::uniform_real_distribution<float> val(-1.0f, 1.0f);
    for (const Axpy4Fn kernel : {axpy4_kernel(), axpy4_kernel_generic()}) {
        for (int64_t n : {0, 1, 7, 8, 9, 31, 64, 100}) {
            const int64_t ldx = n + 3;
            std::vector<float> x(static_cast<size_t>(4 * ldx)), y(static_cast<size_t>(n) + 1), ref;
            for (auto& v : x) v = val(rng);
            for (auto& v : y) v = val(rng);
            const float a[4] = {val(rng), val(rng), 0.0f, val(rng)};
            ref = y;
            for (int64_t j = 0; j < n; ++j)
                for (int k = 0; k < 4; ++k) ref[j] = ref[j] + a[k] * x[static_cast<size_t>(k * ldx + j)];
            kernel(a, x.data(), ldx, y.data(), n);
            int bad = 0;
            for (int64_t j = 0; j < n; ++j) bad += !(std::fabs(y[j] - ref[j]) <= 1e-5f);
            CHECK_MSG(bad == 0, std::to_string(bad) + " of " + std::to_string(n) + " axpy4 sums off");
            CHECK(y[static_cast<size_t>(n)] == ref[static_cast<size_t>(n)]);  // nothing past n written
        }
    }
    // axpy4x2 equals two axpy4 calls of the same kernel family, bit for bit.
    for (const auto& [pair, single] : {std::pair{axpy4x2_kernel(), axpy4_kernel()},
                                       std::pair{axpy4x2_kernel_generic(), axpy4_kernel_generic()}}) {
        for (int64_t n : {0, 3, 8, 13, 64, 77}) {
            const int64_t ldx = n + 1;
            std::vector<float> x(static_cast<size_t>(4 * ldx) + 1);
            for (auto& v : x) v = val(rng);
            std::vector<float> y0(static_cast<size_t>(n) + 1), y1(y0.size());
            for (auto& v : y0) v = val(rng);
            for (auto& v : y1) v = val(rng);
            std::vector<float> r0 = y0, r1 = y1;
            const float a0[4] = {val(rng), val(rng), val(rng), val(rng)}, a1[4] = {val(rng), 0.0f, val(rng), val(rng)};
            pair(a0, a1, x.data(), ldx, y0.data(), y1.data(), n);
            single(a0, x.data(), ldx, r0.data(), n);
            single(a1, x.data(), ldx, r1.data(), n);
            CHECK(y0 == r0);
            CHECK(y1 == r1);
        }
    }
    // The panel kernel gives the bits of axpy4 over the same rows (each sum over the rows in order,
    // one FMA a term) for every count of vectors around its tile of 6, and writes only its n columns.
    // The fused products and candidates: the chosen kernel as the portable one, NaN and inf included.
    for (int64_t n : {0, 5, 8, 29, 200}) {
        std::vector<float> a(static_cast<size_t>(n)), d(a.size());
        for (auto& v : a) v = val(rng);
        for (auto& v : d) v = val(rng);
        if (n > 20) a[3] = INFINITY, d[3] = 0.0f, a[17] = NAN, a[19] = -INFINITY;  // inf x 0 and NaN: -inf
        for (float guess : {-INFINITY, 0.0f, 0.25f, INFINITY}) {
            std::vector<float> c0(a.size() + 1, 9.0f), c1 = c0;
            std::vector<int32_t> i0(a.size() + 1, -5), i1 = i0;
            const int64_t m0 = products_kernel_generic()(a.data(), d.data(), n, guess, c0.data(), i0.data());
            const int64_t m1 = products_kernel()(a.data(), d.data(), n, guess, c1.data(), i1.data());
            CHECK(m0 == m1 && i0 == i1 && std::memcmp(c0.data(), c1.data(), c0.size() * sizeof(float)) == 0);
            int64_t want = 0;
            for (int64_t i = 0; i < n; ++i) want += c0[i] >= guess;
            CHECK(m0 == want);
            if (n > 20) CHECK(c0[3] == -INFINITY && c0[17] == -INFINITY);
        }
    }
    CHECK(panel_kernels().empty() ? panel_kernel() == nullptr : panel_kernel() == panel_kernels().front());
    for (const PanelFn panel : panel_kernels()) {
        const Axpy4Fn axpy4 = axpy4_kernel();
        for (int kc : {1, 4, 7, 64}) {
            for (int M : {1, 2, 5, 6, 7, 13}) {
                const int64_t n = 80, ldd = n + 3, stride = 16 * kc + 16, ldu = kc + 2;  // 2 x 32 + 16 neurons
                std::vector<float> rows(static_cast<size_t>(kc + 3) * n), P(static_cast<size_t>(n / 16 * stride));
                std::vector<float> U(static_cast<size_t>(M) * ldu), D(static_cast<size_t>(M) * ldd);
                for (auto& v : rows) v = val(rng);
                for (auto& v : U) v = val(rng);
                for (auto& v : D) v = val(rng);
                for (int k = 0; k < kc; ++k)
                    for (int64_t j = 0; j < n; ++j) P[(j / 16) * stride + 16 * k + j % 16] = rows[static_cast<size_t>(k) * n + j];
                std::vector<float> ref = D;
                for (int m = 0; m < M; ++m)
                    for (int k = 0; k < kc; k += 4) {  // axpy4 takes 4 rows: pad with zero coefficients
                        float a[4];
                        for (int r = 0; r < 4; ++r) a[r] = k + r < kc ? U[static_cast<size_t>(m) * ldu + k + r] : 0.0f;
                        axpy4(a, rows.data() + static_cast<size_t>(k) * n, n, ref.data() + static_cast<size_t>(m) * ldd, n);
                    }
                panel(U.data(), ldu, M, P.data(), kc, n, D.data(), ldd);
                CHECK_MSG(std::memcmp(D.data(), ref.data(), D.size() * sizeof(float)) == 0,
                          "panel != axpy4 at kc " + std::to_string(kc) + ", M " + std::to_string(M));
            }
        }
    }
}

// Weights of a tiny llama-like model, as written to the file (and so as the reducer sees them).
struct NadWeights {
    int L = 0;
    int64_t F = 0, E = 0;
    int V = 0;
    std::vector<float> down;     // [L][E][F]: W_down[e][i] of layer l, the tensor's rows of ne0 = n_ff
    std::vector<float> unembed;  // [V][E]: the rows that unembed (output.weight if written, else token_embd)
    // W_U[y] . W_down[:, i] of layer l, in double.
    double dot(int l, int64_t i, int32_t y) const {
        double s = 0;
        for (int64_t e = 0; e < E; ++e)
            s += double(unembed[static_cast<size_t>(y) * E + e]) * double(down[(static_cast<size_t>(l) * E + e) * F + i]);
        return s;
    }
};

struct NadFileOptions {
    int wmax = 3;                            // every weight is an integer in [-wmax, wmax]
    ggml_type unembed_type = GGML_TYPE_F32;  // F32 or F16: small integers are exact in both
    bool with_output = false;                // also write output.weight (unlike token_embd), which then unembeds
    int bad_layer = -1;                      // this layer's ffn_down gets ne0 = n_ff + 1
};

// Writes blk.<l>.ffn_down.weight (F32, ne = {n_ff, n_embd}) for each layer and token_embd.weight
// (ne = {n_embd, n_vocab}) through the gguf C API. Integer weights make every dot product, and with
// dyadic activations every contribution, exact in float: the reference can demand equality, ties
// included. In each layer neuron 5 is a copy of neuron 2 (when n_ff > 5), for exact ties.
NadWeights write_nad_gguf(const std::string& path, int L, int64_t F, int64_t E, int V, uint32_t seed,
                          const NadFileOptions& o = {}) {
    NadWeights w;
    w.L = L, w.F = F, w.E = E, w.V = V;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> val(-o.wmax, o.wmax);
    w.down.resize(static_cast<size_t>(L) * E * F);
    for (float& x : w.down) x = float(val(rng));
    if (F > 5)
        for (int l = 0; l < L; ++l)
            for (int64_t e = 0; e < E; ++e) {
                float* row = w.down.data() + (static_cast<size_t>(l) * E + e) * F;
                row[5] = row[2];
            }
    std::vector<float> embd(static_cast<size_t>(V) * E), output(static_cast<size_t>(V) * E);
    for (float& x : embd) x = float(val(rng));
    for (float& x : output) x = float(val(rng));
    w.unembed = o.with_output ? output : embd;

    gguf_context* g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_u32(g, "llama.block_count", static_cast<uint32_t>(L));
    const size_t bytes = (w.down.size() + static_cast<size_t>(L) * E + 2 * embd.size()) * sizeof(float) +
                         static_cast<size_t>(L + 2) * ggml_tensor_overhead() + 4096;
    ggml_init_params ip{/*mem_size=*/bytes, /*mem_buffer=*/nullptr, /*no_alloc=*/false};
    ggml_context* tctx = ggml_init(ip);
    for (int l = 0; l < L; ++l) {
        const int64_t ne0 = l == o.bad_layer ? F + 1 : F;
        ggml_tensor* t = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, ne0, E);
        ggml_set_name(t, ("blk." + std::to_string(l) + ".ffn_down.weight").c_str());
        float* d = static_cast<float*>(t->data);
        for (int64_t e = 0; e < E; ++e)
            for (int64_t i = 0; i < ne0; ++i)
                d[e * ne0 + i] = i < F ? w.down[(static_cast<size_t>(l) * E + e) * F + i] : 1.0f;
        gguf_add_tensor(g, t);
    }
    auto unembedding = [&](const char* name, const std::vector<float>& v) {
        ggml_tensor* t = ggml_new_tensor_2d(tctx, o.unembed_type, E, V);
        ggml_set_name(t, name);
        for (size_t k = 0; k < v.size(); ++k) {
            if (o.unembed_type == GGML_TYPE_F16) static_cast<ggml_fp16_t*>(t->data)[k] = ggml_fp32_to_fp16(v[k]);
            else static_cast<float*>(t->data)[k] = v[k];
        }
        gguf_add_tensor(g, t);
    };
    unembedding("token_embd.weight", embd);
    if (o.with_output) unembedding("output.weight", output);
    const bool ok = gguf_write_to_file(g, path.c_str(), /*only_meta=*/false);
    gguf_free(g);
    ggml_free(tctx);
    if (!ok) throw std::runtime_error("gguf_write_to_file failed for " + path);
    return w;
}

// The reducer's output for one sample.
struct NadResult {
    std::vector<uint64_t> bits;
    std::vector<double> eta;
    std::vector<int32_t> n_active;
    std::vector<double> top_c;
    std::vector<int32_t> top_i;
};

// Brute force, in double: every contribution c = a_i * (W_U[y] . W_down[:, i]); per layer the top k
// (descending, ties by lower index); eta the eta_rank-th largest of those L * k values (the smallest
// when there are fewer); activated: the top members with c > eta, OR-ed over chunks of `chunk` tokens.
// `acts` is [tokens][L][F]; counts how many layer selections a tie at the k-th place decided.
NadResult nad_reference(const NadWeights& w, const std::vector<double>& acts, const std::vector<int32_t>& ids,
                        int chunk, int top_per_layer, int eta_rank, int* boundary_ties = nullptr) {
    const int T = static_cast<int>(ids.size());
    const int L = w.L;
    const int64_t F = w.F;
    const int k = static_cast<int>(std::min<int64_t>(top_per_layer, F));
    const int K = L * k;
    const int64_t words = (L * F + 63) / 64;
    NadResult r;
    r.bits.assign(static_cast<size_t>((T + chunk - 1) / chunk * words), 0);
    std::vector<double> c(static_cast<size_t>(F));
    std::vector<int32_t> order(static_cast<size_t>(F));
    for (int t = 0; t < T; ++t) {
        const size_t first = r.top_c.size();
        for (int l = 0; l < L; ++l) {
            for (int64_t i = 0; i < F; ++i) c[i] = acts[(static_cast<size_t>(t) * L + l) * F + i] * w.dot(l, i, ids[t]);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return c[x] != c[y] ? c[x] > c[y] : x < y; });
            if (boundary_ties && k < F && c[order[k - 1]] == c[order[k]]) ++*boundary_ties;
            for (int q = 0; q < k; ++q) {
                r.top_c.push_back(c[order[q]]);
                r.top_i.push_back(order[q]);
            }
        }
        std::vector<double> vals(r.top_c.begin() + first, r.top_c.end());
        std::sort(vals.begin(), vals.end(), std::greater<double>());
        const double eta = vals[static_cast<size_t>(std::min(eta_rank, K) - 1)];
        int32_t active = 0;
        uint64_t* b = r.bits.data() + static_cast<size_t>(t / chunk * words);
        for (int q = 0; q < K; ++q)
            if (r.top_c[first + q] > eta) {
                const int64_t bit = static_cast<int64_t>(q / k) * F + r.top_i[first + q];
                b[bit / 64] |= uint64_t(1) << (bit % 64);
                ++active;
            }
        r.eta.push_back(eta);
        r.n_active.push_back(active);
    }
    return r;
}

// One sample as the sampler would feed it.
struct NadSample {
    int n_tokens = 0;           // committed tokens
    bool eos = false;           // rows of one more token are offered, never committed, then finish()
                                // (else finish() right after the last commit, before end_step())
    std::vector<float> in;      // [n_tokens + eos][L][F]: what on_row (gate variant: on_gate_row) gets
    std::vector<float> other;   // the same shape, offered to the callback that must ignore it
    std::vector<int32_t> ids;   // [n_tokens]
    int rows() const { return n_tokens + (eos ? 1 : 0); }
};

NadResult snapshot(const ContributionReducer& red, int s) {
    NadResult r;
    r.bits = red.sets(s);
    r.eta.assign(red.eta(s).begin(), red.eta(s).end());
    r.n_active = red.n_active(s);
    r.top_c.assign(red.top_values(s).begin(), red.top_values(s).end());
    r.top_i = red.top_index(s);
    return r;
}

// Feeds the reducer as DecodeLoop does: each step, the rows of every live sample layer by layer
// (both callbacks), then each sample's commit or finish, then end_step(). Returns each sample's
// results as they stood right after its finish().
std::vector<NadResult> run_nad(ContributionReducer& red, const std::vector<NadSample>& samples, int L, int64_t F) {
    const int n = static_cast<int>(samples.size());
    int steps = 1, max_tokens = 1;
    for (const NadSample& s : samples) steps = std::max(steps, s.rows()), max_tokens = std::max(max_tokens, s.n_tokens);
    red.begin(n, L, F, max_tokens);
    const bool gate = red.params().gate_variant;
    std::vector<NadResult> at_finish(static_cast<size_t>(n));
    for (int t = 0; t < steps; ++t) {
        for (int l = 0; l < L; ++l)
            for (int s = 0; s < n; ++s) {
                if (t >= samples[s].rows()) continue;
                const size_t at = (static_cast<size_t>(t) * L + l) * F;
                // The ignored callback's rows come both before and after the real ones, so that
                // heeding them would overwrite the token's activations whatever the order.
                if (gate) {
                    red.on_row(s, t, l, samples[s].other.data() + at);
                    red.on_gate_row(s, t, l, samples[s].in.data() + at);
                    red.on_row(s, t, l, samples[s].other.data() + at);
                } else {
                    red.on_gate_row(s, t, l, samples[s].other.data() + at);
                    red.on_row(s, t, l, samples[s].in.data() + at);
                    red.on_gate_row(s, t, l, samples[s].other.data() + at);
                }
            }
        for (int s = 0; s < n; ++s) {
            const NadSample& smp = samples[s];
            if (t == 0 && smp.rows() == 0) {  // stopped before its first token
                red.finish(s, 0);
                at_finish[s] = snapshot(red, s);
            }
            if (t >= smp.rows()) continue;
            if (t == smp.n_tokens) {  // the end-of-generation token: offered, not committed
                red.finish(s, smp.n_tokens);
                at_finish[s] = snapshot(red, s);
                continue;
            }
            red.commit(s, t, smp.ids[t]);
            if (!smp.eos && t == smp.n_tokens - 1) {  // max_tokens reached: the token is still queued
                red.finish(s, smp.n_tokens);
                at_finish[s] = snapshot(red, s);
            }
        }
        red.end_step();
    }
    return at_finish;
}

// Activations k/8 in [-2, 2] (or k/1024 in [-4, 4] when `fine`): dyadic, so contributions are exact.
NadSample nad_sample(int n_tokens, bool eos, int L, int64_t F, int V, uint32_t seed, bool fine = false) {
    NadSample s;
    s.n_tokens = n_tokens;
    s.eos = eos;
    std::mt19937 rng(seed);
    const size_t n = static_cast<size_t>(s.rows()) * L * F;
    s.in.resize(n);
    s.other.resize(n);
    for (float& x : s.in) x = fine ? float(int(rng() % 8193) - 4096) / 1024.0f : float(int(rng() % 33) - 16) / 8.0f;
    for (float& x : s.other) x = 50.0f + float(rng() % 1000);  // would dominate every selection
    for (int t = 0; t < n_tokens; ++t) s.ids.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(V)));
    return s;
}

std::vector<double> to_double(const std::vector<float>& v, size_t n) { return std::vector<double>(v.begin(), v.begin() + n); }

// Compares the reducer's results with the reference: exactly, or values within a relative `tol`.
void check_nad(const NadResult& got, const NadResult& want, bool keep_top, double tol, const std::string& tag) {
    auto near = [tol](double x, double y) { return tol == 0 ? x == y : std::fabs(x - y) <= tol * std::fabs(y); };
    CHECK_MSG(got.bits == want.bits, tag + ": bits (" + std::to_string(got.bits.size()) + " words, want " +
                                         std::to_string(want.bits.size()) + ")");
    CHECK_MSG(got.n_active == want.n_active, tag + ": n_active");
    CHECK_MSG(got.eta.size() == want.eta.size(), tag + ": eta size");
    if (got.eta.size() == want.eta.size()) {
        int bad = 0;
        for (size_t t = 0; t < want.eta.size(); ++t) bad += !near(got.eta[t], want.eta[t]);
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " eta values");
    }
    if (!keep_top) {
        CHECK_MSG(got.top_c.empty() && got.top_i.empty(), tag + ": top values kept without keep_top");
        return;
    }
    CHECK_MSG(got.top_i == want.top_i, tag + ": top_index");
    CHECK_MSG(got.top_c.size() == want.top_c.size(), tag + ": top_values size");
    if (got.top_c.size() == want.top_c.size()) {
        int bad = 0;
        for (size_t q = 0; q < want.top_c.size(); ++q) bad += !near(got.top_c[q], want.top_c[q]);
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " top values");
    }
}

// Runs `samples` through a reducer with `p` and checks every sample against the reference, both as
// it stood at its finish() and at the end. Returns the references.
std::vector<NadResult> check_nad_run(const std::shared_ptr<const ContributionWeights>& cw, const NadWeights& w,
                                     const ContributionParams& p, const std::vector<NadSample>& samples,
                                     const std::string& label, int* boundary_ties = nullptr,
                                     const std::function<std::vector<double>(const NadSample&)>& acts_of = nullptr,
                                     double tol = 0) {
    ContributionReducer red(cw, p);
    const std::vector<NadResult> at_finish = run_nad(red, samples, w.L, w.F);
    std::vector<NadResult> refs;
    int64_t tokens = 0;
    for (size_t s = 0; s < samples.size(); ++s) {
        const NadSample& smp = samples[s];
        const std::vector<double> acts =
            acts_of ? acts_of(smp) : to_double(smp.in, static_cast<size_t>(smp.n_tokens) * w.L * w.F);
        refs.push_back(nad_reference(w, acts, smp.ids, p.chunk, p.top_per_layer, p.eta_rank, boundary_ties));
        const std::string tag = label + ", sample " + std::to_string(s);
        check_nad(at_finish[s], refs.back(), p.keep_top, tol, tag + " at finish()");
        check_nad(snapshot(red, static_cast<int>(s)), refs.back(), p.keep_top, tol, tag + " at the end");
        tokens += smp.n_tokens;
    }
    CHECK_MSG(red.tokens_processed() == tokens, label + ": tokens_processed");
    return refs;
}

// Whether the references exercise the rules: something activated, something in a top list left out.
void check_nad_not_trivial(const std::vector<NadResult>& refs, const std::string& label) {
    int64_t active = 0, kept = 0;
    for (const NadResult& r : refs) {
        for (int32_t a : r.n_active) active += a;
        kept += static_cast<int64_t>(r.top_c.size());
    }
    CHECK_MSG(active > 0, label + ": nothing activated, the test proves little");
    CHECK_MSG(active < kept, label + ": every top member activated, eta is never exercised");
}

void test_nad_contributions() {
    TempDir dir;
    const int L = 3, V = 7;
    const int64_t F = 10, E = 12;
    const std::string path = dir.file("nad.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 11);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    CHECK(cw->n_layers() == L && cw->n_ff() == F && cw->n_embd() == E && cw->n_vocab() == V);
    CHECK(cw->unembedding_name() == "token_embd.weight");
    // Read in place from the mapped file: no private copy.
    CHECK(cw->memory_bytes() == 0 && cw->mapped_bytes() == fs::file_size(path));
    // The rows, and projections of any neuron range (blocks of 1 for f32) equal to the sums by hand.
    {
        int bad = 0;
        std::vector<float> wrow(static_cast<size_t>(F));
        for (int l = 0; l < L; ++l)
            for (int64_t e = 0; e < E; ++e) {
                cw->down_row(l, e, wrow.data());
                for (int64_t i = 0; i < F; ++i) bad += wrow[i] != w.down[(static_cast<size_t>(l) * E + e) * F + i];
            }
        CHECK_MSG(bad == 0, std::to_string(bad) + " W_down weights wrong");
        std::vector<float> U(static_cast<size_t>(2 * E)), D(static_cast<size_t>(2 * F), -1.0f), scratch(ContributionWeights::kProjectScratch);
        for (int64_t e = 0; e < 2 * E; ++e) U[e] = static_cast<float>((e % 5) - 2);
        const int l = L - 1;
        cw->project(l, U.data(), 2, 3, F, D.data(), F, scratch.data());  // neurons 3.. only, rows F apart
        for (int m = 0; m < 2; ++m)
            for (int64_t i = 3; i < F; ++i) {
                double want = 0;
                for (int64_t e = 0; e < E; ++e) want += double(U[m * E + e]) * w.down[(static_cast<size_t>(l) * E + e) * F + i];
                bad += D[m * F + (i - 3)] != static_cast<float>(want);  // integer weights: exact
            }
        CHECK_MSG(bad == 0, std::to_string(bad) + " projections wrong");
        EXPECT_THROW(ParamError, cw->project(l, U.data(), 2, 5, 2, D.data(), F, scratch.data()), "empty range");
        std::vector<float> row(static_cast<size_t>(E));
        cw->unembed_row(V - 1, row.data());
        CHECK(std::equal(row.begin(), row.end(), w.unembed.begin() + static_cast<size_t>(V - 1) * E));
        EXPECT_THROW(ParamError, cw->unembed_row(V, row.data()), "unembed_row(n_vocab)");
        EXPECT_THROW(ParamError, cw->unembed_row(-1, row.data()), "unembed_row(-1)");
    }

    ContributionParams p;
    p.chunk = 2;
    p.top_per_layer = 4;
    p.eta_rank = 5;
    p.keep_top = true;
    p.n_threads = 2;

    // Sample 0: 5 tokens, then an end-of-generation token; sample 1: 3 tokens, ending at max_tokens.
    std::vector<NadSample> samples = {nad_sample(5, true, L, F, V, 100), nad_sample(3, false, L, F, V, 101)};
    {
        // Token 1, layer 0: only neurons 7 and 8 active, so two zero contributions fill the top 4
        // (ties at the boundary: the lowest indices). Token 2: neurons 2 and 5 (equal columns) equal
        // and large in every layer, an exact tie inside the top list.
        NadSample& s = samples[0];
        float* a = s.in.data() + (static_cast<size_t>(1) * L + 0) * F;
        std::fill(a, a + F, 0.0f);
        a[7] = w.dot(0, 7, s.ids[1]) >= 0 ? 1.5f : -1.5f;
        a[8] = w.dot(0, 8, s.ids[1]) >= 0 ? 0.75f : -0.75f;
        for (int l = 0; l < L; ++l) {
            float* b = s.in.data() + (static_cast<size_t>(2) * L + l) * F;
            b[2] = b[5] = w.dot(l, 2, s.ids[2]) >= 0 ? 2.0f : -2.0f;
        }
        // The uncommitted token's rows would activate everything: nothing of them may show.
        std::fill(s.in.begin() + static_cast<size_t>(5) * L * F, s.in.end(), 2.0f);
    }
    int ties = 0;
    const auto refs = check_nad_run(cw, w, p, samples, "top 4, eta rank 5", &ties);
    check_nad_not_trivial(refs, "top 4, eta rank 5");
    CHECK_MSG(ties > 0, "no tie at a layer's k-th place: tie-breaking by index is not exercised");
    // The hand-made ties came out as intended.
    if (refs[0].top_i.size() >= static_cast<size_t>(3 * L * 4)) {
        const int32_t* t1 = refs[0].top_i.data() + static_cast<size_t>(1) * L * 4;  // token 1, layer 0
        std::vector<int32_t> got(t1, t1 + 4);
        std::sort(got.begin(), got.end());
        if (w.dot(0, 7, samples[0].ids[1]) != 0 && w.dot(0, 8, samples[0].ids[1]) != 0)
            CHECK_MSG((got == std::vector<int32_t>{0, 1, 7, 8}), "zero ties at the boundary not broken by index");
    }
    // The sizes: 3 chunks of sample 0, 2 of sample 1 (the last one half full).
    CHECK(refs[0].bits.size() == 3u * 1u && refs[1].bits.size() == 2u * 1u);

    // Without keep_top nothing is kept, the rest is the same; one thread gives the same results.
    ContributionParams lean = p;
    lean.keep_top = false;
    lean.n_threads = 1;
    check_nad_run(cw, w, lean, samples, "without keep_top");

    // A chunk of 1 token, and a larger one than any sample.
    for (int chunk : {1, 64}) {
        ContributionParams pc = p;
        pc.chunk = chunk;
        check_nad_run(cw, w, pc, samples, "chunk " + std::to_string(chunk));
    }

    // Budgets: no cache and no queue (a pass every step); a cache of 2 ids and queues of 6 and 40
    // tokens (the tokens whose projection is cached are selected early while the others wait,
    // across chunk boundaries, and ids are evicted); the automatic ones; passes of 1, 3 and 5
    // tokens (the queue recorded a prefix at a time, early selections behind a waiting token
    // moved down). The same exact results.
    {
        const std::vector<NadSample> many = {nad_sample(23, false, L, F, V, 104), nad_sample(17, true, L, F, V, 105),
                                             nad_sample(20, false, L, F, V, 106)};
        const int64_t row = L * F * static_cast<int64_t>(sizeof(float));
        struct Budget {
            int64_t cache, queue;
            int pass;
        };
        for (const auto& [cache, queue, pass] : {Budget{0, 0, -1}, {2 * row, 6 * row, -1}, {2 * row, 40 * row, -1}, {-1, -1, -1},
                                                 {0, 0, 1}, {2 * row, 6 * row, 1}, {2 * row, 6 * row, 2}, {2 * row, 40 * row, 3},
                                                 {-1, -1, 5}}) {
            ContributionParams pb = p;
            pb.cache_bytes = cache;
            pb.queue_bytes = queue;
            pb.pass_tokens = pass;
            const auto r = check_nad_run(cw, w, pb, many, "cache " + std::to_string(cache) + " B, queue " + std::to_string(queue) +
                                                              " B, passes of " + std::to_string(pass));
            check_nad_not_trivial(r, "budgets");
            // The cache holds at most its budget, however many distinct ids a pass carries.
            ContributionReducer red(cw, pb);
            run_nad(red, many, L, F);
            if (cache >= 0) CHECK_MSG(red.cache_bytes() <= cache, "cache of " + std::to_string(red.cache_bytes()) + " B over its budget");
        }
    }

    // Gate rows are ignored without gate_variant (run_nad offers huge ones around every row): shown
    // by the matches above. A sample stopped before its first token, and one ending with EOS first.
    {
        std::vector<NadSample> more = samples;
        more.push_back(nad_sample(0, false, L, F, V, 102));
        more.push_back(nad_sample(0, true, L, F, V, 103));
        const auto r = check_nad_run(cw, w, p, more, "with empty samples");
        CHECK(r[2].bits.empty() && r[3].bits.empty() && r[2].eta.empty() && r[3].n_active.empty());
    }

    // eta_rank past L * k: eta is the smallest top value, which is never activated.
    {
        ContributionParams pe = p;
        pe.eta_rank = 100;
        ContributionReducer red(cw, pe);
        run_nad(red, samples, L, F);
        const int K = L * 4;
        int bad = 0;
        for (int s = 0; s < 2; ++s) {
            const auto& tc = red.top_values(s);
            for (int t = 0; t < samples[s].n_tokens; ++t) {
                const float mn = *std::min_element(tc.begin() + t * K, tc.begin() + (t + 1) * K);
                int above = 0;
                for (int q = 0; q < K; ++q) above += tc[static_cast<size_t>(t) * K + q] > mn;
                bad += red.eta(s)[t] != mn || red.n_active(s)[t] != above;
            }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " tokens whose eta is not the smallest top value");
        const auto r = check_nad_run(cw, w, pe, samples, "eta rank 100");
        check_nad_not_trivial(r, "eta rank 100");
        // eta_rank exactly L * k: the same thing.
        pe.eta_rank = K;
        check_nad_run(cw, w, pe, samples, "eta rank L * k");
        pe.eta_rank = 1;  // eta is the largest: nothing activated
        const auto none = check_nad_run(cw, w, pe, samples, "eta rank 1");
        for (const auto& x : none)
            for (int32_t a : x.n_active) CHECK(a == 0);
    }

    // top_per_layer past n_ff: clipped, every neuron ranked.
    {
        ContributionParams pk = p;
        pk.top_per_layer = 50;
        ContributionReducer red(cw, pk);
        run_nad(red, samples, L, F);
        CHECK(red.top_values(0).size() == static_cast<size_t>(5) * L * F);
        CHECK(red.top_index(1).size() == static_cast<size_t>(3) * L * F);
        if (red.top_index(0).size() == static_cast<size_t>(5) * L * F) {
            int bad = 0;
            for (size_t row = 0; row < static_cast<size_t>(5) * L; ++row) {
                std::vector<int32_t> idx(red.top_index(0).begin() + row * F, red.top_index(0).begin() + (row + 1) * F);
                std::sort(idx.begin(), idx.end());
                for (int64_t i = 0; i < F; ++i) bad += idx[i] != i;
            }
            CHECK_MSG(bad == 0, "with top_per_layer > n_ff a layer's top list is not a permutation");
        }
        const auto r = check_nad_run(cw, w, pk, samples, "top 50 > n_ff");
        check_nad_not_trivial(r, "top 50 > n_ff");
        pk.top_per_layer = static_cast<int>(F);
        check_nad_run(cw, w, pk, samples, "top == n_ff");
        pk.top_per_layer = 1;
        pk.eta_rank = 2;
        check_nad_run(cw, w, pk, samples, "top 1, eta rank 2");
    }

    // A token id outside the vocabulary: ParamError from commit, and nothing queued.
    {
        ContributionReducer red(cw, p);
        red.begin(1, L, F, 4);
        red.on_row(0, 0, 0, samples[0].in.data());
        EXPECT_THROW(ParamError, red.commit(0, 0, V), "commit(token id n_vocab)");
        EXPECT_THROW(ParamError, red.commit(0, 0, -1), "commit(token id -1)");
        EXPECT_NO_THROW(red.end_step(), "end_step after rejected commits");
        CHECK(red.tokens_processed() == 0);
        EXPECT_NO_THROW(red.commit(0, 0, V - 1), "commit(token id n_vocab - 1)");
        red.finish(0, 1);
        CHECK(red.tokens_processed() == 1 && red.eta(0).size() == 1u && red.n_active(0).size() == 1u);
        EXPECT_THROW(ParamError, red.begin(1, L + 1, F, 4), "begin with another n_layers");
        EXPECT_THROW(ParamError, red.begin(1, L, F - 1, 4), "begin with another n_ff");
    }

    // Impossible parameters.
    {
        auto make = [&](ContributionParams q) { ContributionReducer r(cw, q); };
        ContributionParams q = p;
        q.chunk = 0;
        EXPECT_THROW(ParamError, make(q), "chunk 0");
        q = p;
        q.top_per_layer = 0;
        EXPECT_THROW(ParamError, make(q), "top_per_layer 0");
        q = p;
        q.eta_rank = 0;
        EXPECT_THROW(ParamError, make(q), "eta_rank 0");
        q = p;
        q.n_threads = 0;  // clamped to 1
        EXPECT_NO_THROW(make(q), "n_threads 0");
        EXPECT_THROW(ParamError, ContributionReducer(nullptr, p), "no weights");
    }
}

// Weights that do not fit the model: ModelError naming the tensor, or ParamError for a shape that
// cannot be a model.
void test_nad_weights_errors() {
    TempDir dir;
    const int L = 3, V = 7;
    const int64_t F = 10, E = 12;
    const std::string good = dir.file("good.gguf");
    write_nad_gguf(good, L, F, E, V, 12);
    GgufFile g(good);
    EXPECT_NO_THROW(ContributionWeights(g, L, F, E, V), "matching shape");
    EXPECT_NO_THROW(ContributionWeights(g, L - 1, F, E, V - 2), "fewer layers and a smaller vocabulary");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F + 1, E, V), "ffn_down.weight' has shape", "n_ff + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F - 1, E, V), "ffn_down.weight' has shape", "n_ff - 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F, E + 1, V), "ffn_down.weight' has shape", "n_embd + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L + 1, F, E, V), "blk.3.ffn_down.weight' missing", "n_layers + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F, E, V + 1), "unembedding", "n_vocab + 1");
    for (int bad : {0, -1})
        EXPECT_THROW(ParamError, ContributionWeights(g, bad, F, E, V), "n_layers " + std::to_string(bad));
    EXPECT_THROW(ParamError, ContributionWeights(g, L, 0, E, V), "n_ff 0");
    EXPECT_THROW(ParamError, ContributionWeights(g, L, F, 0, V), "n_embd 0");
    EXPECT_THROW(ParamError, ContributionWeights(g, L, F, E, 0), "n_vocab 0");

    NadFileOptions o;
    o.bad_layer = 1;
    const std::string bad = dir.file("bad-layer.gguf");
    write_nad_gguf(bad, L, F, E, V, 13, o);
    GgufFile b(bad);
    EXPECT_THROW_MSG(ModelError, ContributionWeights(b, L, F, E, V), "blk.1.ffn_down.weight' has shape 11 x 12",
                     "layer 1's ffn_down is n_ff + 1 wide");
    EXPECT_NO_THROW(ContributionWeights(b, 1, F, E, V), "only layer 0, which fits");

    // No unembedding at all: a file with only the ffn_down tensors.
    {
        const std::string p = dir.file("no-unembedding.gguf");
        gguf_context* gc = gguf_init_empty();
        gguf_set_val_str(gc, "general.architecture", "llama");
        ggml_init_params ip{/*mem_size=*/1 << 16, /*mem_buffer=*/nullptr, /*no_alloc=*/false};
        ggml_context* tctx = ggml_init(ip);
        ggml_tensor* t = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, F, E);
        ggml_set_name(t, "blk.0.ffn_down.weight");
        std::memset(t->data, 0, ggml_nbytes(t));
        gguf_add_tensor(gc, t);
        const bool ok = gguf_write_to_file(gc, p.c_str(), false);
        gguf_free(gc);
        ggml_free(tctx);
        CHECK(ok);
        GgufFile f(p);
        EXPECT_THROW_MSG(ModelError, ContributionWeights(f, 1, F, E, V), "no unembedding", "no unembedding tensor");
    }
}

// output.weight (untied) in F16: it unembeds, not token_embd, and is dequantized exactly.
void test_nad_untied_f16() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 9, E = 16;
    NadFileOptions o;
    o.with_output = true;
    o.unembed_type = GGML_TYPE_F16;
    const std::string path = dir.file("untied.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 14, o);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    CHECK(cw->unembedding_name() == "output.weight");
    CHECK(cw->memory_bytes() == 0);
    std::vector<float> row(static_cast<size_t>(E));
    cw->unembed_row(3, row.data());
    CHECK(std::equal(row.begin(), row.end(), w.unembed.begin() + 3 * E));
    ContributionParams p;
    p.chunk = 2;
    p.top_per_layer = 3;
    p.eta_rank = 4;
    p.keep_top = true;
    const std::vector<NadSample> samples = {nad_sample(4, false, L, F, V, 200), nad_sample(3, true, L, F, V, 201),
                                            nad_sample(1, false, L, F, V, 202)};
    const auto refs = check_nad_run(cw, w, p, samples, "untied F16");
    check_nad_not_trivial(refs, "untied F16");
}

// The paper's parameters (top 64 per layer, eta the 500th largest, chunks of 32) on a wider model,
// large enough that the contribution pass runs on two OpenMP threads.
void test_nad_paper_params() {
    TempDir dir;
    const int L = 8, V = 5;
    const int64_t F = 15000, E = 16;
    NadFileOptions o;
    o.wmax = 7;
    const std::string path = dir.file("wide.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 15, o);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    ContributionParams p;
    CHECK(p.chunk == 32 && p.top_per_layer == 64 && p.eta_rank == 500);
    p.keep_top = true;
    p.n_threads = 2;
    const std::vector<NadSample> samples = {nad_sample(3, false, L, F, V, 300, true), nad_sample(3, true, L, F, V, 301, true)};
    const auto refs = check_nad_run(cw, w, p, samples, "paper parameters");
    check_nad_not_trivial(refs, "paper parameters");
    int64_t active = 0;
    for (const auto& r : refs)
        for (int32_t a : r.n_active) active += a;
    std::printf("  %lld neurons activated over 6 tokens (at most %d each)\n", static_cast<long long>(active), L * 64);
}

// gate_variant: a = act(gate): on_row is ignored and on_gate_row stores SiLU(g) (GELU with gelu).
// Non-finite activations (fp16 overflow upstream, inf x 0) must not break the ranking: a NaN
// contribution ranks last and is never activated; +inf ranks first. Under ASan this also proves
// the selection never reads past its candidates.
void test_nad_non_finite() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 10, E = 8;
    const std::string path = dir.file("nan.gguf");
    write_nad_gguf(path, L, F, E, V, 21);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    for (bool gate : {false, true}) {
        ContributionParams p;
        p.gate_variant = gate;
        p.top_per_layer = 4;
        p.eta_rank = 5;
        p.chunk = 1;
        p.keep_top = true;
        ContributionReducer red(cw, p);
        red.begin(1, L, F, 4);
        std::vector<float> row(static_cast<size_t>(F), 0.5f);
        row[1] = std::nanf("");
        row[3] = gate ? -INFINITY : std::nanf("");  // SiLU(-inf) would be -inf / inf = NaN
        for (int l = 0; l < L; ++l) {
            if (gate) red.on_gate_row(0, 0, l, row.data());
            else red.on_row(0, 0, l, row.data());
        }
        red.commit(0, 0, 2);
        red.end_step();
        red.finish(0, 1);
        const auto& ti = red.top_index(0);
        const auto& tc = red.top_values(0);
        CHECK(ti.size() == static_cast<size_t>(L) * 4);
        for (size_t k = 0; k < ti.size(); ++k) {
            CHECK_MSG(!std::isnan(tc[k]), "a NaN contribution was kept in a top list");
            CHECK(ti[k] >= 0 && ti[k] < F);
            if (!gate) CHECK_MSG(ti[k] != 1 && ti[k] != 3, "a NaN neuron ranked in the top 4 of 10");
        }
        const int64_t n_bits = popcount(red.sets(0).data(), static_cast<int64_t>(red.sets(0).size()));
        CHECK(n_bits == red.n_active(0)[0]);
        CHECK(n_bits <= 4);
    }
}

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

void test_nad_gate_variant() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 10, E = 8;
    const std::string path = dir.file("gate.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 16);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);

    // Gate pre-activations in [-6, 6], not dyadic; neurons 2 and 5 (equal columns) get equal gates.
    std::vector<NadSample> samples = {nad_sample(4, true, L, F, V, 400), nad_sample(3, false, L, F, V, 401)};
    std::mt19937 rng(402);
    std::uniform_real_distribution<float> u(-6.0f, 6.0f);
    for (NadSample& s : samples) {
        for (float& x : s.in) x = u(rng);
        for (int t = 0; t < s.rows(); ++t)
            for (int l = 0; l < L; ++l) s.in[(static_cast<size_t>(t) * L + l) * F + 5] = s.in[(static_cast<size_t>(t) * L + l) * F + 2];
    }
    auto silu = [](double x) { return x / (1.0 + std::exp(-x)); };
    auto gelu = [](double x) {
        return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / std::acos(-1.0)) * x * (1.0 + 0.044715 * x * x)));
    };
    auto acts_with = [&](const std::function<double(double)>& act) {
        return [&, act](const NadSample& s) {
            std::vector<double> a(static_cast<size_t>(s.n_tokens) * L * F);
            for (size_t k = 0; k < a.size(); ++k) a[k] = act(s.in[k]);
            return a;
        };
    };

    ContributionParams p;
    p.gate_variant = true;
    p.chunk = 2;
    p.top_per_layer = static_cast<int>(F);  // every neuron's contribution is kept: each one is checked
    p.eta_rank = 5;
    p.keep_top = true;
    const auto refs = check_nad_run(cw, w, p, samples, "gate SiLU", nullptr, acts_with(silu), 1e-5);
    check_nad_not_trivial(refs, "gate SiLU");

    // Neuron by neuron: the value kept for index i is SiLU(g_i) * (W_U[y] . W_down[:, i]).
    {
        ContributionReducer red(cw, p);
        run_nad(red, samples, L, F);
        int bad = 0, seen = 0;
        for (int s = 0; s < 2; ++s) {
            const auto& tc = red.top_values(s);
            const auto& ti = red.top_index(s);
            CHECK(tc.size() == static_cast<size_t>(samples[s].n_tokens) * L * F && ti.size() == tc.size());
            if (tc.size() != static_cast<size_t>(samples[s].n_tokens) * L * F || ti.size() != tc.size()) continue;
            for (int t = 0; t < samples[s].n_tokens; ++t)
                for (int l = 0; l < L; ++l)
                    for (int64_t r = 0; r < F; ++r) {
                        const size_t at = (static_cast<size_t>(t) * L + l) * F;
                        const int32_t i = ti[at + r];
                        const double want = silu(samples[s].in[at + i]) * w.dot(l, i, samples[s].ids[t]);
                        bad += !(std::fabs(tc[at + r] - want) <= 1e-5 * std::fabs(want) + 1e-30);
                        ++seen;
                    }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " of " + std::to_string(seen) + " contributions are not SiLU(g) * dot");
    }

    // GELU: the tanh approximation in float cancels below g = -3 (1e-5 relative error there, all of
    // it by -6, if only 1e-8 absolute), so the gates are mapped to [-2.5, 6] for a relative check.
    std::vector<NadSample> gsamples = samples;
    for (NadSample& s : gsamples)
        for (float& x : s.in) x = -2.5f + (x + 6.0f) * (8.5f / 12.0f);
    ContributionParams pg = p;
    pg.gelu = true;
    pg.top_per_layer = 4;
    const auto grefs = check_nad_run(cw, w, pg, gsamples, "gate GELU", nullptr, acts_with(gelu), 1e-5);
    check_nad_not_trivial(grefs, "gate GELU");
}

// Lifetimes: a model closed under its contexts (what llama_cpp.Llama.close does to a tapped model)
// frees them first; every later use raises instead of touching freed memory (ASan watches). A tiny
// context decodes a long prompt in the batches llama.cpp accepts.
void test_model_lifetime() {
    auto model = Model::load(g_model_path, 0);
    const std::vector<llama_token> prompt = model->tokenize("The capital of France is", true, false);
    auto tc = std::make_unique<TappedContext>(model, small_context());
    GenerateResult before = generate(*tc, prompt, greedy(4), nullptr);
    CHECK(before.tokens.size() == 4u);
    SampleParams sp = sample_params(1, 16, 3);
    DecodeLoop loop(*tc, prompt, sp, {});
    loop.advance(2, nullptr);
    model->close();
    CHECK(model->closed() && tc->closed());
    EXPECT_THROW_MSG(RuntimeError, generate(*tc, prompt, greedy(4), nullptr), "was closed", "generate after close");
    EXPECT_THROW_MSG(RuntimeError, loop.advance(8, nullptr), "was closed", "advance after close");
    EXPECT_THROW_MSG(RuntimeError, model->tokenize("Hi", true, false), "was closed", "tokenize after close");
    EXPECT_THROW(RuntimeError, TappedContext(model, small_context()), "a new context after close");
    EXPECT_NO_THROW(loop.stop({0}), "stopping after close frees nothing twice");
    CHECK(loop.sample(0).tokens.size() == 2u);
    model->close();  // twice: nothing
    tc.reset();      // the context object outlives its llama context, and goes cleanly

    auto m2 = Model::load(g_model_path, 0);
    ContextParams tiny = small_context();
    tiny.n_ctx = 32;  // padded to 256 by llama.cpp; its batch stays 32
    TappedContext small(m2, tiny);
    std::vector<llama_token> longer;
    while (longer.size() < 120) longer.insert(longer.end(), prompt.begin(), prompt.end());
    GenerateResult r;
    EXPECT_NO_THROW(r = generate(small, longer, greedy(3), nullptr), "a prompt longer than the batch");
    CHECK(r.tokens.size() == 3u);
    while (longer.size() < 400) longer.insert(longer.end(), prompt.begin(), prompt.end());
    EXPECT_THROW_MSG(ContextError, generate(small, longer, greedy(3), nullptr), "exceeds the context",
                     "a prompt beyond the context");
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


// NeuReasoner's spectral features against a direct double-precision DFT, on windows whose spectra
// are known: a pure tone (all its energy in one bin), an alternating sign (the Nyquist bin), a
// constant (no spectrum: zeros) and random values.
void test_nr_spectral() {
    EXPECT_THROW(ParamError, SpectralWindow(3), "a window of 3");
    EXPECT_THROW(ParamError, SpectralWindow(513), "a window of 513");
    const int W = 32, K = W / 2;
    const SpectralWindow spec(W);
    auto reference = [&](const std::vector<float>& x, double* out) {
        double mean = 0;
        for (float v : x) mean += v;
        mean /= W;
        std::vector<double> p(K + 1, 0.0);
        double total = 0, top = 0, lo = 0, hi = 0, ent = 0, var = 0, tv = 0;
        for (int k = 1; k <= K; ++k) {
            double re = 0, im = 0;
            for (int t = 0; t < W; ++t) {
                re += (x[t] - mean) * std::cos(2 * M_PI * k * t / W);
                im -= (x[t] - mean) * std::sin(2 * M_PI * k * t / W);
            }
            p[k] = re * re + im * im;
            total += p[k];
            top = std::max(top, p[k]);
        }
        for (int k = 1; k <= K; ++k) {
            if (k <= W / 8) lo += p[k];
            if (k > W / 4) hi += p[k];
            if (p[k] > 0) ent -= p[k] / total * std::log(p[k] / total);
        }
        for (int t = 0; t < W; ++t) var += (x[t] - mean) * (x[t] - mean);
        for (int t = 1; t < W; ++t) tv += (double(x[t]) - x[t - 1]) * (double(x[t]) - x[t - 1]);
        out[0] = hi / total, out[1] = lo / total, out[2] = top / total, out[3] = ent / std::log(double(K)), out[4] = tv / var;
    };
    std::mt19937 rng(3);
    std::normal_distribution<float> noise;
    for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> x(W);
        for (float& v : x) v = noise(rng) * (1 + trial);
        float f[kNumSpectral];
        double r[kNumSpectral];
        spec.features(x.data(), f);
        reference(x, r);
        for (int i = 0; i < kNumSpectral; ++i) CHECK_MSG(std::fabs(f[i] - r[i]) < 1e-4 * std::max(1.0, std::fabs(r[i])), "feature " + std::to_string(i));
    }
    std::vector<float> tone(W), alt(W), flat(W, 2.5f);
    for (int t = 0; t < W; ++t) tone[t] = std::sin(2 * M_PI * 3 * t / W), alt[t] = t % 2 ? 1.0f : -1.0f;
    float f[kNumSpectral];
    spec.features(tone.data(), f);
    CHECK(f[kDominantRatio] > 0.999f && f[kEntropy] < 1e-3f && f[kLowRatio] > 0.999f);
    spec.features(alt.data(), f);
    CHECK(f[kHighRatio] > 0.999f && f[kDominantRatio] > 0.999f);
    spec.features(flat.data(), f);
    for (float v : f) CHECK(v == 0.0f);
}

// The MLP forward pass (ReLU hidden layers, logistic output, scaler first), computed by hand.
void test_nr_mlp() {
    Mlp m;
    m.mean = {1.0f, -1.0f};
    m.scale = {2.0f, 0.5f};
    m.weights = {{1.0f, -1.0f, 0.5f, 2.0f}, {1.5f, -0.5f}};  // [2 x 2], [2 x 1]
    m.biases = {{0.1f, -0.2f}, {0.3f}};
    EXPECT_NO_THROW(m.validate(), "a consistent MLP");
    const float x[2] = {3.0f, 0.0f};  // scaled: (1, 2)
    const double h0 = std::max(0.0, 1 * 1.0 + 2 * 0.5 + 0.1), h1 = std::max(0.0, 1 * -1.0 + 2 * 2.0 - 0.2);
    const double z = 1.5 * h0 - 0.5 * h1 + 0.3;
    CHECK(std::fabs(m.probability(x) - 1.0 / (1.0 + std::exp(-z))) < 1e-6);
    Mlp bad = m;
    bad.weights[1].push_back(1.0f);
    EXPECT_THROW_MSG(ParamError, bad.validate(), "layer 1", "weights of the wrong size");
    bad = m;
    bad.scale[0] = 0.0f;
    EXPECT_THROW(ParamError, bad.validate(), "a zero scale");
    bad = m;
    bad.biases[1] = {0.0f, 0.0f};
    bad.weights[1] = {1, 1, 1, 1};
    EXPECT_THROW_MSG(ParamError, bad.validate(), "one output", "two outputs");
}

// A level that always detects: a one-input MLP whose bias saturates the logistic.
NrLevelConfig always_level(int action, std::vector<int> components) {
    NrLevelConfig lv;
    lv.enabled = true;
    lv.components = std::move(components);
    lv.features = {kEntropy};
    lv.mlp.mean = {0.0f};
    lv.mlp.scale = {1.0f};
    lv.mlp.weights = {{0.0f}};
    lv.mlp.biases = {{30.0f}};
    lv.threshold = 0.5f;
    lv.action = action;
    return lv;
}

// Rollbacks leave the run as if the rolled-back tokens had never been generated: a greedy run
// resampled at every detection draws the plain greedy run's tokens; an exit ends the sample with
// the exit tokens; runs that cannot follow a rollback are refused.
void test_nr_rollback() {
    auto model = shared_model();
    const ModelInfo& mi = model->info();
    const std::vector<llama_token> prompt = chat_prompt(*model, "Tell me a short story about a dragon.");
    const int max_tokens = 60;
    SampleParams sp = sample_params(1, max_tokens, 5);
    sp.sampling.temperature = 0.0f;
    sp.sampling.ignore_eos = true;
    TappedContext tc(model, parallel_context(1));
    DecodeLoop plain(tc, prompt, sp, {});
    plain.advance(max_tokens, nullptr);
    const std::vector<llama_token> ref = plain.sample(0).tokens;

    NeuReasonerConfig cfg;
    cfg.layer = mi.n_layers / 2;
    cfg.window = 8;
    cfg.levels.assign(kNrLevels, NrLevelConfig{});
    // An FFN neuron and an attention head: both taps are read.
    cfg.levels[kNrIntra] = always_level(kNrResample, {3, static_cast<int>(mi.n_ff) + 1});
    cfg.max_actions = 4;
    cfg.max_retries = 2;
    cfg.cooldown = 2;
    // Bounded by the retries of a step (the story's first line is longer than the run), then by
    // the actions of a sample.
    for (int retries : {2, 10}) {
        cfg.max_retries = retries;
        NeuReasonerMonitor mon(cfg, *model);
        CHECK(mon.tap_request().kinds & tap_bit(TapKind::Attention) && mon.tap_request().attention_layer == cfg.layer);
        DecodeLoop loop(tc, prompt, sp, {}, {&mon});
        loop.advance(max_tokens, nullptr);
        const SampleState& st = loop.sample(0);
        int rollbacks = 0, let_pass = 0;
        for (const NrEvent& e : mon.events(0)) rollbacks += e.rollback_to >= 0, let_pass += e.action == kNrNone;
        CHECK_MSG(rollbacks == std::min(retries, cfg.max_actions), "rollbacks: " + std::to_string(rollbacks));
        CHECK(let_pass > 0);
        CHECK(st.tokens == ref);
        CHECK(loop.tokens_sampled() > max_tokens);
        CHECK(mon.signals(0).size() == static_cast<size_t>(max_tokens) * kNrLevels);
        CHECK(std::isfinite(mon.signals(0)[kNrIntra]));
    }
    {
        NeuReasonerConfig ex = cfg;
        ex.levels[kNrIntra] = NrLevelConfig{};
        ex.levels[kNrInstance] = always_level(kNrExit, {7});
        ex.exit_tokens = model->tokenize(" The end.", false, false);
        ex.exit_tokens.push_back(llama_vocab_eos(model->vocab()));
        NeuReasonerMonitor mon(ex, *model);
        CHECK(!(mon.tap_request().kinds & tap_bit(TapKind::Attention)));
        SampleParams p = sp;
        p.sampling.ignore_eos = false;
        DecodeLoop loop(tc, prompt, p, {}, {&mon});
        loop.advance(max_tokens, nullptr);
        const SampleState& st = loop.sample(0);
        CHECK(st.finish == Finish::Exit && st.exit_by == &mon && st.finish_reason() == "neureasoner_exit");
        CHECK(mon.exit_at(0) == ex.window);
        CHECK(st.text.size() >= 9 && st.text.compare(st.text.size() - 9, 9, " The end.") == 0);
        CHECK(std::equal(st.tokens.begin(), st.tokens.begin() + ex.window, ref.begin()));
    }
    NeuReasonerMonitor mon(cfg, *model);
    SampleParams p = sp;
    ActiveSetReducer sets(4, 0.0f);
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, p, {&sets}, {&mon}), "chunked set records", "rollbacks and chunk sets");
    p.forced = {ref[0], ref[1]};
    EXPECT_THROW_MSG(ParamError, DecodeLoop(tc, prompt, p, {}, {&mon}), "teacher-forced", "rollbacks and forcing");
    NeuReasonerConfig out = cfg;
    out.levels[kNrIntra].components = {static_cast<int>(mi.n_ff) + mi.n_head};
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "outside this model", "a component beyond the heads");
    out = cfg;
    out.layer = mi.n_layers;
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "layer", "a layer beyond the model");
    out = cfg;
    out.levels[kNrIntra].features = {kEntropy, kTvEnergy};
    EXPECT_THROW_MSG(ParamError, NeuReasonerMonitor(out, *model), "inputs", "features the MLP does not read");
}

}  // namespace

// neurotap_native_tests [--group G]... [MODEL.gguf]: every test, or those of the named components.
int main(int argc, char** argv) {
    std::vector<std::string> groups;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--group" && i + 1 < argc) {
            groups.push_back(argv[++i]);
        } else if (!arg.empty()) {
            g_model_path = arg;
        }
    }
    if (g_model_path.empty())
        if (const char* env = std::getenv("NEUROTAP_TEST_MODEL")) g_model_path = env;
    auto selected = [&](const TestCase& tc) {
        return groups.empty() || std::find(groups.begin(), groups.end(), tc.group) != groups.end();
    };
    const char* verbose = std::getenv("NEUROTAP_TEST_VERBOSE");
    install_log_capture(verbose && *verbose && std::strcmp(verbose, "0") != 0);

    const TestCase model_free[] = {
        {"tap", "tap_matching", test_tap_matching},
        {"tap", "tap_delivery", test_tap_delivery},
        {"tap", "tap_norm_capture", test_tap_norm_capture},
        {"tap", "tap_errors", test_tap_errors},
        {"tap", "tap_discovery", test_tap_discovery},
        {"gguf", "gguf_overflowing_shape", test_gguf_overflowing_shape},
        {"gguf", "unsupported_models", test_unsupported_models},
        {"reducers", "reducers_synthetic", test_reducers_synthetic},
        {"reducers", "set_records", test_set_records},
        {"nad", "nad_jaccard", test_nad_jaccard},
        {"nad", "nad_dots", test_nad_dots},
        {"nad", "nad_projection_kernels", test_nad_projection_kernels},
        {"nad", "nad_contributions", test_nad_contributions},
        {"nad", "nad_weights_errors", test_nad_weights_errors},
        {"nad", "nad_untied_f16", test_nad_untied_f16},
        {"nad", "nad_paper_params", test_nad_paper_params},
        {"nad", "nad_gate_variant", test_nad_gate_variant},
        {"nad", "nad_non_finite", test_nad_non_finite},
        {"neat", "neat_monitor", test_neat_monitor},
    };
    const TestCase with_model[] = {
        {"gguf", "gguf_real_model", test_gguf_real_model},
        {"gguf", "bad_files", test_bad_files},
        {"gguf", "fuzz_headers", test_fuzz_headers},
        {"generate", "model_info", test_model_info},
        {"generate", "generation", test_generation},
        {"generate", "generation_errors", test_generation_errors},
        {"decode_loop", "parallel_sampling", test_parallel_sampling},
        {"decode_loop", "parallel_control", test_parallel_control},
        {"decode_loop", "parallel_errors", test_parallel_errors},
        {"decode_loop", "parallel_logprobs", test_parallel_logprobs},
        {"decode_loop", "hand_off", test_hand_off},
        {"neat", "neat_file", test_neat_file},
        {"neureasoner", "nr_spectral", test_nr_spectral},
        {"neureasoner", "nr_mlp", test_nr_mlp},
        {"neureasoner", "nr_rollback", test_nr_rollback},
        {"generate", "model_lifetime", test_model_lifetime},
    };

    int passed = 0, failed = 0;
    auto run = [&](const TestCase& tc) {
        g_check_failures = 0;
        std::printf("[ RUN  ] %s\n", tc.name);
        std::fflush(stdout);
        try {
            tc.fn();
        } catch (const std::exception& e) {
            report_failure(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
        } catch (...) {
            report_failure(__FILE__, __LINE__, "uncaught non-std exception");
        }
        const bool ok = g_check_failures == 0;
        (ok ? passed : failed) += 1;
        std::printf("[ %s ] %s\n", ok ? " OK " : "FAIL", tc.name);
        std::fflush(stdout);
    };

    for (const TestCase& tc : model_free)
        if (selected(tc)) run(tc);
    bool needs_model = false;
    for (const TestCase& tc : with_model) needs_model = needs_model || selected(tc);
    if (needs_model && g_model_path.empty()) {
        std::fprintf(stderr, "no model: pass a GGUF path or set NEUROTAP_TEST_MODEL\n");
        failed += 1;
    } else {
        for (const TestCase& tc : with_model)
            if (selected(tc)) run(tc);
    }
    if (passed + failed == 0) {
        std::fprintf(stderr, "no test in the selected groups\n");
        failed += 1;
    }
    g_model.reset();
    std::fflush(stderr);
    std::printf("%d passed, %d failed\n", passed, failed);
    std::fflush(stdout);  // LeakSanitizer exits without flushing stdio
    return failed == 0 ? 0 : 1;
}
