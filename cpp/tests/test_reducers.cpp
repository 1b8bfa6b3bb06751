// Native tests of one component (ctest group "reducers"); fixtures in common.h.
#include "tests/common.h"

namespace {

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
    MlpPostReducer full32(false), full16(true);
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

}  // namespace

std::vector<TestCase> reducers_tests() {
    return {
        {"reducers", "reducers_synthetic", test_reducers_synthetic, false},
        {"reducers", "set_records", test_set_records, false},
    };
}
