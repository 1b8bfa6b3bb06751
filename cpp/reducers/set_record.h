// Compact records of neuron sets per chunk of tokens (NAD's activated sets, the active sets).
//
// A dense bitset over every neuron costs n_layers * n_ff / 8 bytes a chunk (57 KB at an 8B shape),
// while a 32-token chunk of NAD's sets holds about 10,000 of the 458,752 neurons there, most of
// them already in earlier chunks of the same sample. So chunk c is kept as two sorted lists,
// with U the union of chunks 0 .. c-1:
//   fresh: its neurons outside U, as ranks among the neurons outside U (universe n_bits - |U|);
//   seen:  its neurons in U, as ranks in U (universe |U|);
// each stored as the smaller of a bitmap of its universe and Rice-coded gaps. Both bitmaps
// together are n_bits bits, so a chunk never takes more than its dense bitset plus 3 bytes.
// The union of the first k chunks (what NAD compares) needs only the fresh lists; a chunk's own
// set needs the union before it, so chunks decode in order.
//
// Byte layout of chunk c, data[offsets[c] .. offsets[c + 1]): the fresh list, then the seen list.
// A list of n > 0 values (n: fresh[c], and counts[c] - fresh[c]) is one byte `kind`, then:
//   kind 0: a bitmap of its universe u, ceil(u / 8) bytes: value v is bit v % 8 of byte v / 8;
//   kind 1 + b (b < 32): the gaps g = v_i - v_(i-1) - 1 (v_(-1) = -1) in order, each as g >> b
//           in unary (that many 0 bits, then a 1 bit) then the low b bits of g (least significant
//           first); bits fill each byte from its least significant bit; the last byte is 0-padded.
// An empty list takes no bytes. Plain C++, no Python.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace neurotap {

// One sample's chunk sets over keys 0 .. n_bits-1 (key = layer * n_ff + neuron).
struct SetRecord {
    int64_t n_bits = 0;
    std::vector<uint8_t> data;
    std::vector<int64_t> offsets{0};  // [chunks + 1]: chunk c's bytes
    std::vector<int32_t> counts;      // [chunks]: keys in chunk c
    std::vector<int32_t> fresh;       // [chunks]: of which in no earlier chunk

    int64_t n_chunks() const { return static_cast<int64_t>(counts.size()); }
    int64_t n_words() const { return (n_bits + 63) / 64; }
    size_t bytes() const;  // everything the record holds
    // Keys in the union of the first `chunks` chunks (they are disjoint in `fresh`).
    int64_t union_size(int64_t chunks) const;
    // ParamError unless the arrays agree with each other (records built outside the encoder).
    void validate() const;
    // Appends a chunk with no keys.
    void append_empty();
    void truncate(int64_t chunks);
    bool operator==(const SetRecord& o) const;
};

// Appends chunks to a record, given as dense bitsets; keeps the union of the chunks so far.
class SetEncoder {
public:
    explicit SetEncoder(int64_t n_bits = 0);
    int64_t n_bits() const { return n_bits_; }
    int64_t n_words() const { return static_cast<int64_t>(seen_.size()); }
    // The set of `words` (n_words words; bits from n_bits on must be 0) as the next chunk of `rec`.
    void append(const uint64_t* words, SetRecord& rec);
    // The same, leaving the union as it was: a snapshot of a chunk still growing.
    void append_open(const uint64_t* words, SetRecord& rec) const;
    // Continues a record made by an encoder of the same n_bits (its union rebuilt from it).
    void resume(const SetRecord& rec);
    size_t memory_bytes() const;

private:
    int64_t n_bits_, n_seen_ = 0;
    std::vector<uint64_t> seen_;
    std::vector<uint32_t> fresh_, ranks_;  // scratch
};

// Reads a record's chunks in order. The record must outlive the decoder; validate() it first
// if it did not come from an encoder (decoding also throws ParamError on malformed bytes).
class SetDecoder {
public:
    explicit SetDecoder(const SetRecord& rec);
    int64_t position() const { return next_; }  // the chunk the next call reads
    // The next chunk's keys, ascending.
    void next(std::vector<uint32_t>& keys);
    // The next chunk's keys OR-ed into `words` (n_words words).
    void next_or(uint64_t* words);
    // Steps over the next chunk, reading only what the union needs.
    void skip();
    // The union of the chunks read or skipped so far, as n_words words.
    const std::vector<uint64_t>& seen() const { return seen_; }
    int64_t n_seen() const { return n_seen_; }

private:
    void read(bool with_seen);
    const SetRecord& rec_;
    int64_t next_ = 0, n_seen_ = 0;
    std::vector<uint64_t> seen_;
    std::vector<uint32_t> fresh_, old_;  // the chunk's keys outside / inside the union before it
    std::vector<uint32_t> ranks_;        // scratch
};

// Chunk records of several samples, filled chunk by chunk the way the reducers record: each
// sample writes into a working bitset of its current chunk, encoded when a later chunk opens.
class SetRecorder {
public:
    void begin(int n_samples, int64_t n_bits);
    int64_t n_words() const { return (n_bits_ + 63) / 64; }
    // The working bitset of chunk `c` of `sample`: chunks before it are encoded first (chunks
    // never go back). RuntimeError after finish().
    uint64_t* chunk(int sample, int64_t c);
    // The record with exactly `n_chunks` chunks: the encoded ones (cut), the working one,
    // empty ones after (chunks not reached yet).
    SetRecord snapshot(int sample, int64_t n_chunks) const;
    // The sample ends with `n_chunks` chunks: the working chunk is encoded, the bitsets freed.
    void finish(int sample, int64_t n_chunks);
    // Chunks opened so far (encoded ones and the working one once written to), dense, for tests.
    std::vector<uint64_t> dense(int sample) const;
    size_t memory_bytes() const;

private:
    struct Sample {
        SetRecord rec;
        SetEncoder enc;
        std::vector<uint64_t> cur;  // the working chunk
        int64_t cur_chunk = 0;
        bool opened = false;  // chunk() was called for cur_chunk
        bool done = false;
    };
    int64_t n_bits_ = 0;
    std::vector<Sample> samples_;
};

}  // namespace neurotap
