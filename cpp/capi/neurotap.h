/* neurotap C interface: NEAT's early exit and NAD's activated sets inside an application that
 * already runs llama.cpp. Pure C (C99; llama.h, which it includes, wants C11), no C++ types;
 * every handle is opaque.
 *
 * llama.cpp takes its eval callback only when a context is created, so the application lets
 * neurotap fill its llama_context_params, then binds the tap to the context it created:
 *
 *   struct llama_model_params mp = llama_model_default_params();
 *   neurotap_model_params(&mp);                             // optional: loads as neurotap does
 *   struct llama_model *model = llama_model_load_from_file("model.gguf", mp);
 *   neurotap_tap *tap;
 *   neurotap_tap_new(model, "model.gguf", &tap);
 *   neurotap_neat_load(tap, "neat-calibration.json");       // NEAT (optional)
 *   neurotap_sets_enable(tap, 0.0f);                        // NAD's activated sets (optional)
 *   struct llama_context_params cp = llama_context_default_params();
 *   neurotap_tap_context_params(tap, &cp);                  // installs (and chains) cb_eval
 *   struct llama_context *ctx = llama_init_from_model(model, cp);
 *   neurotap_tap_bind(tap, ctx);
 *   for each step:
 *       neurotap_tap_begin_batch(tap, &batch);              // the batch about to be decoded
 *       int rc = llama_decode(ctx, batch);
 *       neurotap_tap_end_batch(tap, rc);
 *       for each sequence s with an output row i in the batch:
 *           float *logits = llama_get_logits_ith(ctx, i);
 *           neurotap_neat_decision d;
 *           neurotap_neat_decide(tap, s, logits, &d);       // bans applied to logits in place
 *           llama_token t = d.token >= 0 ? d.token : my_sampler(logits);
 *           neurotap_tap_accept(tap, s, t);                 // every token the sequence gets
 *   llama_free(ctx); neurotap_tap_free(tap);                // the context first: it calls the tap
 *
 * Rows and sequences. neurotap reads the rows of a batch that request output (batch.logits[i]
 * != 0; with batch.logits == NULL, the last row, as llama.cpp does) and gives each to every
 * sequence in batch.seq_id[i] (seq 0 when batch.seq_id is NULL). Rows that request no output are
 * not read (nothing is tapped for them, at no cost; a batch without output rows costs nothing).
 * The rows of the batch must reach llama.cpp's graph in batch order, which holds when the
 * context has one KV stream (kv_unified = true, llama.cpp's default), or each batch holds one
 * sequence, or the rows of different sequences come in increasing sequence order (one row per
 * sequence per step, as a parallel decode step does). Sequence ids must be below the context's
 * n_seq_max.
 *
 * A generated token's row is the output row that predicts it (for the first token, the prompt's
 * last row). Per sequence the cycle is: a decoded output row -> neurotap_neat_decide (optional)
 * -> neurotap_tap_accept(token). neurotap_tap_reset starts a sequence over (a new prompt).
 * For results identical to neurotap's Python package, decode the prompt as it does: in batches
 * that end at multiples of n_batch (positions; n_ubatch = n_batch), only the last token
 * requesting output (a prompt that fits n_batch: one batch).
 *
 * Errors: every function returns NEUROTAP_OK (0) or a negative NEUROTAP_ERR_* code, and
 * neurotap_last_error() then holds a message naming the problem. Nothing aborts on bad input.
 * A handle is used by one thread at a time (the thread that calls llama_decode on its context).
 */
#ifndef NEUROTAP_H
#define NEUROTAP_H

#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(NEUROTAP_BUILD)
#define NEUROTAP_API __declspec(dllexport)
#elif defined(_WIN32)
#define NEUROTAP_API __declspec(dllimport)
#else
#define NEUROTAP_API __attribute__((visibility("default")))
#endif

/* The interface version: bumped on any incompatible change to this header. */
#define NEUROTAP_C_API_VERSION 1

enum neurotap_status {
    NEUROTAP_OK = 0,
    NEUROTAP_ERR_ARGUMENT = -1, /* a NULL handle or pointer, a sequence id out of range, a bad batch */
    NEUROTAP_ERR_FILE = -2,     /* a model or calibration file missing, unreadable or malformed */
    NEUROTAP_ERR_MODEL = -3,    /* a calibration made for another model; an untappable model */
    NEUROTAP_ERR_STATE = -4,    /* a call out of order (not bound, no row decoded for the sequence, ...) */
    NEUROTAP_ERR_RUNTIME = -5,  /* the tap read something it cannot interpret; llama.cpp failed */
    NEUROTAP_ERR_NO_MEMORY = -6
};

enum neurotap_neat_action {
    NEUROTAP_NEAT_CONTINUE = 0, /* go on (also when NEAT made no decision at this position) */
    NEUROTAP_NEAT_BAN = 1,      /* the reflection words are banned for this token */
    NEUROTAP_NEAT_EXIT = 2      /* the reasoning ends: the exit tokens follow */
};

typedef struct neurotap_tap neurotap_tap;

typedef struct neurotap_neat_decision {
    int32_t action;     /* enum neurotap_neat_action */
    int32_t decided;    /* 1 when NEAT looked at this position (a line start), else 0 */
    llama_token token;  /* >= 0: emit this token instead of sampling (an exit token); -1: sample */
    float similarity;   /* cosine of the watched neurons to the calibrated pattern (when decided) */
    float magnitude;    /* their norm over the pattern's norm (when decided) */
} neurotap_neat_decision;

/* NEUROTAP_C_API_VERSION of the library (compare with the header's at run time). */
NEUROTAP_API int32_t neurotap_c_api_version(void);
/* The message of the last failed call on this thread ("" if none); valid until the next failure. */
NEUROTAP_API const char *neurotap_last_error(void);
/* A short name of a status code ("NEUROTAP_ERR_FILE"). */
NEUROTAP_API const char *neurotap_status_name(int32_t status);

