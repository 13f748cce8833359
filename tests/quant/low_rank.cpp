// Tests of kvc/quant/low_rank.hpp and of KvCache's FitsKeys path (tests/quant/think.cpp has
// the query-driven half): the fitted basis against an independent float64 SVD, the round
// trip bound, which keys the cache encodes when and in which basis (one prefill chunk or
// token by token), attend on the stored data against float64, fork, truncate, a refit after
// a head loses every encoded key, exact byte accounting, and H2O / SnapKV / D2O.
#include <kvc/quant/low_rank.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/d2o.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>

#include <catch2/catch.hpp>

#include "../support/quantizer_checks.hpp"
#include "../support/reference.hpp"

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;

constexpr std::size_t d = 64;
constexpr std::size_t rank = 16;
constexpr std::size_t residual = 32;
using LowRank = kvc::quant::LowRankKeys<residual>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

static_assert(kvc::Quantizer<LowRank> && kvc::FitsKeys<LowRank>);
static_assert(!kvc::GroupsKeys<LowRank> && !kvc::QuantizesTokens<LowRank>);

const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = d};

// n keys whose channel spectrum decays (singular values ∝ decay^j) in a random orthonormal
// frame, so the leading subspace is not aligned with the channels.
std::vector<float> spectral_keys(std::mt19937& rng, std::size_t n, double decay) {
  std::normal_distribution<double> normal;
  Eigen::MatrixXd gaussian(d, d);
  for (Eigen::Index i = 0; i < gaussian.size(); ++i) gaussian.data()[i] = normal(rng);
  const Eigen::MatrixXd frame = Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian).householderQ();
  std::vector<float> keys(n * d);
  Eigen::VectorXd z(d);
  for (std::size_t t = 0; t < n; ++t) {
    for (std::size_t j = 0; j < d; ++j)
      z[Eigen::Index(j)] = normal(rng) * std::pow(decay, double(j));
    const Eigen::VectorXd k = frame * z;
    for (std::size_t c = 0; c < d; ++c) keys[t * d + c] = static_cast<float>(k[Eigen::Index(c)]);
  }
  return keys;
}

MatrixD basis_of(const std::vector<std::byte>& bytes) {
  MatrixD v(d, rank);
  const auto* floats = reinterpret_cast<const float*>(bytes.data());
  for (std::size_t i = 0; i < d * rank; ++i) v.data()[i] = floats[i];
  return v;
}

std::vector<std::byte> fit(const LowRank& quantizer, const float* keys, std::size_t n) {
  std::vector<std::byte> basis(quantizer.key_group_bytes(d));
  quantizer.fit_keys(kvc::KeyFit{keys, n, nullptr, 0, d}, basis.data());
  return basis;
}

// ‖k − k̂‖ ≤ ‖k − VVᵀk‖ + 2⁻¹¹‖Vᵀk‖ (fp16 coefficients) + fp32 slack.
void check_round_trip(const LowRank& quantizer, const std::vector<std::byte>& basis,
                      const float* key) {
  const MatrixD v = basis_of(basis);
  Eigen::VectorXd k(d);
  for (std::size_t c = 0; c < d; ++c) k[Eigen::Index(c)] = key[c];
  const Eigen::VectorXd a = v.transpose() * k;
  const double residual_norm = (k - v * a).norm();
  std::vector<std::byte> codes(quantizer.key_bytes(d));
  std::vector<float> decoded(d);
  quantizer.encode_key(key, d, basis.data(), codes.data());
  quantizer.decode_key(codes.data(), d, basis.data(), decoded.data());
  double error = 0;
  for (std::size_t c = 0; c < d; ++c) error += std::pow(double(decoded[c]) - key[c], 2);
  REQUIRE(std::sqrt(error) <= residual_norm + std::ldexp(a.norm(), -11) + 1e-5 * k.norm());
}

std::vector<float> head_rows(const Tensor3& x, std::size_t h, std::size_t n) {
  const auto first = x.data.begin() + static_cast<std::ptrdiff_t>(h * x.tokens * d);
  return {first, first + static_cast<std::ptrdiff_t>(n * d)};
}

std::vector<float> matrix(const kvc::DenseLayer::Matrix& m) {
  return {m.data(), m.data() + m.size()};
}

