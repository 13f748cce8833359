// Tests of kvc/core/kv_cache.hpp: attend against a float64 reference, sequences (fork,
// close, copy-on-write), export, accounting and the error contract.
#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <limits>
#include <random>
#include <span>

namespace {

using kvc::test::attend_error;
using kvc::test::random_tensor;
using kvc::test::Tensor3;

template <class Cache>
void append_tensors(Cache& cache, kvc::SequenceId seq, std::size_t layer, const Tensor3& k,
                    const Tensor3& v) {
  cache.append(seq, layer, k.view(), v.view());
}

// Everything observable about one sequence, to prove a rejected call changed nothing.
template <class Cache>
struct Snapshot {
  std::vector<kvc::DenseLayer> layers;
  std::vector<std::size_t> seen;
  std::size_t pages = 0;

  Snapshot(Cache& cache, kvc::SequenceId seq) {
    for (std::size_t l = 0; l < cache.geometry().layers; ++l) {
      layers.push_back(cache.export_dense(seq, l));
      seen.push_back(cache.tokens_seen(seq, l));
    }
    pages = cache.stats(seq).pages_in_use;
  }
  bool operator==(const Snapshot& other) const {
    if (seen != other.seen || pages != other.pages) return false;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      for (std::size_t h = 0; h < layers[l].keys.size(); ++h) {
        if (layers[l].keys[h] != other.layers[l].keys[h] ||
            layers[l].values[h] != other.layers[l].values[h] ||
            layers[l].positions[h] != other.layers[l].positions[h]) {
          return false;
        }
      }
    }
    return true;
  }
};

}  // namespace

TEST_CASE("attend matches a float64 reference across GQA, head_dim, queries and lengths",
          "[kv_cache][attend]") {
  const std::size_t group = GENERATE(1, 4, 8);
  const std::size_t head_dim = GENERATE(64, 128);
  const std::size_t length = GENERATE(1, 2, 15, 16, 17, 100, 1000, 5000);
  const std::size_t queries = GENERATE(1, 3, 8);
  if (queries > length) return;
  CAPTURE(group, head_dim, length, queries);

  std::mt19937 rng(static_cast<unsigned>(group * 7919 + head_dim * 31 + length * 3 + queries));
  const kvc::Geometry geometry{
      .layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = head_dim};
  kvc::KvCache<> cache(geometry);
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 2, length, head_dim);
  const Tensor3 v = random_tensor(rng, 2, length, head_dim);
  const Tensor3 q = random_tensor(rng, geometry.q_heads, queries, head_dim);
  Tensor3 out(geometry.q_heads, queries, head_dim);
  append_tensors(cache, seq, 0, k, v);
  cache.attend(seq, 0, q.view(), out.mutable_view());
  // fp32 accumulation over ≤ 5000 terms of O(1) values: a few ulps × log n is ≪ 1e-4.
  CHECK(attend_error(cache, seq, 0, q, out) < 1e-4);
}

TEST_CASE("attend survives adversarial scores (huge logits, late maxima, ties, zero queries)",
          "[kv_cache][attend]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(7);
  const std::size_t length = 300;
  Tensor3 k = random_tensor(rng, 1, length, 64);
  Tensor3 v = random_tensor(rng, 1, length, 64);
  Tensor3 q = random_tensor(rng, 4, 1, 64);

  SECTION("logits of ±1000: the running max must rescale, not overflow") {
    for (float& x : k.data) x *= 250.0F;
    // The largest score appears in the last page, after many pages were accumulated.
    for (std::size_t c = 0; c < 64; ++c) k.at(0, length - 3, c) = q.at(0, 0, c) * 40.0F;
  }
  SECTION("identical keys: uniform attention = mean of the values") {
    for (std::size_t t = 0; t < length; ++t) {
      for (std::size_t c = 0; c < 64; ++c) k.at(0, t, c) = k.at(0, 0, c);
    }
  }
  SECTION("zero queries: uniform attention") {
    std::fill(q.data.begin(), q.data.end(), 0.0F);
  }
  SECTION("tiny values near the denormal range") {
    for (float& x : k.data) x *= 1e-30F;
    for (float& x : v.data) x *= 1e-30F;
  }

  kvc::KvCache<> cache(geometry);
  const auto seq = cache.open_sequence();
  append_tensors(cache, seq, 0, k, v);
  Tensor3 out(4, 1, 64);
  cache.attend(seq, 0, q.view(), out.mutable_view());
  for (float x : out.data) REQUIRE(std::isfinite(x));
  CHECK(attend_error(cache, seq, 0, q, out) < 1e-4);
}

TEST_CASE("chunked prefill, decode and multi-token verification are causal", "[kv_cache][attend]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(11);
  kvc::KvCache<> cache(geometry, {.page_tokens = 8});
  const auto seq = cache.open_sequence();
  // Chunks of uneven size, then single decode tokens, then a 5-token verification step.
  for (std::size_t chunk : {37, 64, 3, 1, 1, 1, 5}) {
    for (std::size_t layer = 0; layer < 2; ++layer) {
      const Tensor3 k = random_tensor(rng, 2, chunk, 64);
      const Tensor3 v = random_tensor(rng, 2, chunk, 64);
      const Tensor3 q = random_tensor(rng, 8, chunk, 64);
      Tensor3 out(8, chunk, 64);
      append_tensors(cache, seq, layer, k, v);
      cache.attend(seq, layer, q.view(), out.mutable_view());
      CHECK(attend_error(cache, seq, layer, q, out) < 1e-4);
    }
  }
  CHECK(cache.tokens_seen(seq, 0) == 112);
  CHECK(cache.tokens(seq, 1, 1) == 112);
}

