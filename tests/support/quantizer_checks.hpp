// tests/support/quantizer_checks.hpp — checks every Quantizer test runs the same way:
// the fused tile kernels on codes against float64 on the decoded rows, and attend end to
// end (with a scorer and a budget) against float64 on the cache's own stored K/V.
#pragma once

#include <kvc/core/kv_cache.hpp>
#include <kvc/quant/int8_fused.hpp>
#include <kvc/simd/int8_dot.hpp>

#include <catch2/catch.hpp>

#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace kvc::test {

// Whether Q's attend takes the integer path (kvc/simd/int8_dot.hpp) at this head_dim, for
// scores and for values; formats without one never do.
template <class Q>
bool integer_scores_of(std::size_t d) {
  if constexpr (requires { Q::integer_scores(d); }) {
    return Q::integer_scores(d);
  } else {
    return false;
  }
}
template <class Q>
bool integer_values_of(std::size_t d) {
  if constexpr (requires { Q::integer_values(d); }) {
    return Q::integer_values(d);
  } else {
    return false;
  }
}

// Channel c's int8 code in a row of Q's integer layout.
template <class Layout>
int code_at(const Layout& layout, const std::byte* row, std::size_t c) {
  if constexpr (requires { Layout::code(row, c); }) return Layout::code(row, c);  // nibbles
  return static_cast<std::int8_t>(
      row[layout.code_offset + c / kvc::simd::int8_chunk * layout.chunk_stride +
          c % kvc::simd::int8_chunk]);
}

// Row r of an integer value tile (acc, started at 0.5) against `expected`, a float64
// re-implementation of what it rounds, to fp32 rounding; and against float64 on the
// decoded rows within `bound`, the rounding bound of its u8 weights.
inline void require_value_row(const std::vector<float>& p, std::size_t r, std::size_t tokens,
                              std::size_t d, const std::vector<float>& decoded_values,
                              const std::vector<double>& expected, const std::vector<double>& bound,
                              const std::vector<float>& acc) {
  std::vector<double> exact(d, 0.5), magnitude(d, 0.5);
  for (std::size_t j = 0; j < tokens; ++j) {
    for (std::size_t c = 0; c < d; ++c) {
      exact[c] += double(p[r * tokens + j]) * decoded_values[j * d + c];
      magnitude[c] += std::abs(double(p[r * tokens + j]) * decoded_values[j * d + c]);
    }
  }
  for (std::size_t c = 0; c < d; ++c) {
    const double got = acc[r * d + c];
    REQUIRE(std::abs(got - expected[c]) <= 1e-5 * magnitude[c] + 1e-6);
    REQUIRE(std::abs(got - exact[c]) <= bound[c] + 1e-5 * magnitude[c] + 1e-6);
  }
}

