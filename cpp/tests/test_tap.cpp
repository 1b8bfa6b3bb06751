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
    };
}
