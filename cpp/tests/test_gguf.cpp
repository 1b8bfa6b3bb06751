// Native tests of one component (ctest group "gguf"); fixtures in common.h.
#include "tests/common.h"

namespace {

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

}  // namespace

std::vector<TestCase> gguf_tests() {
    return {
        {"gguf", "gguf_overflowing_shape", test_gguf_overflowing_shape, false},
        {"gguf", "unsupported_models", test_unsupported_models, false},
        {"gguf", "gguf_real_model", test_gguf_real_model, true},
        {"gguf", "bad_files", test_bad_files, true},
        {"gguf", "fuzz_headers", test_fuzz_headers, true},
    };
}