// The integer path's tiles against a float64 re-implementation of exactly what it rounds
// (each query row to int8; per sub-tile of quant::detail::fused_tokens tokens, row and
// scale, the weights p · scale to u8), to fp32 rounding; and against the exact fp32 path's
// float64 result within the rounding bound: |Δscore| ≤ (s_q/2)·Σ_c|k̂_c| and
// |Δacc_c| ≤ Σ_j (w_max/255)/2 · |code_j,c| per sub-tile.
template <class Q>
void check_integer_tiles(const std::vector<float>& queries, const std::vector<float>& p,
                         std::size_t rows, std::size_t tokens, std::size_t d,
                         const std::byte* key_codes, const std::byte* value_codes,
                         const std::vector<float>& decoded_keys,
                         const std::vector<float>& decoded_values, const std::vector<float>& scores,
                         std::size_t lds, const std::vector<float>& acc) {
  const auto layout = Q::layout(d);
  if (integer_scores_of<Q>(d)) {
    std::vector<std::int8_t> q_codes(d);
    for (std::size_t r = 0; r < rows; ++r) {
      float q_scale = 0.0F;
      kvc::simd::reference::quantize_rows_s8(queries.data() + r * d, 1, d, d, q_codes.data(),
                                             &q_scale);
      // A scale per `width` channels: one per row (Int8<>), or per block (Int8<32>, q8_0).
      const std::size_t width = layout.chunks_per_scale * kvc::simd::int8_chunk;
      for (std::size_t j = 0; j < tokens; ++j) {
        const std::byte* row = key_codes + j * layout.stride;
        double expected = 0, codes_l1 = 0, exact = 0, key_l1 = 0, magnitude = 0;
        for (std::size_t b = 0; b < d / width; ++b) {
          double dot = 0, l1 = 0;  // dot: exact in int32 in the kernel
          for (std::size_t c = b * width; c < (b + 1) * width; ++c) {
            dot += double(q_codes[c]) * code_at(layout, row, c);
            l1 += std::abs(double(q_codes[c]) * code_at(layout, row, c));
          }
          const double scale = double(q_scale) * double(layout.scale(row, b));
          expected += dot * scale;
          codes_l1 += l1 * std::abs(scale);
        }
        for (std::size_t c = 0; c < d; ++c) {
          exact += double(queries[r * d + c]) * decoded_keys[j * d + c];
          key_l1 += std::abs(double(decoded_keys[j * d + c]));
          magnitude += std::abs(double(queries[r * d + c]) * decoded_keys[j * d + c]);
        }
        const double got = scores[r * lds + j];
        // One scale per row: the int32 sum is exact and two roundings follow. Several:
        // fp32 rounding of the scaled partial sums (a block's, or a lane's 4 channels) and
        // of their sum, relative to their magnitudes.
        const double rounding = width == d ? std::abs(expected) : codes_l1;
        REQUIRE(std::abs(got - expected) <= 1e-6 * rounding + 1e-30);
        REQUIRE(std::abs(got - exact) <= double(q_scale) / 2 * key_l1 + 1e-5 * magnitude + 1e-6);
      }
    }
  }
  if (integer_values_of<Q>(d)) {
    const std::size_t width = layout.chunks_per_scale * kvc::simd::int8_chunk;
    constexpr std::size_t sub = kvc::quant::detail::fused_tokens;
    std::vector<float> weights(sub);
    std::vector<std::uint8_t> codes(sub);
    for (std::size_t r = 0; r < rows; ++r) {
      std::vector<double> expected(d, 0.5), bound(d, 0.0);
      for (std::size_t t0 = 0; t0 < tokens; t0 += sub) {
        const std::size_t n = std::min(sub, tokens - t0);
        for (std::size_t s = 0; s < d / width; ++s) {
          for (std::size_t j = 0; j < n; ++j) {
            weights[j] =
                p[r * tokens + t0 + j] * layout.scale(value_codes + (t0 + j) * layout.stride, s);
          }
          const float factor =
              kvc::simd::reference::quantize_weights_u8(weights.data(), n, codes.data());
          for (std::size_t c = s * width; c < (s + 1) * width; ++c) {
            double sum = 0, l1 = 0;
            for (std::size_t j = 0; j < n; ++j) {
              const int code = code_at(layout, value_codes + (t0 + j) * layout.stride, c);
              sum += double(codes[j]) * code;
              l1 += std::abs(double(code));
            }
            expected[c] += double(factor) * sum;
            bound[c] += double(factor) / 2 * l1;
          }
        }
      }
      require_value_row(p, r, tokens, d, decoded_values, expected, bound, acc);
    }
  }
}

