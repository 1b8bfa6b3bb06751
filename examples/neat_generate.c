/* Embedding NEAT's early exit through neurotap's C interface (cpp/capi/neurotap.h): the
 * application owns the llama_model and the llama_context and runs its own decode loop; neurotap
 * taps the FFN neurons, decides at each line start whether the reasoning is done, and records
 * the activated set of the sequence (NAD's). C11 (as llama.h); only neurotap.h and llama.h.
 *
 *   neat_generate_c MODEL.gguf CALIBRATION.json "question" [--max-tokens N] [--threads T]
 *                   [--no-neat] [--prompt-last-apart] [--json]
 *
 * Greedy decoding. The prompt is decoded as neurotap's Python package decodes it (in one batch
 * here, as it fits n_batch, with an output on its last row only), which gives results identical
 * to it. --prompt-last-apart decodes all but the last token, then the last alone with its output
 * (another way applications do it). --json writes the tokens, NEAT's decisions and the activated
 * set as one JSON object (for the tests).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "neurotap.h"

static void quiet_log(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* neurotap's error as a message (it names the call); 1 (the exit status) when rc is not OK. */
static int check(int32_t rc) {
    if (rc == NEUROTAP_OK) return 0;
    fprintf(stderr, "neat_generate_c: %s (%s)\n", neurotap_last_error(), neurotap_status_name(rc));
    return 1;
}

/* Decodes one batch with neurotap reading its output rows. */
static int decode(struct llama_context *ctx, neurotap_tap *tap, struct llama_batch batch) {
    if (check(neurotap_tap_begin_batch(tap, &batch))) return 1;
    const int32_t rc = llama_decode(ctx, batch);
    if (check(neurotap_tap_end_batch(tap, rc))) return 1;
    if (rc != 0) {
        fprintf(stderr, "neat_generate_c: llama_decode failed (%d)\n", rc);
        return 1;
    }
    return 0;
}

/* Fills batch with tokens[0..n) of sequence 0 from position pos0; outputs on the last row only. */
static void fill(struct llama_batch *batch, const llama_token *tokens, int n, int pos0, int last_output) {
    batch->n_tokens = n;
    for (int i = 0; i < n; ++i) {
        batch->token[i] = tokens[i];
        batch->pos[i] = pos0 + i;
        batch->n_seq_id[i] = 1;
        batch->seq_id[i][0] = 0;
        batch->logits[i] = last_output && i == n - 1;
    }
}

