// Tests of kvc/offload/none.hpp: the tier that holds nothing declines every page.
#include <kvc/offload/none.hpp>

#include <catch2/catch.hpp>

#include <array>

TEST_CASE("offload::None declines puts and has nothing to get", "[offload]") {
  kvc::offload::None none;
  static_assert(!kvc::offload::None::enabled);
  std::array<std::byte, 8> bytes{};
  CHECK_FALSE(none.put(kvc::PageKey{1, 2, 3, 4}, bytes));
  CHECK_FALSE(none.get(kvc::PageKey{1, 2, 3, 4}, bytes));
}
