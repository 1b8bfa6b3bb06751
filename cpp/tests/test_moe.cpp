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

// last_row_only: the layer's tensors hold every token of the batch (a layer before the last) and
// only the batch's last token is delivered, as row 0 of 1, with its own experts and weights; a
// layer whose tensors hold neither the batch's rows nor one is refused.
void test_moe_tap_last_row_only() {
    MoeGraph g;
    FfnTap tap("ffn_moe_swiglu", 1, kE * kF, kD);
    tap.set_moe(layout(), "");
    RecordingSink sink;
    tap.arm(kT, &sink, kTapMlpPost | tap_bit(TapKind::MoeRoute), -1, true);
    feed(tap, g);
    EXPECT_NO_THROW(tap.disarm_and_check(), "the last token of a well-formed layer");
    CHECK(sink.calls.size() == 2);
    if (sink.calls.size() != 2) return;
    const RecordedRows& route = sink.calls[0];
    const RecordedRows& rows = sink.calls[1];
    CHECK(route.kind == TapKind::MoeRoute && route.n_rows == 1 && route.row0 == 0);
    CHECK(rows.kind == TapKind::MlpPost && rows.n_rows == 1 && rows.row0 == 0 && rows.width == kE * kF);
    const int t = kT - 1;
    const float* a = static_cast<const float*>(g.act->data);
    const float* w = static_cast<const float*>(g.weights->data);
    std::vector<float> want(static_cast<size_t>(kE * kF), 0.0f);
    for (int j = 0; j < kU; ++j) {
        const int e = g.id(t, j);
        CHECK(route.data[static_cast<size_t>(j)] == static_cast<float>(e));
        CHECK(route.data[static_cast<size_t>(kU + j)] == w[t * kU + j]);
        for (int64_t i = 0; i < kF; ++i) want[static_cast<size_t>(e * kF + i)] = a[(t * kU + j) * kF + i];
    }
    CHECK(rows.data == want);

    // Armed for a batch of 5 rows, a layer of 3 tokens is neither its rows nor its output row.
    MoeGraph other;
    RecordingSink none;
    tap.arm(kT + 2, &none, kTapMlpPost, -1, true);
    feed(tap, other);
    EXPECT_THROW_MSG(RuntimeError, tap.disarm_and_check(), "holds 3 rows, neither the batch's 5 nor its one output row",
                     "a split batch");
    CHECK(none.calls.empty());
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

// ---------------------------------------------------------------------------------------------
// The compact path (Reducer::on_moe_row) against the scatter (on_row at full width): the same
// counts, sets, routes and contributions, bit for bit.

struct MoeShape {
    int n_expert, n_used;
    int64_t n_ff_exp, n_ff_shexp;
    MoeLayout layout() const {
        MoeLayout m;
        m.n_expert = n_expert;
        m.n_used = n_used;
        m.n_ff_exp = n_ff_exp;
        m.n_ff_shexp = n_ff_shexp;
        return m;
    }
    std::string name() const {
        return std::to_string(n_expert) + "x" + std::to_string(n_ff_exp) + " top " + std::to_string(n_used) +
               (n_ff_shexp ? " + shared " + std::to_string(n_ff_shexp) : "");
    }
};

// One layer's compact rows for n rows: experts in random order (not sorted), dyadic values with
// zeros, negatives and repeats (exact products, ties).
struct MoeBatch {
    std::vector<float> act, weights, shexp, gate;
    std::vector<int32_t> ids;
    MoeRows rows;
    MoeBatch(const MoeLayout& L, int layer, int n, std::mt19937& rng) {
        const int U = L.n_used;
        std::uniform_int_distribution<int> v(-4, 8), w(1, 8);
        auto value = [&] { const int x = v(rng); return x <= 0 && x > -3 ? 0.0f : 0.25f * static_cast<float>(x); };
        act.resize(static_cast<size_t>(n) * U * L.n_ff_exp);
        for (float& x : act) x = value();
        shexp.resize(static_cast<size_t>(n) * L.n_ff_shexp);
        for (float& x : shexp) x = value();
        for (int r = 0; r < n; ++r) {
            std::vector<int32_t> all(static_cast<size_t>(L.n_expert));
            std::iota(all.begin(), all.end(), 0);
            std::shuffle(all.begin(), all.end(), rng);
            for (int j = 0; j < U; ++j) {
                ids.push_back(all[static_cast<size_t>(j)]);
                weights.push_back(0.125f * static_cast<float>(w(rng)));
            }
            gate.push_back(0.0625f * static_cast<float>(w(rng)));
        }
        rows = MoeRows{layer, 0, n, nullptr, act.data(), ids.data(), weights.data(),
                       L.n_ff_shexp ? shexp.data() : nullptr, L.n_ff_shexp ? gate.data() : nullptr};
    }
};

// Decodes T steps of n samples through two sets of reducers as the decode loop offers rows:
// per layer, each sample's route row, then its activations, compact to `compact` (scattered for
// those that decline: DecodeLoop::on_moe_rows) and scattered to every one of `full`. Sample s's
// token ids come from ids(s, t). The last sample's last token is offered but never committed.
// fed: if given, every row offered, [sample][token][layer] as (route row, scattered row).
using FedRows = std::vector<std::vector<std::vector<std::pair<std::vector<float>, std::vector<float>>>>>;
void run_both(const MoeShape& shape, int n, int L, int T, const std::vector<Reducer*>& compact,
              const std::vector<Reducer*>& full, const std::function<int32_t(int, int)>& ids, uint32_t seed,
              FedRows* fed = nullptr) {
    const MoeLayout lay = shape.layout();
    const int64_t W = lay.width(), RW = moe_route_width(lay);
    std::mt19937 rng(seed);
    for (Reducer* r : compact) r->begin(n, L, W, T);
    for (Reducer* r : full) r->begin(n, L, W, T);
    std::vector<float> route(static_cast<size_t>(RW)), row(static_cast<size_t>(W));
    if (fed) fed->assign(static_cast<size_t>(n), FedRows::value_type(static_cast<size_t>(T), std::vector<std::pair<std::vector<float>, std::vector<float>>>(static_cast<size_t>(L))));
    for (int t = 0; t < T; ++t) {
        for (int l = 0; l < L; ++l) {
            MoeBatch b(lay, l, n, rng);
            b.rows.layout = &lay;
            for (int s = 0; s < n; ++s) {
                moe_route_row(b.rows, s, route.data());
                scatter_moe_row(b.rows, s, row.data());
                if (fed) (*fed)[static_cast<size_t>(s)][static_cast<size_t>(t)][static_cast<size_t>(l)] = {route, row};
                for (Reducer* r : compact) {
                    r->on_hidden_row(TapKind::MoeRoute, s, t, l, route.data(), RW);
                    if (!r->on_moe_row(s, t, b.rows, s)) r->on_row(s, t, l, row.data());
                }
                for (Reducer* r : full) {
                    r->on_hidden_row(TapKind::MoeRoute, s, t, l, route.data(), RW);
                    r->on_row(s, t, l, row.data());
                }
            }
        }
        for (int s = 0; s < n; ++s) {
            if (s == n - 1 && t == T - 1) continue;
            for (Reducer* r : compact) r->commit(s, t, ids(s, t));
            for (Reducer* r : full) r->commit(s, t, ids(s, t));
        }
        for (Reducer* r : compact) r->end_step();
        for (Reducer* r : full) r->end_step();
    }
    for (int s = 0; s < n; ++s) {
        for (Reducer* r : compact) r->finish(s, s == n - 1 ? T - 1 : T);
        for (Reducer* r : full) r->finish(s, s == n - 1 ? T - 1 : T);
    }
    for (Reducer* r : compact) r->sync();
    for (Reducer* r : full) r->sync();
}

const std::vector<MoeShape>& compact_shapes() {
    static const std::vector<MoeShape> shapes = {
        {8, 2, 32, 0},     // 64 computed neurons a layer, word-aligned experts
        {16, 3, 40, 24},   // experts and the shared one across word boundaries
        {4, 1, 5, 3},      // fewer computed neurons than a contribution top k
        {64, 8, 100, 0},   // wide, many experts a token
    };
    return shapes;
}

void test_moe_compact_counts_sets_routes() {
    for (const MoeShape& shape : compact_shapes()) {
        for (const float thr : {0.0f, 0.3f, -0.5f}) {  // below 0 the idle zeros are active: taken scattered
            const std::string tag = shape.name() + ", threshold " + std::to_string(thr);
            const int n = 3, L = 3, T = 7;
            ActiveCountReducer c1(thr), c2(thr);
            ActiveSetReducer s1(3, thr), s2(3, thr);
            MoeRouteReducer r1(shape.layout(), false), r2(shape.layout(), false);
            const int64_t W = shape.layout().width(), F = shape.n_ff_exp;
            const std::vector<std::pair<int, int>> watch = {{0, 0}, {1, static_cast<int>(W - 1)}, {2, static_cast<int>(F + 3)},
                                                            {0, static_cast<int>(W / 2)}, {1, static_cast<int>(shape.n_ff_shexp ? shape.n_expert * F : W - 2)},
                                                            {2, static_cast<int>(3 * F + 1)}};
            WatchReducer w1(watch), w2(watch);
            run_both(shape, n, L, T, {&c1, &s1, &r1, &w1}, {&c2, &s2, &r2, &w2}, [](int s, int t) { return s + t; }, 5);
            for (int s = 0; s < n; ++s) {
                CHECK_MSG(c1.counts(s) == c2.counts(s), tag + ": counts of sample " + std::to_string(s));
                CHECK_MSG(s1.sets(s) == s2.sets(s), tag + ": active sets of sample " + std::to_string(s));
                CHECK_MSG(r1.ids(s) == r2.ids(s) && r1.weights(s) == r2.weights(s) && r1.shexp_gate(s) == r2.shexp_gate(s),
                          tag + ": routes of sample " + std::to_string(s));
                CHECK_MSG(w1.values(s) == w2.values(s), tag + ": watched neurons of sample " + std::to_string(s));
            }
            // Not trivial: something active, not everything.
            int64_t active = 0;
            for (int32_t v : c1.counts(0)) active += v;
            CHECK_MSG(active > 0 && active < int64_t{L} * T * shape.layout().width(), tag + ": " + std::to_string(active) + " active");
            CHECK_MSG(static_cast<int>(c1.counts(n - 1).size()) == (T - 1) * L, tag + ": the uncommitted token is dropped");
        }
    }
}

// ffn_down_exps (F32 ne = {n_ff_exp, n_embd, n_expert}), ffn_down_shexp, token_embd: small integers.
struct MoeDownWeights {
    std::vector<std::vector<float>> exps, shexp;  // [layer] in ggml order: (i, k, e) at (e * n_embd + k) * n_ff_exp + i
    std::vector<float> embd;                      // (k, y) at y * n_embd + k
};
MoeDownWeights write_moe_down_gguf(const std::string& path, const MoeLayout& m, int L, int64_t E, int V, uint32_t seed) {
    MoeDownWeights out;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> val(-3, 3);
    gguf_context* g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "qwen2moe");
    const size_t floats = static_cast<size_t>(L) * static_cast<size_t>(m.width() * E) + static_cast<size_t>(V) * E;
    ggml_init_params ip{floats * sizeof(float) + static_cast<size_t>(2 * L + 1) * ggml_tensor_overhead() + 4096, nullptr, false};
    ggml_context* tctx = ggml_init(ip);
    auto fill = [&](ggml_tensor* t) {
        float* d = static_cast<float*>(t->data);
        for (int64_t i = 0; i < ggml_nelements(t); ++i) d[i] = static_cast<float>(val(rng));
        gguf_add_tensor(g, t);
        return std::vector<float>(d, d + ggml_nelements(t));
    };
    for (int l = 0; l < L; ++l) {
        ggml_tensor* t = ggml_new_tensor_3d(tctx, GGML_TYPE_F32, m.n_ff_exp, E, m.n_expert);
        ggml_set_name(t, ("blk." + std::to_string(l) + ".ffn_down_exps.weight").c_str());
        out.exps.push_back(fill(t));
        out.shexp.emplace_back();
        if (m.n_ff_shexp > 0) {
            ggml_tensor* sh = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, m.n_ff_shexp, E);
            ggml_set_name(sh, ("blk." + std::to_string(l) + ".ffn_down_shexp.weight").c_str());
            out.shexp.back() = fill(sh);
        }
    }
    ggml_tensor* u = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, E, V);
    ggml_set_name(u, "token_embd.weight");
    out.embd = fill(u);
    const bool ok = gguf_write_to_file(g, path.c_str(), false);
    gguf_free(g);
    ggml_free(tctx);
    if (!ok) throw std::runtime_error("gguf_write_to_file failed for " + path);
    return out;
}

