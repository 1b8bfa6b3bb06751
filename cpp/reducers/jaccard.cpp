#include "reducers/jaccard.h"

#include "base/errors.h"

namespace neurotap {

int64_t popcount(const uint64_t* set, int64_t words) {
    int64_t c = 0;
    for (int64_t k = 0; k < words; ++k) c += __builtin_popcountll(set[k]);
    return c;
}

std::vector<double> jaccard_matrix(const uint64_t* sets, int n, int64_t words) {
    if (n < 0 || words < 0) throw ParamError("jaccard: negative shape");
    std::vector<double> s(static_cast<size_t>(n) * n, 1.0);
    for (int i = 0; i < n; ++i) {
        const uint64_t* a = sets + static_cast<size_t>(i) * words;
        for (int j = i + 1; j < n; ++j) {
            const uint64_t* b = sets + static_cast<size_t>(j) * words;
            int64_t inter = 0, uni = 0;
            for (int64_t k = 0; k < words; ++k) {
                inter += __builtin_popcountll(a[k] & b[k]);
                uni += __builtin_popcountll(a[k] | b[k]);
            }
            const double v = uni ? double(inter) / double(uni) : 1.0;
            s[static_cast<size_t>(i) * n + j] = s[static_cast<size_t>(j) * n + i] = v;
        }
    }
    return s;
}

}  // namespace neurotap
