// Tests of kvc/runtime/recipe.hpp: the grammar (round trips, canonical form, every error
// and its message), caches built from recipes against the same KvCache built directly
// (outputs bit for bit, kept positions, bytes), the catalog, budgets and custom registries.
#include <kvc/runtime/recipe.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;

// K, V and Q for a prompt followed by decode steps, per (step, layer), from a fixed seed.
struct Workload {
  kvc::Geometry geometry;
  std::vector<std::vector<Tensor3>> k, v, q;  // [step][layer]

  Workload(kvc::Geometry g, std::size_t prompt, std::size_t steps, unsigned seed) : geometry(g) {
    std::mt19937 rng(seed);
    for (std::size_t s = 0; s <= steps; ++s) {
      const std::size_t n = s == 0 ? prompt : 1;
      k.emplace_back();
      v.emplace_back();
      q.emplace_back();
      for (std::size_t l = 0; l < g.layers; ++l) {
        k.back().push_back(random_tensor(rng, g.kv_heads, n, g.head_dim));
        v.back().push_back(random_tensor(rng, g.kv_heads, n, g.head_dim));
        q.back().push_back(random_tensor(rng, g.q_heads, n, g.head_dim));
      }
    }
  }
};

// Runs the workload on a KvCache or an AnyCache (same member names): append, observe the
// prompt's last `observe_window` queries if non-zero, attend. Returns every output.
template <class Cache>
std::vector<float> run(Cache& cache, kvc::SequenceId seq, const Workload& work,
                       std::size_t observe_window = 0) {
  std::vector<float> outputs;
  for (std::size_t s = 0; s < work.k.size(); ++s) {
    for (std::size_t l = 0; l < work.geometry.layers; ++l) {
      const Tensor3& q = work.q[s][l];
      cache.append(seq, l, work.k[s][l].view(), work.v[s][l].view());
      if (s == 0 && observe_window > 0) {
        cache.observe(seq, l, q.slice(q.tokens - observe_window, observe_window));
      }
      Tensor3 out(q.heads, q.tokens, q.dim);
      cache.attend(seq, l, q.view(), out.mutable_view());
      outputs.insert(outputs.end(), out.data.begin(), out.data.end());
    }
  }
  return outputs;
}

bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string error_of(std::string_view recipe) {
  try {
    (void)kvc::parse_recipe(recipe);
  } catch (const kvc::ValueError& error) {
    return error.what();
  }
  return "(no error)";
}

// The recipe cache as its concrete type (throws std::bad_cast if it is another one).
template <class Scorer, class Quant>
auto& concrete(kvc::AnyCache& cache) {
  return dynamic_cast<kvc::CacheModel<kvc::RecipeCache<Scorer, Quant>>&>(cache).cache();
}

template <class Direct>
void check_same_cache(kvc::AnyCache& recipe_cache, Direct& direct, const Workload& work,
                      std::size_t observe_window = 0) {
  using Scorer = typename Direct::scorer_type;
  using Quant = typename Direct::quantizer_type;
  const auto seq = recipe_cache.open_sequence();
  const auto direct_seq = direct.open_sequence();
  CHECK(bit_identical(run(recipe_cache, seq, work, observe_window),
                      run(direct, direct_seq, work, observe_window)));
  auto& cache = concrete<Scorer, Quant>(recipe_cache);
  for (std::size_t l = 0; l < work.geometry.layers; ++l) {
    for (std::size_t h = 0; h < work.geometry.kv_heads; ++h) {
      CHECK(cache.positions(seq, l, h) == direct.positions(direct_seq, l, h));
    }
  }
  const kvc::CacheStats a = recipe_cache.stats(), b = direct.stats();
  CHECK(a.tokens_seen == b.tokens_seen);
  CHECK(a.tokens_stored == b.tokens_stored);
  CHECK(a.tokens_per_head == b.tokens_per_head);
  CHECK(a.pages_in_use == b.pages_in_use);
  CHECK(a.code_bytes == b.code_bytes);
  CHECK(a.page_bytes == b.page_bytes);
  CHECK(a.metadata_bytes == b.metadata_bytes);
  CHECK(a.scorer == b.scorer);
  CHECK(a.quantizer == b.quantizer);
}

// "a, b, c": the names of one role in the catalog, in table order, each once.
std::string known(kvc::RecipeInfo::Role role) {
  std::string text;
  std::set<std::string> seen;
  for (const kvc::RecipeInfo& info : kvc::recipe_catalog()) {
    if (info.role != role || !seen.insert(info.name).second) continue;
    text += (text.empty() ? "" : ", ") + info.name;
  }
  return text;
}

const kvc::Geometry small{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 32};

}  // namespace

// ---- the grammar --------------------------------------------------------------------------