// NAD's selection from the rows by brute force at full width, as the reducer defines it: c = a * w
// * (W_down[e][:, i] . W_U[y]) for the experts that ran (exact: small integers and dyadic values),
// -inf for the others; each layer's top k by value, ties by lower index; eta the eta_rank-th of
// them all; a neuron activated when among its layer's top k and above eta.
NadResult moe_reference(const FedRows::value_type& rows, const MoeLayout& m, const MoeDownWeights& w, int L, int64_t E,
                        int n_tokens, const std::function<int32_t(int)>& id, const ContributionParams& p) {
    const int64_t W = m.width(), F = m.n_ff_exp, routed = int64_t{m.n_expert} * F;
    const int U = m.n_used, k = static_cast<int>(std::min<int64_t>(p.top_per_layer, W));
    NadResult out;
    const int64_t words = (int64_t{L} * W + 63) / 64;
    for (int t = 0; t < n_tokens; ++t) {
        const float* u = w.embd.data() + static_cast<size_t>(id(t)) * static_cast<size_t>(E);
        std::vector<float> topc, all;
        std::vector<int32_t> topi;
        for (int l = 0; l < L; ++l) {
            const auto& [route, row] = rows[static_cast<size_t>(t)][static_cast<size_t>(l)];
            std::vector<float> c(static_cast<size_t>(W), -INFINITY);
            for (int64_t i = 0; i < W; ++i) {
                float scale = 0.0f;
                bool ran = i >= routed;
                if (ran) scale = route[static_cast<size_t>(2 * U)];
                for (int j = 0; j < U && !ran; ++j)
                    if (static_cast<int64_t>(route[static_cast<size_t>(j)]) == i / F) ran = true, scale = route[static_cast<size_t>(U + j)];
                if (!ran) continue;
                float d = 0.0f;
                for (int64_t e = 0; e < E; ++e)
                    d += (i >= routed ? w.shexp[static_cast<size_t>(l)][static_cast<size_t>(e * m.n_ff_shexp + i - routed)]
                                      : w.exps[static_cast<size_t>(l)][static_cast<size_t>(((i / F) * E + e) * F + i % F)]) * u[e];
                c[static_cast<size_t>(i)] = row[static_cast<size_t>(i)] * scale * d;
            }
            std::vector<int32_t> order(static_cast<size_t>(W));
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return c[static_cast<size_t>(x)] > c[static_cast<size_t>(y)]; });
            for (int r = 0; r < k; ++r) {
                topi.push_back(order[static_cast<size_t>(r)]);
                topc.push_back(c[static_cast<size_t>(order[static_cast<size_t>(r)])]);
            }
        }
        all = topc;
        const int rank = std::min(p.eta_rank, L * k);
        std::nth_element(all.begin(), all.begin() + (rank - 1), all.end(), std::greater<float>());
        const float eta = all[static_cast<size_t>(rank - 1)];
        const size_t chunk = static_cast<size_t>(t / p.chunk);
        if (out.bits.size() < (chunk + 1) * static_cast<size_t>(words)) out.bits.resize((chunk + 1) * static_cast<size_t>(words), 0);
        int32_t active = 0;
        for (int l = 0; l < L; ++l)
            for (int r = 0; r < k && topc[static_cast<size_t>(l * k + r)] > eta; ++r) {
                const int64_t bit = int64_t{l} * W + topi[static_cast<size_t>(l * k + r)];
                out.bits[chunk * static_cast<size_t>(words) + static_cast<size_t>(bit / 64)] |= uint64_t{1} << (bit % 64);
                ++active;
            }
        out.eta.push_back(eta);
        out.n_active.push_back(active);
        out.top_c.insert(out.top_c.end(), topc.begin(), topc.end());
        out.top_i.insert(out.top_i.end(), topi.begin(), topi.end());
    }
    return out;
}

