// Tests of kvc/runtime/any_cache.hpp: CacheModel forwards every call of the AnyCache
// interface to the KvCache it owns — same results as the KvCache used directly, same
// errors, same accounting — and exposes that KvCache.
#include <kvc/runtime/any_cache.hpp>

#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/dense.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;

const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 16};

bool bit_identical(const Tensor3& a, const Tensor3& b) {
  return a.data.size() == b.data.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

// One append + observe + attend of every layer, on the AnyCache and on the direct KvCache.
template <class Cache>
void step(kvc::AnyCache& any, kvc::SequenceId any_seq, Cache& direct, kvc::SequenceId direct_seq,
          std::mt19937& rng, std::size_t n) {
  for (std::size_t l = 0; l < geometry.layers; ++l) {
    const Tensor3 k = random_tensor(rng, geometry.kv_heads, n, geometry.head_dim);
    const Tensor3 v = random_tensor(rng, geometry.kv_heads, n, geometry.head_dim);
    const Tensor3 q = random_tensor(rng, geometry.q_heads, n, geometry.head_dim);
    Tensor3 any_out(geometry.q_heads, n, geometry.head_dim), direct_out = any_out;
    any.append(any_seq, l, k.view(), v.view());
    direct.append(direct_seq, l, k.view(), v.view());
    any.observe(any_seq, l, q.view());
    direct.observe(direct_seq, l, q.view());
    any.attend(any_seq, l, q.view(), any_out.mutable_view());
    direct.attend(direct_seq, l, q.view(), direct_out.mutable_view());
    CHECK(bit_identical(any_out, direct_out));
  }
}

template <class Cache>
void check_same_state(const kvc::AnyCache& any, kvc::SequenceId any_seq, const Cache& direct,
                      kvc::SequenceId direct_seq) {
  for (std::size_t l = 0; l < geometry.layers; ++l) {
    CHECK(any.tokens_seen(any_seq, l) == direct.tokens_seen(direct_seq, l));
    for (std::size_t h = 0; h < geometry.kv_heads; ++h) {
      CHECK(any.tokens(any_seq, l, h) == direct.tokens(direct_seq, l, h));
    }
  }
  const kvc::CacheStats a = any.stats(any_seq), b = direct.stats(direct_seq);
  CHECK(a.tokens_per_head == b.tokens_per_head);
  CHECK(a.page_bytes == b.page_bytes);
  CHECK(a.metadata_bytes == b.metadata_bytes);
}

}  // namespace

TEST_CASE("AnyCache is an interface: virtual destructor, no copies through it", "[any_cache]") {
  STATIC_REQUIRE(std::has_virtual_destructor_v<kvc::AnyCache>);
  STATIC_REQUIRE(std::is_abstract_v<kvc::AnyCache>);
  STATIC_REQUIRE(!std::is_copy_constructible_v<kvc::CacheModel<kvc::KvCache<>>>);
  STATIC_REQUIRE(std::is_base_of_v<kvc::AnyCache, kvc::CacheModel<kvc::KvCache<>>>);
}

TEST_CASE("CacheModel forwards every call to the KvCache it owns", "[any_cache]") {
  using Cache = kvc::KvCache<kvc::evict::SnapKV, kvc::quant::Dense<Eigen::half>>;
  const kvc::CacheOptions options{.budget = kvc::Budget::tokens(24), .page_tokens = 8};
  const kvc::evict::SnapKV scorer({.window = 4});
  std::unique_ptr<kvc::AnyCache> any = std::make_unique<kvc::CacheModel<Cache>>(
      "snapkv:budget=24,window=4+f16", geometry, options, scorer);
  Cache direct(geometry, options, scorer);

  CHECK(any->recipe() == "snapkv:budget=24,window=4+f16");
  CHECK(any->geometry() == geometry);
  CHECK(any->options().budget.token_count() == 24);
  CHECK(any->options().page_tokens == 8);
  auto& owned = dynamic_cast<kvc::CacheModel<Cache>&>(*any).cache();
  CHECK(owned.scorer().options().window == 4);

  std::mt19937 rng(21);
  const kvc::SequenceId seq = any->open_sequence();
  const kvc::SequenceId direct_seq = direct.open_sequence();
  CHECK(any->is_open(seq));
  step(*any, seq, direct, direct_seq, rng, 40);  // prompt: observe + compress to 24
  for (int i = 0; i < 5; ++i) step(*any, seq, direct, direct_seq, rng, 1);
  check_same_state(*any, seq, direct, direct_seq);
  CHECK(owned.positions(seq, 1, 1) == direct.positions(direct_seq, 1, 1));

  // fork shares pages; the child diverges on its own.
  const kvc::SequenceId child = any->fork(seq);
  const kvc::SequenceId direct_child = direct.fork(direct_seq);
  step(*any, child, direct, direct_child, rng, 3);
  check_same_state(*any, child, direct, direct_child);
  check_same_state(*any, seq, direct, direct_seq);

  // truncate and an explicit compress.
  any->truncate(child, 30);
  direct.truncate(direct_child, 30);
  check_same_state(*any, child, direct, direct_child);
  CHECK(any->tokens_seen(child, 0) == 30);
  any->compress(seq);
  direct.compress(direct_seq);
  check_same_state(*any, seq, direct, direct_seq);

  // close frees the child's pages; the handle goes stale.
  any->close(child);
  direct.close(direct_child);
  CHECK(!any->is_open(child));
  const kvc::CacheStats a = any->stats(), b = direct.stats();
  CHECK(a.sequences == 1);
  CHECK(a.sequences == b.sequences);
  CHECK(a.pages_in_use == b.pages_in_use);
  CHECK(a.bytes_held() == b.bytes_held());
  CHECK(a.scorer == "snapkv");
  CHECK(a.quantizer == "dense_f16");
}

TEST_CASE("CacheModel passes the KvCache's errors through unchanged", "[any_cache]") {
  std::unique_ptr<kvc::AnyCache> any =
      std::make_unique<kvc::CacheModel<kvc::KvCache<kvc::evict::H2O>>>(
          "", geometry, kvc::CacheOptions{.budget = kvc::Budget::tokens(8)});
  CHECK(any->recipe().empty());
  const kvc::SequenceId seq = any->open_sequence();
  std::mt19937 rng(22);
  const Tensor3 wrong = random_tensor(rng, geometry.kv_heads + 1, 2, geometry.head_dim);
  const Tensor3 right = random_tensor(rng, geometry.kv_heads, 2, geometry.head_dim);
  CHECK_THROWS_AS(any->append(seq, 0, wrong.view(), wrong.view()), kvc::ShapeError);
  CHECK_THROWS_AS(any->append(seq, geometry.layers, right.view(), right.view()), kvc::ShapeError);
  CHECK(any->tokens_seen(seq, 0) == 0);  // a rejected call changes nothing
  any->close(seq);
  CHECK_THROWS_AS(any->append(seq, 0, right.view(), right.view()), kvc::SequenceError);
  CHECK_THROWS_AS(any->stats(seq), kvc::SequenceError);
  // A finite budget on a scorer that never evicts is refused at construction.
  CHECK_THROWS_AS(kvc::CacheModel<kvc::KvCache<>>(
                      "", geometry, kvc::CacheOptions{.budget = kvc::Budget::tokens(8)}),
                  kvc::BudgetError);
}
