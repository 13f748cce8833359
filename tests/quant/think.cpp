// Tests of kvc/quant/think.hpp and of KvCache's FitsKeys path when the fit takes the
// observe() window: the channel selection by hand and against an independent float64
// ranking, the kept count, what the cache stores before and after observe, the window of
// whole keys, attend on the stored data against float64, byte accounting, and H2O /
// SnapKV / D2O composition.
#include <kvc/quant/think.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/d2o.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;

constexpr std::size_t d = 64;
constexpr std::size_t residual = 32;
using Think = kvc::quant::Think<residual>;

static_assert(kvc::Quantizer<Think> && kvc::FitsKeys<Think> && !kvc::QuantizesTokens<Think>);

const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = d};

std::vector<std::uint16_t> fitted_channels(const Think& think, const float* keys,
                                           std::size_t tokens, const float* queries,
                                           std::size_t rows, std::size_t dim) {
  std::vector<std::byte> channels(think.key_group_bytes(dim));
  think.fit_keys(kvc::KeyFit{keys, tokens, queries, rows, dim}, channels.data());
  return think.channels(channels.data(), dim);
}

// The r channels of highest mean(q_c²)·mean(k_c²), ties to the lower channel, in float64,
// written apart from the library's.
std::vector<std::uint16_t> reference_channels(const std::vector<float>& keys, std::size_t tokens,
                                              const std::vector<float>& queries, std::size_t rows,
                                              std::size_t kept) {
  std::vector<std::pair<double, std::size_t>> ranked;
  for (std::size_t c = 0; c < d; ++c) {
    double q = 0, k = 0;
    for (std::size_t r = 0; r < rows; ++r) q += double(queries[r * d + c]) * queries[r * d + c];
    for (std::size_t t = 0; t < tokens; ++t) k += double(keys[t * d + c]) * keys[t * d + c];
    ranked.emplace_back(-(q / double(rows)) * (k / double(tokens)), c);
  }
  std::sort(ranked.begin(), ranked.end());
  std::vector<std::uint16_t> result;
  for (std::size_t i = 0; i < kept; ++i)
    result.push_back(static_cast<std::uint16_t>(ranked[i].second));
  std::sort(result.begin(), result.end());
  return result;
}

std::vector<float> head_rows(const Tensor3& x, std::size_t h, std::size_t n) {
  const auto first = x.data.begin() + static_cast<std::ptrdiff_t>(h * x.tokens * x.dim);
  return {first, first + static_cast<std::ptrdiff_t>(n * x.dim)};
}

}  // namespace

TEST_CASE("think: kept channels by query and key energy, by hand and against float64",
          "[quant][think]") {
  // r = d − ⌊λd⌋ rounded up to a multiple of 16, at most d.
  CHECK(Think(0.4F).projected_dim(128) == 80);
  CHECK(Think(0.4F).projected_dim(64) == 48);
  CHECK(Think(0.5F).projected_dim(32) == 16);
  CHECK(Think(0.0F).projected_dim(64) == 64);
  CHECK(Think(0.5F).projected_dim(8) == 8);
  CHECK(Think(0.4F).key_bytes(128) == 160);
  CHECK(Think(0.4F).key_group_bytes(128) == 160);

  // By hand, d = 32, keep 16: one query row q_c = (c mod 8) + 1, keys all 1 but channel 31
  // at 0. Scores (c mod 8 + 1)²: the channels ≡ 4..7 (mod 8) lead, except 31 (score 0);
  // the last place goes to a score-16 channel (≡ 3), of which the lowest, 3, wins the tie.
  const Think half(0.5F);
  std::vector<float> query(32), keys(5 * 32, 1.0F);
  for (std::size_t c = 0; c < 32; ++c) query[c] = float(c % 8 + 1);
  for (std::size_t t = 0; t < 5; ++t) keys[t * 32 + 31] = 0.0F;
  const std::vector<std::uint16_t> expected{3,  4,  5,  6,  7,  12, 13, 14,
                                            15, 20, 21, 22, 23, 28, 29, 30};
  CHECK(fitted_channels(half, keys.data(), 5, query.data(), 1, 32) == expected);

  // Random keys with uneven channel energies and a GQA window of 4 × 16 query rows.
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::vector<float> k(200 * d), q(64 * d);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = normal(rng) * float(1 + (i * 7) % d % 5);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = normal(rng) * float(1 + (i * 3) % d % 7);
  const Think think(0.4F);
  CHECK(fitted_channels(think, k.data(), 200, q.data(), 64, d) ==
        reference_channels(k, 200, q, 64, think.projected_dim(d)));

  // A stored key: its kept channels in fp16, 0 elsewhere; a query row restricted to them.
  std::vector<std::byte> channels(think.key_group_bytes(d));
  think.fit_keys(kvc::KeyFit{k.data(), 200, q.data(), 64, d}, channels.data());
  const std::vector<std::uint16_t> kept = think.channels(channels.data(), d);
  std::vector<std::byte> codes(think.key_bytes(d));
  std::vector<float> decoded(d), projected(think.projected_dim(d));
  think.encode_key(k.data(), d, channels.data(), codes.data());
  think.decode_key(codes.data(), d, channels.data(), decoded.data());
  think.project_queries(q.data(), 1, d, channels.data(), projected.data());
  for (std::size_t c = 0; c < d; ++c) {
    const auto at = std::find(kept.begin(), kept.end(), c);
    const float expected_value = at == kept.end() ? 0.0F : float(Eigen::half(k[c]));
    REQUIRE(decoded[c] == expected_value);
    if (at != kept.end()) REQUIRE(projected[std::size_t(at - kept.begin())] == q[c]);
  }
}

