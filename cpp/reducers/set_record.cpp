#include "reducers/set_record.h"

#include <algorithm>
#include <limits>
#include <string>

#include "base/errors.h"

namespace neurotap {

namespace {

constexpr int kMaxRice = 31;  // Rice parameters b = 0 .. 31 (kind bytes 1 .. 32)

[[noreturn]] void malformed(const std::string& why) { throw ParamError("malformed chunk set record: " + why); }

inline int popcnt(uint64_t x) { return __builtin_popcountll(x); }
inline uint64_t low_bits(int j) { return j >= 64 ? ~uint64_t{0} : (uint64_t{1} << j) - 1; }

class BitWriter {
public:
    explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
    void put(uint64_t v, int n) {  // n <= 32
        acc_ |= v << n_;
        n_ += n;
        while (n_ >= 8) {
            out_.push_back(static_cast<uint8_t>(acc_));
            acc_ >>= 8;
            n_ -= 8;
        }
    }
    void zeros(uint64_t n) {
        for (; n > 32; n -= 32) put(0, 32);
        put(0, static_cast<int>(n));
    }
    void flush() {
        if (n_ > 0) out_.push_back(static_cast<uint8_t>(acc_));
        acc_ = 0, n_ = 0;
    }

private:
    std::vector<uint8_t>& out_;
    uint64_t acc_ = 0;
    int n_ = 0;
};

class BitReader {
public:
    BitReader(const uint8_t* p, const uint8_t* end) : p_(p), end_(end) {}
    uint64_t unary() {
        uint64_t q = 0;
        for (;;) {
            refill();
            if (n_ == 0) malformed("a Rice code runs past the chunk");
            if (buf_ == 0) {  // every buffered bit is a 0
                q += static_cast<uint64_t>(n_);
                used_ += n_;
                n_ = 0;
                continue;
            }
            const int z = __builtin_ctzll(buf_);  // < n_: the bits above n_ are 0
            q += static_cast<uint64_t>(z);
            drop(z + 1);
            return q;
        }
    }
    uint32_t bits(int b) {  // b <= 31
        if (b == 0) return 0;
        refill();
        if (n_ < b) malformed("a Rice code runs past the chunk");
        const uint32_t v = static_cast<uint32_t>(buf_ & low_bits(b));
        drop(b);
        return v;
    }
    size_t bytes_used() const { return static_cast<size_t>((used_ + 7) / 8); }

private:
    void refill() {
        while (n_ <= 56 && p_ < end_) {
            buf_ |= static_cast<uint64_t>(*p_++) << n_;
            n_ += 8;
        }
    }
    void drop(int k) {
        buf_ = k >= 64 ? 0 : buf_ >> k;
        n_ -= k;
        used_ += k;
    }
    const uint8_t* p_;
    const uint8_t* end_;
    uint64_t buf_ = 0;
    int n_ = 0;
    int64_t used_ = 0;
};

// Appends a list of ascending values below `universe` (layout in set_record.h).
void put_list(const std::vector<uint32_t>& v, int64_t universe, std::vector<uint8_t>& out) {
    const size_t n = v.size();
    if (n == 0) return;
    // Bits of the Rice codes for every b at once: n (1 + b) + sum of g >> b.
    uint64_t high[kMaxRice + 1] = {};
    int64_t prev = -1;
    for (uint32_t x : v) {
        uint64_t g = static_cast<uint64_t>(static_cast<int64_t>(x) - prev - 1);
        prev = x;
        for (int b = 0; g; ++b, g >>= 1) high[b] += g;
    }
    int best = 0;
    uint64_t best_bits = std::numeric_limits<uint64_t>::max();
    for (int b = 0; b <= kMaxRice; ++b) {
        const uint64_t bits = n * static_cast<uint64_t>(1 + b) + high[b];
        if (bits < best_bits) best_bits = bits, best = b;
    }
    const uint64_t bitmap_bytes = static_cast<uint64_t>(universe + 7) / 8;
    if (bitmap_bytes <= (best_bits + 7) / 8) {
        out.push_back(0);
        const size_t at = out.size();
        out.resize(at + bitmap_bytes, 0);
        for (uint32_t x : v) out[at + x / 8] |= static_cast<uint8_t>(1u << (x % 8));
        return;
    }
    out.push_back(static_cast<uint8_t>(1 + best));
    BitWriter w(out);
    prev = -1;
    for (uint32_t x : v) {
        const uint64_t g = static_cast<uint64_t>(static_cast<int64_t>(x) - prev - 1);
        prev = x;
        w.zeros(g >> best);
        w.put(1, 1);
        w.put(g & low_bits(best), best);
    }
    w.flush();
}

// Reads a list of n values below `universe` at p (advanced past it) into out.
void get_list(const uint8_t*& p, const uint8_t* end, int64_t n, int64_t universe, std::vector<uint32_t>& out) {
    out.clear();
    if (n == 0) return;
    if (p >= end) malformed("a list's bytes are missing");
    const int kind = *p++;
    if (kind == 0) {
        const int64_t bytes = (universe + 7) / 8;
        if (end - p < bytes) malformed("a bitmap runs past the chunk");
        for (int64_t k = 0; k < bytes; ++k)
            for (uint32_t byte = p[k]; byte; byte &= byte - 1)
                out.push_back(static_cast<uint32_t>(k * 8 + __builtin_ctz(byte)));
        p += bytes;
        if (static_cast<int64_t>(out.size()) != n || (n && out.back() >= universe))
            malformed("a bitmap does not hold its count of keys");
        return;
    }
    if (kind > kMaxRice + 1) malformed("unknown list kind " + std::to_string(kind));
    const int b = kind - 1;
    BitReader r(p, end);
    out.resize(static_cast<size_t>(n));
    int64_t prev = -1;
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t q = r.unary();
        if (q >= (uint64_t{1} << 32)) malformed("a gap is too long");
        const int64_t g = static_cast<int64_t>((q << b) | r.bits(b));
        prev += g + 1;
        if (prev >= universe) malformed("a key lies outside its universe");
        out[static_cast<size_t>(i)] = static_cast<uint32_t>(prev);
    }
    p += r.bytes_used();
}

// Keys of ascending `ranks` among the set bits of `words` (or of their complement, below n_bits).
void select(const std::vector<uint32_t>& ranks, const std::vector<uint64_t>& words, bool complement,
            int64_t n_bits, std::vector<uint32_t>& out) {
    out.clear();
    size_t i = 0;
    int64_t base = 0;
    const int64_t W = static_cast<int64_t>(words.size());
    for (int64_t w = 0; w < W && i < ranks.size(); ++w) {
        uint64_t x = complement ? ~words[static_cast<size_t>(w)] : words[static_cast<size_t>(w)];
        if (complement && w == W - 1) x &= low_bits(static_cast<int>(n_bits - 64 * w));
        const int cnt = popcnt(x);
        if (ranks[i] >= base + cnt) {
            base += cnt;
            continue;
        }
        for (int64_t idx = base; x && i < ranks.size(); ++idx, x &= x - 1)
            if (ranks[i] == idx) {
                out.push_back(static_cast<uint32_t>(64 * w + __builtin_ctzll(x)));
                ++i;
            }
        base += cnt;
    }
    if (i != ranks.size()) malformed("a rank lies outside its universe");
}

// Appends the set `words` as a chunk of `rec`, against the union `seen` of n_seen keys.
void encode(const uint64_t* words, const std::vector<uint64_t>& seen, int64_t n_seen, SetRecord& rec,
            std::vector<uint32_t>& fresh, std::vector<uint32_t>& ranks) {
    const int64_t W = static_cast<int64_t>(seen.size());
    if (W && (rec.n_bits % 64) && (words[W - 1] & ~low_bits(static_cast<int>(rec.n_bits % 64))))
        throw ParamError("a chunk set holds keys beyond its " + std::to_string(rec.n_bits) + " bits");
    fresh.clear();
    ranks.clear();
    int64_t base = 0;  // keys of the union below word w
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t u = seen[static_cast<size_t>(w)];
        for (uint64_t s = words[w]; s; s &= s - 1) {
            const int j = __builtin_ctzll(s);
            const int64_t below = base + popcnt(u & low_bits(j));  // union keys below this key
            if ((u >> j) & 1) ranks.push_back(static_cast<uint32_t>(below));
            else fresh.push_back(static_cast<uint32_t>(64 * w + j - below));
        }
        base += popcnt(u);
    }
    put_list(fresh, rec.n_bits - n_seen, rec.data);
    put_list(ranks, n_seen, rec.data);
    rec.offsets.push_back(static_cast<int64_t>(rec.data.size()));
    rec.counts.push_back(static_cast<int32_t>(fresh.size() + ranks.size()));
    rec.fresh.push_back(static_cast<int32_t>(fresh.size()));
}

}  // namespace