TEST_CASE("parse_recipe reads the grammar's examples into their parts", "[recipe]") {
  const kvc::RecipeSpec full = kvc::parse_recipe("full");
  CHECK(full.scorer == "full");
  CHECK(!full.budget);
  CHECK(full.planner == "uniform");
  CHECK(full.quantizer == "f32");
  CHECK(full.settings.empty());

  const kvc::RecipeSpec ratio = kvc::parse_recipe("h2o:budget=0.25");
  REQUIRE(ratio.budget);
  CHECK(ratio.budget->kind() == kvc::Budget::Kind::ratio);
  CHECK(ratio.budget->fraction() == 0.25);

  const kvc::RecipeSpec tokens = kvc::parse_recipe("snapkv:budget=512,window=32");
  REQUIRE(tokens.budget);
  CHECK(tokens.budget->kind() == kvc::Budget::Kind::tokens);
  CHECK(tokens.budget->token_count() == 512);
  CHECK(tokens.settings == std::vector<kvc::RecipeSetting>{{"window", "32"}});

  // An integer is tokens, a number with a '.' a ratio: "1" and "1.0" differ.
  CHECK(kvc::parse_recipe("tova:budget=1").budget->kind() == kvc::Budget::Kind::tokens);
  CHECK(kvc::parse_recipe("tova:budget=1.0").budget->kind() == kvc::Budget::Kind::ratio);
  CHECK(kvc::parse_recipe("tova:budget=5e-1").budget->fraction() == 0.5);

  const kvc::RecipeSpec alone = kvc::parse_recipe("int8");
  CHECK(alone.scorer == "full");
  CHECK(alone.quantizer == "int8");
  CHECK(alone.quantizer_settings.empty());

  const kvc::RecipeSpec pyramid = kvc::parse_recipe("h2o:budget=0.25,planner=pyramid,beta=10");
  CHECK(pyramid.planner == "pyramid");
  CHECK(pyramid.settings == std::vector<kvc::RecipeSetting>{{"beta", "10"}});

  const kvc::RecipeSpec both = kvc::parse_recipe("snapkv:budget=512+q4_0");
  CHECK(both.scorer == "snapkv");
  CHECK(both.quantizer == "q4_0");

  const kvc::RecipeSpec grouped = kvc::parse_recipe("h2o:budget=0.25+int8:group=32");
  CHECK(grouped.quantizer_settings == std::vector<kvc::RecipeSetting>{{"group", "32"}});
}

TEST_CASE("parse_recipe round-trips through the canonical form", "[recipe]") {
  // {as written, canonical}: defaults dropped, declaration order, one spelling per number.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"full", "full"},
      {"streaming:sink=4,window=256", "streaming:window=256"},
      {"streaming:sink=2,window=30", "streaming:sink=2,window=30"},
      {"h2o:budget=0.25", "h2o:budget=0.25"},
      {"snapkv:budget=512,window=32", "snapkv:budget=512,window=32"},
      {"snapkv:pooling=max,kernel=7,window=32,budget=512",
       "snapkv:budget=512,window=32,kernel=7,pooling=max"},
      {"tova:budget=0.5", "tova:budget=0.5"},
      {"knorm:budget=0.25", "knorm:budget=0.25"},
      {"keydiff:budget=0.25,recent=8", "keydiff:budget=0.25,recent=8"},
      {"h2o:budget=0.25,planner=pyramid", "h2o:budget=0.25,planner=pyramid"},
      {"h2o:budget=0.25,planner=uniform", "h2o:budget=0.25"},
      {"h2o:budget=64,recent=0.50", "h2o:budget=64"},
      {"h2o:budget=64,recent=16", "h2o:budget=64,recent=16"},
      {"h2o:budget=0.250,planner=pyramid,beta=20.0,pyramid_window=032",
       "h2o:budget=0.25,planner=pyramid,pyramid_window=32"},
      {"h2o:budget=1.0", "h2o:budget=1.0"},
      {"int8", "full+int8"},
      {"int8:group=0", "full+int8"},
      {"+int8:group=32", "full+int8:group=32"},
      {"full+f32", "full"},
      {"snapkv:budget=512+q4_0", "snapkv:budget=512+q4_0"},
      {"h2o:budget=0.25+int8", "h2o:budget=0.25+int8"},
      {"h2o+bf16", "h2o+bf16"},  // no budget: make_cache takes CacheOptions::budget
      {"windowkv:budget=0.25,block=8,window=32", "windowkv:budget=0.25,window=32"},
      {"duo", "duo:planner=duo"},  // duo always names its own planner
      {"duo:planner=duo,recent=256,retrieval_every=4", "duo:planner=duo,retrieval_every=4"},
  };
  for (const auto& [written, canonical] : cases) {
    INFO(written);
    const kvc::RecipeSpec spec = kvc::parse_recipe(written);
    CHECK(spec.to_string() == canonical);
    CHECK(kvc::parse_recipe(canonical) == spec);
    CHECK(kvc::parse_recipe(canonical).to_string() == canonical);
  }
  CHECK(kvc::parse_recipe("h2o:budget=1") != kvc::parse_recipe("h2o:budget=1.0"));
  CHECK(kvc::parse_recipe("h2o:budget=64") != kvc::parse_recipe("h2o:budget=64+f16"));
  CHECK(kvc::parse_recipe("snapkv:budget=64") != kvc::parse_recipe("snapkv:budget=64,window=32"));
}