TEST_CASE("think: the cache prunes at observe and keeps the newest R keys whole",
          "[quant][think][cache]") {
  std::mt19937 rng(5);
  const Think think(0.5F);
  const std::size_t kept = think.projected_dim(d);  // 32
  Tensor3 k = random_tensor(rng, 2, 180, d);
  for (std::size_t i = 0; i < k.data.size(); ++i) k.data[i] *= float(1 + i % d % 4);
  const Tensor3 v = random_tensor(rng, 2, 180, d);
  kvc::KvCache<kvc::evict::Full, Think> cache(geometry, {.page_tokens = 16}, {}, think);
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, k.slice(0, 150), v.slice(0, 150));
  // Before observe: nothing is pruned, every key waits in fp32.
  const kvc::DenseLayer before = cache.export_dense(seq, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    const std::vector<float> keys = head_rows(k, h, 150);
    REQUIRE(std::equal(keys.begin(), keys.end(), before.keys[h].data()));
  }
  const std::size_t row = d * sizeof(float);
  REQUIRE(cache.stats().code_bytes ==
          2 * (150 * row + 118 * think.value_bytes(d) + residual * row));

  const Tensor3 window = random_tensor(rng, 8, 16, d);
  cache.observe(seq, 0, window.view());
  for (std::size_t n = 150;; ++n) {
    const kvc::DenseLayer dense = cache.export_dense(seq, 0);
    for (std::size_t h = 0; h < 2; ++h) {
      // The GQA group's window rows (query heads 4h..4h+3), as attend scales them.
      std::vector<float> rows;
      for (std::size_t g = 0; g < 4; ++g) {
        for (std::size_t t = 0; t < 16; ++t) {
          for (std::size_t c = 0; c < d; ++c) rows.push_back(window.at(4 * h + g, t, c) / 8.0F);
        }
      }
      const std::vector<float> keys = head_rows(k, h, n);
      const std::vector<std::uint16_t> channels = reference_channels(keys, 150, rows, 64, kept);
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t c = 0; c < d; ++c) {
          const float original = keys[t * d + c];
          const bool pruned = std::find(channels.begin(), channels.end(), c) == channels.end();
          const float expected = t + residual >= n ? original
                                 : pruned          ? 0.0F
                                                   : float(Eigen::half(original));
          REQUIRE(dense.keys[h](Eigen::Index(t), Eigen::Index(c)) == expected);
        }
      }
    }
    const Tensor3 q = random_tensor(rng, 8, 2, d);
    Tensor3 out(8, 2, d);
    cache.attend(seq, 0, q.view(), out.mutable_view());
    REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < 1e-4);
    const std::size_t sealed = n - residual;
    REQUIRE(cache.stats().code_bytes ==
            2 * (sealed * think.key_bytes(d) + think.key_group_bytes(d) +
                 sealed * think.value_bytes(d) + 2 * residual * row));
    if (n == 180) break;
    cache.append(seq, 0, k.slice(n, 1), v.slice(n, 1));
  }
  // A fitted head keeps its channels: a second observe changes nothing stored.
  const kvc::DenseLayer fitted = cache.export_dense(seq, 0);
  cache.observe(seq, 0, random_tensor(rng, 8, 4, d).view());
  REQUIRE(cache.export_dense(seq, 0).keys[0] == fitted.keys[0]);
}

TEST_CASE("think: composes with H2O, SnapKV and D2O merging", "[quant][think][cache]") {
  const Think think(0.4F);
  kvc::test::check_composes_over_decode(kvc::evict::H2O{}, think, true, 1e-4);
  kvc::test::check_composes_over_decode(kvc::evict::SnapKV({.window = 16}), think, true, 1e-4);
  kvc::test::check_composes_over_decode(kvc::evict::D2O<>{}, think, true, 1e-4);
}

TEST_CASE("think: bad ratios and queries are rejected", "[quant][think][cache]") {
  CHECK_THROWS_AS(Think(1.0F), kvc::ValueError);
  CHECK_THROWS_AS(Think(-0.1F), kvc::ValueError);
  CHECK_THROWS_WITH(Think(std::numeric_limits<float>::quiet_NaN()), Catch::Contains("think"));
  kvc::KvCache<kvc::evict::Full, Think> cache(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  std::mt19937 rng(2);
  cache.append(seq, 0, random_tensor(rng, 2, 100, d).view(), random_tensor(rng, 2, 100, d).view());
  const std::size_t bytes = cache.stats().code_bytes;
  Tensor3 window = random_tensor(rng, 8, 4, d);
  window.at(3, 2, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(cache.observe(seq, 0, window.view()),
                    Catch::Contains("observe") && Catch::Contains("finite"));
  CHECK(cache.stats().code_bytes == bytes);  // not fitted
}
