// Tests of kvc/core/concepts.hpp: an archetype per role satisfies its concept, each
// shipped default does, and a type missing one member fails exactly the named piece.
#include <kvc/kvc.hpp>

#include <catch2/catch.hpp>

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

namespace archetype {

// The minimum each role asks for, nothing more.
struct Scorer {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() { return "archetype"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void score(const HeadState&, const kvc::ScoreContext&, std::span<float>) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
};

struct Planner {
  static constexpr std::string_view name() { return "archetype"; }
  void plan_layer(const kvc::LayerPlan&, std::span<std::size_t>) {}
};

struct Quantizer {
  static constexpr std::string_view name() { return "archetype"; }
  std::size_t key_bytes(std::size_t) const { return 1; }
  std::size_t value_bytes(std::size_t) const { return 1; }
  bool supports_head_dim(std::size_t) const { return true; }
  template <class T>
  void encode_key(const T*, std::size_t, std::byte*) const {}
  template <class T>
  void encode_value(const T*, std::size_t, std::byte*) const {}
  void decode_key(const std::byte*, std::size_t, float*) const {}
  void decode_value(const std::byte*, std::size_t, float*) const {}
  void score_tile(const kvc::ScoreTile&) const {}
  void accumulate_tile(const kvc::AccumulateTile&) const {}
};

struct SelectiveIndex {
  struct HeadState {};
  static constexpr bool reads_all = false;
  static constexpr std::string_view name() { return "archetype"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
  void select_pages(const HeadState&, const kvc::SelectContext&, std::vector<std::uint32_t>&) {}
};

struct Offload {
  static constexpr bool enabled = true;
  static constexpr std::string_view name() { return "archetype"; }
  bool put(const kvc::PageKey&, std::span<const std::byte>) { return true; }
  bool get(const kvc::PageKey&, std::span<std::byte>) { return true; }
  void erase(const kvc::PageKey&) {}
};

struct Backend {
  static constexpr bool host_accessible = true;
  static constexpr std::string_view name() { return "archetype"; }
  std::byte* allocate(std::size_t) { return nullptr; }
  void deallocate(std::byte*, std::size_t) {}
};

// One member missing each.
struct ScorerWithoutScore {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() { return "broken"; }
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
};
struct QuantizerWithoutHalfInput : Quantizer {
  using Quantizer::encode_key;
  void encode_key(const Eigen::half*, std::size_t, std::byte*) const = delete;
};
struct IndexWithoutSelect {
  struct HeadState {};
  static constexpr bool reads_all = false;
  static constexpr std::string_view name() { return "broken"; }
};
struct Unnamed {
  void plan_layer(const kvc::LayerPlan&, std::span<std::size_t>) {}
};

}  // namespace archetype

// Archetypes satisfy their role.
static_assert(kvc::EvictionScorer<archetype::Scorer>);
static_assert(kvc::BudgetPlanner<archetype::Planner>);
static_assert(kvc::Quantizer<archetype::Quantizer>);
static_assert(kvc::RetrievalIndex<archetype::SelectiveIndex>);
static_assert(kvc::OffloadBackend<archetype::Offload>);
static_assert(kvc::ComputeBackend<archetype::Backend>);

// The shipped policies satisfy theirs.
static_assert(kvc::EvictionScorer<kvc::evict::Full>);
static_assert(kvc::EvictionScorer<kvc::evict::StreamingLLM>);
static_assert(kvc::EvictionScorer<kvc::evict::H2O>);
static_assert(kvc::ConsumesAttention<kvc::evict::H2O>);
static_assert(!kvc::ConsumesAttention<kvc::evict::StreamingLLM>);
static_assert(kvc::BudgetPlanner<kvc::budget::Uniform>);
static_assert(kvc::Quantizer<kvc::quant::Dense<float>>);
static_assert(kvc::Quantizer<kvc::quant::Dense<Eigen::half>>);
static_assert(kvc::Quantizer<kvc::quant::Dense<Eigen::bfloat16>>);
static_assert(kvc::RetrievalIndex<kvc::retrieval::Exhaustive>);
static_assert(kvc::OffloadBackend<kvc::offload::None>);
static_assert(kvc::ComputeBackend<kvc::backend::Cpu>);

// A missing member fails the role *and* the named part that says which member.
static_assert(!kvc::EvictionScorer<archetype::ScorerWithoutScore>);
static_assert(!kvc::ScoresTokens<archetype::ScorerWithoutScore>);
static_assert(kvc::TracksAppends<archetype::ScorerWithoutScore>);
static_assert(!kvc::Quantizer<archetype::QuantizerWithoutHalfInput>);
static_assert(!kvc::EncodesFrom<archetype::QuantizerWithoutHalfInput, Eigen::half>);
static_assert(kvc::EncodesFrom<archetype::QuantizerWithoutHalfInput, float>);
static_assert(!kvc::RetrievalIndex<archetype::IndexWithoutSelect>);
static_assert(!kvc::SelectsPages<archetype::IndexWithoutSelect>);
static_assert(!kvc::BudgetPlanner<archetype::Unnamed>);
static_assert(!kvc::NamedPolicy<archetype::Unnamed>);
static_assert(kvc::PlansLayers<archetype::Unnamed>);

// Roles are not interchangeable.
static_assert(!kvc::EvictionScorer<kvc::quant::Dense<float>>);
static_assert(!kvc::Quantizer<kvc::evict::H2O>);

// Defaults are empty and cost the cache nothing ([[no_unique_address]]): swapping one empty
// policy for another does not change the cache's size.
static_assert(std::is_empty_v<kvc::evict::Full> && std::is_empty_v<kvc::quant::Dense<float>> &&
              std::is_empty_v<kvc::retrieval::Exhaustive> && std::is_empty_v<kvc::offload::None> &&
              std::is_empty_v<kvc::budget::Uniform> && std::is_empty_v<kvc::backend::Cpu>);
static_assert(sizeof(kvc::KvCache<>) ==
              sizeof(kvc::KvCache<kvc::evict::Full, kvc::quant::Dense<Eigen::half>,
                                  kvc::retrieval::Exhaustive, kvc::offload::None>));

TEST_CASE("policy archetypes plug into KvCache", "[concepts]") {
  // Compiles only if KvCache accepts every role's archetype; the run proves the selective
  // index and the archetype scorer drive a real cache without touching its memory.
  kvc::KvCache<archetype::Scorer, kvc::quant::Dense<float>, archetype::SelectiveIndex,
               archetype::Offload, archetype::Planner>
      cache({.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 8});
  const auto seq = cache.open_sequence();
  std::vector<float> k(8, 1.0F);
  cache.append(seq, 0, kvc::View<const float, 3>(k.data(), {1, 1, 8}),
               kvc::View<const float, 3>(k.data(), {1, 1, 8}));
  std::vector<float> out(8, 0.0F);
  cache.attend(seq, 0, kvc::View<const float, 3>(k.data(), {1, 1, 8}),
               kvc::View<float, 3>(out.data(), {1, 1, 8}));
  // One token: attention is exactly that token's value.
  for (float x : out) CHECK(x == 1.0F);
  // The archetype planner gives every head budget 0: compress empties the layer.
  cache.compress(seq);
  CHECK(cache.tokens(seq, 0, 0) == 0);
}
