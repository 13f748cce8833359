// tests/support/reference.hpp — float64 references and random inputs shared by the tests.
#pragma once

#include <kvc/kvc.hpp>

#include <cmath>
#include <cstddef>
#include <numeric>
#include <random>
#include <vector>

namespace kvc::test {

// Positions first..last (inclusive), and two position lists one after the other.
inline std::vector<kvc::Position> iota_positions(kvc::Position first, kvc::Position last) {
  std::vector<kvc::Position> result(static_cast<std::size_t>(last - first + 1));
  std::iota(result.begin(), result.end(), first);
  return result;
}

inline std::vector<kvc::Position> concat(std::vector<kvc::Position> a,
                                         const std::vector<kvc::Position>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A [heads][tokens][dim] fp32 tensor the tests own.
struct Tensor3 {
  std::size_t heads = 0, tokens = 0, dim = 0;
  std::vector<float> data;

  Tensor3() = default;
  Tensor3(std::size_t h, std::size_t t, std::size_t d)
      : heads(h), tokens(t), dim(d), data(h * t * d) {}

  float& at(std::size_t h, std::size_t t, std::size_t c) {
    return data[(h * tokens + t) * dim + c];
  }
  float at(std::size_t h, std::size_t t, std::size_t c) const {
    return data[(h * tokens + t) * dim + c];
  }
  View<const float, 3> view() const {
    return View<const float, 3>(data.data(), {heads, tokens, dim});
  }
  View<float, 3> mutable_view() { return View<float, 3>(data.data(), {heads, tokens, dim}); }
  // Tokens [first, first + count) of every head, as a strided view into this tensor.
  View<const float, 3> slice(std::size_t first, std::size_t count) const {
    return View<const float, 3>(
        data.data() + first * dim, {heads, count, dim},
        {static_cast<std::ptrdiff_t>(tokens * dim), static_cast<std::ptrdiff_t>(dim), 1});
  }
};

inline Tensor3 random_tensor(std::mt19937& rng, std::size_t h, std::size_t t, std::size_t d,
                             float scale = 1.0F) {
  Tensor3 tensor(h, t, d);
  std::normal_distribution<float> normal(0.0F, scale);
  for (float& x : tensor.data) x = normal(rng);
  return tensor;
}

// Exact (float64) GQA attention of queries on a set of stored tokens of one kv head.
// keys/values: [tokens][dim] row-major; positions ascending; query at `query_position`
// sees tokens with position ≤ it. Returns dim outputs.
inline std::vector<double> reference_attention(const std::vector<float>& query, const float* keys,
                                               const float* values,
                                               const std::vector<Position>& positions,
                                               Position query_position, std::size_t dim) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> scores;
  double max_score = -INFINITY;
  for (std::size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] > query_position) break;
    double s = 0;
    for (std::size_t c = 0; c < dim; ++c) s += double(query[c]) * double(keys[i * dim + c]);
    scores.push_back(s * scale);
    max_score = std::max(max_score, scores.back());
  }
  std::vector<double> out(dim, 0.0);
  double total = 0;
  for (std::size_t i = 0; i < scores.size(); ++i) {
    const double p = std::exp(scores[i] - max_score);
    total += p;
    for (std::size_t c = 0; c < dim; ++c) out[c] += p * double(values[i * dim + c]);
  }
  if (total > 0) {
    for (double& x : out) x /= total;
  }
  return out;
}

// Softmax weights of one query over stored tokens (visible prefix only; others 0).
inline std::vector<double> reference_weights(const std::vector<float>& query, const float* keys,
                                             const std::vector<Position>& positions,
                                             Position query_position, std::size_t dim) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> weights(positions.size(), 0.0);
  double max_score = -INFINITY;
  std::size_t visible = 0;
  for (; visible < positions.size() && positions[visible] <= query_position; ++visible) {
    double s = 0;
    for (std::size_t c = 0; c < dim; ++c) s += double(query[c]) * double(keys[visible * dim + c]);
    weights[visible] = s * scale;
    max_score = std::max(max_score, weights[visible]);
  }
  double total = 0;
  for (std::size_t i = 0; i < visible; ++i)
    total += (weights[i] = std::exp(weights[i] - max_score));
  for (std::size_t i = 0; i < visible; ++i) weights[i] /= total;
  return weights;
}

// Compares kvc's attend output for one layer against the float64 reference computed on the
// cache's own stored (exported) K/V. Returns the largest |error| relative to the output's
// max |value| over all heads and queries.
template <class Cache>
double attend_error(Cache& cache, SequenceId sequence, std::size_t layer, const Tensor3& q,
                    const Tensor3& out) {
  const Geometry& g = cache.geometry();
  const DenseLayer dense = cache.export_dense(sequence, layer);
  const std::size_t seen = cache.tokens_seen(sequence, layer);
  double worst = 0;
  for (std::size_t qh = 0; qh < g.q_heads; ++qh) {
    const std::size_t h = qh / g.group_size();
    for (std::size_t t = 0; t < q.tokens; ++t) {
      std::vector<float> query(g.head_dim);
      for (std::size_t c = 0; c < g.head_dim; ++c) query[c] = q.at(qh, t, c);
      const auto position = static_cast<Position>(seen - q.tokens + t);
      const auto expected = reference_attention(query, dense.keys[h].data(), dense.values[h].data(),
                                                dense.positions[h], position, g.head_dim);
      double magnitude = 1e-30;
      for (double x : expected) magnitude = std::max(magnitude, std::abs(x));
      for (std::size_t c = 0; c < g.head_dim; ++c) {
        worst = std::max(worst, std::abs(double(out.at(qh, t, c)) - expected[c]) / magnitude);
      }
    }
  }
  return worst;
}

}  // namespace kvc::test