// Out of line: inlined into the checks below with their constant shapes, g++ 12 warns
// (-Waggressive-loop-optimizations) about iterations the kernels' loops never reach.
template <class Q>
[[gnu::noinline]] void score_tile_of(const Q& quantizer, const kvc::ScoreTile& tile) {
  quantizer.score_tile(tile);
}

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
  score_tile_of(quantizer, kvc::ScoreTile{queries.data(), rows, key_codes.data() + offset, tokens,
                                          d, scores.data(), tokens + 3, scratch.data()});
  quantizer.accumulate_tile(kvc::AccumulateTile{p.data(), rows, tokens, value_codes.data() + offset,
                                                tokens, d, acc.data(), scratch.data()});
  if constexpr (requires { Q::layout(d); }) {
    check_integer_tiles<Q>(queries, p, rows, tokens, d, key_codes.data() + offset,
                           value_codes.data() + offset, decoded_keys, decoded_values, scores,
                           tokens + 3, acc);
  }
  if (integer_scores_of<Q>(d)) {
    // KvCache hands the integer path the query rows already rounded (ScoreTile::query_codes,
    // once per attend block): the same scores, bit for bit.
    std::vector<std::int8_t> query_codes(rows * d);
    std::vector<float> query_scales(rows), again(scores.size());
    kvc::simd::reference::quantize_rows_s8(queries.data(), rows, d, d, query_codes.data(),
                                           query_scales.data());
    score_tile_of(quantizer, kvc::ScoreTile{queries.data(), rows, key_codes.data() + offset, tokens,
                                            d, again.data(), tokens + 3, scratch.data(), false,
                                            query_codes.data(), query_scales.data()});
    for (std::size_t r = 0; r < rows; ++r) {
      for (std::size_t j = 0; j < tokens; ++j) {
        REQUIRE(again[r * (tokens + 3) + j] == scores[r * (tokens + 3) + j]);
      }
    }
  }
  // A tile that asks for exact scores (observe does) gets the fp32 path in every format.
  const bool exact_scores = !integer_scores_of<Q>(d), exact_values = !integer_values_of<Q>(d);
  if (!exact_scores) {
    score_tile_of(quantizer, kvc::ScoreTile{queries.data(), rows, key_codes.data() + offset, tokens,
                                            d, scores.data(), tokens + 3, scratch.data(),
                                            /*exact=*/true});
  }
  // The fp32 path widens the same codes to the same fp32 values, so the only difference from
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
    for (std::size_t c = 0; c < d && exact_values; ++c) {
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
  // The exact fp32 path differs from float64 by rounding only. The integer path (simd/
  // int8_dot.hpp) also rounds queries and weights to 8 bits, each ~0.4 % of the row's
  // largest, which on these random rows (nearly flat attention, outputs averaging random
  // values, so small) moves the output by ~1 % (measured 1.1 % for Int8, 0.6 % for Q8_0);
  // check_tile_kernels checks that path exactly.
  const double tolerance = integer_scores_of<Q>(64) || integer_values_of<Q>(64) ? 3e-2 : 1e-4;
  REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < tolerance);
  cache.compress(seq);
  Tensor3 step_out(8, 1, 64);
  for (std::size_t step = 0; step < 20; ++step) {
    cache.append(seq, 0, random_tensor(rng, 2, 1, 64).view(), random_tensor(rng, 2, 1, 64).view());
    const Tensor3 step_q = random_tensor(rng, 8, 1, 64);
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    REQUIRE(kvc::test::attend_error(cache, seq, 0, step_q, step_out) < tolerance);
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

struct Errors {
  double keys = 0;       // RMS of (stored key − original key) over all elements
  double attention = 0;  // RMS of (attend − float64 attention on the original K/V)
};

// Stores k, v in a KvCache<Full, B> (built from `quantizer`) and attends q: the RMS error
// of the stored keys and of the attention output against float64 on the original K/V.
template <class B>
Errors errors_vs_original(const B& quantizer, const Tensor3& k, const Tensor3& v,
                          const Tensor3& q) {
  const kvc::Geometry geometry{
      .layers = 1, .q_heads = q.heads, .kv_heads = k.heads, .head_dim = k.dim};
  kvc::KvCache<kvc::evict::Full, B> cache(geometry, {}, {}, quantizer);
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, k.view(), v.view());
  Tensor3 out(q.heads, q.tokens, q.dim);
  cache.attend(seq, 0, q.view(), out.mutable_view());
  const std::size_t group = q.heads / k.heads;
  const auto positions = kvc::test::iota_positions(0, static_cast<kvc::Position>(k.tokens - 1));
  double sum2 = 0;
  for (std::size_t qh = 0; qh < q.heads; ++qh) {
    const std::size_t h = qh / group;
    for (std::size_t t = 0; t < q.tokens; ++t) {
      std::vector<float> query(q.dim);
      for (std::size_t c = 0; c < q.dim; ++c) query[c] = q.at(qh, t, c);
      const auto position = static_cast<kvc::Position>(k.tokens - q.tokens + t);
      const auto expected = kvc::test::reference_attention(
          query, k.data.data() + h * k.tokens * k.dim, v.data.data() + h * v.tokens * v.dim,
          positions, position, q.dim);
      for (std::size_t c = 0; c < q.dim; ++c) {
        const double e = double(out.at(qh, t, c)) - expected[c];
        sum2 += e * e;
      }
    }
  }
  const kvc::DenseLayer stored = cache.export_dense(seq, 0);
  double key2 = 0;
  for (std::size_t h = 0; h < k.heads; ++h) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      for (std::size_t c = 0; c < k.dim; ++c) {
        const double e = double(stored.keys[h](long(t), long(c))) - k.at(h, t, c);
        key2 += e * e;
      }
    }
  }
  return {std::sqrt(key2 / double(k.data.size())), std::sqrt(sum2 / double(out.data.size()))};
}

// Q with attend's scores always on the exact fp32 path (ScoreTile::exact), where Q's own
// would round the queries (integer_scores): for checks that compare with a Dense<float>
// cache token for token.
template <class Q>
struct ExactScores : Q {
  using Q::Q;
  void score_tile(kvc::ScoreTile tile) const noexcept {
    tile.exact = true;
    Q::score_tile(tile);
  }
};