TEST_CASE("half and bfloat16 inputs, storage and outputs", "[kv_cache][attend]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(5);
  const Tensor3 k = random_tensor(rng, 1, 200, 64);
  const Tensor3 v = random_tensor(rng, 1, 200, 64);
  const Tensor3 q = random_tensor(rng, 4, 2, 64);

  std::vector<Eigen::half> k16(k.data.size()), v16(v.data.size()), out16(4 * 2 * 64);
  for (std::size_t i = 0; i < k.data.size(); ++i) {
    k16[i] = Eigen::half(k.data[i]);
    v16[i] = Eigen::half(v.data[i]);
  }
  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>> cache(geometry);
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, kvc::View<const Eigen::half, 3>(k16.data(), {1, 200, 64}),
               kvc::View<const Eigen::half, 3>(v16.data(), {1, 200, 64}));
  cache.attend(seq, 0, q.view(), kvc::View<Eigen::half, 3>(out16.data(), {4, 2, 64}));
  Tensor3 out(4, 2, 64);
  for (std::size_t i = 0; i < out16.size(); ++i) out.data[i] = static_cast<float>(out16[i]);
  // Stored f16 keys are exact copies of the inputs.
  const auto dense = cache.export_dense(seq, 0);
  for (std::size_t i = 0; i < 200 * 64; ++i) {
    REQUIRE(dense.keys[0].data()[i] == static_cast<float>(k16[i]));
  }
  // The f16 output rounding (2^-11 relative) dominates the error.
  CHECK(attend_error(cache, seq, 0, q, out) < 2e-3);

  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::bfloat16>> bf16_cache(geometry);
  const auto bf16_seq = bf16_cache.open_sequence();
  bf16_cache.append(bf16_seq, 0, k.view(), v.view());
  Tensor3 bf16_out(4, 2, 64);
  bf16_cache.attend(bf16_seq, 0, q.view(), bf16_out.mutable_view());
  CHECK(attend_error(bf16_cache, bf16_seq, 0, q, bf16_out) < 1e-4);
  const auto bf16_dense = bf16_cache.export_dense(bf16_seq, 0);
  for (std::size_t i = 0; i < 200 * 64; ++i) {
    // bf16 keeps 8 significant bits: round-to-nearest error ≤ 2^-9 relative.
    REQUIRE(std::abs(bf16_dense.keys[0].data()[i] - k.data[i]) <=
            std::abs(k.data[i]) * (1.0F / 256.0F) + 1e-30F);
  }
}

TEST_CASE("fork shares pages copy-on-write and close returns them", "[kv_cache][sequences]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 2, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  kvc::KvCache<> cache(geometry, {.page_tokens = 16});
  const auto parent = cache.open_sequence();
  for (std::size_t l = 0; l < 2; ++l) {
    append_tensors(cache, parent, l, random_tensor(rng, 2, 40, 64), random_tensor(rng, 2, 40, 64));
  }
  const std::size_t pages_parent = 2 * 2 * 3;  // layers × kv heads × ceil(40 / 16)
  REQUIRE(cache.stats().pages_in_use == pages_parent);
  const Snapshot<kvc::KvCache<>> before(cache, parent);

  const auto child = cache.fork(parent);
  CHECK(cache.sequence_count() == 2);
  CHECK(cache.stats().pages_in_use == pages_parent);  // nothing copied yet
  CHECK(cache.stats(child).pages_in_use == pages_parent);

  // The child writes into the shared, partially filled last page of layer 0: only that
  // page (per kv head) is copied.
  append_tensors(cache, child, 0, random_tensor(rng, 2, 1, 64), random_tensor(rng, 2, 1, 64));
  CHECK(cache.stats().pages_in_use == pages_parent + 2);
  CHECK(Snapshot<kvc::KvCache<>>(cache, parent) == before);
  CHECK(cache.tokens(child, 0, 0) == 41);
  CHECK(cache.tokens(parent, 0, 0) == 40);
  const auto child_dense = cache.export_dense(child, 0);
  const auto parent_dense = cache.export_dense(parent, 0);
  CHECK(child_dense.keys[1].topRows(40) == parent_dense.keys[1]);

  cache.close(parent);
  CHECK(!cache.is_open(parent));
  CHECK(cache.stats().pages_in_use == pages_parent + 2 - 2);  // the child keeps its own
  CHECK(cache.export_dense(child, 0).keys[1] == child_dense.keys[1]);
  cache.close(child);
  CHECK(cache.stats().pages_in_use == 0);
  CHECK(cache.sequence_count() == 0);

  // Slots are reused; stale handles stay invalid.
  const auto reused = cache.open_sequence();
  CHECK(reused.slot == child.slot);
  CHECK(!cache.is_open(child));
  CHECK_THROWS_AS(cache.tokens(child, 0, 0), kvc::SequenceError);
}