TEST_CASE("bad recipes throw ValueError naming the bad token and what exists", "[recipe]") {
  struct Case {
    std::string recipe;
    std::vector<std::string> mentions;
  };
  const std::vector<Case> cases = {
      {"h3o:budget=0.25",
       {"unknown scorer 'h3o' in recipe 'h3o:budget=0.25'; known: full, streaming", "SCORERS"}},
      {"h2o:budget=0.25+h3o",
       {"unknown quantizer 'h3o' in recipe 'h2o:budget=0.25+h3o'", "QUANTIZERS"}},
      {"int8:group=16", {"no quantizer 'int8' with group=16", "group=0|32"}},
      {"q4_0:group=32", {"unknown parameter 'group' for quantizer 'q4_0'", "no parameters"}},
      {"kivi:bits=3", {"no quantizer 'kivi' with bits=3", "bits=2|4"}},
      {"think:rank=8", {"unknown parameter 'rank' for quantizer 'think'", "lambda"}},
      {"snapkv:budget=64,windw=8",
       {"unknown parameter 'windw' for scorer 'snapkv'",
        "snapkv takes: budget, planner, window, kernel, pooling"}},
      {"h2o:budget=64,planner=pyramid,windw=8",
       {"unknown parameter 'windw'", "budget, planner, recent, pyramid_window, beta"}},
      {"h2o:budget=64,planner=pyramd", {"unknown planner 'pyramd'", "PLANNERS"}},
      {"h2o:budget=64,beta=3", {"'beta'", "belongs to planner 'pyramid'", "add planner=pyramid"}},
      {"full:budget=64", {"unknown parameter 'budget' for scorer 'full'", "no parameters"}},
      {"snapkv:budget=64,window=3x", {"malformed value '3x' for 'window'", "an unsigned integer"}},
      {"snapkv:budget=64,window=-3", {"malformed value '-3' for 'window'"}},
      {"h2o:budget=4,planner=pyramid,pyramid_window=1e3", {"malformed value '1e3'"}},
      {"h2o:budget=4,planner=pyramid,beta=inf", {"malformed value 'inf' for 'beta'", "finite"}},
      {"snapkv:budget=64,pooling=mean", {"bad value 'mean' for 'pooling'", "avg|max"}},
      {"h2o:budget=0.2.5", {"malformed budget '0.2.5'"}},
      {"h2o:budget=abc", {"malformed budget 'abc'"}},
      {"h2o:budget=99999999999999999999999", {"malformed budget '99999999999999999999999'"}},
      {"h2o:budget=64,budget=32", {"duplicate parameter 'budget'"}},
      {"snapkv:budget=64,window=8,window=8", {"duplicate parameter 'window'"}},
      {"h2o:budget=0", {"budget '0'", "0 tokens"}},
      {"h2o:budget=0.0", {"budget '0.0'", "outside (0, 1]"}},
      {"h2o:budget=1.5", {"budget '1.5'", "outside (0, 1]"}},
      {"h2o:budget=64,recent=1.5", {"recent=1.5", "ratio above 1"}},
      {"snapkv:budget=64,kernel=4", {"recipe 'snapkv:budget=64,kernel=4'", "kernel 4 is even"}},
      {"h2o:budget=4,planner=pyramid,beta=0.5", {"beta 0.5 is below 1"}},
      {"h2o:budget=4,planner=adakv,alpha=2", {"alpha 2 is outside [0, 1]"}},
      {"h2o:budget=4,alpha=0.5", {"'alpha'", "belongs to planner 'adakv'", "add planner=adakv"}},
      {"streaming:budget=64,window=60", {"budget or window", "not both"}},
      {"streaming:sink=0,window=0", {"recipe 'streaming:sink=0,window=0'", "0 tokens"}},
      {"duo:budget=64,planner=uniform",
       {"scorer 'duo' always uses planner 'duo'", "drop planner=uniform"}},
      {"duo:retrieval_every=0", {"recipe 'duo:retrieval_every=0'", "retrieval_every is 0"}},
      {"windowkv:budget=64,block=0", {"block (window size c) is 0"}},
      {"", {"empty recipe", "full, streaming", "f32, f16"}},
      {"h2o: budget=64", {"whitespace", "offset 4"}},
      {"h2o:budget=64+int8+f16", {"more than one '+'"}},
      {"h2o:", {"empty parameter list after 'h2o:'"}},
      {"h2o:budget", {"parameter 'budget'", "has no value"}},
      {"h2o:budget=64,", {"stray ','"}},
      {"h2o:=64", {"malformed parameter '=64'"}},
      {"h2o:budget=6=4", {"malformed parameter 'budget=6=4'"}},
      {"h2o:budget=64+", {"empty quantizer name after '+'"}},
      {":budget=64", {"empty scorer name"}},
  };
  // The lists grow with the tables; the ones of the issue are a prefix of them.
  const std::string scorers = known(kvc::RecipeInfo::Role::scorer);
  const std::string planners = known(kvc::RecipeInfo::Role::planner);
  const std::string quantizers = known(kvc::RecipeInfo::Role::quantizer);
  REQUIRE(scorers.rfind("full, streaming, h2o, snapkv, tova, knorm, keydiff", 0) == 0);
  REQUIRE(planners.rfind("uniform, pyramid", 0) == 0);
  REQUIRE(quantizers.rfind("f32, f16, bf16, int8, q8_0, q4_0", 0) == 0);
  const std::map<std::string, std::string> lists = {
      {"SCORERS", "known: " + scorers + " (or a quantizer alone: " + quantizers + ")"},
      {"PLANNERS", "known: " + planners},
      {"QUANTIZERS", "known: " + quantizers}};
  for (Case c : cases) {
    for (std::string& mention : c.mentions) {
      if (lists.count(mention) != 0) mention = lists.at(mention);
    }
    INFO(c.recipe);
    CHECK_THROWS_AS(kvc::parse_recipe(c.recipe), kvc::ValueError);
    const std::string message = error_of(c.recipe);
    for (const std::string& mention : c.mentions) {
      INFO(message);
      CHECK(message.find(mention) != std::string::npos);
    }
  }
}

// ---- caches built from recipes ------------------------------------------------------------

TEST_CASE("make_cache of full is exactly KvCache<>, same type and same bits", "[recipe]") {
  const Workload work(small, 37, 5, 11);
  const auto cache = kvc::make_cache("full", small);
  REQUIRE(dynamic_cast<kvc::CacheModel<kvc::KvCache<>>*>(cache.get()) != nullptr);
  CHECK(cache->recipe() == "full");
  kvc::KvCache<> direct(small);
  check_same_cache(*cache, direct, work);
  CHECK(cache->stats().tokens_stored == small.layers * small.kv_heads * 42);
}

