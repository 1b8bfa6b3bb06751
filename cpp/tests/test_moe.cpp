// Native tests of the mixture-of-experts tap (ctest group "moe"): the route parsing and bounds
// checks of FfnTap on a hand-built ggml graph (no llama.cpp run), and the default scatter.
#include "ggml.h"
#include "tests/common.h"

namespace {

constexpr int kE = 4, kU = 2, kT = 3;
constexpr int64_t kF = 3, kD = 8;

// One MoE layer's nodes as build_moe_ffn makes them: ids a strided view of a wider I32 tensor
// (as the argsort's top-k view is), gate/up MUL_MAT_ID nodes fed by it, the activation, the final
// weights and ffn_moe_weighted multiplying by them through a reshape view.
struct MoeGraph {
    ggml_context* ctx = nullptr;
    ggml_tensor *ids_all, *ids, *act, *weights, *weighted;
    MoeGraph() {
        ggml_init_params p{16 * 1024 * 1024, nullptr, false};
        ctx = ggml_init(p);
        ggml_tensor* as = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kD, kF, kE);
        ggml_tensor* b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kD, 1, kT);
        ids_all = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, kE, kT);
        ids = ggml_view_2d(ctx, ids_all, kU, kT, ids_all->nb[1], 0);
        ggml_tensor* gate = ggml_mul_mat_id(ctx, as, b, ids);
        ggml_tensor* up = ggml_mul_mat_id(ctx, as, b, ids);
        act = ggml_swiglu_split(ctx, gate, up);
        ggml_set_name(act, "ffn_moe_swiglu-0");
        ggml_tensor* w2 = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kU, kT);
        ggml_set_name(w2, "ffn_moe_weights_norm-0");
        weights = w2;
        ggml_tensor* down = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, kD, kU, kT);
        weighted = ggml_mul(ctx, down, ggml_reshape_3d(ctx, w2, 1, kU, kT));
        ggml_set_name(weighted, "ffn_moe_weighted-0");
        auto* id = static_cast<int32_t*>(ids_all->data);
        const int32_t route[kT][kU] = {{2, 0}, {1, 3}, {3, 2}};
        for (int t = 0; t < kT; ++t)
            for (int j = 0; j < kE; ++j) id[t * kE + j] = j < kU ? route[t][j] : -7;  // padding never read
        auto* a = static_cast<float*>(act->data);
        for (int64_t i = 0; i < kF * kU * kT; ++i) a[i] = 0.5f + static_cast<float>(i);
        auto* w = static_cast<float*>(w2->data);
        for (int i = 0; i < kU * kT; ++i) w[i] = 0.25f * static_cast<float>(i + 1);
    }
    ~MoeGraph() { ggml_free(ctx); }
    int32_t& id(int t, int j) { return static_cast<int32_t*>(ids_all->data)[t * kE + j]; }
};

MoeLayout layout() {
    MoeLayout m;
    m.n_expert = kE;
    m.n_used = kU;
    m.n_ff_exp = kF;
    return m;
}

// Runs the callback protocol over the graph's nodes in graph order (weights first).
void feed(FfnTap& tap, MoeGraph& g, bool weights_first = true) {
    std::vector<ggml_tensor*> order = {g.weights, g.act, g.weighted};
    if (!weights_first) order = {g.act, g.weights, g.weighted};
    for (ggml_tensor* t : order)
        if (FfnTap::callback(t, true, &tap)) FfnTap::callback(t, false, &tap);
}

void test_moe_tap_route_and_scatter() {
    MoeGraph g;
    FfnTap tap("ffn_moe_swiglu", 1, kE * kF, kD);
    tap.set_moe(layout(), "");
    RecordingSink sink;
    tap.arm(kT, &sink, kTapMlpPost | tap_bit(TapKind::MoeRoute));
    feed(tap, g);
    EXPECT_NO_THROW(tap.disarm_and_check(), "a well-formed layer");
    CHECK(sink.calls.size() == 2);
    if (sink.calls.size() != 2) return;
    const RecordedRows& route = sink.calls[0];
    const RecordedRows& rows = sink.calls[1];
    CHECK(route.kind == TapKind::MoeRoute && route.width == 2 * kU && route.n_rows == kT);
    CHECK(rows.kind == TapKind::MlpPost && rows.width == kE * kF && rows.n_rows == kT && rows.row0 == 0);
    const float* a = static_cast<const float*>(g.act->data);
    const float* w = static_cast<const float*>(g.weights->data);
    for (int t = 0; t < kT; ++t) {
        std::vector<float> want(static_cast<size_t>(kE * kF), 0.0f);
        for (int j = 0; j < kU; ++j) {
            const int e = g.id(t, j);
            CHECK(route.data[static_cast<size_t>(t * 2 * kU + j)] == static_cast<float>(e));
            CHECK(route.data[static_cast<size_t>(t * 2 * kU + kU + j)] == w[t * kU + j]);
            for (int64_t i = 0; i < kF; ++i) want[static_cast<size_t>(e * kF + i)] = a[(t * kU + j) * kF + i];
        }
        CHECK(std::equal(want.begin(), want.end(), rows.data.begin() + t * kE * kF));
    }
}