TEST_CASE("many sequences keep their own lengths", "[kv_cache][sequences]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(9);
  kvc::KvCache<> cache(geometry);
  std::vector<kvc::SequenceId> sequences;
  std::vector<Tensor3> keys;
  for (std::size_t s = 0; s < 5; ++s) {
    sequences.push_back(cache.open_sequence());
    keys.push_back(random_tensor(rng, 2, 10 + 7 * s, 64));
    append_tensors(cache, sequences.back(), 0, keys.back(), random_tensor(rng, 2, 10 + 7 * s, 64));
  }
  for (std::size_t s = 0; s < 5; ++s) {
    CHECK(cache.tokens(sequences[s], 0, 1) == 10 + 7 * s);
    const auto dense = cache.export_dense(sequences[s], 0);
    for (std::size_t t = 0; t < keys[s].tokens; ++t) {
      for (std::size_t c = 0; c < 64; ++c) REQUIRE(dense.keys[1](t, c) == keys[s].at(1, t, c));
    }
  }
  CHECK(cache.stats().tokens_stored == 2 * (10 + 17 + 24 + 31 + 38));
}

TEST_CASE("stats() accounts bytes exactly", "[kv_cache][stats]") {
  const kvc::Geometry geometry{.layers = 3, .q_heads = 4, .kv_heads = 2, .head_dim = 128};
  std::mt19937 rng(1);
  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>> cache(geometry,
                                                                       {.page_tokens = 32});
  const auto seq = cache.open_sequence();
  for (std::size_t l = 0; l < 3; ++l) {
    append_tensors(cache, seq, l, random_tensor(rng, 2, 100, 128), random_tensor(rng, 2, 100, 128));
  }
  const kvc::CacheStats stats = cache.stats();
  // Page = 32 × (256 B key + 256 B value + 4 B position), each block padded to 64 B.
  CHECK(cache.page_bytes() == 32 * 256 + 32 * 256 + 128);
  CHECK(stats.pages_in_use == 3 * 2 * 4);
  CHECK(stats.page_bytes == stats.pages_in_use * cache.page_bytes());
  CHECK(stats.code_bytes == 3 * 2 * 100 * 512);
  CHECK(stats.tokens_stored == 600);
  CHECK(stats.tokens_seen == 300);
  CHECK(stats.tokens(2, 1) == 100);
  CHECK(stats.dense_f16_bytes() == 3 * 2 * 100 * 512);
  CHECK(stats.metadata_bytes > 0);
  CHECK(stats.bytes_held() == stats.page_bytes + stats.metadata_bytes);
  // Dense f16 holds slightly more than the fp16 baseline (positions, page tails, tables).
  CHECK(stats.compression_ratio() < 1.0);
  CHECK(stats.compression_ratio() > 0.7);
  const std::string text = fmt::format("{}", stats);
  CHECK(text.find("dense_f16") != std::string::npos);
  CHECK(text.find(std::to_string(stats.bytes_held())) != std::string::npos);
}