TEST_CASE("a recipe keeps exactly what the KvCache it names keeps", "[recipe]") {
  const Workload work(small, 200, 30, 12);
  SECTION("h2o:budget=64 is KvCache<H2O> with Budget::tokens(64)") {
    const auto cache = kvc::make_cache("h2o:budget=64", small);
    kvc::KvCache<kvc::evict::H2O> direct(small, {.budget = kvc::Budget::tokens(64)});
    check_same_cache(*cache, direct, work);
    CHECK(cache->stats().tokens_stored == small.layers * small.kv_heads * 64);
  }
  SECTION("h2o with a ratio and a recent window in tokens") {
    const auto cache = kvc::make_cache("h2o:budget=0.2,recent=8", small);
    kvc::KvCache<kvc::evict::H2O> direct(small, {.budget = kvc::Budget::ratio(0.2)},
                                         kvc::evict::H2O({.recent_tokens = 8}));
    check_same_cache(*cache, direct, work);
  }
  SECTION("streaming:sink=2,window=30 is StreamingLLM({.sink = 2}) with 32 tokens") {
    const auto cache = kvc::make_cache("streaming:sink=2,window=30", small);
    kvc::KvCache<kvc::evict::StreamingLLM> direct(small, {.budget = kvc::Budget::tokens(32)},
                                                  kvc::evict::StreamingLLM({.sink = 2}));
    check_same_cache(*cache, direct, work);
    CHECK(cache->options().budget.token_count() == 32);
  }
  SECTION("snapkv with a window, kernel and max pooling, observing the prompt") {
    const auto cache = kvc::make_cache("snapkv:budget=48,window=16,kernel=7,pooling=max", small);
    kvc::KvCache<kvc::evict::SnapKV> direct(
        small, {.budget = kvc::Budget::tokens(48)},
        kvc::evict::SnapKV(
            {.window = 16, .kernel = 7, .pooling = kvc::evict::SnapKV::Pooling::max}));
    check_same_cache(*cache, direct, work, 16);
  }
  SECTION("d2o is KvCache<D2O<H2O>> with the merge threshold's weights") {
    const auto cache = kvc::make_cache("d2o:budget=48,recent=8,merge_alpha=0.25", small);
    kvc::KvCache<kvc::evict::D2O<kvc::evict::H2O>> direct(
        small, {.budget = kvc::Budget::tokens(48)},
        kvc::evict::D2O<kvc::evict::H2O>(kvc::evict::H2O({.recent_tokens = 8}),
                                         {.alpha = 0.25, .beta = 0.5}));
    check_same_cache(*cache, direct, work);
  }
  SECTION("cake with the cake planner cascades as KvCache<CakeIndicator, ..., Cake>") {
    const auto cache =
        kvc::make_cache("cake:budget=40,planner=cake,cake_window=16,tau1=1.6,tau2=0.4", small);
    using Direct = kvc::KvCache<kvc::evict::CakeIndicator, kvc::quant::Dense<float>,
                                kvc::retrieval::Exhaustive, kvc::offload::None, kvc::budget::Cake>;
    Direct direct(small, {.budget = kvc::Budget::tokens(40)}, kvc::evict::CakeIndicator{}, {}, {},
                  {}, kvc::budget::Cake({.window = 16, .tau1 = 1.6, .tau2 = 0.4}));
    check_same_cache(*cache, direct, work, 16);
    // The layers' shares differ (CAKE's point) and sum to L·B per head.
    const kvc::CacheStats stats = cache->stats();
    CHECK(stats.tokens_stored == small.layers * small.kv_heads * 40);
  }
  SECTION("h2o with the prefixkv planner plans the layers together") {
    const auto cache = kvc::make_cache("h2o:budget=40,planner=prefixkv", small);
    using Direct =
        kvc::KvCache<kvc::evict::H2O, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                     kvc::offload::None, kvc::budget::PrefixKV>;
    Direct direct(small, {.budget = kvc::Budget::tokens(40)});
    check_same_cache(*cache, direct, work, 0);
    CHECK(cache->stats().tokens_stored == small.layers * small.kv_heads * 40);
  }
  SECTION("rot_q4_0 is Rotated<Q4_0> storage") {
    const auto cache = kvc::make_cache("h2o:budget=64+rot_q4_0", small);
    kvc::KvCache<kvc::evict::H2O, kvc::quant::Rotated<kvc::quant::Q4_0>> direct(
        small, {.budget = kvc::Budget::tokens(64)});
    check_same_cache(*cache, direct, work);
  }
  SECTION("snapkv with the pyramid planner is KvCache<SnapKV, ..., PyramidKV>") {
    const auto cache = kvc::make_cache(
        "snapkv:budget=64,window=16,planner=pyramid,pyramid_window=16,beta=5", small);
    using Direct =
        kvc::KvCache<kvc::evict::SnapKV, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                     kvc::offload::None, kvc::budget::PyramidKV>;
    Direct direct(small, {.budget = kvc::Budget::tokens(64)}, kvc::evict::SnapKV({.window = 16}),
                  {}, {}, {}, kvc::budget::PyramidKV({.window = 16, .beta = 5}));
    check_same_cache(*cache, direct, work, 16);
    auto& concrete_cache = concrete<kvc::evict::SnapKV, kvc::quant::Dense<float>>(*cache);
    CHECK(concrete_cache.planner().chosen_name() == "pyramid_kv");
    // The pyramid really is ragged: layer 0 keeps more than the last layer.
    const kvc::CacheStats stats = cache->stats();
    CHECK(stats.tokens(0, 0) > stats.tokens(small.layers - 1, 0));
  }
  SECTION("snapkv with the adakv planner is KvCache<SnapKV, ..., AdaKV>") {
    // RecipePlanner holds AdaKV among its choices, so it is PlansFromScores and asks the
    // chosen planner at run time; the scored path gives the same cache as AdaKV itself.
    const auto cache = kvc::make_cache("snapkv:budget=40,window=8,planner=adakv,alpha=0.1", small);
    using Direct = kvc::KvCache<kvc::evict::SnapKV, kvc::quant::Dense<float>,
                                kvc::retrieval::Exhaustive, kvc::offload::None, kvc::budget::AdaKV>;
    Direct direct(small, {.budget = kvc::Budget::tokens(40)}, kvc::evict::SnapKV({.window = 8}), {},
                  {}, {}, kvc::budget::AdaKV({.alpha = 0.1}));
    check_same_cache(*cache, direct, work, 8);
    auto& concrete_cache = concrete<kvc::evict::SnapKV, kvc::quant::Dense<float>>(*cache);
    CHECK(concrete_cache.planner().chosen_name() == "ada_kv");
    CHECK(concrete_cache.planner().wants_scores());
    // Ragged heads, H·B per layer.
    const kvc::CacheStats stats = cache->stats();
    bool ragged = false;
    for (std::size_t l = 0; l < small.layers; ++l) {
      std::size_t held = 0;
      for (std::size_t h = 0; h < small.kv_heads; ++h) {
        held += stats.tokens(l, h);
        ragged = ragged || stats.tokens(l, h) != stats.tokens(l, 0);
      }
      CHECK(held == small.kv_heads * 40);
    }
    CHECK(ragged);
    CHECK(stats.code_bytes == stats.tokens_stored * concrete_cache.bytes_per_token());
  }
  SECTION("with adakv among the choices, uniform is still planned without scores") {
    const auto cache = kvc::make_cache("snapkv:budget=40,window=8", small);
    CHECK_FALSE(
        concrete<kvc::evict::SnapKV, kvc::quant::Dense<float>>(*cache).planner().wants_scores());
    kvc::KvCache<kvc::evict::SnapKV> direct(small, {.budget = kvc::Budget::tokens(40)},
                                            kvc::evict::SnapKV({.window = 8}));
    check_same_cache(*cache, direct, work, 8);
  }
  SECTION("windowkv with a block, observing the prompt") {
    const auto cache = kvc::make_cache("windowkv:budget=45,window=16,block=4", small);
    kvc::KvCache<kvc::evict::WindowKV> direct(small, {.budget = kvc::Budget::tokens(45)},
                                              kvc::evict::WindowKV({.window = 16, .block = 4}));
    check_same_cache(*cache, direct, work, 16);
  }
  SECTION("duo brings its planner: retrieval heads keep all, streaming heads sink + recent") {
    const auto cache = kvc::make_cache("duo:sink=4,recent=20", small);
    CHECK(cache->recipe() == "duo:planner=duo,sink=4,recent=20");
    CHECK(cache->options().budget.token_count() == 24);
    using Direct =
        kvc::KvCache<kvc::evict::DuoAttention, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                     kvc::offload::None, kvc::budget::DuoAttention>;
    const auto roles = kvc::evict::HeadRoles::alternating(2);
    Direct direct(small, {.budget = kvc::Budget::tokens(24)},
                  kvc::evict::DuoAttention(roles, {.sink = 4}), {}, {}, {},
                  kvc::budget::DuoAttention(roles, {.sink = 4, .recent = 20}));
    check_same_cache(*cache, direct, work);
    auto& concrete_cache = concrete<kvc::evict::DuoAttention, kvc::quant::Dense<float>>(*cache);
    CHECK(concrete_cache.planner().chosen_name() == "duo_attention");
    const kvc::CacheStats stats = cache->stats();
    for (std::size_t l = 0; l < small.layers; ++l) {
      for (std::size_t h = 0; h < small.kv_heads; ++h) {
        CHECK(stats.tokens(l, h) == ((l + h) % 2 == 0 ? 230 : 24));
      }
    }
    // retrieval_every=1: every head retrieval, nothing evicted.
    const auto all = kvc::make_cache("duo:retrieval_every=1", small);
    const auto seq = all->open_sequence();
    run(*all, seq, work);
    CHECK(all->stats().tokens_stored == small.layers * small.kv_heads * 230);
  }
  SECTION("tova, knorm and keydiff with quantizers") {
    {
      const auto cache = kvc::make_cache("tova:budget=40+f16", small);
      kvc::KvCache<kvc::evict::TOVA, kvc::quant::Dense<Eigen::half>> direct(
          small, {.budget = kvc::Budget::tokens(40)});
      check_same_cache(*cache, direct, work);
    }
    {
      const auto cache = kvc::make_cache("knorm:budget=0.25,recent=4+int8", small);
      kvc::KvCache<kvc::evict::Knorm, kvc::quant::Int8<>> direct(
          small, {.budget = kvc::Budget::ratio(0.25)}, kvc::evict::Knorm({.recent = 4}));
      check_same_cache(*cache, direct, work);
    }
    {
      const auto cache = kvc::make_cache("keydiff:budget=50+q8_0", small);
      kvc::KvCache<kvc::evict::KeyDiff, kvc::quant::Q8_0> direct(
          small, {.budget = kvc::Budget::tokens(50)});
      check_same_cache(*cache, direct, work);
    }
  }
}