int main(int argc, char **argv) {
    int max_tokens = 256, threads = 2, use_neat = 1, last_apart = 0, json = 0, ok = argc >= 4;
    for (int i = 4; ok && i < argc; ++i) {
        if (strcmp(argv[i], "--no-neat") == 0) use_neat = 0;
        else if (strcmp(argv[i], "--prompt-last-apart") == 0) last_apart = 1;
        else if (strcmp(argv[i], "--json") == 0) json = 1;
        else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) max_tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else ok = 0;
    }
    if (!ok || max_tokens < 1 || threads < 1) {
        fprintf(stderr, "usage: %s MODEL.gguf CALIBRATION.json \"question\" [--max-tokens N] [--threads T] "
                        "[--no-neat] [--prompt-last-apart] [--json]\n", argv[0]);
        return 2;
    }
    if (neurotap_c_api_version() != NEUROTAP_C_API_VERSION) {
        fprintf(stderr, "neat_generate_c: libneurotap speaks C API %d, this program %d\n", neurotap_c_api_version(),
                NEUROTAP_C_API_VERSION);
        return 1;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    int status = 1;
    struct llama_model *model = NULL;
    struct llama_context *ctx = NULL;
    neurotap_tap *tap = NULL;
    llama_token *prompt = NULL, *out = NULL;
    char *chat = NULL;
    struct llama_batch batch = {0};
    int batch_ok = 0;
    /* What the run did, for the summary. */
    int n_out = 0, n_decisions = 0, n_bans = 0, exit_at = -1;
    const char *finish = "length";
    char *events = NULL;
    size_t events_len = 0;

    struct llama_model_params mp = llama_model_default_params();
    neurotap_model_params(&mp); /* as neurotap loads models: identical results */
    model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "neat_generate_c: llama.cpp could not load %s\n", argv[1]);
        goto done;
    }
    /* The application's model, handed to neurotap with the file it came from. */
    if (check(neurotap_tap_new(model, argv[1], &tap))) goto done;
    if (use_neat && check(neurotap_neat_load(tap, argv[2]))) goto done;
    if (check(neurotap_sets_enable(tap, 0.0f))) goto done;

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = cp.n_ubatch = 512;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.no_perf = true;
    if (check(neurotap_tap_context_params(tap, &cp))) goto done;
    ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "neat_generate_c: llama.cpp could not create a context\n");
        goto done;
    }
    if (check(neurotap_tap_bind(tap, ctx))) goto done;

    /* The question in the model's chat template (llama.cpp's built-in renderer). */
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const char *tmpl = llama_model_chat_template(model, NULL);
    if (!tmpl) {
        fprintf(stderr, "neat_generate_c: the model has no chat template\n");
        goto done;
    }
    struct llama_chat_message msg = {"user", argv[3]};
    int32_t cap = (int32_t)(2 * strlen(argv[3]) + 256);
    chat = malloc((size_t)cap);
    int32_t len = chat ? llama_chat_apply_template(tmpl, &msg, 1, true, chat, cap) : -1;
    if (len > cap) {
        char *bigger = realloc(chat, (size_t)len);
        if (!bigger) goto done;
        chat = bigger;
        len = llama_chat_apply_template(tmpl, &msg, 1, true, chat, len);
    }
    if (len < 0) {
        fprintf(stderr, "neat_generate_c: llama.cpp cannot render this chat template\n");
        goto done;
    }
    int32_t np = -llama_tokenize(vocab, chat, len, NULL, 0, false, true);
    prompt = malloc(sizeof(llama_token) * (size_t)(np > 0 ? np : 1));
    if (np < 1 || !prompt || llama_tokenize(vocab, chat, len, prompt, np, false, true) != np) {
        fprintf(stderr, "neat_generate_c: tokenization failed\n");
        goto done;
    }
    if (np + max_tokens > (int32_t)llama_n_ctx(ctx) || np > (int32_t)cp.n_batch) {
        fprintf(stderr, "neat_generate_c: the prompt (%d tokens) plus max_tokens does not fit\n", np);
        goto done;
    }
    out = malloc(sizeof(llama_token) * (size_t)max_tokens);
    batch = llama_batch_init((int32_t)cp.n_batch, 0, 1);
    batch_ok = 1;
    if (!out) goto done;

    /* The prompt: its last row predicts the first token. */
    int out_row;
    if (!last_apart) {
        fill(&batch, prompt, np, 0, 1);
        out_row = np - 1;
    } else {
        if (np > 1) {
            fill(&batch, prompt, np - 1, 0, 0);
            if (decode(ctx, tap, batch)) goto done;
        }
        fill(&batch, prompt + np - 1, 1, np - 1, 1);
        out_row = 0;
    }
    if (decode(ctx, tap, batch)) goto done;

    for (;;) {
        float *logits = llama_get_logits_ith(ctx, out_row);
        neurotap_neat_decision d = {NEUROTAP_NEAT_CONTINUE, 0, -1, 0.0f, 0.0f};
        if (use_neat && check(neurotap_neat_decide(tap, 0, logits, &d))) goto done;
        if (d.decided) {
            char ev[128];
            int m = snprintf(ev, sizeof ev, "%s[%d, %d, %.9g, %.9g]", n_decisions ? ", " : "", n_out, d.action,
                             d.similarity, d.magnitude);
            char *grown = realloc(events, events_len + (size_t)m + 1);
            if (!grown) goto done;
            events = grown;
            memcpy(events + events_len, ev, (size_t)m + 1);
            events_len += (size_t)m;
            ++n_decisions;
            n_bans += d.action == NEUROTAP_NEAT_BAN;
            if (d.action == NEUROTAP_NEAT_EXIT) exit_at = n_out;
        }
        llama_token tok = d.token;
        if (tok < 0) { /* greedy: the first largest logit, as llama.cpp's greedy sampler */
            const int32_t V = llama_vocab_n_tokens(vocab);
            tok = 0;
            for (int32_t v = 1; v < V; ++v)
                if (logits[v] > logits[tok]) tok = v;
        }
        if (check(neurotap_tap_accept(tap, 0, tok))) goto done;
        if (llama_vocab_is_eog(vocab, tok)) {
            finish = d.token >= 0 ? "neat_exit" : "eos";
            break;
        }
        out[n_out++] = tok;
        if (n_out == max_tokens) break;
        fill(&batch, &tok, 1, np + n_out - 1, 1);
        out_row = 0;
        if (decode(ctx, tap, batch)) goto done;
    }

    int64_t n_words = 0, set_count = 0;
    if (check(neurotap_sets_n_words(tap, &n_words)) ||
        check(neurotap_sets_count(tap, 0, &set_count)))
        goto done;
    if (json) {
        uint64_t *words = malloc(sizeof(uint64_t) * (size_t)n_words);
        if (!words) goto done;
        if (check(neurotap_sets_copy(tap, 0, words, n_words))) {
            free(words);
            goto done;
        }
        printf("{\"tokens\": [");
        for (int i = 0; i < n_out; ++i) printf("%s%d", i ? ", " : "", out[i]);
        printf("], \"finish\": \"%s\", \"exit_at\": %d, \"events\": [%s], \"set_count\": %lld, \"set_words\": \"",
               finish, exit_at, events ? events : "", (long long)set_count);
        for (int64_t k = 0; k < n_words; ++k) printf("%016llx", (unsigned long long)words[k]);
        printf("\"}\n");
        free(words);
    } else {
        for (int i = 0; i < n_out; ++i) {
            char piece[256];
            const int32_t m = llama_token_to_piece(vocab, out[i], piece, sizeof piece, 0, false);
            if (m > 0) fwrite(piece, 1, (size_t)m, stdout);
        }
        printf("\n[%d tokens | finish: %s | NEAT: %d decisions, %d bans, exit at %d | activated set: %lld neurons]\n",
               n_out, finish, n_decisions, n_bans, exit_at, (long long)set_count);
    }
    status = 0;

done:
    if (batch_ok) llama_batch_free(batch);
    if (ctx) llama_free(ctx); /* before the tap: the context calls it */
    neurotap_tap_free(tap);
    if (model) llama_model_free(model);
    free(events);
    free(out);
    free(prompt);
    free(chat);
    llama_backend_free();
    return status;
}