TEST_CASE("rejected calls throw a typed error naming the value and change nothing",
          "[kv_cache][errors]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(2);
  kvc::KvCache<kvc::evict::H2O> cache(geometry, {.budget = kvc::Budget::tokens(24)});
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 2, 30, 64);
  const Tensor3 v = random_tensor(rng, 2, 30, 64);
  append_tensors(cache, seq, 0, k, v);
  append_tensors(cache, seq, 1, k, v);
  using Cache = kvc::KvCache<kvc::evict::H2O>;
  const Snapshot<Cache> before(cache, seq);
  const std::size_t pages_before = cache.stats().pages_in_use;

  SECTION("wrong kv head count") {
    const Tensor3 bad = random_tensor(rng, 3, 1, 64);
    CHECK_THROWS_WITH(cache.append(seq, 0, bad.view(), bad.view()),
                      "append: k has 3 kv heads, cache has 2");
    CHECK_THROWS_AS(cache.append(seq, 0, bad.view(), bad.view()), kvc::ShapeError);
  }
  SECTION("wrong head_dim") {
    const Tensor3 bad = random_tensor(rng, 2, 1, 32);
    CHECK_THROWS_WITH(cache.append(seq, 0, bad.view(), bad.view()),
                      "append: k has head_dim 32, cache has 64");
  }
  SECTION("k and v of different lengths") {
    CHECK_THROWS_WITH(cache.append(seq, 0, k.slice(0, 2), v.slice(0, 3)),
                      "append: k has 2 tokens, v has 3");
  }
  SECTION("non-contiguous head_dim") {
    const kvc::View<const float, 3> strided(k.data.data(), {2, 2, 64}, {64 * 30, 128, 2});
    CHECK_THROWS_AS(cache.append(seq, 0, strided, strided), kvc::ShapeError);
  }
  SECTION("layer out of range") {
    CHECK_THROWS_WITH(cache.append(seq, 2, k.slice(0, 1), v.slice(0, 1)),
                      "append: layer 2 out of range, cache has 2 layers");
  }
  SECTION("NaN and Inf are rejected before anything is stored") {
    Tensor3 poisoned = random_tensor(rng, 2, 4, 64);
    poisoned.at(1, 3, 17) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(cache.append(seq, 0, poisoned.view(), poisoned.view()), kvc::ValueError);
    CHECK_THROWS_WITH(cache.append(seq, 0, v.slice(0, 4), poisoned.view()),
                      Catch::Contains("v[1][3][17] is nan"));
    poisoned.at(1, 3, 17) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(cache.append(seq, 1, poisoned.view(), v.slice(0, 4)),
                      Catch::Contains("k[1][3][17] is inf"));
  }
  SECTION("queries: NaN and Inf are rejected") {
    Tensor3 q = random_tensor(rng, 8, 1, 64);
    Tensor3 out(8, 1, 64);
    q.at(5, 0, 9) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(cache.attend(seq, 0, q.view(), out.mutable_view()),
                      "attend: q[5][0][9] is nan, queries must be finite");
    q.at(5, 0, 9) = -std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(cache.attend(seq, 0, q.view(), out.mutable_view()), kvc::ValueError);
  }
  SECTION("queries: wrong heads, too many tokens, zero tokens, mismatched out") {
    const Tensor3 q_bad_heads = random_tensor(rng, 2, 1, 64);
    Tensor3 out(8, 1, 64);
    CHECK_THROWS_WITH(cache.attend(seq, 0, q_bad_heads.view(), out.mutable_view()),
                      "attend: q has 2 query heads, cache has 8");
    const Tensor3 q_long = random_tensor(rng, 8, 31, 64);
    Tensor3 out_long(8, 31, 64);
    CHECK_THROWS_WITH(cache.attend(seq, 0, q_long.view(), out_long.mutable_view()),
                      Catch::StartsWith("attend: q has 31 tokens but the layer has seen only 30"));
    const Tensor3 q_empty(8, 0, 64);
    Tensor3 out_empty(8, 0, 64);
    CHECK_THROWS_WITH(cache.attend(seq, 0, q_empty.view(), out_empty.mutable_view()),
                      "attend: q has 0 tokens");
    const Tensor3 q = random_tensor(rng, 8, 2, 64);
    CHECK_THROWS_WITH(cache.attend(seq, 0, q.view(), out.mutable_view()),
                      "attend: out has 1 tokens, q has 2");
    CHECK_THROWS_AS(cache.observe(seq, 0, q_long.view()), kvc::ShapeError);
  }
  SECTION("unknown and closed sequences") {
    CHECK_THROWS_WITH(cache.append(kvc::SequenceId{7, 0}, 0, k.slice(0, 1), v.slice(0, 1)),
                      "append: sequence 7 was never opened (1 slots)");
    const auto other = cache.open_sequence();
    cache.close(other);
    CHECK_THROWS_WITH(cache.compress(other), "compress: sequence 1 (generation 0) is closed");
    CHECK_THROWS_AS(cache.fork(other), kvc::SequenceError);
    CHECK_THROWS_AS(cache.close(other), kvc::SequenceError);
  }
  CHECK(Snapshot<Cache>(cache, seq) == before);
  CHECK(cache.stats().pages_in_use == pages_before);
}

TEST_CASE("queries beyond the storage format's range are valid", "[kv_cache][errors]") {
  // Only the stored K/V are bound by the format (f16: ±65504); a query is never stored.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 32};
  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>> cache(geometry);
  const auto seq = cache.open_sequence();
  Tensor3 k(1, 3, 32), v(1, 3, 32), q(2, 1, 32), out(2, 1, 32);
  for (std::size_t t = 0; t < 3; ++t) {
    k.at(0, t, 0) = 1.0F;
    v.at(0, t, 1) = static_cast<float>(t);
  }
  cache.append(seq, 0, k.view(), v.view());
  q.at(1, 0, 0) = 1.0e30F;  // equal keys: equal scores, however large
  REQUIRE_NOTHROW(cache.attend(seq, 0, q.view(), out.mutable_view()));
  CHECK(out.at(1, 0, 1) == Approx(1.0));  // the mean of 0, 1, 2
}

TEST_CASE("construction rejects bad geometry, budgets and head dims", "[kv_cache][errors]") {
  CHECK_THROWS_WITH(kvc::KvCache<>({.layers = 1, .q_heads = 6, .kv_heads = 4, .head_dim = 64}),
                    "Geometry: q_heads 6 is not a positive multiple of kv_heads 4");
  CHECK_THROWS_AS(kvc::KvCache<>({.layers = 0, .q_heads = 4, .kv_heads = 4, .head_dim = 64}),
                  kvc::ShapeError);
  CHECK_THROWS_AS(kvc::KvCache<>({.layers = 1, .q_heads = 4, .kv_heads = 4, .head_dim = 0}),
                  kvc::ShapeError);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 4, .head_dim = 64};
  CHECK_THROWS_AS(kvc::KvCache<>(geometry, {.page_tokens = 0}), kvc::ShapeError);
  CHECK_THROWS_AS(kvc::Budget::tokens(0), kvc::BudgetError);
  CHECK_THROWS_WITH(kvc::Budget::ratio(1.5), "Budget::ratio: fraction 1.5 is outside (0, 1]");
  CHECK_THROWS_AS(kvc::Budget::ratio(0.0), kvc::BudgetError);
  // A budget on a cache that never evicts would be silently ignored: rejected instead.
  CHECK_THROWS_AS(kvc::KvCache<>(geometry, {.budget = kvc::Budget::tokens(8)}), kvc::BudgetError);
}