TEST_CASE("the recipe's policies default to the policies' own defaults", "[recipe]") {
  const auto defaults = [](const auto& parameters) {
    return kvc::RecipeArguments("test", "test", parameters, {});
  };
  using kvc::RecipeOptions;
  const auto snapkv = RecipeOptions<kvc::evict::SnapKV>::make(
                          defaults(RecipeOptions<kvc::evict::SnapKV>::parameters))
                          .options();
  CHECK(snapkv.window == kvc::evict::SnapKV{}.options().window);
  CHECK(snapkv.kernel == kvc::evict::SnapKV{}.options().kernel);
  CHECK(snapkv.pooling == kvc::evict::SnapKV{}.options().pooling);
  const auto h2o =
      RecipeOptions<kvc::evict::H2O>::make(defaults(RecipeOptions<kvc::evict::H2O>::parameters))
          .options();
  CHECK(h2o.recent_fraction == kvc::evict::H2O{}.options().recent_fraction);
  CHECK(h2o.recent_tokens == kvc::evict::H2O{}.options().recent_tokens);
  CHECK(RecipeOptions<kvc::evict::StreamingLLM>::make(
            defaults(RecipeOptions<kvc::evict::StreamingLLM>::parameters))
            .options()
            .sink == kvc::evict::StreamingLLM{}.options().sink);
  CHECK(
      RecipeOptions<kvc::evict::Knorm>::make(defaults(RecipeOptions<kvc::evict::Knorm>::parameters))
          .options()
          .recent == kvc::evict::Knorm{}.options().recent);
  CHECK(RecipeOptions<kvc::evict::KeyDiff>::make(
            defaults(RecipeOptions<kvc::evict::KeyDiff>::parameters))
            .options()
            .recent == kvc::evict::KeyDiff{}.options().recent);
  const auto pyramid = RecipeOptions<kvc::budget::PyramidKV>::make(
                           defaults(RecipeOptions<kvc::budget::PyramidKV>::parameters))
                           .options();
  CHECK(pyramid.window == kvc::budget::PyramidKV{}.options().window);
  CHECK(pyramid.beta == kvc::budget::PyramidKV{}.options().beta);
  CHECK(RecipeOptions<kvc::budget::AdaKV>::make(
            defaults(RecipeOptions<kvc::budget::AdaKV>::parameters))
            .options()
            .alpha == kvc::budget::AdaKV{}.options().alpha);
  const auto windowkv = RecipeOptions<kvc::evict::WindowKV>::make(
                            defaults(RecipeOptions<kvc::evict::WindowKV>::parameters))
                            .options();
  CHECK(windowkv.window == kvc::evict::WindowKV{}.options().window);
  CHECK(windowkv.kernel == kvc::evict::WindowKV{}.options().kernel);
  CHECK(windowkv.pooling == kvc::evict::WindowKV{}.options().pooling);
  CHECK(windowkv.block == kvc::evict::WindowKV{}.options().block);
  const auto duo_arguments = defaults(RecipeOptions<kvc::evict::DuoAttention>::parameters);
  const auto duo = RecipeOptions<kvc::evict::DuoAttention>::make(duo_arguments);
  CHECK(duo.options().sink == kvc::evict::DuoAttention{}.options().sink);
  CHECK(duo.roles() == kvc::evict::DuoAttention{}.roles());
  const auto duo_planner = RecipeOptions<kvc::evict::DuoAttention>::make_planner(duo_arguments);
  CHECK(duo_planner.options().sink == kvc::budget::DuoAttention{}.options().sink);
  CHECK(duo_planner.options().recent == kvc::budget::DuoAttention{}.options().recent);
  CHECK(duo_planner.roles() == kvc::budget::DuoAttention{}.roles());
}

