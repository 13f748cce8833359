// Tests of kvc/core/geometry.hpp: geometry validation and budget resolution.
#include <kvc/core/geometry.hpp>

#include <catch2/catch.hpp>

#include <limits>

TEST_CASE("Geometry validates its shape and computes the GQA group", "[geometry]") {
  const kvc::Geometry llama{.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128};
  CHECK_NOTHROW(llama.validate());
  CHECK(llama.group_size() == 4);
  CHECK_THROWS_WITH(
      (kvc::Geometry{.layers = 1, .q_heads = 8, .kv_heads = 0, .head_dim = 64}.validate()),
      "Geometry: kv_heads is 0");
  CHECK_THROWS_WITH(
      (kvc::Geometry{.layers = 1, .q_heads = 0, .kv_heads = 2, .head_dim = 64}.validate()),
      "Geometry: q_heads 0 is not a positive multiple of kv_heads 2");
}

TEST_CASE("Budget resolves tokens, ratios and unlimited", "[geometry][budget]") {
  CHECK(kvc::Budget::unlimited().resolve(10) == std::numeric_limits<std::size_t>::max());
  CHECK(kvc::Budget{}.is_unlimited());
  CHECK(kvc::Budget::tokens(512).resolve(10) == 512);
  CHECK(kvc::Budget::tokens(512).resolve(100000) == 512);
  const auto quarter = kvc::Budget::ratio(0.25);
  CHECK(quarter.resolve(100) == 25);
  CHECK(quarter.resolve(101) == 26);  // ceil
  CHECK(quarter.resolve(1) == 1);
  CHECK(quarter.resolve(0) == 1);  // never 0
  CHECK(kvc::Budget::ratio(1.0).resolve(77) == 77);
  CHECK_THROWS_AS(kvc::Budget::ratio(-0.5), kvc::BudgetError);
  CHECK_THROWS_AS(kvc::Budget::ratio(std::numeric_limits<double>::quiet_NaN()), kvc::BudgetError);
  CHECK_THROWS_WITH(kvc::Budget::tokens(0), "Budget::tokens: budget is 0 tokens");
}