void test_moe_tap_bad_routes() {
    // handed: rows were handed on before the error showed (ffn_moe_weighted comes after the
    // activation): the decode still fails at disarm, so no run keeps them.
    auto expect_error = [](void (*spoil)(MoeGraph&), const char* needle, bool weights_first = true,
                           bool handed = false) {
        MoeGraph g;
        spoil(g);
        FfnTap tap("ffn_moe_swiglu", 1, kE * kF, kD);
        tap.set_moe(layout(), "");
        RecordingSink sink;
        tap.arm(kT, &sink);
        feed(tap, g, weights_first);
        EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), needle, needle);
        CHECK(sink.calls.empty() != handed);  // else nothing wrong is ever handed on
    };
    expect_error([](MoeGraph& g) { g.id(1, 1) = kE; }, "layer 0: the router selected expert id 4 outside [0, 4)");
    expect_error([](MoeGraph& g) { g.id(2, 0) = -1; }, "expert id -1 outside");
    expect_error([](MoeGraph& g) { g.id(0, 1) = g.id(0, 0); }, "selected expert 2 twice");
    expect_error([](MoeGraph& g) { static_cast<float*>(g.weights->data)[3] = NAN; }, "layer 0: gate weight nan");
    expect_error([](MoeGraph&) {}, "were not computed before ffn_moe_swiglu-0", false);
    // ffn_moe_weighted multiplying by another tensor than the one read: the graph changed.
    expect_error([](MoeGraph& g) { g.weighted->src[1] = g.act; }, "are not the ffn_moe_weights* node", true, true);
    expect_error([](MoeGraph& g) { g.act->ne[1] = 1; g.act->ne[2] = kT * kU; }, "unexpected layout");
}

// A sink that records like RecordingSink: the default on_moe_rows chunks wide layers.
void test_moe_scatter_chunks() {
    MoeLayout m;
    m.n_expert = 64;
    m.n_used = 2;
    m.n_ff_exp = 8192;  // 512 Ki floats a row: one row a chunk
    m.n_ff_shexp = 16;
    const int n = 3;
    std::vector<float> act(static_cast<size_t>(n) * 2 * 8192), shexp(static_cast<size_t>(n) * 16), gate = {0.1f, 0.2f, 0.3f};
    for (size_t i = 0; i < act.size(); ++i) act[i] = static_cast<float>(i % 97) + 1.0f;
    for (size_t i = 0; i < shexp.size(); ++i) shexp[i] = -static_cast<float>(i) - 1.0f;
    std::vector<int32_t> ids = {5, 63, 0, 1, 40, 7};
    std::vector<float> w = {0.6f, 0.4f, 0.5f, 0.5f, 0.9f, 0.1f};
    MoeRows rows{2, 10, n, &m, act.data(), ids.data(), w.data(), shexp.data(), gate.data()};
    RecordingSink sink;
    sink.on_moe_rows(rows, kTapMlpPost | tap_bit(TapKind::MoeRoute));
    CHECK(sink.calls.size() == 2 * n);
    for (int r = 0; r < n && sink.calls.size() == 2 * n; ++r) {
        const RecordedRows& rt = sink.calls[static_cast<size_t>(2 * r)];
        const RecordedRows& rw = sink.calls[static_cast<size_t>(2 * r + 1)];
        CHECK(rt.kind == TapKind::MoeRoute && rt.row0 == 10 + r && rt.width == 5 && rt.layer == 2);
        CHECK(rt.data[4] == gate[static_cast<size_t>(r)]);
        CHECK(rw.kind == TapKind::MlpPost && rw.row0 == 10 + r && rw.n_rows == 1 && rw.width == m.width());
        std::vector<float> want(static_cast<size_t>(m.width()), 0.0f);
        scatter_moe_row(rows, r, want.data());
        CHECK(rw.data == want);
        int64_t nonzero = 0;
        for (float v : rw.data) nonzero += v != 0.0f;
        CHECK(nonzero == 2 * 8192 + 16);
        CHECK(rw.data[static_cast<size_t>(64 * 8192)] == shexp[static_cast<size_t>(r * 16)]);
    }
}

}  // namespace

std::vector<TestCase> moe_tests() {
    return {
        {"moe", "moe_tap_route_and_scatter", test_moe_tap_route_and_scatter, false},
        {"moe", "moe_tap_bad_routes", test_moe_tap_bad_routes, false},
        {"moe", "moe_scatter_chunks", test_moe_scatter_chunks, false},
    };
}