namespace {

// A quantizer whose kernels only take head_dim % 32 == 0 (like ggml's block formats).
struct Blocked32 : kvc::quant::Dense<float> {
  static constexpr std::string_view name() noexcept { return "blocked32"; }
  constexpr bool supports_head_dim(std::size_t d) const noexcept { return d % 32 == 0; }
};

}  // namespace

TEST_CASE("a head_dim the quantizer cannot take is rejected by name", "[kv_cache][errors]") {
  static_assert(kvc::Quantizer<Blocked32>);
  using Cache = kvc::KvCache<kvc::evict::Full, Blocked32>;
  CHECK_THROWS_WITH(Cache({.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 48}),
                    "KvCache: quantizer 'blocked32' does not support head_dim 48");
  CHECK_NOTHROW(Cache({.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64}));
}

namespace {

// Reads only page 0 (plus the newest page, which the cache always adds): exercises the
// retrieval path of attend.
struct FirstPageIndex {
  struct HeadState {
    std::size_t appended = 0;
    std::size_t compactions = 0;
  };
  static constexpr bool reads_all = false;
  static constexpr std::string_view name() noexcept { return "first_page"; }
  void on_append(HeadState& state, const kvc::AppendEvent& event) const {
    REQUIRE(event.keys.size() == event.count * event.head_dim);
    state.appended += event.count;
  }
  void on_compact(HeadState& state, std::span<const std::uint32_t>) const { ++state.compactions; }
  void select_pages(const HeadState&, const kvc::SelectContext&,
                    std::vector<std::uint32_t>& pages) const {
    pages.push_back(0);
  }
};

}  // namespace

TEST_CASE("a retrieval index restricts attend to the pages it selects", "[kv_cache][retrieval]") {
  static_assert(kvc::RetrievalIndex<FirstPageIndex>);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(4);
  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<float>, FirstPageIndex> cache(
      geometry, {.page_tokens = 8});
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 1, 30, 64);
  const Tensor3 v = random_tensor(rng, 1, 30, 64);
  const Tensor3 q = random_tensor(rng, 2, 1, 64);
  append_tensors(cache, seq, 0, k, v);
  Tensor3 out(2, 1, 64);
  cache.attend(seq, 0, q.view(), out.mutable_view());

  // Expected: exact attention over tokens 0..7 (page 0) and 24..29 (the newest page).
  std::vector<float> keys, values;
  std::vector<kvc::Position> positions;
  for (std::size_t t = 0; t < 30; ++t) {
    if (t >= 8 && t < 24) continue;
    positions.push_back(static_cast<kvc::Position>(t));
    for (std::size_t c = 0; c < 64; ++c) {
      keys.push_back(k.at(0, t, c));
      values.push_back(v.at(0, t, c));
    }
  }
  for (std::size_t qh = 0; qh < 2; ++qh) {
    std::vector<float> query(q.data.begin() + static_cast<std::ptrdiff_t>(qh * 64),
                             q.data.begin() + static_cast<std::ptrdiff_t>(qh * 64 + 64));
    const auto expected =
        kvc::test::reference_attention(query, keys.data(), values.data(), positions, 29, 64);
    for (std::size_t c = 0; c < 64; ++c)
      CHECK(out.at(qh, 0, c) == Approx(expected[c]).margin(1e-5));
  }
}

namespace {

// Records what observe() hands over, to check it against a float64 softmax.
struct RecordingScorer : kvc::evict::Full {
  struct HeadState {
    std::vector<float> weights;
    std::size_t rows = 0, window = 0, tokens = 0;
  };
  void on_append(HeadState&, const kvc::AppendEvent&) noexcept {}
  void score(const HeadState&, const kvc::ScoreContext&, std::span<float> scores) const noexcept {
    std::fill(scores.begin(), scores.end(), 0.0F);
  }
  void on_compact(HeadState&, std::span<const std::uint32_t>) noexcept {}
  void on_observe(HeadState& state, const kvc::ObserveEvent& event) {
    state.weights.assign(event.weights.begin(), event.weights.end());
    state.rows = event.query_rows;
    state.window = event.window;
    state.tokens = event.tokens;
  }
};

}  // namespace

