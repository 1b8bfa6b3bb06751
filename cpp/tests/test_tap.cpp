// Native tests of one component (ctest group "tap"); fixtures in common.h.
#include "tests/common.h"

namespace {

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

    tap.arm(1, &sink, kTapMlpPost | tap_bit(TapKind::Ln2Normalized));  // this decode also reads the norm
    CHECK(tap.armed_kinds() == (kTapMlpPost | tap_bit(TapKind::Ln2Normalized)));
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
        CHECK(c.kind == TapKind::MlpPost);
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
    const unsigned norm = kTapMlpPost | tap_bit(TapKind::Ln2Normalized);
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
        if (c.kind != TapKind::Ln2Normalized) continue;
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

// last_row_only: a batch of n rows whose last row alone requests logits. Tensors of the layers
// before the last hold every row, the last layer's only the output row; either way the batch's
// last row is delivered, as row 0 of 1. Any other row count, a second delivery or a missing layer
// is an error naming it.
void test_tap_last_row_only() {
    const int n = 5;
    const unsigned norm = kTapMlpPost | tap_bit(TapKind::Ln2Normalized);
    FfnTap tap("ffn_swiglu", kLayers, kFf, kEmbd);
    RecordingSink sink;
    tap.arm(n, &sink, norm, -1, true);
    for (int il = 0; il < kLayers; ++il) {
        const int rows = il == kLayers - 1 ? 1 : n;  // the last layer after ggml_get_rows(inp_out_ids)
        deliver(tap, "ffn_norm", il, 0, rows, kEmbd);
        deliver(tap, "ffn_swiglu", il, 0, rows, kFf);
    }
    EXPECT_NO_THROW(tap.disarm_and_check(), "the last row of every layer");
    CHECK(sink.calls.size() == static_cast<size_t>(2 * kLayers));
    bool data_ok = true;
    for (const RecordedRows& c : sink.calls) {
        CHECK(c.row0 == 0 && c.n_rows == 1);
        CHECK(c.width == (c.kind == TapKind::MlpPost ? kFf : kEmbd));
        const int row = c.layer == kLayers - 1 ? 0 : n - 1;  // the tensor's last row
        for (int64_t i = 0; i < c.width && c.data.size() == static_cast<size_t>(c.width); ++i)
            data_ok = data_ok && c.data[static_cast<size_t>(i)] == cell(c.layer, row, i);
    }
    CHECK(data_ok);

    auto expect_error = [&](const std::function<void()>& spoil, const char* needle, const std::string& what) {
        RecordingSink s;
        tap.arm(n, &s, kTapMlpPost, -1, true);
        spoil();
        EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), needle, what);
        CHECK(!tap.armed());
    };
    expect_error([&] {  // a split batch: a ubatch of 3 rows
        for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, il == 6 ? 3 : n, kFf);
    }, "tapped tensor ffn_swiglu-6 holds 3 rows, neither the batch's 5 nor its one output row", "3 of 5 rows");
    expect_error([&] {
        for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, n, kFf);
        deliver(tap, "ffn_swiglu", 9, 0, 1, kFf);
    }, "ffn_swiglu-9 delivered more rows than the batch holds (2 > 1)", "a layer delivered twice");
    expect_error([&] {
        for (int il = 0; il < kLayers; ++il)
            if (il != 17) deliver(tap, "ffn_swiglu", il, 0, n, kFf);
    }, "layer 17 delivered 0 rows of ffn_swiglu, expected 1", "a layer delivered nothing");

    // The next arm without last_row_only delivers every row again: the mode holds for one arm.
    sink.calls.clear();
    tap.arm(n, &sink);
    for (int il = 0; il < kLayers; ++il) deliver(tap, "ffn_swiglu", il, 0, n, kFf);
    EXPECT_NO_THROW(tap.disarm_and_check(), "every row after a last-row arm");
    CHECK(sink.calls.size() == static_cast<size_t>(kLayers));
    for (const RecordedRows& c : sink.calls) CHECK(c.row0 == 0 && c.n_rows == n);
}

// A sink reading the activation, the normed FFN input, the residual and one layer's attention
// output, recording rows per (kind, layer, batch row).
class KindsSink : public RecordingSink {
public:
    explicit KindsSink(int attention_layer) : layer_(attention_layer) {}
    TapRequest tap_request() const override {
        return {kTapMlpPost | tap_bit(TapKind::Ln2Normalized) | tap_bit(TapKind::ResidPost) | tap_bit(TapKind::AttnZ), layer_};
    }
    // The row `row` of (kind, layer) as delivered, or empty.
    std::vector<float> row(TapKind kind, int layer, int row) const {
        for (const RecordedRows& c : calls)
            if (c.kind == kind && c.layer == layer && row >= c.row0 && row < c.row0 + c.n_rows)
                return std::vector<float>(c.data.begin() + static_cast<int64_t>(row - c.row0) * c.width,
                                          c.data.begin() + static_cast<int64_t>(row - c.row0 + 1) * c.width);
        return {};
    }
    int rows(TapKind kind, int layer) const {
        int k = 0;
        for (const RecordedRows& c : calls) k += (c.kind == kind && c.layer == layer) ? c.n_rows : 0;
        return k;
    }

private:
    int layer_;
};

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0, n = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
        d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
        n += static_cast<double>(b[i]) * b[i];
    }
    return a.size() == b.size() && n > 0 ? std::sqrt(d / n) : 1.0;
}

