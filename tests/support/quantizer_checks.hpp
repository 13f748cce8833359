// tests/support/quantizer_checks.hpp — checks every Quantizer test runs the same way:
// the fused tile kernels on codes against float64 on the decoded rows, and attend end to
// end (with a scorer and a budget) against float64 on the cache's own stored K/V.
#pragma once

#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "reference.hpp"

#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace kvc::test {

// Encodes random rows, decodes them, and checks score_tile / accumulate_tile on the codes
// against float64 on the decoded rows. `offset` shifts the codes off alignment: byte
// formats must not care (default 1); formats storing typed values (Dense) pass 0.
template <class Q>
void check_tile_kernels(const Q& quantizer, std::size_t d, std::size_t tokens, std::size_t rows,
                        unsigned seed, std::size_t offset = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> keys(tokens * d), values(tokens * d), queries(rows * d), p(rows * tokens);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : queries) x = normal(rng);
  for (float& x : p) x = std::abs(normal(rng));
  const std::size_t kb = quantizer.key_bytes(d);
  const std::size_t vb = quantizer.value_bytes(d);
  std::vector<std::byte> key_codes(offset + tokens * kb), value_codes(offset + tokens * vb);
  std::vector<float> decoded_keys(tokens * d), decoded_values(tokens * d);
  for (std::size_t t = 0; t < tokens; ++t) {
    quantizer.encode_key(keys.data() + t * d, d, key_codes.data() + offset + t * kb);
    quantizer.encode_value(values.data() + t * d, d, value_codes.data() + offset + t * vb);
    quantizer.decode_key(key_codes.data() + offset + t * kb, d, decoded_keys.data() + t * d);
    quantizer.decode_value(value_codes.data() + offset + t * vb, d, decoded_values.data() + t * d);
  }
  std::vector<float> scores(rows * (tokens + 3)), scratch(tokens * d), acc(rows * d, 0.5F);
  quantizer.score_tile(kvc::ScoreTile{queries.data(), rows, key_codes.data() + offset, tokens, d,
                                      scores.data(), tokens + 3, scratch.data()});
  quantizer.accumulate_tile(kvc::AccumulateTile{p.data(), rows, tokens, value_codes.data() + offset,
                                                tokens, d, acc.data(), scratch.data()});
  // The kernels widen the same codes to the same fp32 values, so the only difference from
  // float64 is fp32 summation: ≤ d · 2^-24 relative to Σ|terms| (1e-5 leaves margin).
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < tokens; ++j) {
      double expected = 0, magnitude = 0;
      for (std::size_t c = 0; c < d; ++c) {
        expected += double(queries[r * d + c]) * decoded_keys[j * d + c];
        magnitude += std::abs(double(queries[r * d + c]) * decoded_keys[j * d + c]);
      }
      REQUIRE(std::abs(scores[r * (tokens + 3) + j] - expected) <= 1e-5 * magnitude + 1e-6);
    }
    for (std::size_t c = 0; c < d; ++c) {
      double expected = 0.5, magnitude = 0.5;
      for (std::size_t j = 0; j < tokens; ++j) {
        expected += double(p[r * tokens + j]) * decoded_values[j * d + c];
        magnitude += std::abs(double(p[r * tokens + j]) * decoded_values[j * d + c]);
      }
      REQUIRE(std::abs(acc[r * d + c] - expected) <= 1e-5 * magnitude + 1e-6);
    }
  }
}

// attend on the codes vs float64 attention on the cache's own decoded K/V, and the bytes.
template <class Scorer, class Q>
void check_end_to_end(Scorer scorer, kvc::Budget budget, std::size_t expected_tokens) {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  // auto_compress off: attend_error references the stored K/V, which must still be the set
  // attend read; compress() runs after each check.
  kvc::KvCache<Scorer, Q> cache(
      geometry, {.budget = budget, .page_tokens = 16, .auto_compress = false}, scorer);
  std::mt19937 rng(11);
  const auto seq = cache.open_sequence();
  const Tensor3 q = random_tensor(rng, 8, 5, 64);
  Tensor3 out(8, 5, 64);
  cache.append(seq, 0, random_tensor(rng, 2, 293, 64).view(),
               random_tensor(rng, 2, 293, 64).view());
  cache.attend(seq, 0, q.view(), out.mutable_view());
  REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < 1e-4);
  cache.compress(seq);
  Tensor3 step_out(8, 1, 64);
  for (std::size_t step = 0; step < 20; ++step) {
    cache.append(seq, 0, random_tensor(rng, 2, 1, 64).view(), random_tensor(rng, 2, 1, 64).view());
    const Tensor3 step_q = random_tensor(rng, 8, 1, 64);
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    // Exact on the codes: only fp32 rounding separates it from the float64 reference.
    REQUIRE(kvc::test::attend_error(cache, seq, 0, step_q, step_out) < 1e-4);
    cache.compress(seq);
  }
  const auto stats = cache.stats();
  const Q quantizer;
  CHECK(stats.tokens_stored == 2 * expected_tokens);
  CHECK(stats.code_bytes ==
        2 * expected_tokens * (quantizer.key_bytes(64) + quantizer.value_bytes(64)));
}

// f16 and bf16 host rows must encode exactly as their widened fp32 values.
template <class Q>
void check_host_types_encode_as_widened(const Q& quantizer, std::size_t d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> half_widened(d), bf16_widened(d);
  std::vector<Eigen::half> halves(d);
  std::vector<Eigen::bfloat16> bf16s(d);
  for (std::size_t c = 0; c < d; ++c) {
    const float x = normal(rng);
    halves[c] = Eigen::half(x);
    bf16s[c] = Eigen::bfloat16(x);
    half_widened[c] = static_cast<float>(halves[c]);
    bf16_widened[c] = static_cast<float>(bf16s[c]);
  }
  std::vector<std::byte> from_host(quantizer.key_bytes(d)), from_float(quantizer.key_bytes(d));
  quantizer.encode_key(halves.data(), d, from_host.data());
  quantizer.encode_key(half_widened.data(), d, from_float.data());
  CHECK(from_host == from_float);
  quantizer.encode_value(bf16s.data(), d, from_host.data());
  quantizer.encode_value(bf16_widened.data(), d, from_float.data());
  CHECK(from_host == from_float);
}

}  // namespace kvc::test
