// bench/synthetic.hpp — synthetic K/V/Q with the structure real attention has, for the
// fidelity benchmark (bench/fidelity.cpp). Deterministic from a seed on every platform
// (splitmix64 + Box–Muller, no <random> distributions, whose output is library-specific).
//
// Every (layer, kv head) gets its own random directions; every query head of a GQA group
// shares its kv head's directions but draws its own noise. All vectors are post-RoPE in
// spirit: the cache sees them as the host would hand them over.
//
// A structure with logit boost b puts amplitude a = sqrt(b·√d) on a unit direction in both
// the key and the query, so that it adds a·a/√d = b to the logit q·k/√d of the matching
// pairs. Noise: keys, values and queries are N(0, 1) per channel, so unrelated pairs have
// logits of about N(0, 1) before the structure's own cross terms.
//
// The knobs (SyntheticOptions), from the attention patterns measured in real LLMs:
//   sinks, sink_logit     the first `sinks` tokens' keys align with a direction every query
//                         carries: each query gives them a boost of sink_logit ("attention
//                         sinks", StreamingLLM). Their values are scaled by
//                         sink_value_scale (real sinks act as a near no-op: small values).
//   local_logit,          a direction u(t) that drifts slowly with the position (a Gaussian
//   local_length          AR(1) process z(t) = ρ z(t−1) + √(1−ρ²) g, ρ = exp(−1/length),
//                         u = z/√d) sits in the key and the query of token t, so query t
//                         gives token i a boost of about local_logit · ρ^|t−i|: attention to
//                         the recent window, decaying over ~local_length tokens.
//   heavy_hitters,        `heavy_hitters` tokens per (layer, kv head), at seeded positions
//   heavy_logit,          in the prompt, each with its own key direction; every query
//   heavy_query_share     carries each heavy direction with probability heavy_query_share,
//                         so these tokens collect attention from many queries (H2O's heavy
//                         hitters).
//   needle_depth,         one token at position round(needle_depth · prompt_tokens) (the
//   needle_logit,         same position in every layer and head, like a fact in a text) has
//   question_tokens       a key direction that only the "question" asks for: the last
//                         `question_tokens` queries of the prompt (the question at the end
//                         of a long-context prompt, inside a query-aware scorer's
//                         observation window) and the final query (token count − 1, the
//                         decode step that answers). Nothing else attends to it, so
//                         position- and accumulation-based scorers tend to lose it.
//                         question_tokens = 0 makes the question a surprise no prompt query
//                         foreshadows.
//   outlier_channels,     `outlier_channels` fixed key channels per (layer, kv head) carry a
//   outlier_scale_min/max large per-channel offset of magnitude 10–20 (× the other
//   outlier_jitter        channels' scale of 1) with random sign, varying per token by
//                         ±outlier_jitter of it (the massive key channels of real models:
//                         mostly a constant bias, which the softmax ignores, but which
//                         dominates key norms and per-token quantization ranges).
//   sharpness_first/last  queries of layer l are scaled by a factor going linearly from
//                         sharpness_first (layer 0) to sharpness_last (last layer): lower
//                         layers attend more broadly, upper layers more sharply (the
//                         "pyramidal information funneling" PyramidKV builds on).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <vector>

namespace kvc::bench {

struct SyntheticOptions {
  std::size_t layers = 4;
  std::size_t q_heads = 8;
  std::size_t kv_heads = 2;
  std::size_t head_dim = 64;
  std::size_t tokens = 4096 + 17;  // every token generated: prompt + decode + question
  std::size_t prompt_tokens = 4096;
  std::uint64_t seed = 1;

  std::size_t sinks = 4;
  double sink_logit = 7.0;
  double sink_value_scale = 0.1;

  double local_logit = 7.0;
  double local_length = 8.0;

  std::size_t heavy_hitters = 8;
  double heavy_logit = 5.0;
  double heavy_query_share = 0.25;

  double needle_depth = 0.37;
  double needle_logit = 12.0;
  std::size_t question_tokens = 8;

  std::size_t outlier_channels = 4;
  double outlier_scale_min = 10.0;
  double outlier_scale_max = 20.0;
  double outlier_jitter = 0.1;

  double sharpness_first = 0.7;
  double sharpness_last = 1.3;
};

// One layer: keys and values [kv_heads][tokens][head_dim], queries [q_heads][tokens][head_dim],
// row-major, plus where the planted structure is.
struct SyntheticLayer {
  std::vector<float> keys, values, queries;
  std::vector<std::vector<std::size_t>> heavy_positions;  // [kv_head] → sorted positions
  std::size_t needle_position = 0;
};

namespace detail {

// splitmix64 stream with Box–Muller normals: the same numbers on every platform.
class Random {
 public:
  explicit Random(std::uint64_t seed) noexcept : state_(seed) {}

  std::uint64_t next() noexcept {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform();  // (0, 1]
    const double u2 = uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return radius * std::cos(2.0 * std::numbers::pi * u2);
  }
  std::vector<double> unit_vector(std::size_t d) {
    std::vector<double> v(d);
    double norm = 0.0;
    for (double& x : v) {
      x = normal();
      norm += x * x;
    }
    for (double& x : v) x /= std::sqrt(norm);
    return v;
  }

