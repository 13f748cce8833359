// Tests of kvc/core/error.hpp: the hierarchy users catch, and formatted messages.
#include <kvc/core/error.hpp>

#include <catch2/catch.hpp>

TEST_CASE("every kvc error is a kvc::Error and a std::runtime_error", "[error]") {
  CHECK_THROWS_AS(kvc::detail::fail<kvc::ShapeError>("x {}", 1), kvc::Error);
  CHECK_THROWS_AS(kvc::detail::fail<kvc::SequenceError>("x"), kvc::Error);
  CHECK_THROWS_AS(kvc::detail::fail<kvc::BudgetError>("x"), std::runtime_error);
  CHECK_THROWS_AS(kvc::detail::fail<kvc::UnsupportedError>("x"), kvc::UnsupportedError);
  CHECK_THROWS_AS(kvc::detail::fail<kvc::ValueError>("x"), kvc::ValueError);
  CHECK_THROWS_WITH(
      kvc::detail::fail<kvc::ShapeError>("append: k has {} kv heads, cache has {}", 7, 8),
      "append: k has 7 kv heads, cache has 8");
}