TEST_CASE("the budget: the recipe's, else CacheOptions::budget, never for full", "[recipe]") {
  // The recipe's budget overrides the base options'; the rest of the options pass through.
  const auto overridden = kvc::make_cache("h2o:budget=8", small,
                                          {.budget = kvc::Budget::tokens(16), .page_tokens = 16});
  CHECK(overridden->options().budget.token_count() == 8);
  CHECK(overridden->options().page_tokens == 16);
  CHECK(overridden->recipe() == "h2o:budget=8");

  const auto from_base = kvc::make_cache("h2o", small, {.budget = kvc::Budget::ratio(0.5)});
  CHECK(from_base->options().budget.fraction() == 0.5);
  CHECK(from_base->recipe() == "h2o:budget=0.5");  // the budget it got, written in

  const auto full = kvc::make_cache("full", small, {.budget = kvc::Budget::tokens(16)});
  CHECK(full->options().budget.is_unlimited());

  CHECK_THROWS_AS(kvc::make_cache("h2o", small), kvc::ValueError);
  CHECK_THROWS_WITH(kvc::make_cache("snapkv:window=8", small),
                    Catch::Contains("recipe 'snapkv:window=8' sets no budget") &&
                        Catch::Contains("'snapkv:budget=0.25'"));
  // What only the geometry decides is KvCache's own error.
  CHECK_THROWS_AS(
      kvc::make_cache("q4_0", {.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 40}),
      kvc::UnsupportedError);
}

