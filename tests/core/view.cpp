// Tests of kvc/core/view.hpp: contiguous and strided indexing, const conversion.
#include <kvc/core/view.hpp>

#include <catch2/catch.hpp>

#include <numeric>
#include <vector>

TEST_CASE("View indexes row-major contiguous data", "[view]") {
  std::vector<int> data(2 * 3 * 4);
  std::iota(data.begin(), data.end(), 0);
  const kvc::View<int, 3> view(data.data(), {2, 3, 4});
  CHECK(view.size() == 24);
  CHECK(view.stride(0) == 12);
  CHECK(view.stride(1) == 4);
  CHECK(view.stride(2) == 1);
  CHECK(view(1, 2, 3) == 23);
  CHECK(view(0, 1, 0) == 4);
  CHECK(view.pointer(1) == data.data() + 12);
  view(1, 0, 0) = -1;
  CHECK(data[12] == -1);
  const kvc::View<const int, 3> read_only = view;  // non-const → const converts
  CHECK(read_only(1, 0, 0) == -1);
}

TEST_CASE("View follows explicit strides (a token slice of a larger tensor)", "[view]") {
  std::vector<float> data(2 * 10 * 4);
  std::iota(data.begin(), data.end(), 0.0F);
  // Tokens 3..5 of each of 2 heads of a [2][10][4] tensor.
  const kvc::View<const float, 3> slice(data.data() + 3 * 4, {2, 3, 4}, {40, 4, 1});
  CHECK(slice(0, 0, 0) == 12.0F);
  CHECK(slice(1, 2, 3) == data[40 + 5 * 4 + 3]);
}