/* -- the tap ------------------------------------------------------------------------------- */

/* Adjusts llama_model_params as neurotap loads models: on CPUs where llama.cpp would put weights
 * in its AMX buffers (whose matmul crashes, ggml-org/llama.cpp#20824) it turns off the extra
 * buffer types. Use it for results identical to neurotap's Python package. */
NEUROTAP_API int32_t neurotap_model_params(struct llama_model_params *params);

/* A tap for `model`, a llama_model the application loaded (and frees after the tap) from the
 * GGUF file `model_path`, which neurotap reads to check the model's shape and find the FFN
 * activation tensors. */
NEUROTAP_API int32_t neurotap_tap_new(struct llama_model *model, const char *model_path, neurotap_tap **out);
/* Frees the tap (NULL is fine). Free the context it is bound to first. */
NEUROTAP_API void neurotap_tap_free(neurotap_tap *tap);
/* The neuron grid: a set key is layer * n_ff + neuron. */
NEUROTAP_API int32_t neurotap_tap_shape(const neurotap_tap *tap, int32_t *n_layers, int64_t *n_ff);

/* Installs neurotap's eval callback into `params`, before llama_init_from_model. A callback
 * already there is kept and called as before (neurotap asks for its own tensors besides). */
NEUROTAP_API int32_t neurotap_tap_context_params(neurotap_tap *tap, struct llama_context_params *params);
/* Binds the tap to the context created with those params (once). Resets every sequence. */
NEUROTAP_API int32_t neurotap_tap_bind(neurotap_tap *tap, struct llama_context *ctx);

/* Before llama_decode(ctx, *batch): what the rows of the batch are. The batch must stay
 * unchanged until neurotap_tap_end_batch. */
NEUROTAP_API int32_t neurotap_tap_begin_batch(neurotap_tap *tap, const struct llama_batch *batch);
/* After llama_decode, with what it returned. Checks that every layer's rows were read. When the
 * decode failed after rows were read, the sequences of the batch must be reset. */
NEUROTAP_API int32_t neurotap_tap_end_batch(neurotap_tap *tap, int32_t decode_result);
/* Sequence `seq` got `token` (sampled, or NEAT's). Call it for every token the sequence gets, an
 * end-of-generation token included (its row is then dropped from the sets, the sequence is over). */
NEUROTAP_API int32_t neurotap_tap_accept(neurotap_tap *tap, llama_seq_id seq, llama_token token);
/* Forgets sequence `seq` (its NEAT state and its set): it starts over with a new prompt. */
NEUROTAP_API int32_t neurotap_tap_reset(neurotap_tap *tap, llama_seq_id seq);

/* -- NEAT: neuron-based early exit ------------------------------------------------------------ */

/* Loads a NEAT calibration (the JSON `neurotap neat calibrate` writes) for this model; before
 * neurotap_tap_bind. NEUROTAP_ERR_FILE for a missing or malformed file, NEUROTAP_ERR_MODEL for
 * one made for another architecture or shape (the file's hash, which Python also checks, is not). */
NEUROTAP_API int32_t neurotap_neat_load(neurotap_tap *tap, const char *calibration_path);
/* NEAT's decision for the next token of `seq`, from its last decoded row; once per row. With
 * logits (n_vocab floats of that row) non-NULL, a ban is applied to them in place; with NULL,
 * apply it with neurotap_neat_apply_ban. */
NEUROTAP_API int32_t neurotap_neat_decide(neurotap_tap *tap, llama_seq_id seq, float *logits,
                                          neurotap_neat_decision *out);
/* Sets the banned tokens' logits to -INFINITY (logits: n_vocab floats). */
NEUROTAP_API int32_t neurotap_neat_apply_ban(const neurotap_tap *tap, float *logits);
/* The exit tokens (marker + answer prefix): *n_tokens gets their number; up to `capacity` of them
 * are copied to `tokens` (which may be NULL when capacity is 0). An end-of-generation token
 * among them ends the sequence. */
NEUROTAP_API int32_t neurotap_neat_exit_tokens(const neurotap_tap *tap, llama_token *tokens, int32_t capacity,
                                               int32_t *n_tokens);

/* -- NAD: activated sets ------------------------------------------------------------------------- */

/* Records, per sequence, the set of neurons with activation > threshold on any of its accepted
 * tokens' rows (neurotap's "active_sets" with threshold = active_threshold); before bind. A token
 * adds every output row of the sequence decoded since the previous token (one, in a decode loop). */
NEUROTAP_API int32_t neurotap_sets_enable(neurotap_tap *tap, float threshold);
/* Words of a set: ceil(n_layers * n_ff / 64). */
NEUROTAP_API int32_t neurotap_sets_n_words(const neurotap_tap *tap, int64_t *n_words);
/* Neurons in the set of `seq`. */
NEUROTAP_API int32_t neurotap_sets_count(const neurotap_tap *tap, llama_seq_id seq, int64_t *count);
/* The set of `seq` as a bitset: key k is bit k % 64 of words[k / 64]; n_words must be the
 * value neurotap_sets_n_words gives. */
NEUROTAP_API int32_t neurotap_sets_copy(const neurotap_tap *tap, llama_seq_id seq, uint64_t *words, int64_t n_words);
/* Jaccard similarity |A & B| / |A | B| of two sequences' sets (NAD's similarity; 1 when both are empty). */
NEUROTAP_API int32_t neurotap_sets_jaccard(const neurotap_tap *tap, llama_seq_id a, llama_seq_id b, double *out);

#ifdef __cplusplus
}
#endif

#endif /* NEUROTAP_H */