size_t SetRecord::bytes() const {
    return data.size() + offsets.size() * sizeof(int64_t) + (counts.size() + fresh.size()) * sizeof(int32_t);
}

int64_t SetRecord::union_size(int64_t chunks) const {
    int64_t n = 0;
    for (int64_t c = 0; c < std::min(chunks, n_chunks()); ++c) n += fresh[static_cast<size_t>(c)];
    return n;
}

void SetRecord::validate() const {
    if (n_bits < 0 || n_bits > std::numeric_limits<int32_t>::max()) malformed("n_bits out of range");
    const size_t C = counts.size();
    if (fresh.size() != C || offsets.size() != C + 1) malformed("counts, fresh and offsets disagree in length");
    if (offsets[0] != 0 || offsets[C] != static_cast<int64_t>(data.size())) malformed("offsets do not span the data");
    int64_t seen = 0;
    for (size_t c = 0; c < C; ++c) {
        if (offsets[c + 1] < offsets[c]) malformed("offsets go back");
        if (fresh[c] < 0 || counts[c] < fresh[c] || counts[c] - fresh[c] > seen || seen + fresh[c] > n_bits)
            malformed("chunk " + std::to_string(c) + " holds more keys than there are");
        seen += fresh[c];
    }
}

void SetRecord::append_empty() {
    offsets.push_back(static_cast<int64_t>(data.size()));
    counts.push_back(0);
    fresh.push_back(0);
}