void test_moe_compact_contributions() {
    TempDir dir;
    const int L = 2, V = 9, n = 3, T = 9;
    const int64_t E = 16;
    for (const MoeShape& shape : compact_shapes()) {
        const MoeLayout lay = shape.layout();
        const std::string path = dir.file("moe-" + std::to_string(lay.width()) + ".gguf");
        const MoeDownWeights weights = write_moe_down_gguf(path, lay, L, E, V, 17);
        GgufFile file(path);
        auto cw = std::make_shared<const ContributionWeights>(file, L, lay.width(), E, V, &lay);
        // Small budgets: evictions and several passes, cache hits that need more experts.
        const int64_t per_token = int64_t{L} * lay.width() * 4;
        for (const int k : {4, 12, 64}) {  // 64: the k-th value near 0, among many tied zeros
            ContributionParams p;
            p.chunk = 2;
            p.top_per_layer = k;
            p.eta_rank = 5;
            p.keep_top = true;
            p.n_threads = 2;
            p.cache_bytes = 3 * per_token;
            p.queue_bytes = 4 * per_token;
            const std::string tag = shape.name() + ", top " + std::to_string(k);
            ContributionReducer a(cw, p), b(cw, p);
            auto id = [](int s, int t) { return (s * 2 + t * 5) % V; };
            FedRows fed;
            run_both(shape, n, L, T, {&a}, {&b}, id, 23, &fed);
            for (int s = 0; s < n; ++s) {
                const NadResult x = snapshot(a, s), y = snapshot(b, s);
                const std::string ts = tag + ", sample " + std::to_string(s);
                const NadResult want = moe_reference(fed[static_cast<size_t>(s)], lay, weights, L, E, s == n - 1 ? T - 1 : T,
                                                     [&](int t) { return id(s, t); }, p);
                CHECK_MSG(x.bits == want.bits && x.eta == want.eta && x.n_active == want.n_active, ts + ": sets, eta, counts vs brute force");
                CHECK_MSG(x.top_c == want.top_c && x.top_i == want.top_i, ts + ": top values and neurons vs brute force");
                CHECK_MSG(x.bits == y.bits, ts + ": activated sets");
                CHECK_MSG(x.eta == y.eta && x.n_active == y.n_active, ts + ": eta and counts");
                CHECK_MSG(x.top_c == y.top_c && x.top_i == y.top_i, ts + ": top values and their neurons");
                int32_t any = 0;
                for (int32_t c : x.n_active) any += c;
                CHECK_MSG(any > 0, ts + ": nothing activated");
            }
            CHECK_MSG(a.cache_hits() == b.cache_hits() && a.cache_misses() == b.cache_misses() &&
                          a.expert_projections() == b.expert_projections() &&
                          a.expert_projections_cached() == b.expert_projections_cached(),
                      tag + ": the cache's work");
            CHECK_MSG(a.cache_hits() > 0 && a.expert_projections_cached() > 0, tag + ": cache hits needing more experts");
            // A top k beyond the computed neurons holds idle ones at -inf, lowest index first.
            if (k > lay.n_used * lay.n_ff_exp + lay.n_ff_shexp) {
                const NadResult x = snapshot(a, 0);
                CHECK_MSG(!x.top_c.empty() && x.top_c[static_cast<size_t>(k - 1)] == -INFINITY, tag + ": -inf fill");
            }
        }
    }
}