TEST_CASE("every catalog entry builds from its example and runs", "[recipe]") {
  const Workload work(small, 24, 2, 13);
  const std::vector<kvc::RecipeInfo> catalog = kvc::recipe_catalog();
  REQUIRE(catalog.size() == std::tuple_size_v<decltype(kvc::recipe_scorers)> +
                                std::tuple_size_v<decltype(kvc::recipe_planners)> +
                                std::tuple_size_v<decltype(kvc::recipe_quantizers)>);
  for (const kvc::RecipeInfo& info : catalog) {
    INFO(info.example);
    CHECK(!info.summary.empty());
    const auto cache = kvc::make_cache(info.example, small);
    CHECK(cache->recipe() == kvc::parse_recipe(info.example).to_string());
    const auto seq = cache->open_sequence();
    const std::vector<float> out = run(*cache, seq, work);
    CHECK(std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); }));
    const kvc::RecipeSpec spec = kvc::parse_recipe(info.example);
    const std::size_t seen = cache->tokens_seen(seq, 0);
    CHECK(seen == 26);
    for (std::size_t l = 0; l < small.layers; ++l) {
      for (std::size_t h = 0; h < small.kv_heads; ++h) {
        // budget=0.5 keeps ceil(0.5 · 26) = 13 (the pyramid falls back to uniform: 26 < w);
        // the duo planner keeps its retrieval heads ((l + h) even by default) whole.
        const bool whole = spec.scorer == "full" || (spec.planner == "duo" && (l + h) % 2 == 0);
        CHECK(cache->tokens(seq, l, h) == (whole ? seen : 13));
      }
    }
    for (const auto& parameter : info.parameters) {
      INFO(parameter.key);
      if (parameter.kind == kvc::RecipeValue::choice) {
        CHECK(parameter.choices.find(parameter.default_value) != std::string::npos);
      }
    }
  }
}

TEST_CASE("the catalog's names and keys do not collide", "[recipe]") {
  std::set<std::string> scorers, quantizers, scorer_keys, planner_keys;
  for (const kvc::RecipeInfo& info : kvc::recipe_catalog()) {
    for (const auto& parameter : info.parameters) {
      if (info.role == kvc::RecipeInfo::Role::scorer && parameter.key != "budget" &&
          parameter.key != "planner") {
        scorer_keys.insert(parameter.key);
      }
      if (info.role == kvc::RecipeInfo::Role::planner) {
        CHECK(parameter.key != "budget");
        CHECK(parameter.key != "planner");
        planner_keys.insert(parameter.key);
      }
    }
    if (info.role == kvc::RecipeInfo::Role::scorer) scorers.insert(info.name);
    if (info.role == kvc::RecipeInfo::Role::quantizer) quantizers.insert(info.name);
  }
  CHECK(scorers == std::set<std::string>{"full", "streaming", "h2o", "snapkv", "tova", "knorm",
                                         "keydiff", "keyformer", "lazy", "cake", "windowkv", "duo",
                                         "d2o"});
  CHECK(quantizers == std::set<std::string>{"f32", "f16", "bf16", "int8", "q8_0", "q4_0",
                                            "rot_q4_0", "fp8", "fp8_e5m2", "kivi", "lowrank",
                                            "think"});
  for (const std::string& name : scorers) CHECK(quantizers.count(name) == 0);
  for (const std::string& key : planner_keys) CHECK(scorer_keys.count(key) == 0);
}

TEST_CASE("stats bytes shrink as the budget shrinks", "[recipe]") {
  const Workload work(small, 256, 0, 14);
  const kvc::CacheOptions base{.page_tokens = 16};
  for (const std::string scorer : {"streaming", "h2o", "snapkv", "tova", "knorm", "keydiff"}) {
    for (const std::vector<std::string>& budgets :
         {std::vector<std::string>{"1.0", "0.5", "0.25", "0.125"},
          std::vector<std::string>{"192", "96", "48", "24"}}) {
      std::size_t previous_bytes = 0, previous_tokens = 0;
      for (std::size_t i = 0; i < budgets.size(); ++i) {
        const std::string recipe = scorer + ":budget=" + budgets[i] + "+f16";
        INFO(recipe);
        const auto cache = kvc::make_cache(recipe, small, base);
        run(*cache, cache->open_sequence(), work);
        const kvc::CacheStats stats = cache->stats();
        if (i > 0) {
          CHECK(stats.bytes_held() < previous_bytes);
          CHECK(stats.tokens_stored < previous_tokens);
        }
        previous_bytes = stats.bytes_held();
        previous_tokens = stats.tokens_stored;
      }
    }
  }
}

namespace {

// A quantizer recipe is the KvCache it names, bit for bit: alone, under h2o, and under
// snapkv with the prompt's last 16 queries observed (which is when think fits its channels).
// The prompt outlasts every fp32 window (kivi and lowrank keep the newest 128 tokens, think
// 32). A quantizer of token rows stores exactly key_bytes + value_bytes per token; the others
// also hold their windows and group parameters.
template <class Quant>
void check_quantizer(const std::string& name, Quant quant = {}) {
  INFO(name);
  const Workload work(small, 200, 6, 18);
  constexpr std::size_t window = 16;
  {
    const auto cache = kvc::make_cache(name, small);
    kvc::KvCache<kvc::evict::Full, Quant> direct(small, {}, {}, quant);
    check_same_cache(*cache, direct, work, window);
    const kvc::CacheStats stats = cache->stats();
    if constexpr (kvc::QuantizesTokens<Quant>) {
      const std::size_t per_token =
          quant.key_bytes(small.head_dim) + quant.value_bytes(small.head_dim);
      CHECK(stats.code_bytes == stats.tokens_stored * per_token);
    }
    CHECK(stats.quantizer == Quant::name());
  }
  {
    const auto cache = kvc::make_cache("h2o:budget=16+" + name, small);
    kvc::KvCache<kvc::evict::H2O, Quant> direct(small, {.budget = kvc::Budget::tokens(16)}, {},
                                                quant);
    check_same_cache(*cache, direct, work);
  }
  {
    const auto cache = kvc::make_cache("snapkv:budget=96,window=16+" + name, small);
    kvc::KvCache<kvc::evict::SnapKV, Quant> direct(small, {.budget = kvc::Budget::tokens(96)},
                                                   kvc::evict::SnapKV({.window = window}), quant);
    check_same_cache(*cache, direct, work, window);
  }
}

}  // namespace