TEST_CASE("observe hands scorers the window queries' softmax over all keys",
          "[kv_cache][observe]") {
  static_assert(kvc::ObservesQueries<RecordingScorer>);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(6);
  kvc::KvCache<RecordingScorer> cache(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 2, 50, 64);
  append_tensors(cache, seq, 0, k, random_tensor(rng, 2, 50, 64));
  const Tensor3 window = random_tensor(rng, 4, 6, 64);
  cache.observe(seq, 0, window.view());
  const auto positions = cache.positions(seq, 0, 1);
  const auto& state = cache.scorer_state(seq, 0, 1);
  REQUIRE(state.rows == 2 * 6);
  REQUIRE(state.window == 6);
  REQUIRE(state.tokens == 50);
  std::vector<float> keys(k.data.begin() + 50 * 64, k.data.end());
  for (std::size_t r = 0; r < state.rows; ++r) {
    const std::size_t qh = 2 + r / 6;  // kv head 1 serves query heads 2 and 3
    const std::size_t t = r % 6;
    std::vector<float> query(64);
    for (std::size_t c = 0; c < 64; ++c) query[c] = window.at(qh, t, c);
    const auto expected = kvc::test::reference_weights(query, keys.data(), positions,
                                                       static_cast<kvc::Position>(44 + t), 64);
    for (std::size_t i = 0; i < 50; ++i) {
      REQUIRE(state.weights[r * 50 + i] == Approx(expected[i]).margin(1e-6));
    }
  }
}

namespace {

// Keeps the tokens with the smallest key norm (Knorm's rule) from the stored keys, and
// records the appended keys it was shown.
struct SmallestKeyNorm : kvc::evict::Full {
  static constexpr bool evicts = true;
  static constexpr bool wants_appended_keys = true;
  static constexpr bool scores_stored_keys = true;
  struct HeadState {
    std::vector<float> appended;
  };
  void on_append(HeadState& state, const kvc::AppendEvent& event) {
    state.appended.insert(state.appended.end(), event.keys.begin(), event.keys.end());
  }
  void score(const HeadState&, const kvc::ScoreContext& context, std::span<float> scores) const {
    REQUIRE(context.head_dim == 64);
    REQUIRE(context.keys.size() == scores.size() * 64);
    for (std::size_t i = 0; i < scores.size(); ++i) {
      double norm = 0;
      for (std::size_t c = 0; c < context.head_dim; ++c) {
        norm +=
            double(context.keys[i * context.head_dim + c]) * context.keys[i * context.head_dim + c];
      }
      scores[i] = static_cast<float>(-norm);
    }
  }
  void on_compact(HeadState&, std::span<const std::uint32_t>) noexcept {}
};

}  // namespace

TEST_CASE("scorers that ask for keys get the appended and the stored keys", "[kv_cache][scorer]") {
  static_assert(kvc::WantsAppendedKeys<SmallestKeyNorm> && kvc::ScoresStoredKeys<SmallestKeyNorm>);
  static_assert(!kvc::WantsAppendedKeys<kvc::evict::H2O> &&
                !kvc::ScoresStoredKeys<kvc::evict::H2O>);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(8);
  kvc::KvCache<SmallestKeyNorm, kvc::quant::Dense<Eigen::half>> cache(
      geometry, {.budget = kvc::Budget::tokens(10), .page_tokens = 4});
  const auto seq = cache.open_sequence();
  Tensor3 k = random_tensor(rng, 2, 30, 64);
  // Scale each token's key so its norm rank is known: token t has norm ∝ (1 + (t * 7) % 30).
  for (std::size_t h = 0; h < 2; ++h) {
    for (std::size_t t = 0; t < 30; ++t) {
      double norm = 0;
      for (std::size_t c = 0; c < 64; ++c) norm += double(k.at(h, t, c)) * k.at(h, t, c);
      const double target = 1.0 + static_cast<double>((t * 7) % 30);
      for (std::size_t c = 0; c < 64; ++c)
        k.at(h, t, c) = static_cast<float>(k.at(h, t, c) * target / std::sqrt(norm));
    }
  }
  append_tensors(cache, seq, 0, k, random_tensor(rng, 2, 30, 64));
  CHECK(cache.scorer_state(seq, 0, 1).appended ==
        std::vector<float>(k.data.begin() + 30 * 64, k.data.end()));
  cache.compress(seq);
  // The 10 smallest norms: (t * 7) % 30 < 10.
  std::vector<kvc::Position> expected;
  for (kvc::Position t = 0; t < 30; ++t) {
    if ((t * 7) % 30 < 10) expected.push_back(t);
  }
  CHECK(cache.positions(seq, 0, 0) == expected);
  CHECK(cache.positions(seq, 0, 1) == expected);
}

