// tests/support/snapkv_reference.hpp — SnapKV's votes and kept set in float64, shared by the
// tests of SnapKV and of the scorers built on its votes (WindowKV).
#pragma once

#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <vector>

namespace kvc::test {

// SnapKV written out from the paper and kvpress, in float64, on a fresh prompt of n tokens
// (positions 0..n-1): the window queries q ([group][W][dim], positions n-W..n-1) attend to
// all keys (causal inside the window); per head the mean over the last w rows, pooling over
// the prefix, the group mean; keep the top budget - w prefix tokens and the w window tokens.
struct ReferenceSnapKV {
  std::size_t window, kernel;
  bool average;

  std::vector<double> scores(const Tensor3& k, const Tensor3& q) const {
    const std::size_t n = k.tokens, dim = k.dim, group = q.heads, rows = q.tokens;
    const std::size_t w = std::min(window, rows);
    const std::size_t prefix = n - w;
    std::vector<Position> positions(n);
    std::iota(positions.begin(), positions.end(), 0);
    std::vector<double> total(prefix, 0.0);
    for (std::size_t a = 0; a < group; ++a) {
      std::vector<double> mean(prefix, 0.0);
      for (std::size_t j = rows - w; j < rows; ++j) {
        std::vector<float> query(dim);
        for (std::size_t c = 0; c < dim; ++c) query[c] = q.at(a, j, c);
        const auto weights = kvc::test::reference_weights(query, k.data.data(), positions,
                                                          static_cast<Position>(n - rows + j), dim);
        for (std::size_t t = 0; t < prefix; ++t) mean[t] += weights[t] / static_cast<double>(w);
      }
      const auto half = static_cast<std::ptrdiff_t>(kernel / 2);
      for (std::size_t t = 0; t < prefix; ++t) {
        double sum = 0, best = -INFINITY;
        for (std::ptrdiff_t j = static_cast<std::ptrdiff_t>(t) - half;
             j <= static_cast<std::ptrdiff_t>(t) + half; ++j) {
          const double x = (j < 0 || j >= static_cast<std::ptrdiff_t>(prefix))
                               ? (average ? 0.0 : -INFINITY)
                               : mean[static_cast<std::size_t>(j)];
          sum += x;
          best = std::max(best, x);
        }
        total[t] += average ? sum / static_cast<double>(kernel) : best;
      }
    }
    for (double& x : total) x /= static_cast<double>(group);
    return total;
  }

  std::vector<Position> kept(const Tensor3& k, const Tensor3& q, std::size_t budget) const {
    const auto s = scores(k, q);
    std::vector<std::size_t> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return s[a] != s[b] ? s[a] > s[b] : a > b; });
    const std::size_t w = k.tokens - s.size();
    std::vector<Position> result;
    for (std::size_t i = 0; i < budget - w; ++i) result.push_back(static_cast<Position>(order[i]));
    for (std::size_t t = s.size(); t < k.tokens; ++t) result.push_back(static_cast<Position>(t));
    std::sort(result.begin(), result.end());
    return result;
  }
};

}  // namespace kvc::test