TEST_CASE("quantizer names map to their types and bytes per token", "[recipe]") {
  check_quantizer<kvc::quant::Dense<float>>("f32");
  check_quantizer<kvc::quant::Dense<Eigen::half>>("f16");
  check_quantizer<kvc::quant::Dense<Eigen::bfloat16>>("bf16");
  check_quantizer<kvc::quant::Int8<>>("int8");
  check_quantizer<kvc::quant::Int8<32>>("int8:group=32");
  check_quantizer<kvc::quant::Q8_0>("q8_0");
  check_quantizer<kvc::quant::Q4_0>("q4_0");
  // Fewer bytes per token down the list, as the formats promise.
  std::vector<std::size_t> bytes;
  for (const std::string name : {"f32", "f16", "int8", "q8_0", "q4_0"}) {
    const auto cache = kvc::make_cache(name, small);
    run(*cache, cache->open_sequence(), Workload(small, 8, 0, 16));
    bytes.push_back(cache->stats().code_bytes);
  }
  CHECK(std::is_sorted(bytes.rbegin(), bytes.rend()));
  CHECK(std::adjacent_find(bytes.begin(), bytes.end()) == bytes.end());
}

TEST_CASE("kivi, lowrank and think recipes are their KvCaches", "[recipe]") {
  check_quantizer<kvc::quant::Kivi<2>>("kivi");
  check_quantizer<kvc::quant::Kivi<2>>("kivi:bits=2");
  check_quantizer<kvc::quant::Kivi<4>>("kivi:bits=4");
  check_quantizer<kvc::quant::LowRankKeys<>>("lowrank");
  check_quantizer("lowrank:rank=8", kvc::quant::LowRankKeys<>(8));
  check_quantizer<kvc::quant::Think<>>("think");
  check_quantizer("think:lambda=0.75", kvc::quant::Think<>(0.75F));
  // Fewer bytes per token: 2 bits below 4, rank 8 below 32, more pruning below less.
  const auto held = [](const std::string& name, std::size_t observe_window) {
    const auto cache = kvc::make_cache(name, small);
    run(*cache, cache->open_sequence(), Workload(small, 200, 0, 19), observe_window);
    return cache->stats().bytes_held();
  };
  CHECK(held("kivi:bits=2", 0) < held("kivi:bits=4", 0));
  CHECK(held("lowrank:rank=8", 0) < held("lowrank", 0));
  CHECK(held("think:lambda=0.75", 16) < held("think", 16));
  // Values only the policy can judge: a ValueError naming the recipe and the value.
  CHECK_THROWS_WITH(kvc::make_cache("lowrank:rank=0", small),
                    Catch::Contains("recipe 'lowrank:rank=0'") && Catch::Contains("rank 0"));
  CHECK_THROWS_WITH(kvc::make_cache("think:lambda=1.5", small),
                    Catch::Contains("recipe 'think:lambda=1.5'") && Catch::Contains("1.5"));
  // What only the geometry decides is KvCache's own error: rank 48 > head_dim 32.
  CHECK_THROWS_AS(kvc::make_cache("lowrank:rank=48", small), kvc::UnsupportedError);
}

// ---- a registry of one's own ---------------------------------------------------------------

namespace {

// Keeps the oldest tokens: a scorer the default registry does not know.
struct Oldest {
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "oldest"; }
  void on_append(HeadState&, const kvc::AppendEvent&) noexcept {}
  void score(const HeadState&, const kvc::ScoreContext& context,
             std::span<float> scores) const noexcept {
    for (std::size_t i = 0; i < scores.size(); ++i) {
      scores[i] = -static_cast<float>(context.positions[i]);
    }
  }
  void on_compact(HeadState&, std::span<const std::uint32_t>) noexcept {}
};

constexpr kvc::RecipeRegistry custom_recipes{
    std::tuple{kvc::RecipeEntry<kvc::evict::Full>{"full", "everything"},
               kvc::RecipeEntry<Oldest>{"oldest", "the oldest tokens"}},
    kvc::recipe_planners, std::tuple{kvc::RecipeEntry<kvc::quant::Dense<float>>{"f32", "fp32"}}};

}  // namespace

TEST_CASE("a registry of one's own adds a scorer without editing kvc", "[recipe]") {
  const auto cache = kvc::make_cache("oldest:budget=4", small, {}, custom_recipes);
  const auto seq = cache->open_sequence();
  run(*cache, seq, Workload(small, 10, 2, 17));
  const auto& concrete_cache = dynamic_cast<kvc::CacheModel<kvc::RecipeCache<
      Oldest, kvc::quant::Dense<float>, std::remove_const_t<decltype(custom_recipes)>>>&>(*cache)
                                   .cache();
  CHECK(concrete_cache.positions(seq, 0, 0) == std::vector<kvc::Position>{0, 1, 2, 3});
  // Only its own names exist in it.
  CHECK_THROWS_WITH(kvc::parse_recipe("h2o:budget=4", custom_recipes),
                    Catch::Contains("known: full, oldest (or a quantizer alone: f32)"));
  const auto catalog = kvc::recipe_catalog(custom_recipes);
  CHECK(catalog.size() == 2 + std::tuple_size_v<decltype(kvc::recipe_planners)> + 1);
}