 private:
  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) noexcept {
  Random random(a * 0x100000001B3ULL ^ (b + 0x9E3779B97F4A7C15ULL));
  return random.next();
}

}  // namespace detail

// The position of the planted needle (the same in every layer and head).
inline std::size_t needle_position(const SyntheticOptions& o) {
  const auto position =
      static_cast<std::size_t>(std::llround(o.needle_depth * static_cast<double>(o.prompt_tokens)));
  return std::clamp<std::size_t>(position, o.sinks, o.prompt_tokens - 1);
}

// Whether the query of token t asks the question (looks for the needle).
inline bool asks_question(const SyntheticOptions& o, std::size_t t) {
  return t + 1 == o.tokens || (t < o.prompt_tokens && t + o.question_tokens >= o.prompt_tokens);
}

inline SyntheticLayer synthetic_layer(const SyntheticOptions& o, std::size_t layer) {
  const std::size_t d = o.head_dim;
  const std::size_t n = o.tokens;
  const std::size_t group = o.q_heads / o.kv_heads;
  const double root_d = std::sqrt(static_cast<double>(d));
  const auto amplitude = [&](double logit) { return std::sqrt(std::max(logit, 0.0) * root_d); };
  const double sharpness = o.layers < 2
                               ? o.sharpness_first
                               : o.sharpness_first + (o.sharpness_last - o.sharpness_first) *
                                                         static_cast<double>(layer) /
                                                         static_cast<double>(o.layers - 1);
  const double rho = std::exp(-1.0 / std::max(o.local_length, 1e-9));

  SyntheticLayer result;
  result.keys.assign(o.kv_heads * n * d, 0.0F);
  result.values.assign(o.kv_heads * n * d, 0.0F);
  result.queries.assign(o.q_heads * n * d, 0.0F);
  result.heavy_positions.resize(o.kv_heads);
  result.needle_position = needle_position(o);

  for (std::size_t h = 0; h < o.kv_heads; ++h) {
    detail::Random random(detail::mix(detail::mix(o.seed, layer), h));
    const auto sink = random.unit_vector(d);
    const auto needle = random.unit_vector(d);
    std::vector<std::vector<double>> heavy(o.heavy_hitters);
    for (auto& direction : heavy) direction = random.unit_vector(d);
    // Heavy-hitter positions: distinct, after the sinks, before the prompt's end, not the
    // needle.
    auto& positions = result.heavy_positions[h];
    while (positions.size() < o.heavy_hitters && o.prompt_tokens > o.sinks + o.heavy_hitters + 1) {
      const std::size_t p =
          o.sinks + static_cast<std::size_t>(random.uniform() *
                                             static_cast<double>(o.prompt_tokens - o.sinks));
      if (p != result.needle_position &&
          std::find(positions.begin(), positions.end(), p) == positions.end()) {
        positions.push_back(p);
      }
    }
    std::vector<std::size_t> outliers;
    std::vector<double> outlier_offset;
    while (outliers.size() < std::min(o.outlier_channels, d)) {
      const auto c = static_cast<std::size_t>(random.uniform() * static_cast<double>(d));
      if (std::find(outliers.begin(), outliers.end(), c) != outliers.end()) continue;
      outliers.push_back(c);
      const double magnitude =
          o.outlier_scale_min + (o.outlier_scale_max - o.outlier_scale_min) * random.uniform();
      outlier_offset.push_back(random.uniform() < 0.5 ? -magnitude : magnitude);
    }

    // The drifting local direction of every token, u(t) = z(t)/√d.
    std::vector<double> local(n * d);
    std::vector<double> z(d);
    for (double& x : z) x = random.normal();
    const double innovation = std::sqrt(1.0 - rho * rho);
    for (std::size_t t = 0; t < n; ++t) {
      if (t > 0) {
        for (double& x : z) x = rho * x + innovation * random.normal();
      }
      for (std::size_t c = 0; c < d; ++c) local[t * d + c] = z[c] / root_d;
    }

    const double a_sink = amplitude(o.sink_logit);
    const double a_local = amplitude(o.local_logit);
    const double a_heavy = amplitude(o.heavy_logit);
    const double a_needle = amplitude(o.needle_logit);

    for (std::size_t t = 0; t < n; ++t) {
      float* key = result.keys.data() + (h * n + t) * d;
      float* value = result.values.data() + (h * n + t) * d;
      const auto heavy_index = std::find(positions.begin(), positions.end(), t) - positions.begin();
      const double value_scale = t < o.sinks ? o.sink_value_scale : 1.0;
      for (std::size_t c = 0; c < d; ++c) {
        double k = random.normal() + a_local * local[t * d + c];
        if (t < o.sinks) k += a_sink * sink[c];
        if (static_cast<std::size_t>(heavy_index) < positions.size()) {
          k += a_heavy * heavy[static_cast<std::size_t>(heavy_index)][c];
        }
        if (t == result.needle_position) k += a_needle * needle[c];
        key[c] = static_cast<float>(k);
        value[c] = static_cast<float>(value_scale * random.normal());
      }
      for (std::size_t i = 0; i < outliers.size(); ++i) {
        key[outliers[i]] +=
            static_cast<float>(outlier_offset[i] * (1.0 + o.outlier_jitter * random.normal()));
      }
    }

    for (std::size_t g = 0; g < group; ++g) {
      const std::size_t qh = h * group + g;
      for (std::size_t t = 0; t < n; ++t) {
        float* query = result.queries.data() + (qh * n + t) * d;
        std::vector<bool> carries(o.heavy_hitters);
        for (std::size_t j = 0; j < o.heavy_hitters; ++j) {
          carries[j] = random.uniform() < o.heavy_query_share;
        }
        const bool question = asks_question(o, t);
        for (std::size_t c = 0; c < d; ++c) {
          double q = random.normal() + a_sink * sink[c] + a_local * local[t * d + c];
          for (std::size_t j = 0; j < o.heavy_hitters; ++j) {
            if (carries[j]) q += a_heavy * heavy[j][c];
          }
          if (question) q += a_needle * needle[c];
          query[c] = static_cast<float>(sharpness * q);
        }
      }
    }
  }
  return result;
}

}  // namespace kvc::bench