// What the cache holds for n tokens of a head whose basis was fitted to `basis` (empty:
// not fitted): keys older than the newest R encoded in the basis, values older than the
// newest R in fp16, the rest exact.
std::pair<std::vector<float>, std::vector<float>> expected_rows(const LowRank& quantizer,
                                                                const std::vector<std::byte>& basis,
                                                                std::vector<float> keys,
                                                                std::vector<float> values,
                                                                std::size_t n) {
  const std::size_t old = n > residual ? n - residual : 0;
  std::vector<std::byte> codes(std::max(quantizer.key_bytes(d), quantizer.value_bytes(d)));
  for (std::size_t t = 0; t < old; ++t) {
    if (!basis.empty()) {
      quantizer.encode_key(keys.data() + t * d, d, basis.data(), codes.data());
      quantizer.decode_key(codes.data(), d, basis.data(), keys.data() + t * d);
    }
    quantizer.encode_value(values.data() + t * d, d, codes.data());
    quantizer.decode_value(codes.data(), d, values.data() + t * d);
  }
  return {keys, values};
}

// Bytes per kv head: encoded keys, the basis once fitted, fp16 values, fp32 window rows.
std::size_t bytes_per_head(const LowRank& quantizer, std::size_t n, std::size_t sealed,
                           bool fitted) {
  const std::size_t values = n > residual ? n - residual : 0;
  return sealed * quantizer.key_bytes(d) + (fitted ? quantizer.key_group_bytes(d) : 0) +
         values * quantizer.value_bytes(d) + (2 * n - sealed - values) * d * sizeof(float);
}

}  // namespace

TEST_CASE("lowrank: the basis is the keys' leading singular subspace, round trip in bound",
          "[quant][lowrank]") {
  std::mt19937 rng(4);
  const LowRank quantizer(rank);
  REQUIRE(quantizer.key_bytes(d) == 2 * rank);
  REQUIRE(quantizer.value_bytes(d) == 2 * d);
  REQUIRE(quantizer.key_group_bytes(d) == 4 * d * rank);

  const std::size_t n = 300;
  const std::vector<float> keys = spectral_keys(rng, n, 0.85);
  const std::vector<std::byte> basis = fit(quantizer, keys.data(), n);
  const MatrixD v = basis_of(basis);
  REQUIRE((v.transpose() * v - Eigen::MatrixXd::Identity(rank, rank)).cwiseAbs().maxCoeff() < 1e-5);
  // An independent float64 SVD of the same keys: the same subspace (projectors agree).
  MatrixD k(n, d);
  for (std::size_t i = 0; i < n * d; ++i) k.data()[i] = keys[i];
  const Eigen::JacobiSVD<MatrixD> svd(k, Eigen::ComputeThinV);
  const Eigen::MatrixXd leading = svd.matrixV().leftCols(rank);
  REQUIRE((v * v.transpose() - leading * leading.transpose()).cwiseAbs().maxCoeff() < 1e-4);
  // Deterministic signs: each column's largest entry is positive.
  for (Eigen::Index j = 0; j < Eigen::Index(rank); ++j) {
    Eigen::Index largest = 0;
    v.col(j).cwiseAbs().maxCoeff(&largest);
    REQUIRE(v(largest, j) > 0);
  }
  for (std::size_t t = 0; t < n; ++t) check_round_trip(quantizer, basis, keys.data() + t * d);
  // A key outside the fitted keys' span still round-trips within the bound.
  std::vector<float> outsider(d);
  std::normal_distribution<float> normal;
  for (float& x : outsider) x = 50.0F * normal(rng);
  check_round_trip(quantizer, basis, outsider.data());

  // Keys of rank ≤ r come back to fp16 precision.
  std::vector<float> low(n * d);
  std::vector<float> mix(rank * d);
  for (float& x : mix) x = normal(rng);
  for (std::size_t t = 0; t < n; ++t) {
    std::vector<float> z(rank);
    for (float& x : z) x = normal(rng);
    for (std::size_t c = 0; c < d; ++c) {
      for (std::size_t j = 0; j < rank; ++j) low[t * d + c] += z[j] * mix[j * d + c];
    }
  }
  const std::vector<std::byte> exact_basis = fit(quantizer, low.data(), n);
  std::vector<std::byte> codes(quantizer.key_bytes(d));
  std::vector<float> decoded(d);
  for (std::size_t t = 0; t < n; ++t) {
    const float* key = low.data() + t * d;
    quantizer.encode_key(key, d, exact_basis.data(), codes.data());
    quantizer.decode_key(codes.data(), d, exact_basis.data(), decoded.data());
    double error = 0, norm = 0;
    for (std::size_t c = 0; c < d; ++c) {
      error += std::pow(double(decoded[c]) - key[c], 2);
      norm += double(key[c]) * key[c];
    }
    REQUIRE(std::sqrt(error) <= 2e-3 * std::sqrt(norm));
  }

  // Query rows map to Vᵀq: q·k̂ = (Vᵀq)·a.
  std::vector<float> queries(3 * d);
  for (float& x : queries) x = normal(rng);
  std::vector<float> projected(3 * rank);
  quantizer.project_queries(queries.data(), 3, d, basis.data(), projected.data());
  for (std::size_t r = 0; r < 3; ++r) {
    for (std::size_t j = 0; j < rank; ++j) {
      double expected = 0;
      for (std::size_t c = 0; c < d; ++c)
        expected += double(queries[r * d + c]) * v(Eigen::Index(c), Eigen::Index(j));
      REQUIRE(projected[r * rank + j] == Approx(expected).margin(1e-5));
    }
  }
}