TEST_CASE("truncate rolls back rejected speculative tokens and frees their pages",
          "[kv_cache][sequences]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(12);
  kvc::KvCache<kvc::evict::H2O> cache(geometry,
                                      {.budget = kvc::Budget::tokens(64), .page_tokens = 8});
  const auto seq = cache.open_sequence();
  Tensor3 out(4, 40, 64);
  for (std::size_t l = 0; l < 2; ++l) {
    append_tensors(cache, seq, l, random_tensor(rng, 2, 40, 64), random_tensor(rng, 2, 40, 64));
    cache.attend(seq, l, random_tensor(rng, 4, 40, 64).view(), out.mutable_view());
  }
  const Snapshot<kvc::KvCache<kvc::evict::H2O>> accepted(cache, seq);
  // Draft 5 tokens, verify them with one 5-query attend, reject the last 3.
  Tensor3 draft_out(4, 5, 64);
  for (std::size_t l = 0; l < 2; ++l) {
    append_tensors(cache, seq, l, random_tensor(rng, 2, 5, 64), random_tensor(rng, 2, 5, 64));
    cache.attend(seq, l, random_tensor(rng, 4, 5, 64).view(), draft_out.mutable_view());
  }
  CHECK(cache.stats().pages_in_use == 2 * 2 * 6);  // 45 tokens in pages of 8
  CHECK_THROWS_WITH(cache.truncate(seq, 46),
                    "truncate: length 46 is past the 45 tokens layer 0 has seen");
  cache.truncate(seq, 42);
  CHECK(cache.tokens_seen(seq, 1) == 42);
  CHECK(cache.positions(seq, 1, 0).back() == 41);
  CHECK(cache.scorer_state(seq, 1, 0).accumulated.size() == 42);
  CHECK(cache.stats().pages_in_use == 2 * 2 * 6);  // 42 tokens still need 6 pages
  cache.truncate(seq, 40);
  CHECK(cache.stats().pages_in_use == 2 * 2 * 5);
  // K/V and positions are exactly those before the draft.
  const Snapshot<kvc::KvCache<kvc::evict::H2O>> rolled_back(cache, seq);
  CHECK(rolled_back == accepted);
  // Decoding continues at position 40.
  append_tensors(cache, seq, 0, random_tensor(rng, 2, 1, 64), random_tensor(rng, 2, 1, 64));
  CHECK(cache.positions(seq, 0, 1).back() == 40);
}

TEST_CASE("values a format cannot hold are rejected, not stored as infinity",
          "[kv_cache][errors]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 8};
  kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>> half_cache(geometry);
  const auto seq = half_cache.open_sequence();
  Tensor3 k(1, 1, 8);
  k.at(0, 0, 3) = 65504.0F;  // f16's largest finite value: fine
  CHECK_NOTHROW(half_cache.append(seq, 0, k.view(), k.view()));
  k.at(0, 0, 5) = -1e5F;
  CHECK_THROWS_WITH(half_cache.append(seq, 0, k.view(), k.view()),
                    "append: k[0][0][5] is -100000, beyond the ±65504 that 'dense_f16' stores");
  CHECK(half_cache.tokens(seq, 0, 0) == 1);
  // bf16 input: its largest value ≤ 65504 is 65280; 65536 is rejected.
  std::vector<Eigen::bfloat16> bf(8, Eigen::bfloat16(65280.0F));
  const kvc::View<const Eigen::bfloat16, 3> bf_view(bf.data(), {1, 1, 8});
  CHECK_NOTHROW(half_cache.append(seq, 0, bf_view, bf_view));
  bf[7] = Eigen::bfloat16(65536.0F);
  CHECK_THROWS_AS(half_cache.append(seq, 0, bf_view, bf_view), kvc::ValueError);
  // The same value is fine where the format holds it.
  kvc::KvCache<> float_cache(geometry);
  const auto float_seq = float_cache.open_sequence();
  CHECK_NOTHROW(float_cache.append(float_seq, 0, k.view(), k.view()));
}

TEST_CASE("eviction slack lets decode run over budget before compressing back",
          "[kv_cache][budget]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(13);
  kvc::KvCache<kvc::evict::StreamingLLM> cache(
      geometry, {.budget = kvc::Budget::tokens(20), .page_tokens = 8, .eviction_slack = 4});
  const auto seq = cache.open_sequence();
  Tensor3 out(2, 1, 64);
  std::vector<std::size_t> held;
  for (int step = 0; step < 30; ++step) {
    cache.append(seq, 0, random_tensor(rng, 1, 1, 64).view(), random_tensor(rng, 1, 1, 64).view());
    cache.attend(seq, 0, random_tensor(rng, 2, 1, 64).view(), out.mutable_view());
    held.push_back(cache.tokens(seq, 0, 0));
  }
  // Grows to 24 (budget + slack), then drops back to 20 when it passes 24.
  CHECK(*std::max_element(held.begin(), held.end()) == 24);
  CHECK(held[24] == 20);  // step 25 appended the 25th token: over 24, compressed to 20
  cache.compress(seq);    // explicit compression ignores the slack
  CHECK(cache.tokens(seq, 0, 0) == 20);
}

