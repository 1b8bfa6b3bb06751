/* The C interface (cpp/capi/neurotap.h) from C: bad input gives error codes with messages, never
 * a crash; calls out of order are refused; two sequences decoded in one batch get the same rows
 * (NEAT decisions, activated sets) as each decoded in a batch of its own.
 *
 *   neurotap_capi_test [MODEL.gguf [CALIBRATION.json]]   (defaults: $NEUROTAP_TEST_MODEL and
 *   the shipped models/neat-smollm2-135m.json)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "neurotap.h"

#ifndef NEUROTAP_SOURCE_DIR
#define NEUROTAP_SOURCE_DIR "."
#endif

static int failures = 0;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                    \
        }                                                                  \
    } while (0)

/* rc is `want` and the last error mentions `part`. */
static void expect(int32_t rc, int32_t want, const char *part, int line) {
    if (rc != want || !strstr(neurotap_last_error(), part)) {
        fprintf(stderr, "line %d: got %s (%s), wanted %s mentioning '%s'\n", line, neurotap_status_name(rc),
                neurotap_last_error(), neurotap_status_name(want), part);
        ++failures;
    }
}
#define EXPECT(rc, want, part) expect((rc), (want), (part), __LINE__)

static void quiet_log(enum ggml_log_level level, const char *text, void *user_data) {
    (void)level, (void)text, (void)user_data;
}

static const char *write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return NULL;
    fputs(text, f);
    fclose(f);
    return path;
}