TEST_CASE("lowrank: the cache fits each head to its prefill and encodes keys leaving the window",
          "[quant][lowrank][cache]") {
  std::mt19937 rng(3);
  const std::size_t total = 200;
  Tensor3 k(2, total, d);
  for (std::size_t h = 0; h < 2; ++h) {
    const std::vector<float> rows = spectral_keys(rng, total, 0.9);
    std::copy(rows.begin(), rows.end(),
              k.data.begin() + static_cast<std::ptrdiff_t>(h * total * d));
  }
  const Tensor3 v = random_tensor(rng, 2, total, d);
  const LowRank quantizer(rank);
  // One prefill chunk of 150 fits to all 150 keys; a host appending token by token fits to
  // its first R + 1.
  for (const std::size_t prefill : {std::size_t{150}, std::size_t{1}}) {
    const std::size_t fitted_on = prefill == 1 ? residual + 1 : prefill;
    kvc::KvCache<kvc::evict::Full, LowRank> cache(geometry, {.page_tokens = 16}, {}, quantizer);
    const auto seq = cache.open_sequence();
    cache.append(seq, 0, k.slice(0, prefill), v.slice(0, prefill));
    for (std::size_t n = prefill;;) {
      if (n == 20 || n == residual + 1 || n == 150 || n == 171 || n == total) {
        const bool fitted = n >= fitted_on;
        const kvc::DenseLayer dense = cache.export_dense(seq, 0);
        for (std::size_t h = 0; h < 2; ++h) {
          const std::vector<float> keys = head_rows(k, h, n);
          const std::vector<std::byte> basis =
              fitted ? fit(quantizer, keys.data(), fitted_on) : std::vector<std::byte>{};
          const auto [expected_keys, expected_values] =
              expected_rows(quantizer, basis, keys, head_rows(v, h, n), n);
          REQUIRE(matrix(dense.keys[h]) == expected_keys);
          REQUIRE(matrix(dense.values[h]) == expected_values);
        }
        const Tensor3 q = random_tensor(rng, 8, 3, d);
        Tensor3 out(8, 3, d);
        cache.attend(seq, 0, q.view(), out.mutable_view());
        REQUIRE(kvc::test::attend_error(cache, seq, 0, q, out) < 1e-4);
        const std::size_t sealed = fitted ? n - residual : 0;
        const kvc::CacheStats stats = cache.stats();
        REQUIRE(stats.code_bytes == 2 * bytes_per_head(quantizer, n, sealed, fitted));
        REQUIRE(stats.bytes_held() == stats.page_bytes + stats.metadata_bytes + stats.staged_bytes);
      }
      if (n == total) break;
      cache.append(seq, 0, k.slice(n, 1), v.slice(n, 1));
      ++n;
    }
  }
}