TEST_CASE("a sequence's own budget overrides the cache's and forks inherit it",
          "[kv_cache][budget]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 2, .kv_heads = 1, .head_dim = 16};
  std::mt19937 rng(21);
  kvc::KvCache<kvc::evict::StreamingLLM> cache(
      geometry, {.budget = kvc::Budget::tokens(24), .page_tokens = 8});
  const auto wide = cache.open_sequence();
  const auto narrow = cache.open_sequence();
  cache.set_budget(narrow, kvc::Budget::tokens(10));
  CHECK(cache.budget(wide).token_count() == 24);
  CHECK(cache.budget(narrow).token_count() == 10);
  const Tensor3 k = random_tensor(rng, 1, 40, 16);
  const Tensor3 v = random_tensor(rng, 1, 40, 16);
  for (const auto seq : {wide, narrow}) {
    for (std::size_t layer = 0; layer < 2; ++layer) append_tensors(cache, seq, layer, k, v);
    cache.compress(seq);
  }
  for (std::size_t layer = 0; layer < 2; ++layer) {
    CHECK(cache.tokens(wide, layer, 0) == 24);
    CHECK(cache.tokens(narrow, layer, 0) == 10);
  }
  // The narrow sequence holds 2 pages per layer (10 tokens), the wide one 3 (24 tokens).
  CHECK(cache.stats(narrow).pages_in_use == 4);
  CHECK(cache.stats(wide).pages_in_use == 6);

  const auto child = cache.fork(narrow);
  CHECK(cache.budget(child).token_count() == 10);
  cache.set_budget(child, kvc::Budget::ratio(0.5));
  Tensor3 out(2, 1, 16);
  for (const auto seq : {narrow, child}) {
    cache.append(seq, 0, random_tensor(rng, 1, 1, 16).view(), random_tensor(rng, 1, 1, 16).view());
    cache.attend(seq, 0, random_tensor(rng, 2, 1, 16).view(), out.mutable_view());
  }
  CHECK(cache.tokens(narrow, 0, 0) == 10);
  CHECK(cache.tokens(child, 0, 0) == 11);  // 10 + 1 new ≤ ceil(0.5 · 41) = 21: kept
  cache.set_budget(child, kvc::Budget::ratio(0.1));
  cache.compress(child);
  CHECK(cache.tokens(child, 0, 0) == 5);  // ceil(0.1 · 41)
  CHECK(cache.tokens(child, 1, 0) == 4);  // ceil(0.1 · 40)
  CHECK(cache.tokens(narrow, 1, 0) == 10);

  // A closed slot reused by a new sequence starts from the cache's budget again.
  cache.close(narrow);
  const auto reused = cache.open_sequence();
  CHECK(cache.budget(reused).token_count() == 24);

  kvc::KvCache<> keep_all(geometry);
  const auto seq = keep_all.open_sequence();
  CHECK_THROWS_AS(keep_all.set_budget(seq, kvc::Budget::tokens(4)), kvc::BudgetError);
  keep_all.set_budget(seq, kvc::Budget::unlimited());
  CHECK_THROWS_AS(cache.set_budget(narrow, kvc::Budget::tokens(4)), kvc::SequenceError);
}

TEST_CASE("a query buffer re-scores query-aware scorers at decode compressions",
          "[kv_cache][budget][decode]") {
  // DecodingPress semantics: with query_buffer = w and eviction_slack = s, every s + 1
  // decode steps past the budget each head is compressed with the last w attended queries
  // as the observation window. Reference: the same cache without a buffer, where the host
  // calls observe() with those queries itself before compressing.
  const std::size_t buffer = GENERATE(3, 8);
  CAPTURE(buffer);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  const kvc::evict::SnapKV scorer({.window = 4, .kernel = 3});
  const kvc::CacheOptions base{
      .budget = kvc::Budget::tokens(12), .page_tokens = 8, .eviction_slack = 3};
  kvc::CacheOptions buffered = base;
  buffered.query_buffer = buffer;
  kvc::CacheOptions manual = base;
  manual.auto_compress = false;
  kvc::KvCache<kvc::evict::SnapKV> automatic(geometry, buffered, scorer);
  kvc::KvCache<kvc::evict::SnapKV> host(geometry, manual, scorer);
  const auto a = automatic.open_sequence();
  const auto b = host.open_sequence();

  std::mt19937 rng(77);
  const std::size_t prompt = 10, steps = 25, total = prompt + steps;
  const Tensor3 k = random_tensor(rng, 2, total, 16);
  const Tensor3 v = random_tensor(rng, 2, total, 16);
  const Tensor3 q = random_tensor(rng, 4, total, 16, 2.0F);
  Tensor3 out_a(4, prompt, 16), out_b(4, prompt, 16);
  automatic.append(a, 0, k.slice(0, prompt), v.slice(0, prompt));
  host.append(b, 0, k.slice(0, prompt), v.slice(0, prompt));
  automatic.attend(a, 0, q.slice(0, prompt), out_a.mutable_view());
  host.attend(b, 0, q.slice(0, prompt), out_b.mutable_view());
  std::size_t compressions = 0;
  for (std::size_t t = prompt; t < total; ++t) {
    Tensor3 step_a(4, 1, 16), step_b(4, 1, 16);
    automatic.append(a, 0, k.slice(t, 1), v.slice(t, 1));
    automatic.attend(a, 0, q.slice(t, 1), step_a.mutable_view());
    host.append(b, 0, k.slice(t, 1), v.slice(t, 1));
    host.attend(b, 0, q.slice(t, 1), step_b.mutable_view());
    if (host.tokens(b, 0, 0) > 12 + 3 || host.tokens(b, 0, 1) > 12 + 3) {
      const std::size_t window = std::min(buffer, t + 1);
      host.observe(b, 0, q.slice(t + 1 - window, window));
      host.compress(b);
      ++compressions;
    }
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(t, h);
      REQUIRE(automatic.positions(a, 0, h) == host.positions(b, 0, h));
      CHECK(automatic.tokens(a, 0, h) <= 12 + 3);
    }
    CHECK(step_a.data == step_b.data);
  }
  CHECK(compressions >= 5);
  // The ring is metadata: q_heads × buffer × head_dim floats.
  CHECK(automatic.stats(a).metadata_bytes >= host.stats(b).metadata_bytes + 4 * buffer * 16 * 4);
}
