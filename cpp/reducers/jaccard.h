// Jaccard similarity of activated-neuron sets (NAD's selection).
#pragma once
#include <cstdint>
#include <vector>

namespace neurotap {

// Jaccard similarity |A & B| / |A | B| of n bitsets of `words` 64-bit words each (row-major);
// two empty sets count as identical (1). Returns n x n, row-major.
std::vector<double> jaccard_matrix(const uint64_t* sets, int n, int64_t words);
int64_t popcount(const uint64_t* set, int64_t words);

}  // namespace neurotap