// On the real model: decode_seq taps the prompt's last row inside the batch decoding the prompt
// (only that row requests logits). Against the same batch decoded with logits and the tap on every
// row (decode_rows): every layer before the last, and the last layer's attention output (computed
// before llama.cpp drops the rows without logits), are bit for bit the same; the last layer's FFN
// runs on that one row instead of all of them, so it and the logits are compared within 1e-4
// (relative L2), and bit for bit against the same decode_seq again. A prompt longer than n_batch
// is cut at multiples of n_batch, and only its last batch is tapped.
void test_tap_last_row_real() {
    auto model = shared_model();
    const int L = model->info().n_layers, V = model->info().n_vocab;
    std::vector<llama_token> prompt;
    const std::vector<llama_token> piece = model->tokenize("The quick brown fox jumps over the lazy dog. ", false, false);
    while (prompt.size() < 90) prompt.insert(prompt.end(), piece.begin(), piece.end());
    prompt.resize(90);  // 90 rows: the tiled attention path, and 90 % 4 = 2 rows outside the groups of 4
    const int np = static_cast<int>(prompt.size());
    ContextParams cp = small_context();
    TappedContext tc(model, cp);
    const TapKind kinds[] = {TapKind::MlpPost, TapKind::Ln2Normalized, TapKind::ResidPost};

    KindsSink every(L - 1);
    std::vector<int> pos(static_cast<size_t>(np));
    std::iota(pos.begin(), pos.end(), 0);
    const std::vector<llama_seq_id> seqs(static_cast<size_t>(np), 0);
    tc.decode_rows(prompt.data(), pos.data(), seqs.data(), np, &every);
    const std::vector<float> logits_every(llama_get_logits_ith(tc.ctx(), np - 1), llama_get_logits_ith(tc.ctx(), np - 1) + V);

    std::vector<float> logits_last[2];
    KindsSink last[2] = {KindsSink(L - 1), KindsSink(L - 1)};
    for (int k = 0; k < 2; ++k) {
        tc.clear();
        const int row = tc.decode_seq(prompt.data(), np, 0, 0, &last[k]);
        CHECK(row == np - 1);
        logits_last[k].assign(llama_get_logits_ith(tc.ctx(), row), llama_get_logits_ith(tc.ctx(), row) + V);
        for (int il = 0; il < L; ++il) {
            for (TapKind kind : kinds) CHECK_MSG(last[k].rows(kind, il) == 1, "layer " + std::to_string(il));
            CHECK(last[k].rows(TapKind::AttnZ, il) == (il == L - 1 ? 1 : 0));
        }
    }
    int differ = 0;
    for (int il = 0; il < L - 1; ++il)
        for (TapKind kind : kinds) {
            const std::vector<float> a = last[0].row(kind, il, 0), b = every.row(kind, il, np - 1);
            differ += a.empty() || a != b;
        }
    CHECK_MSG(differ == 0, std::to_string(differ) + " rows of the layers before the last differ from the every-row batch");
    const std::vector<float> z = last[0].row(TapKind::AttnZ, L - 1, 0);
    CHECK_MSG(!z.empty() && z == every.row(TapKind::AttnZ, L - 1, np - 1), "the last layer's attention output");
    for (TapKind kind : kinds) {
        const std::vector<float> a = last[0].row(kind, L - 1, 0), b = every.row(kind, L - 1, np - 1);
        const double d = rel_diff(a, b);
        CHECK_MSG(d < 1e-4, "last layer, kind " + std::to_string(static_cast<int>(kind)) + ": relative difference " + std::to_string(d));
        CHECK(a == last[1].row(kind, L - 1, 0));
    }
    CHECK(rel_diff(logits_last[0], logits_every) < 1e-4);
    CHECK(logits_last[0] == logits_last[1]);
    CHECK(all_finite(logits_last[0]));

    // n_batch 32: batches [0, 32), [32, 64), [64, 90); the last alone is tapped, and its last row
    // equals the same batch's every-row decode after the first two untapped.
    cp.n_batch = 32;
    TappedContext cut(model, cp);
    KindsSink split(L - 1), ref(L - 1);
    const int row = cut.decode_seq(prompt.data(), np, 0, 0, &split);
    CHECK(row == np - 65);
    for (int il = 0; il < L; ++il) CHECK(split.rows(TapKind::MlpPost, il) == 1);
    cut.clear();
    cut.decode_seq(prompt.data(), 64, 0, 0, nullptr, false);
    cut.decode_rows(prompt.data() + 64, pos.data() + 64, seqs.data(), np - 64, &ref);
    differ = 0;
    for (int il = 0; il < L - 1; ++il) differ += split.row(TapKind::MlpPost, il, 0) != ref.row(TapKind::MlpPost, il, np - 65);
    CHECK_MSG(differ == 0, std::to_string(differ) + " layers differ after cutting at n_batch");

    // A sink that cannot be tapped with logits off: refused before anything runs.
    EXPECT_THROW_MSG(ParamError, tc.decode_seq(prompt.data(), np, 0, 0, &split, false), "requests logits", "tapped, no logits");
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

}  // namespace

std::vector<TestCase> tap_tests() {
    return {
        {"tap", "tap_matching", test_tap_matching, false},
        {"tap", "tap_delivery", test_tap_delivery, false},
        {"tap", "tap_norm_capture", test_tap_norm_capture, false},
        {"tap", "tap_errors", test_tap_errors, false},
        {"tap", "tap_discovery", test_tap_discovery, false},
        {"tap", "tap_last_row_only", test_tap_last_row_only, false},
        {"tap", "tap_last_row_real", test_tap_last_row_real, true},
    };
}