// Drives a quantizer's tiles as KvCache does, so that check_tile_kernels can compare them
// with float64 on decode_key / decode_value: the query rows go through prepare_queries
// (PreparesQueries) before score_tile, and each tile's accumulator starts at 0 and goes
// through finish_outputs (FinishesOutputs) before it is added to the caller's acc.
template <class Q>
struct AsTheCacheCalls {
  Q quantizer{};
  // Q's integer-path flags, so that check_tile_kernels knows which path Q's tiles take.
  static bool integer_scores(std::size_t d) { return integer_scores_of<Q>(d); }
  static bool integer_values(std::size_t d) { return integer_values_of<Q>(d); }
  std::size_t key_bytes(std::size_t d) const { return quantizer.key_bytes(d); }
  std::size_t value_bytes(std::size_t d) const { return quantizer.value_bytes(d); }
  template <class S>
  void encode_key(const S* x, std::size_t d, std::byte* codes) const {
    quantizer.encode_key(x, d, codes);
  }
  template <class S>
  void encode_value(const S* x, std::size_t d, std::byte* codes) const {
    quantizer.encode_value(x, d, codes);
  }
  void decode_key(const std::byte* codes, std::size_t d, float* out) const {
    quantizer.decode_key(codes, d, out);
  }
  void decode_value(const std::byte* codes, std::size_t d, float* out) const {
    quantizer.decode_value(codes, d, out);
  }
  void score_tile(kvc::ScoreTile tile) const {
    std::vector<float> queries(tile.queries, tile.queries + tile.rows * tile.head_dim);
    if constexpr (kvc::PreparesQueries<Q>) {
      quantizer.prepare_queries(queries.data(), tile.rows, tile.head_dim);
    }
    tile.queries = queries.data();
    // KvCache rounds the prepared rows (ScoreTile::query_codes), so the adapter does too.
    std::vector<std::int8_t> codes(tile.query_codes != nullptr ? queries.size() : 0);
    std::vector<float> scales(tile.query_codes != nullptr ? tile.rows : 0);
    if (tile.query_codes != nullptr) {
      kvc::simd::quantize_rows_s8(queries.data(), tile.rows, tile.head_dim, tile.head_dim,
                                  codes.data(), scales.data());
      tile.query_codes = codes.data();
      tile.query_scales = scales.data();
    }
    quantizer.score_tile(tile);
  }
  void accumulate_tile(kvc::AccumulateTile tile) const {
    const std::size_t n = tile.rows * tile.head_dim;
    std::vector<float> block(n, 0.0F);
    float* acc = tile.acc;
    tile.acc = block.data();
    quantizer.accumulate_tile(tile);
    if constexpr (kvc::FinishesOutputs<Q>) {
      quantizer.finish_outputs(block.data(), tile.rows, tile.head_dim);
    }
    for (std::size_t i = 0; i < n; ++i) acc[i] += block[i];
  }
};