TEST_CASE("lowrank: fork, truncate, and a refit once a head loses every encoded key",
          "[quant][lowrank][cache]") {
  std::mt19937 rng(21);
  const Tensor3 k = random_tensor(rng, 2, 100, d);
  const Tensor3 v = random_tensor(rng, 2, 100, d);
  const LowRank quantizer(rank);
  kvc::KvCache<kvc::evict::Full, LowRank> cache(geometry, {.page_tokens = 16}, {}, quantizer);
  const auto parent = cache.open_sequence();
  cache.append(parent, 0, k.view(), v.view());
  const auto child = cache.fork(parent);
  const kvc::DenseLayer at_fork = cache.export_dense(parent, 0);
  // The child encodes 50 more keys leaving its window, into pages the parent shares.
  const Tensor3 k2 = random_tensor(rng, 2, 50, d);
  const Tensor3 v2 = random_tensor(rng, 2, 50, d);
  for (std::size_t t = 0; t < 50; ++t) cache.append(child, 0, k2.slice(t, 1), v2.slice(t, 1));
  const kvc::DenseLayer parent_now = cache.export_dense(parent, 0);
  const kvc::DenseLayer child_now = cache.export_dense(child, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    REQUIRE(parent_now.keys[h] == at_fork.keys[h]);
    REQUIRE(parent_now.values[h] == at_fork.values[h]);
    // The child's new keys went into the parent's basis (fitted on the 100-token prefill).
    std::vector<float> keys = head_rows(k, h, 100);
    const std::vector<std::byte> basis = fit(quantizer, keys.data(), 100);
    const std::vector<float> more = head_rows(k2, h, 50);
    keys.insert(keys.end(), more.begin(), more.end());
    std::vector<float> values = head_rows(v, h, 100);
    const std::vector<float> more_values = head_rows(v2, h, 50);
    values.insert(values.end(), more_values.begin(), more_values.end());
    const auto [expected_keys, expected_values] =
        expected_rows(quantizer, basis, keys, values, 150);
    REQUIRE(matrix(child_now.keys[h]) == expected_keys);
    REQUIRE(matrix(child_now.values[h]) == expected_values);
  }

  // Truncate to 10: ten encoded keys and values stay, with the basis.
  cache.truncate(child, 10);
  const kvc::DenseLayer cut = cache.export_dense(child, 0);
  for (std::size_t h = 0; h < 2; ++h) REQUIRE(cut.keys[h] == child_now.keys[h].topRows(10));
  REQUIRE(cache.stats(child).code_bytes ==
          2 * (10 * quantizer.key_bytes(d) + quantizer.key_group_bytes(d) +
               10 * quantizer.value_bytes(d)));
  // To 0: the basis goes with the last encoded key; the next prefill fits a new one.
  cache.truncate(child, 0);
  REQUIRE(cache.stats(child).code_bytes == 0);
  const Tensor3 k3 = random_tensor(rng, 2, 80, d);
  const Tensor3 v3 = random_tensor(rng, 2, 80, d);
  cache.append(child, 0, k3.view(), v3.view());
  const kvc::DenseLayer refit = cache.export_dense(child, 0);
  for (std::size_t h = 0; h < 2; ++h) {
    const std::vector<float> keys = head_rows(k3, h, 80);
    const auto [expected_keys, expected_values] =
        expected_rows(quantizer, fit(quantizer, keys.data(), 80), keys, head_rows(v3, h, 80), 80);
    REQUIRE(matrix(refit.keys[h]) == expected_keys);
  }
  REQUIRE(cache.stats(child).code_bytes == 2 * bytes_per_head(quantizer, 80, 80 - residual, true));
  cache.close(child);
  cache.close(parent);
  REQUIRE(cache.stats().pages_in_use == 0);
}

TEST_CASE("lowrank: composes with H2O, SnapKV and D2O merging", "[quant][lowrank][cache]") {
  const LowRank quantizer(rank);
  kvc::test::check_composes_over_decode(kvc::evict::H2O{}, quantizer, false, 1e-4);
  kvc::test::check_composes_over_decode(kvc::evict::SnapKV({.window = 16}), quantizer, true, 1e-4);
  kvc::test::check_composes_over_decode(kvc::evict::D2O<>{}, quantizer, false, 1e-4);
}

TEST_CASE("lowrank: bad ranks and inputs are rejected before anything is stored",
          "[quant][lowrank][cache]") {
  CHECK_THROWS_AS(LowRank(0), kvc::ValueError);
  CHECK_THROWS_WITH(LowRank(300), Catch::Contains("300") && Catch::Contains("lowrank"));
  const kvc::Geometry narrow{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 8};
  CHECK_THROWS_AS((kvc::KvCache<kvc::evict::Full, LowRank>(narrow, {}, {}, LowRank(16))),
                  kvc::UnsupportedError);
  kvc::KvCache<kvc::evict::Full, LowRank> cache(geometry, {.page_tokens = 16}, {}, LowRank(rank));
  const auto seq = cache.open_sequence();
  Tensor3 k(2, 40, d);
  Tensor3 v(2, 40, d);
  k.at(1, 39, 5) = 5000.0F;  // |a| ≤ √d · 4000 keeps the coefficients in fp16; beyond: rejected
  CHECK_THROWS_WITH(cache.append(seq, 0, k.view(), v.view()),
                    Catch::Contains("5000") && Catch::Contains("lowrank"));
  k.at(1, 39, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(cache.append(seq, 0, k.view(), v.view()), kvc::ValueError);
  CHECK(cache.tokens(seq, 0, 0) == 0);
  CHECK(cache.stats().code_bytes == 0);
}