void SetRecord::truncate(int64_t chunks) {
    if (chunks >= n_chunks()) return;
    const size_t k = static_cast<size_t>(std::max<int64_t>(chunks, 0));
    data.resize(static_cast<size_t>(offsets[k]));
    offsets.resize(k + 1);
    counts.resize(k);
    fresh.resize(k);
}

bool SetRecord::operator==(const SetRecord& o) const {
    return n_bits == o.n_bits && data == o.data && offsets == o.offsets && counts == o.counts && fresh == o.fresh;
}

SetEncoder::SetEncoder(int64_t n_bits) : n_bits_(n_bits), seen_(static_cast<size_t>((n_bits + 63) / 64), 0) {
    if (n_bits < 0 || n_bits > std::numeric_limits<int32_t>::max())
        throw ParamError("chunk sets hold 0 .. 2^31 - 1 keys, not " + std::to_string(n_bits));
}

void SetEncoder::append_open(const uint64_t* words, SetRecord& rec) const {
    if (rec.n_bits != n_bits_) throw ParamError("chunk set record and encoder disagree in n_bits");
    std::vector<uint32_t> f, r;
    encode(words, seen_, n_seen_, rec, f, r);
}

void SetEncoder::append(const uint64_t* words, SetRecord& rec) {
    if (rec.n_bits != n_bits_) throw ParamError("chunk set record and encoder disagree in n_bits");
    encode(words, seen_, n_seen_, rec, fresh_, ranks_);
    for (size_t w = 0; w < seen_.size(); ++w) seen_[w] |= words[w];
    n_seen_ += static_cast<int64_t>(fresh_.size());
}

void SetEncoder::resume(const SetRecord& rec) {
    if (rec.n_bits != n_bits_) throw ParamError("chunk set record and encoder disagree in n_bits");
    SetDecoder d(rec);
    while (d.position() < rec.n_chunks()) d.skip();
    seen_ = d.seen();
    n_seen_ = d.n_seen();
}

size_t SetEncoder::memory_bytes() const {
    return (seen_.capacity() * sizeof(uint64_t)) + (fresh_.capacity() + ranks_.capacity()) * sizeof(uint32_t);
}

SetDecoder::SetDecoder(const SetRecord& rec) : rec_(rec), seen_(static_cast<size_t>(rec.n_words()), 0) {}

