// Internal to rings/: the free id lists of SplitQueue (descriptor ids) and
// PackedQueue (buffer ids), both a singly linked list through a member of
// the per-id shadow entry, ended by the queue size.
#pragma once

#include <cstdint>
#include <vector>

namespace uvirtio::rings::detail {

// One past the highest id with a chain in flight (0 when none): after a
// reset, handing ids out from there leaves the dropped ones for last.
template <class Extra>
std::uint16_t after_ids_in_flight(const std::vector<Extra>& extra, std::uint16_t size) {
  std::uint32_t after = 0;
  for (std::uint16_t i = 0; i < size; ++i)
    if (extra[i].chain_len != 0) after = i + 1u;
  return static_cast<std::uint16_t>(after % size);
}

// Links every id free, in the order first .. size-1, 0 .. first-1 (size
// ends the list); returns the list's head (first). first < size.
template <class Extra, class Link>
std::uint16_t link_free_ids(std::vector<Extra>& extra, std::uint16_t size, std::uint16_t first,
                            Link Extra::*next) {
  for (std::uint16_t i = 0; i < size; ++i) extra[i].*next = static_cast<Link>(i + 1);
  if (first != 0) {
    extra[size - 1].*next = 0;
    extra[first - 1].*next = size;
  }
  return first;
}

}  // namespace uvirtio::rings::detail
