// Native tests of continuous batching and prompt reuse (ctest group "batcher"); fixtures in common.h.
#include "runtime/batcher.h"
#include "tests/common.h"

namespace {

struct Spec {
    std::string question;
    SampleParams sp;
    bool rows;  // record every activation row
};

struct Result {
    std::vector<std::vector<llama_token>> tokens;
    std::vector<std::string> finish;
    std::vector<std::vector<float>> rows;
    int n_reused = 0;
};

Result read(const DecodeLoop& loop, const MlpPostReducer* rows) {
    Result r;
    for (int s = 0; s < loop.n(); ++s) {
        r.tokens.push_back(loop.sample(s).tokens);
        r.finish.push_back(loop.sample(s).finish_reason());
        if (rows) r.rows.push_back(rows->rows_f32(s));
    }
    r.n_reused = loop.n_reused();
    return r;
}

std::vector<Spec> specs(const Model& model) {
    (void)model;
    std::vector<Spec> out;
    SampleParams a = sample_params(2, 14, 11);
    a.ignore_eos = true;  // live after the first steps, when the others join
    out.push_back({"Tell me a short story about a dragon.", a, true});
    SampleParams b = sample_params(3, 10, 22);
    b.tap = false;
    b.stop = {"."};
    out.push_back({"What is the capital of France? Answer briefly.", b, false});
    SampleParams c = sample_params(1, 18, 33);
    c.temperature = 0.0f;
    c.top_logprobs = 3;
    out.push_back({"Name three colors.", c, true});
    return out;
}

// Runs made alone (each in a context of its own, slots 0..n-1) and the same runs joining one
// batcher at different steps, on interleaved slots: the same tokens, finish reasons and rows.
void test_batched_equals_alone() {
    auto model = shared_model();
    const std::vector<Spec> sp = specs(*model);
    std::vector<Result> alone;
    for (const Spec& s : sp) {
        TappedContext tc(model, parallel_context(8));
        MlpPostReducer rows(false);
        std::vector<Reducer*> reds;
        if (s.rows && s.sp.tap) reds.push_back(&rows);
        DecodeLoop loop(tc, chat_prompt(*model, s.question), s.sp, reds);
        loop.advance(s.sp.max_tokens, nullptr);
        alone.push_back(read(loop, reds.empty() ? nullptr : &rows));
    }

    TappedContext tc(model, parallel_context(8));
    Batcher batcher(tc);
    // Interleaved slots: the batch's rows are sorted by sequence across runs.
    const std::vector<std::vector<int>> slots = {{0, 5}, {1, 2, 6}, {3}};
    std::vector<std::unique_ptr<MlpPostReducer>> rows;
    std::vector<std::unique_ptr<DecodeLoop>> loops;
    for (size_t i = 0; i < sp.size(); ++i) {
        SampleParams p = sp[i].sp;
        p.seqs = slots[i];
        rows.push_back(std::make_unique<MlpPostReducer>(false));
        std::vector<Reducer*> reds;
        if (sp[i].rows && p.tap) reds.push_back(rows.back().get());
        loops.push_back(std::make_unique<DecodeLoop>(tc, chat_prompt(*model, sp[i].question), p, reds));
    }
    batcher.add(loops[0].get(), 1 << 20);
    Progress progress;
    CHECK(batcher.run(3, &progress).empty());  // three shared steps of the first run alone
    CHECK(loops[0]->sample(0).tokens.size() == 4);
    batcher.add(loops[1].get(), 5);  // joins after 3 steps, stops at 5 tokens for its owner
    batcher.add(loops[2].get(), 1 << 20);
    EXPECT_THROW(ParamError, batcher.add(loops[2].get(), 1), "a run added twice");
    int rounds = 0;
    std::vector<bool> done(sp.size(), false);
    while (batcher.size() > 0 && rounds++ < 200) {
        for (DecodeLoop* l : batcher.run(1000, &progress)) {
            CHECK_MSG(l->failed().empty(), l->failed());
            if (l == loops[1].get() && l->n_live() > 0 && l->pending(1 << 20) > 0) {
                batcher.set_until(l, 1 << 20);  // its owner lets it go on
                continue;
            }
            batcher.remove(l);
        }
    }
    CHECK(batcher.size() == 0);
    CHECK(batcher.steps() > 0 && batcher.rows() > batcher.steps());
    for (size_t i = 0; i < sp.size(); ++i) {
        const std::string tag = "run " + std::to_string(i);
        const Result got = read(*loops[i], sp[i].rows && sp[i].sp.tap ? rows[i].get() : nullptr);
        CHECK_MSG(got.tokens == alone[i].tokens, tag + ": tokens differ from the run made alone");
        CHECK_MSG(got.finish == alone[i].finish, tag + ": finish reasons differ");
        CHECK_MSG(got.rows.size() == alone[i].rows.size(), tag);
        for (size_t s = 0; s < got.rows.size() && s < alone[i].rows.size(); ++s)
            CHECK_MSG(got.rows[s] == alone[i].rows[s], tag + " sample " + std::to_string(s) + ": rows differ");
        for (int s = 0; s < loops[i]->n(); ++s) CHECK(!loops[i]->sample(s).live);
    }
    // A slot held by a member is refused to another.
    SampleParams p = sample_params(1, 4, 1);
    p.seqs = {4};
    DecodeLoop x(tc, chat_prompt(*model, "Hi"), p, {}), y(tc, chat_prompt(*model, "Hi"), p, {});
    batcher.add(&x, 4);
    EXPECT_THROW(ParamError, batcher.add(&y, 4), "a slot held by another run");
    SampleParams bad = sample_params(2, 4, 1);
    bad.seqs = {3, 3};
    EXPECT_THROW(ParamError, DecodeLoop(tc, chat_prompt(*model, "Hi"), bad, {}), "slots not increasing");
    bad.seqs = {7, 8};
    EXPECT_THROW(ParamError, DecodeLoop(tc, chat_prompt(*model, "Hi"), bad, {}), "a slot beyond the context");
}

// A prompt that begins with what a slot holds reuses those cells: the same tokens as decoding it
// whole, and the reused count is the common prefix.
void test_prompt_reuse() {
    auto model = shared_model();
    ContextParams cp = small_context();
    cp.n_ctx = 1024;
    cp.n_batch = 64;  // prompt chunks of 64 tokens: the unit of reuse
    cp.flash_attn = false;  // whole chunks (with flash attention on the CPU, finer: tests/test_prompt_reuse.py)
    TappedContext tc(model, cp);
    const int C = tc.params().n_batch;
    CHECK(C == 64);
    CHECK(!tc.reuse_by_token());
    std::string question;
    for (int i = 0; i < 4; ++i)
        question += "Tell me a short story about a dragon who lived in a cave by the sea, guarding a treasure of "
                    "old books, and about the girl who came to read them one stormy winter night. ";
    const std::vector<llama_token> p1 = chat_prompt(*model, question);
    const int np1 = static_cast<int>(p1.size());
    CHECK_MSG(np1 > 2 * C + 1, std::to_string(np1));
    SampleParams sp = sample_params(1, 12, 5);
    sp.seed_per_sample = false;
    DecodeLoop first(tc, p1, sp, {});
    first.advance(12, nullptr);
    CHECK(first.n_reused() == 0);
    // The cells hold the prompt and every generated token but the last (never decoded).
    const auto& held = tc.seq_tokens(0);
    std::vector<llama_token> want = p1;
    const auto& t1 = first.sample(0).tokens;
    want.insert(want.end(), t1.begin(), t1.end() - (first.sample(0).finish_reason() == "eos" ? 0 : 1));
    CHECK(held == want);
    // The next turn: the whole conversation so far, then more. Only the first prompt's whole
    // chunks are reused (its tail and the generated tokens were decoded in other batches).
    std::vector<llama_token> p2 = want;
    const std::vector<llama_token> more = model->tokenize(" And then?", false, true);
    p2.insert(p2.end(), more.begin(), more.end());
    MlpPostReducer r_reuse(false), r_fresh(false);
    DecodeLoop reused(tc, p2, sp, {&r_reuse});
    reused.advance(12, nullptr);
    CHECK_MSG(reused.n_reused() == (np1 - 1) / C * C, std::to_string(reused.n_reused()));
    CHECK(tc.reused_cells() == reused.n_reused());
    // The same prompt again: its whole chunks, never its last token.
    const int np2 = static_cast<int>(p2.size());
    DecodeLoop again(tc, p2, sp, {});
    again.advance(2, nullptr);
    CHECK_MSG(again.n_reused() == (np2 - 1) / C * C, std::to_string(again.n_reused()));
    // Another prompt sharing only the first chunk's tokens reuses that chunk.
    CHECK(np2 > C + 4);
    if (np2 <= C + 4) return;
    std::vector<llama_token> p3(p2.begin(), p2.begin() + C + 3);
    p3.push_back(p2[static_cast<size_t>(C + 3)] == 100 ? 101 : 100);
    p3.insert(p3.end(), p2.begin() + C + 4, p2.end());
    DecodeLoop third(tc, p3, sp, {});
    third.advance(2, nullptr);
    CHECK_MSG(third.n_reused() == C, std::to_string(third.n_reused()));
    // Without reuse (last: a run without reuse frees its cells), the same tokens and rows.
    SampleParams no = sp;
    no.reuse_prompt = PromptReuse::Off;
    DecodeLoop fresh(tc, p2, no, {&r_fresh});
    fresh.advance(12, nullptr);
    CHECK(fresh.n_reused() == 0);
    CHECK_MSG(reused.sample(0).tokens == fresh.sample(0).tokens, "reuse changed the tokens");
    // The rows too: the reused cells are those the prompt's own decode computes.
    CHECK_MSG(r_reuse.rows_f32(0) == r_fresh.rows_f32(0), "reuse changed the tapped rows");
}

// Untapped runs joining at once have their prompts decoded in one llama_decode when llama.cpp's
// split into ubatches keeps every row in the kernels of its prompt decoded alone: the same tokens
// as the runs made alone; joint_breaker names the span that would leave them.
void test_joint_prompts() {
    auto model = shared_model();
    CHECK(!model->info().repackable_weights);  // SmolLM2-135M Q4_1
    const std::vector<std::string> qs = {"Name three colors.", "What is the capital of France? Answer briefly.",
                                         "Count to five.", "Say hi to the dragon who lived in a cave by the sea."};
    const std::vector<std::vector<int>> slots = {{0}, {1}, {2}, {4, 5}};
    auto params = [&](size_t i) {
        SampleParams p = sample_params(static_cast<int>(slots[i].size()), 10, 40 + static_cast<uint32_t>(i));
        p.tap = false;
        return p;
    };
    std::vector<std::vector<std::vector<llama_token>>> alone;
    for (size_t i = 0; i < qs.size(); ++i) {
        TappedContext tc(model, parallel_context(8));
        DecodeLoop loop(tc, chat_prompt(*model, qs[i]), params(i), {});
        loop.advance(10, nullptr);
        std::vector<std::vector<llama_token>> t;
        for (int s = 0; s < loop.n(); ++s) t.push_back(loop.sample(s).tokens);
        alone.push_back(t);
    }
    TappedContext tc(model, parallel_context(8));
    CHECK(tc.joint_prompts());
    Batcher batcher(tc);
    std::vector<std::unique_ptr<DecodeLoop>> loops;
    for (size_t i = 0; i < qs.size(); ++i) {
        SampleParams p = params(i);
        p.seqs = slots[i];
        loops.push_back(std::make_unique<DecodeLoop>(tc, chat_prompt(*model, qs[i]), p, std::vector<Reducer*>{}));
        batcher.add(loops.back().get(), 1 << 20);
    }
    Progress progress;
    for (int rounds = 0; batcher.size() > 0 && rounds < 100; ++rounds)
        for (DecodeLoop* l : batcher.run(1000, &progress)) {
            CHECK_MSG(l->failed().empty(), l->failed());
            batcher.remove(l);
        }
    CHECK_MSG(batcher.joint_prompt_decodes() == 1, std::to_string(batcher.joint_prompt_decodes()));
    for (size_t i = 0; i < qs.size(); ++i)
        for (int s = 0; s < loops[i]->n(); ++s)
            CHECK_MSG(loops[i]->sample(s).tokens == alone[i][static_cast<size_t>(s)],
                      "run " + std::to_string(i) + " sample " + std::to_string(s) + ": tokens differ from alone");

    // The rule, piece by piece (n_batch 512).
    const std::vector<llama_token> t(600, 100);
    auto span = [&](int n, int pos0, llama_seq_id seq) { return PromptSpan{t.data(), n, pos0, seq}; };
    CHECK(tc.joint_breaker({span(20, 0, 0), span(20, 30, 1), span(12, 0, 2)}) == -1);
    // Seqs 0 and 1 take 20 rows each, then seq 1's last row would go alone: a lone row.
    CHECK(tc.joint_breaker({span(20, 0, 0), span(21, 0, 1)}) == 1);
    // Not consecutive: each its own ubatch (20 rows each), which is fine.
    CHECK(tc.joint_breaker({span(20, 0, 0), span(21, 0, 3)}) == -1);
    CHECK(tc.joint_breaker({span(20, 0, 0), span(64, 0, 1)}) == 1);    // the tiled attention kernel alone
    CHECK(tc.joint_breaker({span(20, 0, 0), span(1, 40, 1)}) == 1);    // one row: other kernels alone
    CHECK(tc.joint_breaker({span(20, 0, 0), span(20, 500, 1)}) == 1);  // decode_seq cuts it at 512
    CHECK(tc.joint_breaker({span(20, 0, 1), span(20, 0, 0)}) == 1);    // sequences not increasing
    EXPECT_THROW(ParamError, tc.decode_prompts({span(20, 0, 0), span(21, 0, 1)}), "spans that break the rule");
    // One stream for every sequence: each prompt's attention would see the others' rows.
    ContextParams one = parallel_context(4);
    one.kv_unified = true;
    TappedContext shared(model, one);
    CHECK(!shared.joint_prompts());
}

// A slot's cells saved aside and restored into another slot later (the server's prompt cache):
// the record comes back with them, a prompt that extends them reuses what it would have reused
// in the slot they left, and its tokens are those of a run without reuse; a state the context
// cannot take is refused, leaving the slot empty.
void test_saved_seq() {
    auto model = shared_model();
    TappedContext tc(model, parallel_context(4));
    CHECK(tc.reuse_by_token());
    SampleParams sp = sample_params(1, 8, 7);
    sp.tap = false;
    std::string text;
    // Long enough that reuse keeps most of it (a rest of 64 rows or more is decoded again: tiled class).
    for (int i = 0; i < 9; ++i) text += "A dragon lived in a cave by the sea, guarding a treasure of old books. ";
    const std::vector<llama_token> pa = chat_prompt(*model, text + "Who came to read them?");
    DecodeLoop a(tc, pa, sp, {});
    a.advance(8, nullptr);
    const SavedSeq saved = tc.save_seq(0);
    CHECK(saved.tokens == tc.seq_tokens(0) && !saved.tokens.empty() && saved.bytes() > saved.state.size());
    DecodeLoop b(tc, chat_prompt(*model, "Name three colors."), sp, {});  // slot 0 now holds another prompt
    b.advance(8, nullptr);
    CHECK(tc.seq_tokens(0) != saved.tokens);
    std::vector<llama_token> pa2 = pa;
    const std::vector<llama_token> more = model->tokenize(" And then?", false, true);
    pa2.insert(pa2.end() - 1, more.begin(), more.end());
    const int expect = tc.reusable_prefix(saved, pa2);
    CHECK_MSG(expect > static_cast<int>(pa.size()) / 2, std::to_string(expect));
    tc.restore_seq(2, saved);
    CHECK(tc.seq_tokens(2) == saved.tokens);
    CHECK(tc.reusable_prefix(2, pa2) == expect);
    SampleParams on2 = sp;
    on2.seqs = {2};
    DecodeLoop again(tc, pa2, on2, {});
    again.advance(8, nullptr);
    CHECK(again.n_reused() == expect);
    SampleParams off = sp;
    off.reuse_prompt = PromptReuse::Off;
    TappedContext fresh_tc(model, parallel_context(4));
    DecodeLoop fresh(fresh_tc, pa2, off, {});
    fresh.advance(8, nullptr);
    CHECK_MSG(again.sample(0).tokens == fresh.sample(0).tokens, "restored cells changed the tokens");
    // Refused: a cut state, a record of another length.
    SavedSeq cut = saved;
    cut.state.resize(cut.state.size() / 2);
    EXPECT_THROW(RuntimeError, tc.restore_seq(1, cut), "a cut state");
    CHECK(tc.seq_tokens(1).empty());
    SavedSeq odd = saved;
    odd.made.pop_back();
    EXPECT_THROW(ParamError, tc.restore_seq(1, odd), "a record of another length");
    EXPECT_THROW(ParamError, tc.reusable_prefix(odd, pa2), "a record of another length");
}

}  // namespace

std::vector<TestCase> batcher_tests() {
    return {
        {"batcher", "batched_equals_alone", test_batched_equals_alone, true},
        {"batcher", "prompt_reuse", test_prompt_reuse, true},
        {"batcher", "joint_prompts", test_joint_prompts, true},
        {"batcher", "saved_seq", test_saved_seq, true},
    };
}