// One pass that projects more than 64 ids through one expert (kMaxBatch, the chunk in which an
// expert's W_down was dequantized again) and passes of 5 tokens give the same bits, equal to the
// brute-force reference; the pass's new ids find their experts in the pool, not a full-width row.
void test_moe_contributions_one_wide_pass() {
    TempDir dir;
    const int L = 2, n = 8, T = 16, V = n * T + 3;
    const int64_t E = 16;
    const MoeShape shape{3, 2, 32, 16};  // two of three experts a token: ~85 of 128 ids an expert
    const MoeLayout lay = shape.layout();
    const std::string path = dir.file("moe-wide.gguf");
    const MoeDownWeights weights = write_moe_down_gguf(path, lay, L, E, V, 29);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, lay.width(), E, V, &lay);
    ContributionParams p;
    p.chunk = 4;
    p.top_per_layer = 6;
    p.eta_rank = 7;
    p.keep_top = true;
    p.n_threads = 2;
    p.cache_bytes = p.queue_bytes = int64_t{1} << 30;  // everything in one pass at the end
    ContributionParams q = p;
    q.pass_tokens = 5;
    q.queue_bytes = 0;  // a pass every step, of at most 5 tokens
    ContributionReducer wide(cw, p), small(cw, q);
    auto id = [](int s, int t) { return s * T + t; };  // all distinct: every id new
    FedRows fed;
    run_both(shape, n, L, T, {&wide}, {&small}, id, 31, &fed);
    CHECK_MSG(wide.cache_misses() == n * T - 1 && small.cache_misses() == n * T - 1, "every id new");
    for (int s = 0; s < n; ++s) {
        const NadResult x = snapshot(wide, s), y = snapshot(small, s);
        const NadResult want = moe_reference(fed[static_cast<size_t>(s)], lay, weights, L, E, s == n - 1 ? T - 1 : T,
                                             [&](int t) { return id(s, t); }, p);
        const std::string ts = "sample " + std::to_string(s);
        CHECK_MSG(x.bits == want.bits && x.eta == want.eta && x.n_active == want.n_active, ts + ": one pass vs brute force");
        CHECK_MSG(x.top_c == want.top_c && x.top_i == want.top_i, ts + ": one pass's top values vs brute force");
        CHECK_MSG(y.top_c == x.top_c && y.top_i == x.top_i && y.bits == x.bits && y.eta == x.eta, ts + ": passes of 5 tokens");
    }
}

}  // namespace

std::vector<TestCase> moe_tests() {
    return {
        {"moe", "moe_tap_route_and_scatter", test_moe_tap_route_and_scatter, false},
        {"moe", "moe_tap_bad_routes", test_moe_tap_bad_routes, false},
        {"moe", "moe_tap_last_row_only", test_moe_tap_last_row_only, false},
        {"moe", "moe_scatter_chunks", test_moe_scatter_chunks, false},
        {"moe", "moe_compact_counts_sets_routes", test_moe_compact_counts_sets_routes, false},
        {"moe", "moe_compact_contributions", test_moe_compact_contributions, false},
        {"moe", "moe_contributions_one_wide_pass", test_moe_contributions_one_wide_pass, false},
    };
}