static void null_handles(void) {
    neurotap_neat_decision d;
    int64_t n64 = 0;
    int32_t n32 = 0;
    double j = 0;
    uint64_t w = 0;
    float logits[1] = {0};
    struct llama_context_params cp = llama_context_default_params();
    struct llama_batch b = {0};
    neurotap_tap *tap = (neurotap_tap *)1; /* must be overwritten with NULL on failure */
    EXPECT(neurotap_tap_new(NULL, "x.gguf", &tap), NEUROTAP_ERR_ARGUMENT, "model is NULL");
    CHECK(tap == NULL);
    EXPECT(neurotap_tap_new(NULL, "x.gguf", NULL), NEUROTAP_ERR_ARGUMENT, "out is NULL");
    EXPECT(neurotap_tap_shape(NULL, &n32, &n64), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_context_params(NULL, &cp), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_bind(NULL, NULL), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_begin_batch(NULL, &b), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_end_batch(NULL, 0), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_accept(NULL, 0, 0), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_tap_reset(NULL, 0), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_neat_load(NULL, "x.json"), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_neat_decide(NULL, 0, logits, &d), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_neat_apply_ban(NULL, logits), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_neat_exit_tokens(NULL, NULL, 0, &n32), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_sets_enable(NULL, 0.0f), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_sets_n_words(NULL, &n64), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_sets_count(NULL, 0, &n64), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_sets_copy(NULL, 0, &w, 1), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    EXPECT(neurotap_sets_jaccard(NULL, 0, 1, &j), NEUROTAP_ERR_ARGUMENT, "tap is NULL");
    neurotap_tap_free(NULL);
    CHECK(strcmp(neurotap_status_name(NEUROTAP_ERR_FILE), "NEUROTAP_ERR_FILE") == 0);
    CHECK(neurotap_c_api_version() == NEUROTAP_C_API_VERSION);
}

/* One step of n_seq sequences: row s holds tokens[s] of sequence seqs[s]; all rows output. */
static int step(struct llama_context *ctx, neurotap_tap *tap, struct llama_batch *b, const llama_token *tokens,
                const int *pos, const int *seqs, int n) {
    b->n_tokens = n;
    for (int i = 0; i < n; ++i) {
        b->token[i] = tokens[i];
        b->pos[i] = pos[i];
        b->n_seq_id[i] = 1;
        b->seq_id[i][0] = seqs[i];
        b->logits[i] = 1;
    }
    if (neurotap_tap_begin_batch(tap, b) != NEUROTAP_OK) return 1;
    const int32_t rc = llama_decode(ctx, *b);
    return neurotap_tap_end_batch(tap, rc) != NEUROTAP_OK || rc != 0;
}

static llama_token argmax(const float *logits, int32_t V, int rank) {
    llama_token best = 0, second = -1;
    for (llama_token v = 1; v < V; ++v) {
        if (logits[v] > logits[best]) second = best, best = v;
        else if (second < 0 || logits[v] > logits[second]) second = v;
    }
    return rank == 0 ? best : second;
}

/* An application's own eval callback, which neurotap must keep: it asks for a tensor neurotap
 * reads too and one it does not, and must get the data calls of exactly those. */
struct app_cb_state {
    int asked, delivered, unasked;
    const struct ggml_tensor *pending;
};

static int app_wants(const char *name) { return strcmp(name, "ffn_swiglu-3") == 0 || strcmp(name, "attn_norm-2") == 0; }

static bool app_callback(struct ggml_tensor *t, bool ask, void *user_data) {
    struct app_cb_state *st = user_data;
    if (ask) {
        if (!app_wants(ggml_get_name(t))) return false;
        ++st->asked;
        st->pending = t;
        return true;
    }
    if (t != st->pending || !app_wants(ggml_get_name(t))) ++st->unasked;
    else ++st->delivered;
    st->pending = NULL;
    return true;
}

#define STEPS 24
#define MAXEV 64

struct run {
    llama_token tokens[2][STEPS];
    int events[2][MAXEV][2]; /* (token index, action) */
    int n_events[2];
    uint64_t *sets[2];
    int64_t n_words;
    double jaccard;
};

/* Variant 0 answers greedily; variant 1 takes the runner-up at its first token, then greedily.
 * variant < 0: both as sequences 0 and 1 of one context, one batch per step holding both rows
 * (the prompt decoded once for both); else that variant alone as sequence 0. */
static int generate(struct llama_model *model, const char *model_path, const char *cal, int variant,
                    struct run *r) {
    int bad = 1;
    neurotap_tap *tap = NULL;
    struct llama_context *ctx = NULL;
    struct llama_batch b = llama_batch_init(64, 0, 2);
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int32_t V = llama_vocab_n_tokens(vocab);
    const int n_seq = variant < 0 ? 2 : 1;
    llama_token prompt[64];
    const char *text = "<|im_start|>user\nList three fruits, one per line.<|im_end|>\n<|im_start|>assistant\n";
    const int32_t np = llama_tokenize(vocab, text, (int32_t)strlen(text), prompt, 64, false, true);
    int64_t n_words = 0;
    if (np < 2) goto done;
    if (neurotap_tap_new(model, model_path, &tap) || neurotap_neat_load(tap, cal) || neurotap_sets_enable(tap, 0.0f))
        goto done;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = cp.n_ubatch = 64;
    cp.n_seq_max = (uint32_t)n_seq;
    cp.kv_unified = true; /* one stream: the prompt's cells are shared by both sequences */
    struct app_cb_state app = {0, 0, 0, NULL};
    if (variant == 0) { /* the application has a callback of its own: neurotap chains it */
        cp.cb_eval = app_callback;
        cp.cb_eval_user_data = &app;
    }
    cp.n_threads = cp.n_threads_batch = 2;
    cp.no_perf = true;
    if (neurotap_tap_context_params(tap, &cp)) goto done;
    ctx = llama_init_from_model(model, cp);
    if (!ctx || neurotap_tap_bind(tap, ctx)) goto done;
    /* The prompt once, for every sequence: its last row (the only output) goes to each. */
    b.n_tokens = np;
    for (int i = 0; i < np; ++i) {
        b.token[i] = prompt[i];
        b.pos[i] = i;
        b.n_seq_id[i] = n_seq;
        for (int s = 0; s < n_seq; ++s) b.seq_id[i][s] = s;
        b.logits[i] = i == np - 1;
    }
    if (neurotap_tap_begin_batch(tap, &b)) goto done;
    const int32_t rc = llama_decode(ctx, b);
    if (neurotap_tap_end_batch(tap, rc) || rc != 0) goto done;
    int rows[2] = {np - 1, np - 1}; /* each sequence's output row in the last batch */
    for (int j = 0; j < STEPS; ++j) {
        llama_token next[2];
        int pos[2], seqs[2];
        for (int s = 0; s < n_seq; ++s) {
            const int v = variant < 0 ? s : variant;
            float *logits = llama_get_logits_ith(ctx, rows[s]);
            neurotap_neat_decision d;
            if (neurotap_neat_decide(tap, s, logits, &d)) goto done;
            if (d.decided && r->n_events[v] < MAXEV) {
                r->events[v][r->n_events[v]][0] = j;
                r->events[v][r->n_events[v]][1] = d.action;
                ++r->n_events[v];
            }
            next[s] = d.token >= 0 ? d.token : argmax(logits, V, v == 1 && j == 0);
            if (llama_vocab_is_eog(vocab, next[s])) next[s] = argmax(logits, V, 1); /* keep both going */
            if (neurotap_tap_accept(tap, s, next[s])) goto done;
            r->tokens[v][j] = next[s];
            pos[s] = np + j, seqs[s] = s, rows[s] = s;
        }
        if (j < STEPS - 1 && step(ctx, tap, &b, next, pos, seqs, n_seq)) goto done;
    }
    if (neurotap_sets_n_words(tap, &n_words)) goto done;
    for (int s = 0; s < n_seq; ++s) {
        const int v = variant < 0 ? s : variant;
        r->sets[v] = calloc((size_t)n_words, sizeof(uint64_t));
        if (!r->sets[v] || neurotap_sets_copy(tap, s, r->sets[v], n_words)) goto done;
    }
    r->n_words = n_words;
    if (variant == 0) {
        /* Two tensors per decode (the prompt and STEPS - 1 steps), each asked and delivered once. */
        CHECK(app.asked == 2 * STEPS && app.delivered == app.asked && app.unasked == 0);
    }
    if (n_seq == 2) {
        double jac = -1, self = -1;
        if (neurotap_sets_jaccard(tap, 0, 1, &jac) || neurotap_sets_jaccard(tap, 1, 1, &self)) goto done;
        CHECK(self == 1.0);
        CHECK(jac > 0.5 && jac < 1.0); /* different answers, mostly the same neurons */
        r->jaccard = jac;
    }
    bad = 0;
done:
    if (bad) fprintf(stderr, "generate(variant=%d): %s\n", variant, neurotap_last_error());
    llama_batch_free(b);
    if (ctx) llama_free(ctx);
    neurotap_tap_free(tap);
    return bad;
}

/* Errors of a real model and calibration, and calls out of order. */
static void bad_input(struct llama_model *model, const char *model_path, const char *cal, const char *tmp) {
    neurotap_tap *tap = NULL;
    char path[4096];
    EXPECT(neurotap_tap_new(model, "/nonexistent/model.gguf", &tap), NEUROTAP_ERR_FILE, "/nonexistent/model.gguf");
    CHECK(tap == NULL);
    /* A file that is no GGUF model (the calibration). */
    EXPECT(neurotap_tap_new(model, cal, &tap), NEUROTAP_ERR_MODEL, cal);
    CHECK(tap == NULL);
    if (neurotap_tap_new(model, model_path, &tap) != NEUROTAP_OK) {
        fprintf(stderr, "neurotap_tap_new: %s\n", neurotap_last_error());
        ++failures;
        return;
    }
    int32_t n_layers = 0;
    int64_t n_ff = 0;
    CHECK(neurotap_tap_shape(tap, &n_layers, &n_ff) == NEUROTAP_OK && n_layers > 0 && n_ff > 0);
    EXPECT(neurotap_neat_load(tap, "/nonexistent/cal.json"), NEUROTAP_ERR_FILE, "/nonexistent/cal.json");
    snprintf(path, sizeof path, "%s/capi_truncated.json", tmp);
    if (write_file(path, "{\"version\": 1, \"neurons\": [[0, 1]], \"reference\": ["))
        EXPECT(neurotap_neat_load(tap, path), NEUROTAP_ERR_FILE, "capi_truncated.json");
    snprintf(path, sizeof path, "%s/capi_other_model.json", tmp);
    if (write_file(path, "{\"version\": 1, \"neurons\": [[0, 1]], \"reference\": [1.0], \"exit_similarity\": 0.6, "
                         "\"ban_similarity\": 0.4, \"magnitude\": 0.0, \"line_starts_only\": true, \"marker\": \"x\", "
                         "\"ban_words\": [], \"model\": {\"architecture\": \"llama\", \"file\": \"other.gguf\", "
                         "\"n_layers\": 30, \"n_ff\": 999}}"))
        EXPECT(neurotap_neat_load(tap, path), NEUROTAP_ERR_MODEL, "other.gguf");
    int32_t n_exit = 0;
    EXPECT(neurotap_neat_exit_tokens(tap, NULL, 0, &n_exit), NEUROTAP_ERR_STATE, "no NEAT calibration");
    CHECK(neurotap_neat_load(tap, cal) == NEUROTAP_OK);
    CHECK(neurotap_neat_exit_tokens(tap, NULL, 0, &n_exit) == NEUROTAP_OK && n_exit >= 1);
    EXPECT(neurotap_neat_exit_tokens(tap, NULL, 1, &n_exit), NEUROTAP_ERR_ARGUMENT, "tokens is NULL");
    EXPECT(neurotap_sets_enable(tap, strtof("nan", NULL)), NEUROTAP_ERR_ARGUMENT, "NaN");

    /* Out of order. */
    neurotap_neat_decision d;
    struct llama_batch b = llama_batch_init(4, 0, 1);
    EXPECT(neurotap_neat_decide(tap, 0, NULL, &d), NEUROTAP_ERR_STATE, "not bound");
    EXPECT(neurotap_tap_begin_batch(tap, &b), NEUROTAP_ERR_STATE, "not bound");
    EXPECT(neurotap_sets_count(tap, 0, &n_ff), NEUROTAP_ERR_STATE, "not bound");
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = cp.n_ubatch = 4;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context *plain = llama_init_from_model(model, cp); /* without neurotap's callback */
    EXPECT(neurotap_tap_bind(tap, plain), NEUROTAP_ERR_STATE, "neurotap_tap_context_params");
    CHECK(neurotap_tap_context_params(tap, &cp) == NEUROTAP_OK);
    struct llama_context *ctx = llama_init_from_model(model, cp);
    CHECK(ctx != NULL);
    CHECK(neurotap_tap_bind(tap, ctx) == NEUROTAP_OK);
    EXPECT(neurotap_tap_bind(tap, ctx), NEUROTAP_ERR_STATE, "already bound");
    EXPECT(neurotap_sets_enable(tap, 0.0f), NEUROTAP_ERR_STATE, "before neurotap_tap_bind");
    EXPECT(neurotap_neat_decide(tap, 0, NULL, &d), NEUROTAP_ERR_STATE, "no decoded row");
    EXPECT(neurotap_neat_decide(tap, 7, NULL, &d), NEUROTAP_ERR_ARGUMENT, "sequence id 7");
    EXPECT(neurotap_tap_accept(tap, 0, 1), NEUROTAP_ERR_STATE, "no decoded row");
    EXPECT(neurotap_sets_count(tap, 0, &n_ff), NEUROTAP_ERR_STATE, "not recorded");
    b.n_tokens = 0;
    EXPECT(neurotap_tap_begin_batch(tap, &b), NEUROTAP_ERR_ARGUMENT, "empty");
    b.n_tokens = 1;
    b.token[0] = 1, b.pos[0] = 0, b.n_seq_id[0] = 1, b.seq_id[0][0] = 3, b.logits[0] = 1;
    EXPECT(neurotap_tap_begin_batch(tap, &b), NEUROTAP_ERR_ARGUMENT, "sequence id 3");
    b.seq_id[0][0] = 0;
    CHECK(neurotap_tap_begin_batch(tap, &b) == NEUROTAP_OK);
    EXPECT(neurotap_tap_begin_batch(tap, &b), NEUROTAP_ERR_STATE, "already begun");
    /* A batch other than the one begun: its rows do not add up. */
    struct llama_batch other = llama_batch_init(4, 0, 1);
    other.n_tokens = 2;
    for (int i = 0; i < 2; ++i)
        other.token[i] = 1, other.pos[i] = i, other.n_seq_id[i] = 1, other.seq_id[i][0] = 0, other.logits[i] = 1;
    EXPECT(neurotap_tap_end_batch(tap, llama_decode(ctx, other)), NEUROTAP_ERR_RUNTIME, "expected 1");
    EXPECT(neurotap_neat_decide(tap, 0, NULL, &d), NEUROTAP_ERR_STATE, "reset");
    CHECK(neurotap_tap_reset(tap, 0) == NEUROTAP_OK);
    llama_memory_clear(llama_get_memory(ctx), true);
    /* The right way; then a second decision or token for the same row is refused. */
    CHECK(neurotap_tap_begin_batch(tap, &b) == NEUROTAP_OK);
    CHECK(neurotap_tap_end_batch(tap, llama_decode(ctx, b)) == NEUROTAP_OK);
    CHECK(neurotap_neat_decide(tap, 0, NULL, &d) == NEUROTAP_OK && d.token == -1);
    EXPECT(neurotap_neat_decide(tap, 0, NULL, &d), NEUROTAP_ERR_STATE, "decided already");
    EXPECT(neurotap_tap_accept(tap, 0, -5), NEUROTAP_ERR_ARGUMENT, "token id -5");
    CHECK(neurotap_tap_accept(tap, 0, 1) == NEUROTAP_OK);
    EXPECT(neurotap_tap_accept(tap, 0, 1), NEUROTAP_ERR_STATE, "no decoded row");
    llama_batch_free(other);
    llama_batch_free(b);
    llama_free(ctx);
    llama_free(plain);
    neurotap_tap_free(tap);
}

int main(int argc, char **argv) {
    const char *model_path = argc > 1 ? argv[1] : getenv("NEUROTAP_TEST_MODEL");
    const char *cal = argc > 2 ? argv[2] : NEUROTAP_SOURCE_DIR "/models/neat-smollm2-135m.json";
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    null_handles();
    if (!model_path) {
        fprintf(stderr, "capi_test: give MODEL.gguf or set NEUROTAP_TEST_MODEL\n");
        return 2;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    CHECK(neurotap_model_params(&mp) == NEUROTAP_OK);
    EXPECT(neurotap_model_params(NULL), NEUROTAP_ERR_ARGUMENT, "params is NULL");
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "capi_test: cannot load %s\n", model_path);
        return 2;
    }
    bad_input(model, model_path, cal, tmp);

    static struct run both, alone;
    memset(&both, 0, sizeof both);
    memset(&alone, 0, sizeof alone);
    if (generate(model, model_path, cal, -1, &both) || generate(model, model_path, cal, 0, &alone) ||
        generate(model, model_path, cal, 1, &alone)) {
        ++failures;
    } else {
        /* The rows of a two-sequence batch reach each sequence as a batch of its own would. */
        for (int v = 0; v < 2; ++v) {
            CHECK(memcmp(both.tokens[v], alone.tokens[v], sizeof both.tokens[v]) == 0);
            CHECK(both.n_events[v] == alone.n_events[v]);
            CHECK(memcmp(both.events[v], alone.events[v], sizeof both.events[v]) == 0);
            CHECK(memcmp(both.sets[v], alone.sets[v], sizeof(uint64_t) * (size_t)both.n_words) == 0);
        }
        CHECK(memcmp(both.tokens[0], both.tokens[1], sizeof both.tokens[0]) != 0);
        CHECK(both.n_events[0] > 0); /* NEAT decided somewhere: the comparison says something */
        printf("capi: two sequences, %d and %d NEAT decisions, Jaccard %.4f\n", both.n_events[0], both.n_events[1],
               both.jaccard);
    }
    for (int v = 0; v < 2; ++v) free(both.sets[v]), free(alone.sets[v]);
    llama_model_free(model);
    llama_backend_free();
    if (failures) fprintf(stderr, "capi_test: %d failures\n", failures);
    else printf("capi_test: ok\n");
    return failures ? 1 : 0;
}