// Q against a Dense<float> cache fed the rows Q decodes to, with the same scorer: the same
// tokens survive (H2O after attend, SnapKV after observe: the scores are read on the codes,
// through prepare_queries where Q has it), the stored rows are identical, and attend matches
// float64 attention on the kept (decoded) tokens and the dense cache's output. Channel 9 of
// kv head 0's prompt keys is scaled by `key_outlier`.
template <class Scorer, class Q>
void check_same_as_dense(Scorer scorer, const Q& quantizer, std::size_t budget, bool observe,
                         float key_outlier = 1.0F) {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  const kvc::CacheOptions options{
      .budget = kvc::Budget::tokens(budget), .page_tokens = 16, .auto_compress = false};
  kvc::KvCache<Scorer, Q> coded(geometry, options, scorer, quantizer);
  kvc::KvCache<Scorer, kvc::quant::Dense<float>> dense(geometry, options, scorer);
  const auto round_trip = [&](const Tensor3& x, bool keys) {
    Tensor3 y = x;
    std::vector<std::byte> row(std::max(quantizer.key_bytes(x.dim), quantizer.value_bytes(x.dim)));
    for (std::size_t r = 0; r < x.heads * x.tokens; ++r) {
      if (keys) {
        quantizer.encode_key(x.data.data() + r * x.dim, x.dim, row.data());
        quantizer.decode_key(row.data(), x.dim, y.data.data() + r * x.dim);
      } else {
        quantizer.encode_value(x.data.data() + r * x.dim, x.dim, row.data());
        quantizer.decode_value(row.data(), x.dim, y.data.data() + r * x.dim);
      }
    }
    return y;
  };
  const auto append_both = [&](auto a, auto b, const Tensor3& k, const Tensor3& v) {
    coded.append(a, 0, k.view(), v.view());
    dense.append(b, 0, round_trip(k, true).view(), round_trip(v, false).view());
  };
  const auto same_contents = [&](auto a, auto b) {
    const kvc::DenseLayer x = coded.export_dense(a, 0);
    const kvc::DenseLayer y = dense.export_dense(b, 0);
    for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
      REQUIRE(x.positions[h] == y.positions[h]);
      REQUIRE(x.keys[h] == y.keys[h]);
      REQUIRE(x.values[h] == y.values[h]);
    }
  };
  std::mt19937 rng(17);
  const auto s_coded = coded.open_sequence();
  const auto s_dense = dense.open_sequence();
  Tensor3 k = random_tensor(rng, 2, 293, 64);
  for (std::size_t t = 0; t < 293; ++t) k.at(0, t, 9) *= key_outlier;
  append_both(s_coded, s_dense, k, random_tensor(rng, 2, 293, 64));
  const Tensor3 window = random_tensor(rng, 8, 16, 64);
  if (observe) {
    coded.observe(s_coded, 0, window.view());
    dense.observe(s_dense, 0, window.view());
  } else {
    Tensor3 out(8, 16, 64), out_dense(8, 16, 64);
    coded.attend(s_coded, 0, window.view(), out.mutable_view());
    dense.attend(s_dense, 0, window.view(), out_dense.mutable_view());
    REQUIRE(attend_error(coded, s_coded, 0, window, out) < 1e-4);
  }
  coded.compress(s_coded);
  dense.compress(s_dense);
  same_contents(s_coded, s_dense);
  CHECK(coded.stats().tokens_stored == 2 * budget);
  Tensor3 out(8, 1, 64), out_dense(8, 1, 64);
  for (std::size_t step = 0; step < 20; ++step) {
    append_both(s_coded, s_dense, random_tensor(rng, 2, 1, 64), random_tensor(rng, 2, 1, 64));
    const Tensor3 q = random_tensor(rng, 8, 1, 64);
    coded.attend(s_coded, 0, q.view(), out.mutable_view());
    dense.attend(s_dense, 0, q.view(), out_dense.mutable_view());
    REQUIRE(attend_error(coded, s_coded, 0, q, out) < 1e-4);
    for (std::size_t i = 0; i < out.data.size(); ++i) {
      REQUIRE(out.data[i] == Approx(out_dense.data[i]).margin(1e-5));
    }
    coded.compress(s_coded);
    dense.compress(s_dense);
    same_contents(s_coded, s_dense);
  }
  const auto stats = coded.stats();
  CHECK(stats.tokens_stored == 2 * budget);
  CHECK(stats.code_bytes == 2 * budget * (quantizer.key_bytes(64) + quantizer.value_bytes(64)));
}

// Q under a budgeted scorer through a 300-token prefill and 150 decode steps, compressed
// every step: attend stays within `tolerance` of float64 on the cache's own stored K/V and
// every head holds its budget (96). With `observe`, the prefill's window and each step's
// query are observed too (SnapKV; a quantizer that fits on observe fits there).
template <class Scorer, class Q>
void check_composes_over_decode(Scorer scorer, const Q& quantizer, bool observe, double tolerance) {
  constexpr std::size_t d = 64;
  const Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = d};
  std::mt19937 rng(13);
  KvCache<Scorer, Q> cache(
      geometry, {.budget = Budget::tokens(96), .page_tokens = 16, .auto_compress = false}, scorer,
      quantizer);
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 2, 300, d).view(), random_tensor(rng, 2, 300, d).view());
  if (observe) cache.observe(seq, 0, random_tensor(rng, 8, 16, d).view());
  const Tensor3 q = random_tensor(rng, 8, 4, d);
  Tensor3 out(8, 4, d);
  cache.attend(seq, 0, q.view(), out.mutable_view());
  REQUIRE(attend_error(cache, seq, 0, q, out) < tolerance);
  cache.compress(seq);
  Tensor3 step_out(8, 1, d);
  for (std::size_t step = 0; step < 150; ++step) {
    cache.append(seq, 0, random_tensor(rng, 2, 1, d).view(), random_tensor(rng, 2, 1, d).view());
    const Tensor3 step_q = random_tensor(rng, 8, 1, d);
    if (observe) cache.observe(seq, 0, step_q.view());
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    REQUIRE(attend_error(cache, seq, 0, step_q, step_out) < tolerance);
    cache.compress(seq);
    REQUIRE(cache.tokens(seq, 0, 0) == 96);
  }
  REQUIRE(cache.stats().tokens_stored == 2 * 96);
}

}  // namespace kvc::test
