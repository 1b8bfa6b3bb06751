// The one interface through which a method steers the decode loop. A method watches the tap like a
// reducer (it is one: it sees the rows and commits, and follows rollbacks) and, per sample, may
// edit the logits or force a token before a token is chosen, and after each committed token may
// roll the sample back, or end it. The loop knows no method by name: a new method implements this
// in its own files and is registered where runs are composed (run.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"
#include "runtime/reducer.h"

namespace neurotap {

// What a method reads of a sample after a commit (valid during the call only).
struct SampleView {
    const std::vector<llama_token>& tokens;  // committed so far, the newest last
    const std::string& text;                 // raw bytes of those tokens
    const std::vector<uint32_t>& piece_end;  // text size after each token
    const std::string& piece;                // the newest token's piece
};

// Before a token is chosen: the sampler draws it, or the method gives it (part of an exit: an
// end-of-generation token among the method's exit tokens ends the sample as the method's exit).
enum class Pick : int { Sample = 0, Forced, Exit };

// After a committed token: go on, roll back to the first `keep` tokens (the loop cuts tokens,
// text, records and KV cells and reseeds the sampler), or end the sample as the method's exit
// with its text cut to `text_size` bytes.
struct Decision {
    enum Kind : int { Go = 0, RollBack, End } kind = Go;
    int keep = 0;
    size_t text_size = 0;
};

class Steering : public Reducer {
public:
    // For messages ("NEAT") and the finish reason of a sample the method ended ("neat_exit").
    virtual const char* name() const = 0;
    virtual const char* exit_reason() const = 0;
    // Whether it may change the tokens (false: it only records): at most one such method per run,
    // and none with teacher-forced tokens.
    virtual bool steers() const = 0;
    // Whether it may roll samples back: every record of the run must then follow rollbacks, and
    // the run cannot be an early-stopped race.
    virtual bool rolls_back() const { return false; }

    // Before token j of sample s is chosen; `logits` (n_vocab) of its position may be edited
    // (bans). Forced / Exit: the token is *token, not the sampler's.
    virtual Pick before_sample(int sample, int j, float* logits, llama_token* token) {
        (void)sample, (void)j, (void)logits, (void)token;
        return Pick::Sample;
    }
    // Token committed to sample s (`mine`: this method gave it). Not called for a token that
    // ended the sample (end of generation, stop string, max_tokens).
    virtual Decision after_commit(int sample, const SampleView& v, bool mine) {
        (void)sample, (void)v, (void)mine;
        return {};
    }
    // The rollback this method asked for is done; `seed` is the sample's new sampler seed.
    virtual void rolled_back(int sample, uint32_t seed) { (void)sample, (void)seed; }
};

}  // namespace neurotap