void SetDecoder::read(bool with_seen) {
    if (next_ >= rec_.n_chunks()) throw ParamError("chunk set record: read past its last chunk");
    const size_t c = static_cast<size_t>(next_);
    const uint8_t* p = rec_.data.data() + rec_.offsets[c];
    const uint8_t* end = rec_.data.data() + rec_.offsets[c + 1];
    get_list(p, end, rec_.fresh[c], rec_.n_bits - n_seen_, ranks_);
    select(ranks_, seen_, true, rec_.n_bits, fresh_);
    if (with_seen) {
        get_list(p, end, rec_.counts[c] - rec_.fresh[c], n_seen_, ranks_);
        if (p != end) malformed("chunk " + std::to_string(c) + " has bytes left over");
        select(ranks_, seen_, false, rec_.n_bits, old_);
    }
    for (uint32_t k : fresh_) seen_[k >> 6] |= uint64_t{1} << (k & 63);
    n_seen_ += static_cast<int64_t>(fresh_.size());
    ++next_;
}

void SetDecoder::next(std::vector<uint32_t>& keys) {
    read(true);
    keys.resize(fresh_.size() + old_.size());
    std::merge(fresh_.begin(), fresh_.end(), old_.begin(), old_.end(), keys.begin());
}

void SetDecoder::next_or(uint64_t* words) {
    read(true);
    for (uint32_t k : fresh_) words[k >> 6] |= uint64_t{1} << (k & 63);
    for (uint32_t k : old_) words[k >> 6] |= uint64_t{1} << (k & 63);
}

void SetDecoder::skip() { read(false); }

void SetRecorder::begin(int n_samples, int64_t n_bits) {
    n_bits_ = n_bits;
    samples_.clear();
    samples_.resize(static_cast<size_t>(n_samples));
    for (Sample& s : samples_) {
        s.rec.n_bits = n_bits;
        s.enc = SetEncoder(n_bits);
        s.cur.assign(static_cast<size_t>(n_words()), 0);
    }
}

uint64_t* SetRecorder::chunk(int sample, int64_t c) {
    Sample& s = samples_[static_cast<size_t>(sample)];
    if (s.done) throw RuntimeError("chunk sets: sample " + std::to_string(sample) + " has ended");
    if (c < s.cur_chunk) throw RuntimeError("chunk sets: chunk " + std::to_string(c) + " was already encoded");
    for (; s.cur_chunk < c; ++s.cur_chunk) {  // the working chunk is complete: encode it, start the next
        s.enc.append(s.cur.data(), s.rec);
        std::fill(s.cur.begin(), s.cur.end(), 0);
        s.opened = false;
    }
    s.opened = true;
    return s.cur.data();
}

SetRecord SetRecorder::snapshot(int sample, int64_t n_chunks) const {
    const Sample& s = samples_[static_cast<size_t>(sample)];
    SetRecord r = s.rec;
    r.truncate(n_chunks);
    if (!s.done && r.n_chunks() < n_chunks) s.enc.append_open(s.cur.data(), r);
    while (r.n_chunks() < n_chunks) r.append_empty();
    return r;
}

void SetRecorder::finish(int sample, int64_t n_chunks) {
    Sample& s = samples_[static_cast<size_t>(sample)];
    if (!s.done) {
        if (s.rec.n_chunks() < n_chunks) s.enc.append(s.cur.data(), s.rec);
        s.done = true;
        s.enc = SetEncoder(0);
        std::vector<uint64_t>().swap(s.cur);
    }
    s.rec.truncate(n_chunks);
    while (s.rec.n_chunks() < n_chunks) s.rec.append_empty();
}

std::vector<uint64_t> SetRecorder::dense(int sample) const {
    const Sample& s = samples_[static_cast<size_t>(sample)];
    const SetRecord r = snapshot(sample, s.rec.n_chunks() + (!s.done && s.opened ? 1 : 0));
    const size_t W = static_cast<size_t>(n_words());
    std::vector<uint64_t> out(static_cast<size_t>(r.n_chunks()) * W, 0);
    SetDecoder d(r);
    for (int64_t c = 0; c < r.n_chunks(); ++c) d.next_or(out.data() + static_cast<size_t>(c) * W);
    return out;
}

size_t SetRecorder::memory_bytes() const {
    size_t b = 0;
    for (const Sample& s : samples_) b += s.rec.bytes() + s.cur.capacity() * sizeof(uint64_t) + s.enc.memory_bytes();
    return b;
}

}  // namespace neurotap
